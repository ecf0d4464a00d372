//! Each `kv` pool's prefix index: a shared-memory segment written by one subscriber thread that
//! follows the pool's engines' KV events, read lock-free by every worker.
//!
//! The segment lives at `pool[].index_path` (default `/dev/shm/gantry-kvindex-<port>-<pool>`,
//! so `gantry index inspect` can read it while the proxy runs). Engines are registered under
//! their URL. The approximate tier is always on: engines without `kv_events`, or whose events
//! could not be subscribed to (or models without a tokenizer), are routed on the proxy's own
//! predictions (TTL [`APPROX_TTL_NO_EVENTS`]);
//! otherwise predictions are short-lived ([`APPROX_TTL_EVENTS`]) and cover a burst of sibling
//! requests arriving before the first stored event. The lifetime is chosen per prediction
//! ([`prediction_ttl`]), so it follows engines as they join and leave.
//!
//! Engines join and leave while the proxy runs: a reload or an admin edit calls
//! [`PoolIndex::sync`] with the pool's new engines, which registers newcomers (a slot, their
//! events followed when they have `kv_events`), re-follows engines whose endpoints changed, and
//! releases engines that left (their blocks dropped, their slot freed). An engine that cannot
//! get a slot (all taken: a pool's index has twice its starting engines, at least 64) is routed
//! on load alone and logged; one whose events cannot be followed is retried on the next sync.
//! Freed slots are handed out again last (see `IndexWriter::register_engine`), so predictions
//! still in flight for a departed engine do not land on a newcomer. A pool whose index settings
//! (`index_path`, `index_capacity`, `block_size`) change on reload gets a new index: the old one
//! is closed first ([`PoolIndex::close`]), so the new segment can take the same path; it starts
//! empty and fills from the engines' events from then on (and the proxy's predictions).
//!
//! If the segment cannot be created (another writer holds its lock, `/dev/shm` is missing), the
//! pool routes on load alone: the error is logged and `gantry_route_index_available{pool}` is 0.

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use gantry_kvindex::hash::DEFAULT_SEED;
use gantry_kvindex::index::{IndexOptions, IndexReader, IndexWriter, Overlaps, Predictor};
use gantry_kvindex::sink::EngineSlot;
use gantry_kvindex::subscriber::{EngineSource, Subscriber};

use crate::config::{EngineConf, PoolConf};

/// Prediction lifetime for an engine that publishes no events (or a prompt hashed as text).
pub const APPROX_TTL_NO_EVENTS: Duration = Duration::from_secs(120);
/// Prediction lifetime when events confirm the real state shortly after.
pub const APPROX_TTL_EVENTS: Duration = Duration::from_secs(5);

/// How long a prediction that a request's blocks are on an engine should live: until the
/// engine's own events can confirm them ([`APPROX_TTL_EVENTS`]) when it publishes events and the
/// prompt was hashed from tokens (as its events are), else as long as its cache likely keeps
/// them ([`APPROX_TTL_NO_EVENTS`]).
pub fn prediction_ttl(engine_has_events: bool, hashed_from_tokens: bool) -> Duration {
    if engine_has_events && hashed_from_tokens {
        APPROX_TTL_EVENTS
    } else {
        APPROX_TTL_NO_EVENTS
    }
}

/// One pool's index: the running subscriber (which owns the writer) and what readers need.
pub struct PoolIndex {
    /// Segment file.
    pub path: PathBuf,
    /// Hash seed shared with the subscriber.
    pub seed: u64,
    /// Sends predictions to the writer.
    pub predictor: Predictor,
    /// Engine slots of the segment (to size [`Overlaps`]).
    pub engine_slots: usize,
    /// Blocks the exact tier holds (`pool[].index_capacity`).
    capacity: usize,
    /// Times a worker failed to open the segment (it then routes on load alone for a while).
    pub open_failures: std::sync::atomic::AtomicU64,
    /// The per-engine share ([`PoolIndex::share`]) the followed engines were last given.
    shared: AtomicUsize,
    /// The segment's writer generation: a worker that opens the path and finds another (the
    /// index was replaced by a reload meanwhile) does not read it for this index.
    generation: u64,
    /// The pool's name (for logs).
    pool: String,
    /// The pool's KV block size (events of another size are skipped).
    block_size: u32,
    /// Engine URL → its slot and the event endpoints it is followed on.
    members: Mutex<HashMap<String, Member>>,
    subscriber: Subscriber,
}

/// An engine the index knows.
#[derive(Debug, Clone, PartialEq)]
struct Member {
    slot: EngineSlot,
    /// How its events are followed (None: they are not).
    events: Option<Events>,
}

/// Where an engine's events come from (a change re-follows it from scratch).
#[derive(Debug, Clone, PartialEq)]
struct Events {
    kv_events: String,
    kv_replay: Option<String>,
    dp_ranks: u32,
    topic: String,
}

impl std::fmt::Debug for PoolIndex {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PoolIndex").field("path", &self.path).field("pool", &self.pool).finish_non_exhaustive()
    }
}

impl PoolIndex {
    /// Creates the segment of `pool` and starts following its engines' events.
    pub fn start(pool: &PoolConf, path: PathBuf) -> Result<PoolIndex, String> {
        let with_events = pool.engine.iter().filter(|e| e.kv_events.is_some()).count();
        let engine_slots = (pool.engine.len().max(1) * 2).next_power_of_two().clamp(64, 1024);
        let opts = IndexOptions {
            engine_slots,
            capacity: pool.index_capacity,
            approx_capacity: pool.index_capacity,
            // Each prediction says its own lifetime (`prediction_ttl`); this is the longest.
            approx_ttl: APPROX_TTL_NO_EVENTS,
            ..IndexOptions::default()
        };
        let writer = IndexWriter::create(&path, &opts).map_err(|e| format!("{}: {e}", path.display()))?;
        let generation = writer.reader().generation();
        let predictor = writer.predictor();
        let subscriber = Subscriber::spawn(Vec::new(), writer).map_err(|e| format!("pool `{}`: {e}", pool.name))?;
        let index = PoolIndex {
            path,
            seed: DEFAULT_SEED,
            predictor,
            engine_slots,
            capacity: pool.index_capacity,
            open_failures: Default::default(),
            shared: AtomicUsize::new(0),
            generation,
            pool: pool.name.clone(),
            block_size: pool.block_size,
            members: Mutex::new(HashMap::new()),
            subscriber,
        };
        index.sync(&pool.engine);
        tracing::info!(pool = %pool.name, path = %index.path.display(), engines = pool.engine.len(), with_events, "kv index up");
        Ok(index)
    }

    /// Stops following events and releases the segment (its writer lock), so a replacement can
    /// be created at the same path. Readers of the segment keep answering from what it holds.
    pub fn close(&self) {
        self.subscriber.close();
        tracing::info!(pool = %self.pool, path = %self.path.display(), "kv index closed");
    }

    /// The slot of the engine at `url` (None: not in the index, routed on load alone).
    pub fn slot_of(&self, url: &str) -> Option<EngineSlot> {
        self.lock().get(url.trim_end_matches('/')).map(|m| m.slot)
    }

    /// Blocks one engine of a pool of `engines` may hold in the index: an equal share of its
    /// capacity, so the engines together never fill it and one engine's flood of events never
    /// evicts another's blocks (the subscriber drops that engine's own oldest instead).
    fn share(&self, engines: usize) -> usize {
        (self.capacity / engines.max(1)).max(1)
    }

    /// Whether the index follows the KV events of the engine at `url`: it has `kv_events` and
    /// subscribing to them worked (a failure is retried on the next [`PoolIndex::sync`]).
    pub fn follows_events(&self, url: &str) -> bool {
        self.lock().get(url.trim_end_matches('/')).is_some_and(|m| m.events.is_some())
    }

    /// Makes the index follow exactly `engines`: newcomers get a slot (and their events are
    /// followed when they have `kv_events`), engines whose event endpoints changed are
    /// re-followed from scratch, and engines not in `engines` are released (their blocks
    /// dropped, their slot freed) before this returns. Failures are logged per engine, which
    /// is then routed on load alone.
    pub fn sync(&self, engines: &[EngineConf]) {
        let mut members = self.lock();
        let share = self.share(engines.len());
        let wanted: HashSet<&str> = engines.iter().map(|e| e.url.trim_end_matches('/')).collect();
        let leaving: Vec<String> = members.keys().filter(|u| !wanted.contains(u.as_str())).cloned().collect();
        for url in leaving {
            let m = members.remove(&url).expect("listed above");
            match self.subscriber.release(m.slot) {
                Ok(()) => tracing::info!(pool = %self.pool, engine = %url, slot = m.slot, "kv index: engine released"),
                Err(e) => tracing::error!(pool = %self.pool, engine = %url, error = %e, "kv index: release failed"),
            }
        }
        // In the given order, so slots follow the config's order at startup.
        for e in engines {
            let url = e.url.trim_end_matches('/');
            let events = e.kv_events.as_ref().map(|ev| Events {
                kv_events: ev.clone(),
                kv_replay: e.kv_replay.clone(),
                dp_ranks: e.dp_ranks,
                topic: e.kv_topic.clone(),
            });
            let member = |slot| Member { slot, events: events.clone() };
            let slot = match members.get(url) {
                Some(m) if *m == member(m.slot) => continue,
                Some(m) => {
                    // New event endpoints: what was learnt from the old ones is dropped.
                    let _ = self.subscriber.remove_engine(m.slot);
                    m.slot
                }
                None => match self.subscriber.register(url) {
                    Ok(slot) => slot,
                    Err(err) => {
                        tracing::warn!(pool = %self.pool, engine = %url, error = %err, "kv index: no slot; the engine is routed on load alone");
                        continue;
                    }
                },
            };
            let Some(ev) = &events else {
                members.insert(url.to_owned(), member(slot));
                continue;
            };
            let source = EngineSource {
                slot,
                name: url.to_owned(),
                events: ev.kv_events.clone(),
                replay: ev.kv_replay.clone(),
                topic: ev.topic.clone(),
                dp_ranks: ev.dp_ranks,
                block_size: self.block_size,
                seed: self.seed,
                max_index_blocks: share,
                ..EngineSource::default()
            };
            match self.subscriber.add_engine(source) {
                Ok(()) => {
                    members.insert(url.to_owned(), member(slot));
                }
                Err(err) => {
                    tracing::warn!(pool = %self.pool, engine = %url, error = %err, "kv index: cannot follow the engine's events; it is routed on its predictions");
                    // Remembered as not followed, so the next sync tries again.
                    members.insert(url.to_owned(), Member { slot, events: None });
                }
            }
        }
        // A pool that grew or shrank: every engine followed before gets the new share.
        if self.shared.swap(share, Ordering::Relaxed) != share {
            for m in members.values().filter(|m| m.events.is_some()) {
                if let Err(e) = self.subscriber.set_max_index_blocks(m.slot, share) {
                    tracing::error!(pool = %self.pool, slot = m.slot, error = %e, "kv index: cannot set the engine's share");
                }
            }
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Member>> {
        self.members.lock().unwrap_or_else(|p| p.into_inner())
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
        if reader.generation() != index.generation {
            return Err(format!(
                "{}: the segment was replaced (generation {}, this index's {})",
                index.path.display(),
                reader.generation(),
                index.generation
            ));
        }
        let overlaps = reader.new_overlaps();
        Ok(WorkerIndex { index: index.clone(), reader, overlaps })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fleet::{EngineState, Pool};
    use std::sync::Arc;

    #[test]
    fn predictions_live_long_unless_events_will_confirm_them() {
        assert_eq!(prediction_ttl(true, true), APPROX_TTL_EVENTS);
        for (events, tokens) in [(true, false), (false, true), (false, false)] {
            assert_eq!(prediction_ttl(events, tokens), APPROX_TTL_NO_EVENTS, "events {events}, tokens {tokens}");
        }
        // A pool knows which of its engines' events its index follows: not those without
        // `kv_events` (the second, or the fourth, added later through the admin API), nor those
        // whose events could not be subscribed to (the third: a malformed endpoint).
        let urls = ["http://127.0.0.1:1", "http://127.0.0.1:2", "http://127.0.0.1:3"].map(String::from);
        let mut conf = crate::config::Config::single_pool("m", &urls).pool.remove(0);
        conf.engine[0].kv_events = Some("tcp://127.0.0.1:5557".into());
        conf.engine[2].kv_events = Some("tcp://".into());
        conf.index_capacity = 1024;
        let path = std::env::temp_dir().join(format!("gantry-index-ev-{}-{}", std::process::id(), fastrand::u64(..)));
        let index = Arc::new(PoolIndex::start(&conf, path.clone()).unwrap());
        assert!(index.follows_events("http://127.0.0.1:1/") && !index.follows_events("http://127.0.0.1:3"));
        let engines = ["http://127.0.0.1:1/", "http://127.0.0.1:2", "http://127.0.0.1:3", "http://127.0.0.1:4"]
            .map(|u| Arc::new(EngineState::new(u, "m").unwrap()));
        let pool = Pool::new(&conf, engines.to_vec(), Some(index.clone()), Default::default());
        assert_eq!(pool.events, [true, false, false, false]);
        let without_index = Pool::new(&conf, engines.to_vec(), None, Default::default());
        assert_eq!(without_index.events, [false; 4], "no index, nothing to predict into");
        index.close();
        let _ = std::fs::remove_file(&path);
        let _ = std::fs::remove_file(path.with_extension("lock"));
    }

    /// A worker never reads a replacement segment for the index it replaced (a request still on
    /// the old fleet when a reload swapped the pool's index at the same path).
    #[test]
    fn a_worker_does_not_read_a_replaced_segment_for_the_old_index() {
        let path = std::env::temp_dir().join(format!("gantry-index-gen-{}-{}", std::process::id(), fastrand::u64(..)));
        let mut conf = crate::config::Config::single_pool("m", &["http://127.0.0.1:1".to_string()]).pool.remove(0);
        conf.index_capacity = 1024;
        let old = Arc::new(PoolIndex::start(&conf, path.clone()).unwrap());
        assert!(WorkerIndex::open(&old).is_ok());
        old.close();
        conf.index_capacity = 2048;
        let new = Arc::new(PoolIndex::start(&conf, path.clone()).unwrap());
        let err = WorkerIndex::open(&old).err().expect("the old index's path now holds another segment");
        assert!(err.contains("replaced"), "{err}");
        assert!(WorkerIndex::open(&new).is_ok());
        drop((old, new));
        let _ = std::fs::remove_file(&path);
        let _ = std::fs::remove_file(path.with_extension("lock"));
    }
}
