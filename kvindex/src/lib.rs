//! Gantry's view of the engines' KV caches: the vLLM KV-event protocol and the shared-memory
//! prefix index the router reads.
//!
//! vLLM engines publish prefix-cache changes (blocks stored, removed, all cleared) as msgpack
//! batches on a ZMQ PUB socket, with a ROUTER socket that replays recent batches (spec
//! `vllm-protocols.md` §1). The path from an engine to a routing decision:
//!
//! * [`subscriber`]: a thread with real ZMQ SUB and DEALER sockets per engine and DP rank; it
//!   tracks sequence numbers (gap → replay, restart or unreachable replay → resync), and its
//!   [`EventApplier`](subscriber::EventApplier) turns events into block operations on a
//!   [`sink::BlockSink`], keeping a private `(engine, vLLM hash) → gantry hash` map;
//! * [`decode`]: the event decoder for both wire forms (tagged maps, legacy tagged arrays), by
//!   hand over the bytes: no input panics or allocates beyond the result;
//! * [`hash`]: Gantry's chained xxh3-64 block hash, shared by the proxy, the mock and the index;
//! * [`index`]: the prefix index in a memory-mapped segment (`/dev/shm` by default): one writer
//!   (the sink), lock-free readers on every core and in other processes.
//!
//! The producer side, for the mock engine (`gantry mock`):
//!
//! * [`events`]: the wire types ([`KvEventBatch`], [`KvEvent`], [`BlockStored`],
//!   [`BlockRemoved`]) and [`encode_batch`], which produces exactly msgspec's bytes in both the
//!   map form (vLLM >= 0.24) and the legacy array form (<= 0.23), see [`WireFormat`];
//! * [`publisher`]: [`Publisher`], a clone of vLLM 0.33's `ZmqEventPublisher` (sequence numbers,
//!   replay buffer and ROUTER replay with 0.33 or legacy framing, non-blocking publish);
//! * [`vllm_hash`]: vLLM's chained SHA-256 block hash over pickle or canonical CBOR, so the mock
//!   publishes the hashes vLLM would ([`hash_block`], [`none_hash`], [`digest_to_u64`]).
//!
//! Read first: `worked_example_map_form` in `src/events/tests.rs` (the spec §1.9 bytes), then
//! `tests/index.rs` (the index against a model), `tests/subscriber.rs` (events over real libzmq
//! sockets) and the loom tests at the end of `src/index/table.rs`.

#![deny(unsafe_code)] // allowed in `index::segment` (the mapping) and `index::table` (prefetch)

pub mod decode;
pub mod events;
pub mod hash;
pub mod index;
pub mod publisher;
pub mod sink;
pub mod subscriber;
mod sync;
pub mod vllm_hash;

pub use decode::{decode_batch, DecodeError, DecodedBatch, DecodedEvent};
pub use events::{
    encode_batch, extra_keys_hash, BlockRemoved, BlockStored, ExtraKey, KvEvent, KvEventBatch, WireFormat,
};
pub use publisher::{Publisher, PublisherConfig, PublisherError, PublisherStats, ReplayFraming};
pub use subscriber::{EngineSource, Subscriber, SubscriberError, SubscriberOptions, SubscriberStats};
pub use vllm_hash::{digest_to_u64, hash_block, hash_blocks, none_hash, VllmHashAlgo};
