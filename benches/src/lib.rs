//! `gantry-bench`: the benchmark harness's parts.
//!
//! Today: [`mock`], a vLLM-faithful mock engine (`gantry mock`): vLLM 0.33's OpenAI HTTP
//! surface and error shapes, its Prometheus metrics, KV events on ZMQ in both wire forms with
//! replay, the NixlConnector P/D protocol, a paged KV cache with prefix caching and LRU
//! eviction, continuous batching with chunked prefill, a polynomial step-time model and fault
//! injection. Read `benches/tests/mock.rs` first. [`up`] runs mock engines behind the proxy
//! (`gantry up`). [`bench`] is the load generator, trace replayer and comparer (`gantry bench`):
//! read `benches/tests/bench.rs` for it.
#![forbid(unsafe_code)]

pub mod bench;
pub mod mock;
pub mod up;
