//! Each `kv` pool's prefix index: a shared-memory segment written by one subscriber thread that
//! follows the pool's engines' KV events, read lock-free by every worker.
//!
//! The segment lives at `pool[].index_path` (default `/dev/shm/gantry-kvindex-<port>-<pool>`,
//! so `gantry index inspect` can read it while the proxy runs). Engines are registered under
//! their URL. The approximate tier is always on: engines without `kv_events` (or models without
//! a tokenizer) are routed on the proxy's own predictions (TTL [`APPROX_TTL_NO_EVENTS`]);
//! otherwise predictions are short-lived ([`APPROX_TTL_EVENTS`]) and cover a burst of sibling
//! requests arriving before the first stored event.
//!
//! Not yet: engines added by a reload or the admin API after the pool's index started are routed
//! on load alone (their events are not followed) until the proxy restarts; a pool whose index
//! settings change on reload keeps routing on load alone until restart too.
//!
//! If the segment cannot be created (another writer holds its lock, `/dev/shm` is missing), the
//! pool routes on load alone: the error is logged and `gantry_route_index_available{pool}` is 0.

use std::collections::HashMap;
use std::path::PathBuf;
use std::time::Duration;

use gantry_kvindex::hash::DEFAULT_SEED;
use gantry_kvindex::index::{IndexOptions, IndexReader, IndexWriter, Overlaps, Predictor};
use gantry_kvindex::sink::EngineSlot;
use gantry_kvindex::subscriber::{EngineSource, Subscriber};

use crate::config::PoolConf;

/// Prediction lifetime for pools whose engines publish no events.
pub const APPROX_TTL_NO_EVENTS: Duration = Duration::from_secs(120);
/// Prediction lifetime when events confirm the real state shortly after.
pub const APPROX_TTL_EVENTS: Duration = Duration::from_secs(5);

/// One pool's index: the running subscriber (which owns the writer) and what readers need.
pub struct PoolIndex {
    /// Segment file.
    pub path: PathBuf,
    /// Engine URL → slot.
    pub slots: HashMap<String, EngineSlot>,
    /// Hash seed shared with the subscriber.
    pub seed: u64,
    /// Sends predictions to the writer.
    pub predictor: Predictor,
    /// Engine slots of the segment (to size [`Overlaps`]).
    pub engine_slots: usize,
    subscriber: Subscriber,
}

impl std::fmt::Debug for PoolIndex {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PoolIndex").field("path", &self.path).field("slots", &self.slots).finish_non_exhaustive()
    }
}

impl PoolIndex {
    /// Creates the segment of `pool` and starts following its engines' events. `tokenized`:
    /// every model of the pool has a tokenizer (else its prompts hash as text, which only
    /// predictions can match, so predictions keep the long TTL).
    pub fn start(pool: &PoolConf, path: PathBuf, tokenized: bool) -> Result<PoolIndex, String> {
        let with_events = pool.engine.iter().filter(|e| e.kv_events.is_some()).count();
        let engine_slots = (pool.engine.len().max(1) * 2).next_power_of_two().clamp(64, 1024);
        let opts = IndexOptions {
            engine_slots,
            capacity: pool.index_capacity,
            approx_capacity: pool.index_capacity,
            approx_ttl: if tokenized && with_events == pool.engine.len() {
                APPROX_TTL_EVENTS
            } else {
                APPROX_TTL_NO_EVENTS
            },
            ..IndexOptions::default()
        };
        let mut writer = IndexWriter::create(&path, &opts).map_err(|e| format!("{}: {e}", path.display()))?;
        let mut slots = HashMap::new();
        let mut sources = Vec::new();
        for e in &pool.engine {
            let url = e.url.trim_end_matches('/').to_owned();
            let slot = writer.register_engine(&url).map_err(|e| format!("{}: {e}", path.display()))?;
            slots.insert(url.clone(), slot);
            if let Some(events) = &e.kv_events {
                sources.push(EngineSource {
                    slot,
                    name: url,
                    events: events.clone(),
                    replay: e.kv_replay.clone(),
                    block_size: pool.block_size,
                    seed: DEFAULT_SEED,
                    ..EngineSource::default()
                });
            }
        }
        let predictor = writer.predictor();
        let subscriber = Subscriber::spawn(sources, writer).map_err(|e| format!("pool `{}`: {e}", pool.name))?;
        tracing::info!(pool = %pool.name, path = %path.display(), engines = slots.len(), with_events, "kv index up");
        Ok(PoolIndex { path, slots, seed: DEFAULT_SEED, predictor, engine_slots, subscriber })
    }

    /// Events applied, gaps, resyncs and the like, summed over the pool's engines.
    pub fn event_counters(&self) -> Vec<(&'static str, u64)> {
        let totals = self.subscriber.stats().totals;
        gantry_kvindex::sink::Counter::ALL.iter().map(|&c| (c.name(), totals[c])).collect()
    }
}

/// A worker's reader of one pool's segment plus its lookup storage.
pub struct WorkerIndex {
    /// Which index this reads (compared by pointer on each request).
    pub index: std::sync::Arc<PoolIndex>,
    /// The reader.
    pub reader: IndexReader,
    /// Lookup results.
    pub overlaps: Overlaps,
}

impl WorkerIndex {
    /// Opens `index`'s segment for this worker.
    pub fn open(index: &std::sync::Arc<PoolIndex>) -> Result<WorkerIndex, String> {
        let reader = IndexReader::open(&index.path).map_err(|e| format!("{}: {e}", index.path.display()))?;
        let overlaps = reader.new_overlaps();
        Ok(WorkerIndex { index: index.clone(), reader, overlaps })
    }
}
