//! The vLLM KV-event protocol for Gantry, producer side, and vLLM's block hash.
//!
//! vLLM engines publish prefix-cache changes (blocks stored, removed, all cleared) as msgpack
//! batches on a ZMQ PUB socket, with a ROUTER socket that replays recent batches (spec
//! `vllm-protocols.md` §1). This crate currently holds what a byte-faithful mock engine
//! (`gantry mock`) needs:
//!
//! * [`events`]: the wire types ([`KvEventBatch`], [`KvEvent`], [`BlockStored`],
//!   [`BlockRemoved`]) and [`encode_batch`], which produces exactly msgspec's bytes in both the
//!   map form (vLLM >= 0.24) and the legacy array form (<= 0.23), see [`WireFormat`];
//! * [`publisher`]: [`Publisher`], a clone of vLLM 0.33's `ZmqEventPublisher` (sequence numbers,
//!   replay buffer and ROUTER replay with 0.33 or legacy framing, non-blocking publish);
//! * [`vllm_hash`]: vLLM's chained SHA-256 block hash over pickle or canonical CBOR, so the mock
//!   publishes the hashes vLLM would ([`hash_block`], [`none_hash`], [`digest_to_u64`]).
//!
//! Later it will also hold the event decoder and subscriber and the shared-memory prefix index
//! the router looks up.
//!
//! Read first: `worked_example_map_form` in `src/events/tests.rs` (the spec §1.9 bytes), then
//! `tests/publisher.rs` (live stream and replay over real libzmq sockets).

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
pub use events::{encode_batch, BlockRemoved, BlockStored, ExtraKey, KvEvent, KvEventBatch, WireFormat};
pub use publisher::{Publisher, PublisherConfig, PublisherError, PublisherStats, ReplayFraming};
pub use subscriber::{EngineSource, Subscriber, SubscriberError, SubscriberOptions, SubscriberStats};
pub use vllm_hash::{digest_to_u64, hash_block, hash_blocks, none_hash, VllmHashAlgo};
