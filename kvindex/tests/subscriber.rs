//! Subscriber over real libzmq loopback sockets: live apply, late join, gaps, resyncs, restarts,
//! clears, engine removal, a garbage-sending engine next to a good one, DP-rank refcounts.
//!
//! Engines are either the crate's [`Publisher`] (a vLLM clone) or, where a test needs exact
//! control of sequence numbers and replay answers, a [`FakeEngine`] made of raw sockets: an XPUB
//! (which sees the subscription, so the test knows the subscriber has joined: no slow-joiner
//! guesswork) and a ROUTER the test answers by hand. The restart, gap and short-replay scenarios
//! are also run against the [`Publisher`] itself (the one `gantry mock` runs per engine): a
//! restart is a new `Publisher` on the same endpoints, and a gap is what a stalled consumer gets
//! from a real PUB socket: the subscriber thread is held in the sink ([`Gated`]) while a flood of
//! large batches overflows the PUB and SUB high-water marks and the TCP buffers, so libzmq drops
//! batches the replay must then fill.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use gantry_kvindex::hash::{hash_blocks, DEFAULT_SEED};
use gantry_kvindex::sink::{BlockSink, Counter, EngineSlot};
use gantry_kvindex::subscriber::{EngineSource, EventApplier, Subscriber, SubscriberError, SubscriberOptions};
use gantry_kvindex::{
    encode_batch, BlockRemoved, BlockStored, KvEvent, KvEventBatch, Publisher, PublisherConfig, PublisherError,
    ReplayFraming, WireFormat,
};

const TOPIC: &str = "kv-events";
const DEADLINE: Duration = Duration::from_secs(10);
const BS: u32 = 4;
const END: [u8; 8] = [0xff; 8];

// ---------------------------------------------------------------------------------------------
// The sink: a model behind a mutex, read by the test thread.

#[derive(Default)]
struct Model {
    blocks: HashMap<EngineSlot, HashSet<u64>>,
    counters: HashMap<Counter, u64>,
    maintained: u64,
}

#[derive(Clone, Default)]
struct Shared(Arc<Mutex<Model>>);

impl BlockSink for Shared {
    /// Idempotent, as the contract says: every GPU store reaches the sink, known blocks too.
    fn store(&mut self, engine: EngineSlot, hash: u64, _pos: u64) {
        self.0.lock().unwrap().blocks.entry(engine).or_default().insert(hash);
    }
    fn remove(&mut self, engine: EngineSlot, hash: u64, _pos: u64) {
        let removed = self.0.lock().unwrap().blocks.entry(engine).or_default().remove(&hash);
        assert!(removed, "remove of an absent block");
    }
    fn count(&mut self, counter: Counter, n: u64) {
        *self.0.lock().unwrap().counters.entry(counter).or_default() += n;
    }
    fn maintain(&mut self) {
        self.0.lock().unwrap().maintained += 1;
    }
}

impl Shared {
    fn of(&self, engine: EngineSlot) -> HashSet<u64> {
        self.0.lock().unwrap().blocks.get(&engine).cloned().unwrap_or_default()
    }
}

/// Polls `cond` until it holds or the deadline passes (a poll interval, not a synchronisation sleep).
fn wait_until(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + DEADLINE;
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// Like [`wait_until`], publishing an empty batch every 50 ms meanwhile: if the subscriber missed
/// the last real batch (PUB/SUB slow joiner), the next sequence number shows it the gap, which it
/// then replays.
fn wait_nudging(what: &str, publishers: &[&Publisher], mut cond: impl FnMut() -> bool) {
    let mut last_nudge = Instant::now();
    wait_until(what, || {
        if cond() {
            return true;
        }
        if last_nudge.elapsed() > Duration::from_millis(50) {
            publishers.iter().for_each(|p| p.publish(Vec::new()));
            last_nudge = Instant::now();
        }
        false
    });
}

// ---------------------------------------------------------------------------------------------
// Events and the hashes they must produce.

/// A GPU BlockStored of `hashes.len()` blocks with tokens `first_token..`.
fn stored(hashes: &[u64], parent: Option<u64>, first_token: u32) -> KvEvent {
    KvEvent::BlockStored(BlockStored {
        block_hashes: hashes.to_vec(),
        parent_block_hash: parent,
        token_ids: (first_token..first_token + hashes.len() as u32 * BS).collect(),
        block_size: BS,
        medium: Some("GPU".into()),
        group_idx: Some(0),
        kv_cache_spec_kind: Some("full_attention".into()),
        ..BlockStored::default()
    })
}

fn removed(hashes: &[u64]) -> KvEvent {
    KvEvent::BlockRemoved(BlockRemoved {
        block_hashes: hashes.to_vec(),
        medium: Some("GPU".into()),
        group_idx: Some(0),
    })
}

/// Gantry's hashes of the blocks of tokens `first..first + n * BS` starting a prompt.
fn chain(first: u32, n: u32) -> Vec<u64> {
    let tokens: Vec<u32> = (first..first + n * BS).collect();
    let mut out = Vec::new();
    hash_blocks(DEFAULT_SEED, &tokens, BS as usize, 0, &mut out);
    out
}

fn set(hashes: &[u64]) -> HashSet<u64> {
    hashes.iter().copied().collect()
}

fn payload(events: Vec<KvEvent>) -> Vec<u8> {
    let mut out = Vec::new();
    encode_batch(&KvEventBatch { ts: 1.0, events, data_parallel_rank: Some(0) }, WireFormat::Map, &mut out);
    out
}

fn source(slot: EngineSlot, events: &str, replay: Option<&str>) -> EngineSource {
    EngineSource {
        slot,
        name: format!("engine-{slot}"),
        events: events.to_owned(),
        replay: replay.map(str::to_owned),
        topic: TOPIC.to_owned(),
        block_size: BS,
        ..EngineSource::default()
    }
}

fn publisher(ctx: &zmq::Context, cfg: PublisherConfig) -> Publisher {
    Publisher::start(ctx, PublisherConfig { endpoint: "tcp://127.0.0.1:0".into(), topic: TOPIC.into(), ..cfg }).unwrap()
}

fn with_replay() -> PublisherConfig {
    PublisherConfig { replay_endpoint: Some("tcp://127.0.0.1:0".into()), ..PublisherConfig::default() }
}

fn source_of(slot: EngineSlot, p: &Publisher) -> EngineSource {
    source(slot, p.endpoint(), p.replay_endpoint())
}

fn counter(sub: &Subscriber, slot: EngineSlot, c: Counter) -> u64 {
    sub.stats().engine(slot).map_or(0, |e| e.counters[c])
}

// ---------------------------------------------------------------------------------------------
// A hand-driven engine.

struct FakeEngine {
    xpub: zmq::Socket,
    router: Option<zmq::Socket>,
    events: String,
    replay: Option<String>,
}

impl FakeEngine {
    fn new(ctx: &zmq::Context, replay: bool) -> Self {
        let sock = |kind| {
            let s = ctx.socket(kind).unwrap();
            s.set_linger(0).unwrap();
            s.set_rcvtimeo(20).unwrap();
            s.bind("tcp://127.0.0.1:*").unwrap();
            let ep = s.get_last_endpoint().unwrap().unwrap();
            (s, ep)
        };
        let (xpub, events) = sock(zmq::XPUB);
        let (router, replay) = if replay {
            let (r, ep) = sock(zmq::ROUTER);
            (Some(r), Some(ep))
        } else {
            (None, None)
        };
        FakeEngine { xpub, router, events, replay }
    }

    fn source(&self, slot: EngineSlot) -> EngineSource {
        source(slot, &self.events, self.replay.as_deref())
    }

    /// Waits for the subscriber's subscription to reach the XPUB; later messages are delivered.
    fn wait_subscribed(&self) {
        let deadline = Instant::now() + DEADLINE;
        loop {
            match self.xpub.recv_bytes(0) {
                Ok(m) => {
                    assert_eq!(m, [&[1u8][..], TOPIC.as_bytes()].concat(), "subscription message");
                    return;
                }
                Err(zmq::Error::EAGAIN) => assert!(Instant::now() < deadline, "no subscriber joined"),
                Err(e) => panic!("xpub recv: {e}"),
            }
        }
    }

    fn send(&self, seq: u64, events: Vec<KvEvent>) {
        self.send_raw(&[TOPIC.as_bytes(), &seq.to_be_bytes(), &payload(events)]);
    }

    fn send_raw(&self, frames: &[&[u8]]) {
        self.xpub.send_multipart(frames, 0).unwrap();
    }

    /// Waits for a replay request; returns the requester's identity and the start seq.
    fn expect_replay(&self) -> (Vec<u8>, u64) {
        let router = self.router.as_ref().expect("replay enabled");
        let deadline = Instant::now() + DEADLINE;
        loop {
            match router.recv_multipart(0) {
                Ok(m) => {
                    assert_eq!(m.len(), 3, "[identity, <empty>, start]");
                    assert!(m[1].is_empty(), "delimiter");
                    let start = u64::from_be_bytes(m[2].as_slice().try_into().expect("8-byte start"));
                    return (m[0].clone(), start);
                }
                Err(zmq::Error::EAGAIN) => assert!(Instant::now() < deadline, "no replay request"),
                Err(e) => panic!("router recv: {e}"),
            }
        }
    }

    /// Answers a replay request with `batches` and the end marker, in 0.33 or legacy framing.
    fn answer(&self, id: &[u8], batches: Vec<(u64, Vec<KvEvent>)>, legacy: bool) {
        let router = self.router.as_ref().expect("replay enabled");
        let send = |seq: &[u8], payload: &[u8]| {
            if legacy {
                router.send_multipart([id, &[], seq, payload], 0).unwrap();
            } else {
                router.send_multipart([id, &[], TOPIC.as_bytes(), seq, payload], 0).unwrap();
            }
        };
        for (seq, events) in batches {
            send(&seq.to_be_bytes(), &payload(events));
        }
        if legacy {
            send(&END, &[]);
        } else {
            router.send_multipart([id, &[], &[], &END, &[]], 0).unwrap();
        }
    }
}

fn spawn(ctx: &zmq::Context, sources: Vec<EngineSource>, sink: &Shared) -> Subscriber {
    Subscriber::spawn_with(ctx, SubscriberOptions::default(), sources, sink.clone()).unwrap()
}

// ---------------------------------------------------------------------------------------------
// Tests.

#[test]
fn live_stream_is_applied() {
    let ctx = zmq::Context::new();
    let p = publisher(&ctx, PublisherConfig::default()); // no replay: the live stream alone
    let sink = Shared::default();
    let sub = spawn(&ctx, vec![source_of(0, &p)], &sink);
    // Join: publish an independent probe block every 20 ms until one arrives (slow joiner).
    let (mut probe, mut last) = (0u64, Instant::now() - Duration::from_secs(1));
    wait_until("the first live batch", || {
        if last.elapsed() > Duration::from_millis(20) {
            probe += 1;
            p.publish(vec![stored(&[probe], None, 10_000 + probe as u32 * BS)]);
            last = Instant::now();
        }
        !sink.of(0).is_empty()
    });
    // A chain over two events, the first block evicted in the second.
    p.publish(vec![stored(&[100, 101], None, 0)]);
    p.publish(vec![stored(&[102], Some(101), 8), removed(&[100])]);
    let h = chain(0, 3);
    wait_until("the chain", || h[1..].iter().all(|x| sink.of(0).contains(x)));
    assert!(!sink.of(0).contains(&h[0]), "removed in the same batch that stored block 2");
    let stats = sub.stats();
    assert_eq!(stats.engine(0).unwrap().counters[Counter::DecodeErrors], 0);
    assert_eq!(stats.totals[Counter::Replays], 0, "no replay endpoint");
    wait_until("the sink's upkeep to run periodically", || sink.0.lock().unwrap().maintained >= 3);
    assert_eq!(sink.0.lock().unwrap().counters.get(&Counter::EventsSkipped), None);
}

#[test]
fn late_join_replays_from_zero_in_both_framings() {
    let ctx = zmq::Context::new();
    let new = publisher(&ctx, with_replay());
    let old = publisher(
        &ctx,
        PublisherConfig { replay_framing: ReplayFraming::Legacy, format: WireFormat::Array, ..with_replay() },
    );
    // Everything is published before the subscriber exists.
    for p in [&new, &old] {
        p.publish(vec![stored(&[1, 2], None, 0)]);
        p.publish(vec![stored(&[3], Some(2), 8)]);
        p.publish(vec![stored(&[4], Some(3), 12), removed(&[1])]);
    }
    wait_until("published", || new.stats().published == 3 && old.stats().published == 3);
    let sink = Shared::default();
    let sub = spawn(&ctx, vec![source_of(0, &new), source_of(1, &old)], &sink);
    let h = chain(0, 4);
    wait_until("replayed state", || sink.of(0) == set(&h[1..]) && sink.of(1) == set(&h[1..]));
    for slot in [0, 1] {
        assert_eq!(counter(&sub, slot, Counter::EventsApplied), 4, "engine {slot}");
        assert_eq!(counter(&sub, slot, Counter::Resyncs), 0, "engine {slot}");
    }
    // The live stream continues from there (gaps from joining late are replayed).
    for p in [&new, &old] {
        p.publish(vec![stored(&[5], Some(4), 16)]);
    }
    let h = chain(0, 5);
    wait_nudging("live after replay", &[&new, &old], || sink.of(0) == set(&h[1..]) && sink.of(1) == set(&h[1..]));
    assert_eq!(sub.stats().totals[Counter::DecodeErrors], 0);
}

#[test]
fn gap_is_filled_by_replay() {
    let ctx = zmq::Context::new();
    let engine = FakeEngine::new(&ctx, true);
    let sink = Shared::default();
    let sub = spawn(&ctx, vec![engine.source(0)], &sink);
    let (id, start) = engine.expect_replay();
    assert_eq!(start, 0, "a new engine is replayed from 0");
    engine.answer(&id, vec![], false);
    engine.wait_subscribed();

    engine.send(0, vec![stored(&[1], None, 0)]);
    engine.send(1, vec![stored(&[2], Some(1), 4)]);
    let h = chain(0, 5);
    wait_until("seq 0 and 1", || sink.of(0) == set(&h[..2]));
    // Seq 2 is lost; seq 3 shows the gap.
    engine.send(3, vec![stored(&[4], Some(3), 12)]);
    let (id, start) = engine.expect_replay();
    assert_eq!(start, 2);
    // Seq 4 arrives while the replay is in flight: buffered, applied after it.
    engine.send(4, vec![stored(&[5], Some(4), 16)]);
    engine.answer(&id, vec![(2, vec![stored(&[3], Some(2), 8)]), (3, vec![stored(&[4], Some(3), 12)])], false);
    wait_until("all five blocks", || sink.of(0) == set(&h));
    let c = sub.stats().engine(0).unwrap().counters;
    assert_eq!((c[Counter::Gaps], c[Counter::Replays], c[Counter::Resyncs]), (1, 2, 0));
    assert_eq!(c[Counter::EventsApplied], 5, "seq 3 applied once although it came twice");
}

#[test]
fn gap_beyond_the_replay_buffer_resyncs() {
    let ctx = zmq::Context::new();
    let engine = FakeEngine::new(&ctx, true);
    let sink = Shared::default();
    let sub = spawn(&ctx, vec![engine.source(0)], &sink);
    let (id, _) = engine.expect_replay();
    engine.answer(&id, vec![], true);
    engine.wait_subscribed();
    engine.send(0, vec![stored(&[1], None, 0)]);
    engine.send(1, vec![stored(&[2], Some(1), 4)]);
    wait_until("seq 0 and 1", || sink.of(0) == set(&chain(0, 2)));

    engine.send(5, vec![stored(&[11], Some(10), 104)]);
    let (id, start) = engine.expect_replay();
    assert_eq!(start, 2);
    // The engine's buffer only reaches back to seq 4 (legacy 3-frame replies).
    engine.answer(&id, vec![(4, vec![stored(&[10], None, 100)]), (5, vec![stored(&[11], Some(10), 104)])], true);
    wait_until("state rebuilt from seq 4", || sink.of(0) == set(&chain(100, 2)));
    assert_eq!(counter(&sub, 0, Counter::Resyncs), 1);
    // And the stream goes on.
    engine.send(6, vec![removed(&[11])]);
    wait_until("seq 6", || sink.of(0) == set(&chain(100, 1)));
}

#[test]
fn silent_replay_resyncs_after_the_timeout() {
    let ctx = zmq::Context::new();
    let engine = FakeEngine::new(&ctx, true);
    let sink = Shared::default();
    let options = SubscriberOptions { replay_timeout: Duration::from_millis(200), ..SubscriberOptions::default() };
    let sub = Subscriber::spawn_with(&ctx, options, vec![engine.source(0)], sink.clone()).unwrap();
    engine.expect_replay(); // never answered: the subscriber gives up and follows the live stream
    engine.wait_subscribed();
    engine.send(0, vec![stored(&[1], None, 0)]);
    engine.send(1, vec![stored(&[2], Some(1), 4)]);
    wait_until("seq 0 and 1", || sink.of(0) == set(&chain(0, 2)));
    engine.send(3, vec![stored(&[20], None, 200)]);
    let (_, start) = engine.expect_replay();
    assert_eq!(start, 2);
    wait_until("resynced to seq 3", || sink.of(0) == set(&chain(200, 1)));
    let c = sub.stats().engine(0).unwrap().counters;
    assert_eq!((c[Counter::Gaps], c[Counter::Resyncs]), (1, 1));
}

#[test]
fn restart_clears_the_engine() {
    let ctx = zmq::Context::new();
    let engine = FakeEngine::new(&ctx, false);
    let sink = Shared::default();
    let sub = spawn(&ctx, vec![engine.source(0)], &sink);
    engine.wait_subscribed();
    engine.send(0, vec![stored(&[1, 2], None, 0)]);
    engine.send(1, vec![stored(&[3], Some(2), 8)]);
    engine.send(2, vec![removed(&[1])]);
    wait_until("three batches", || sink.of(0) == set(&chain(0, 3)[1..]));
    // The engine restarts: seq 0 again, and its cache is empty (no AllBlocksCleared on start).
    engine.send(0, vec![stored(&[50], None, 500)]);
    wait_until("state of the new process", || sink.of(0) == set(&chain(500, 1)));
    assert_eq!(counter(&sub, 0, Counter::Resyncs), 1);
    engine.send(1, vec![stored(&[51], Some(50), 504)]);
    wait_until("the new process continues", || sink.of(0) == set(&chain(500, 2)));
}

#[test]
fn all_blocks_cleared_empties_the_engine() {
    let ctx = zmq::Context::new();
    let p = publisher(&ctx, with_replay());
    let sink = Shared::default();
    let sub = spawn(&ctx, vec![source_of(7, &p)], &sink);
    p.publish(vec![stored(&[1, 2], None, 0)]);
    wait_nudging("stored", &[&p], || sink.of(7) == set(&chain(0, 2)));
    p.publish(vec![KvEvent::AllBlocksCleared]);
    wait_nudging("cleared", &[&p], || sink.of(7).is_empty());
    // After the reset the same hashes are new blocks again.
    p.publish(vec![stored(&[1], None, 0)]);
    wait_nudging("stored again", &[&p], || sink.of(7) == set(&chain(0, 1)));
    assert!(counter(&sub, 7, Counter::Resyncs) >= 1);
}

#[test]
fn remove_engine_removes_its_blocks_and_add_engine_brings_them_back() {
    let ctx = zmq::Context::new();
    let (a, b) = (publisher(&ctx, with_replay()), publisher(&ctx, with_replay()));
    a.publish(vec![stored(&[1, 2], None, 0)]);
    b.publish(vec![stored(&[1], None, 0)]);
    let sink = Shared::default();
    let sub = spawn(&ctx, vec![source_of(0, &a), source_of(1, &b)], &sink);
    wait_nudging("both engines", &[&a, &b], || sink.of(0).len() == 2 && sink.of(1).len() == 1);

    assert!(sub.remove_engine(0).unwrap());
    assert!(sink.of(0).is_empty(), "removed before remove_engine returns");
    assert_eq!(sink.of(1), set(&chain(0, 1)));
    assert!(!sub.remove_engine(0).unwrap());
    assert!(sub.stats().engine(0).is_none());
    assert_eq!(sub.stats().totals[Counter::Resyncs], 1);

    // Re-adding replays the engine's buffer from 0.
    sub.add_engine(source_of(0, &a)).unwrap();
    wait_until("engine 0 again", || sink.of(0) == set(&chain(0, 2)));
    assert!(matches!(sub.add_engine(source_of(1, &b)), Err(SubscriberError::SlotInUse { slot: 1 })));
    let bad = EngineSource { events: "no-scheme".into(), ..source_of(2, &a) };
    assert!(matches!(sub.add_engine(bad), Err(SubscriberError::InvalidConfig { key: "events", .. })));
    let unresolvable = EngineSource { events: "tcp://127.0.0.1:notaport".into(), ..source_of(3, &a) };
    assert!(matches!(sub.add_engine(unresolvable), Err(SubscriberError::Socket { .. })));
    sub.shutdown();
}

#[test]
fn garbage_from_one_engine_does_not_touch_another() {
    let ctx = zmq::Context::new();
    let bad = FakeEngine::new(&ctx, false);
    let good = publisher(&ctx, with_replay());
    let sink = Shared::default();
    let sub = spawn(&ctx, vec![bad.source(0), source_of(1, &good)], &sink);
    bad.wait_subscribed();

    let mut huge = vec![0x93, 0xcb, 0, 0, 0, 0, 0, 0, 0, 0, 0xdd, 0xff, 0xff, 0xff, 0xff];
    huge.extend_from_slice(&[0x91; 64]);
    bad.send_raw(&[TOPIC.as_bytes(), &0u64.to_be_bytes(), b"\xc1 not msgpack"]);
    bad.send_raw(&[TOPIC.as_bytes(), &1u64.to_be_bytes()]);
    bad.send_raw(&[TOPIC.as_bytes(), &[0, 0, 0, 0, 0, 0, 2], &payload(vec![stored(&[9], None, 0)])]);
    bad.send_raw(&[TOPIC.as_bytes(), &2u64.to_be_bytes(), b"{}", b"extra"]);
    bad.send_raw(&[TOPIC.as_bytes(), &1u64.to_be_bytes(), &[0x92, 0x00, 0x91, 0x82, 0xa4]]);
    bad.send_raw(&[TOPIC.as_bytes(), &2u64.to_be_bytes(), &huge]);
    for n in 0..50u32 {
        good.publish(vec![stored(&[u64::from(n)], None, n * BS)]);
    }
    let want: HashSet<u64> = (0..50).map(|n| chain(n * BS, 1)[0]).collect();
    wait_nudging("the good engine's blocks", &[&good], || sink.of(1) == want);
    wait_until("the bad engine's errors counted", || counter(&sub, 0, Counter::DecodeErrors) == 6);
    assert!(sink.of(0).is_empty());
    assert_eq!(counter(&sub, 1, Counter::DecodeErrors), 0);
    assert_eq!(counter(&sub, 1, Counter::Resyncs), 0);
    assert_eq!(counter(&sub, 0, Counter::Resyncs), 0, "the bad engine's sequence numbers were in order");
    // The bad engine's stream still works once it sends something valid.
    bad.send(3, vec![stored(&[9], None, 0)]);
    wait_until("a valid batch from the bad engine", || sink.of(0) == set(&chain(0, 1)));
}

/// Binds rank 0 on ephemeral ports and rank 1 on the next ports up (vLLM's DP layout),
/// retrying when those are taken.
fn dp_pair(ctx: &zmq::Context) -> (Publisher, Publisher) {
    for _ in 0..50 {
        let r0 = publisher(ctx, with_replay());
        let port = |ep: &str| ep.rsplit_once(':').unwrap().1.parse::<u32>().unwrap();
        let next = |ep: &str| format!("tcp://127.0.0.1:{}", port(ep) + 1);
        let cfg = PublisherConfig {
            endpoint: next(r0.endpoint()),
            replay_endpoint: Some(next(r0.replay_endpoint().unwrap())),
            topic: TOPIC.into(),
            ..PublisherConfig::default()
        };
        match Publisher::start(ctx, cfg) {
            Ok(r1) => return (r0, r1),
            Err(PublisherError::Bind { .. }) => continue,
            Err(e) => panic!("{e}"),
        }
    }
    panic!("no two consecutive free port pairs");
}

#[test]
fn dp_ranks_share_blocks_by_refcount() {
    let ctx = zmq::Context::new();
    let (r0, r1) = dp_pair(&ctx);
    let sink = Shared::default();
    let sub = spawn(&ctx, vec![EngineSource { dp_ranks: 2, ..source_of(4, &r0) }], &sink);
    // Both ranks cache the same prefix (under their own vLLM hashes).
    r0.publish(vec![stored(&[100, 101], None, 0)]);
    r1.publish(vec![stored(&[200], None, 0)]);
    let h = chain(0, 2);
    wait_nudging("both ranks", &[&r0, &r1], || {
        sink.of(4) == set(&h) && sub.stats().engine(4).is_some_and(|e| e.blocks == 3)
    });
    r0.publish(vec![removed(&[100])]);
    wait_nudging("rank 0 evicted block 0", &[&r0, &r1], || sub.stats().engine(4).is_some_and(|e| e.blocks == 2));
    assert_eq!(sink.of(4), set(&h), "rank 1 still holds block 0");
    r1.publish(vec![removed(&[200])]);
    wait_nudging("both evicted block 0", &[&r0, &r1], || sink.of(4) == set(&h[1..]));
}

#[test]
fn shutdown_joins_promptly() {
    let ctx = zmq::Context::new();
    let engine = FakeEngine::new(&ctx, true);
    let sub = spawn(&ctx, vec![engine.source(0)], &Shared::default());
    engine.expect_replay();
    let t = Instant::now();
    drop(sub);
    assert!(t.elapsed() < Duration::from_secs(2), "shutdown took {:?}", t.elapsed());
}

#[test]
fn engines_join_and_leave_an_index_while_the_subscriber_runs() {
    use gantry_kvindex::index::{IndexOptions, IndexWriter};
    let ctx = zmq::Context::new();
    let a = publisher(&ctx, with_replay());
    a.publish(vec![stored(&[1, 2], None, 0)]);
    let path = std::env::temp_dir().join(format!("gantry-kvindex-join-{}", std::process::id()));
    let writer = IndexWriter::create(&path, &IndexOptions { engine_slots: 2, capacity: 64, ..IndexOptions::default() })
        .expect("create segment");
    let reader = writer.reader();
    let sub = Subscriber::spawn_with(&ctx, SubscriberOptions::default(), Vec::new(), writer).unwrap();

    let slot = sub.register("http://a").unwrap();
    assert_eq!(sub.register("http://a").unwrap(), slot, "a known name keeps its slot");
    assert_eq!(reader.engine_slot("http://a"), Some(slot), "the name is in the segment");
    sub.add_engine(EngineSource { name: "http://a".into(), ..source_of(slot, &a) }).unwrap();
    let h = chain(0, 2);
    let mut out = reader.new_overlaps();
    wait_nudging("engine a's blocks in the index", &[&a], || {
        reader.overlaps(&h, &mut out);
        out.get(slot) == 2
    });

    let b = sub.register("http://b").unwrap();
    assert_ne!(b, slot);
    let full = sub.register("http://c");
    assert!(matches!(&full, Err(SubscriberError::Register { engine, .. }) if engine == "http://c"), "{full:?}");

    sub.release(slot).unwrap();
    reader.overlaps(&h, &mut out);
    assert_eq!(out.get(slot), 0, "its blocks are gone before release returns");
    assert_eq!(reader.engine_slot("http://a"), None);
    assert!(sub.stats().engine(slot).is_none(), "no longer followed");
    assert_eq!(sub.register("http://c").unwrap(), slot, "the freed slot is taken again");
    sub.shutdown();
    let _ = std::fs::remove_file(&path);
    let _ = std::fs::remove_file(format!("{}.lock", path.display()));
}

#[test]
fn a_block_the_index_evicted_is_found_again_once_stored_again() {
    use gantry_kvindex::index::{IndexOptions, IndexWriter};
    let path = std::env::temp_dir().join(format!("gantry-kvindex-restore-{}", std::process::id()));
    let writer = IndexWriter::create(&path, &IndexOptions { engine_slots: 2, capacity: 64, ..IndexOptions::default() })
        .expect("create segment");
    let reader = writer.reader();
    let mut a = EventApplier::new(writer);
    let slot = a.sink_mut().register("http://a").unwrap();
    a.add_engine(&EngineSource { name: "http://a".into(), ..source(slot, "tcp://127.0.0.1:1", None) }).unwrap();
    let found = |h: u64| {
        let mut out = reader.new_overlaps();
        reader.overlaps(&[h], &mut out);
        out.get(slot) == 1
    };
    let h = chain(0, 1)[0];
    a.apply_payload(slot, 0, &payload(vec![stored(&[1], None, 0)])).unwrap();
    assert!(found(h));
    // Other blocks fill the index until it evicts `h`: the engine still holds it (no removal).
    let mut n = 0;
    while found(h) {
        n += 1;
        assert!(n < 10_000, "the index never evicted the block");
        a.apply_payload(slot, 0, &payload(vec![stored(&[1000 + u64::from(n)], None, n * BS)])).unwrap();
    }
    // The engine reports it again (a reuse report, another request): it is back.
    a.apply_payload(slot, 0, &payload(vec![stored(&[1], None, 0)])).unwrap();
    assert!(found(h), "a re-store brings an evicted block back");
    // Storing it again refreshes it, it does not add an entry.
    let entries = || reader.stats().writer.iter().find(|(name, _)| *name == "entries").unwrap().1;
    let before = entries();
    a.apply_payload(slot, 0, &payload(vec![stored(&[1], None, 0)])).unwrap();
    assert_eq!(entries(), before);
    // The removal still takes it out.
    a.apply_payload(slot, 0, &payload(vec![removed(&[1])])).unwrap();
    assert!(!found(h));
    drop(a);
    let _ = std::fs::remove_file(&path);
    let _ = std::fs::remove_file(format!("{}.lock", path.display()));
}

// ---------------------------------------------------------------------------------------------
// Restarts, gaps and short replays against the real `Publisher` (what `gantry mock` runs).

/// A [`Shared`] sink whose upkeep can be held: while held, the subscriber thread blocks in
/// [`BlockSink::maintain`] and reads no socket, as a stalled consumer would.
#[derive(Clone, Default)]
struct Gated {
    inner: Shared,
    gate: Arc<Gate>,
}

#[derive(Default)]
struct Gate {
    /// (held, the subscriber thread is blocked in the sink)
    state: Mutex<(bool, bool)>,
    cv: Condvar,
}

impl BlockSink for Gated {
    fn store(&mut self, engine: EngineSlot, hash: u64, pos: u64) {
        self.inner.store(engine, hash, pos);
    }
    fn remove(&mut self, engine: EngineSlot, hash: u64, pos: u64) {
        self.inner.remove(engine, hash, pos);
    }
    fn count(&mut self, counter: Counter, n: u64) {
        self.inner.count(counter, n);
    }
    fn maintain(&mut self) {
        self.inner.maintain();
        let mut s = self.gate.state.lock().unwrap();
        while s.0 {
            s.1 = true;
            self.gate.cv.notify_all();
            s = self.gate.cv.wait(s).unwrap();
        }
        s.1 = false;
    }
}

/// Holds the subscriber thread in the sink until dropped (also when the test panics, so that
/// dropping the subscriber does not hang).
struct Hold<'a>(&'a Gate);

impl Gate {
    /// Returns once the subscriber thread is blocked in the sink.
    fn hold(&self) -> Hold<'_> {
        let mut s = self.state.lock().unwrap();
        s.0 = true;
        let deadline = Instant::now() + DEADLINE;
        while !s.1 {
            let left =
                deadline.checked_duration_since(Instant::now()).expect("the subscriber never blocked in the sink");
            s = self.cv.wait_timeout(s, left).unwrap().0;
        }
        Hold(self)
    }
}

impl Drop for Hold<'_> {
    fn drop(&mut self) {
        self.0.state.lock().unwrap().0 = false;
        self.0.cv.notify_all();
    }
}

/// Block size of the flood tests: one block is a large batch (about 80 KB of msgpack).
const FLOOD_BS: u32 = 16_384;
/// Batches published while the subscriber is held: about 80 MB, more than the high-water marks
/// of 1 message and the largest loopback TCP buffers Linux grows to by default (`tcp_rmem` 6 to
/// 32 MB plus `tcp_wmem` 4 MB) can hold. (In practice one or two batches get through.)
const FLOOD: u32 = 1000;

/// Batch `k` of a flood test: one block that starts a prompt, `FLOOD_BS` tokens of its own.
fn big(k: u32) -> KvEvent {
    KvEvent::BlockStored(BlockStored {
        block_hashes: vec![1_000_000 + u64::from(k)],
        token_ids: (k * FLOOD_BS..(k + 1) * FLOOD_BS).collect(),
        block_size: FLOOD_BS,
        medium: Some("GPU".into()),
        ..BlockStored::default()
    })
}

/// Gantry's hash of the block of [`big`]`(k)`.
fn big_hash(k: u32) -> u64 {
    let tokens: Vec<u32> = (k * FLOOD_BS..(k + 1) * FLOOD_BS).collect();
    let mut out = Vec::new();
    hash_blocks(DEFAULT_SEED, &tokens, FLOOD_BS as usize, 0, &mut out);
    out[0]
}

/// A publisher whose PUB socket drops a batch as soon as one is queued for a slow subscriber.
fn flood_publisher(ctx: &zmq::Context, buffer_steps: usize) -> Publisher {
    publisher(ctx, PublisherConfig { hwm: 1, buffer_steps, ..with_replay() })
}

/// A subscriber whose sockets queue one message each, feeding a [`Gated`] sink.
fn spawn_gated(ctx: &zmq::Context, sources: Vec<EngineSource>, sink: &Gated) -> Subscriber {
    let options = SubscriberOptions { rcvhwm: 1, ..SubscriberOptions::default() };
    Subscriber::spawn_with(ctx, options, sources, sink.clone()).unwrap()
}

/// Publishes batches `range` of the flood while the subscriber is held, and returns once the
/// publisher has sent (or dropped) all of them.
fn flood(p: &Publisher, range: std::ops::Range<u32>) {
    let before = p.stats().published;
    for k in range.clone() {
        p.publish(vec![big(k)]);
    }
    let want = before + u64::from(range.end - range.start);
    wait_until("the flood published", || p.stats().published == want);
    assert_eq!(p.stats().dropped, 0, "the publisher's queue took every batch");
}

/// Starts a publisher on `old`'s endpoints after `old` is dropped (libzmq unbinds in the
/// background, so the port may stay taken for a moment).
fn restart(ctx: &zmq::Context, old: Publisher) -> Publisher {
    let cfg = PublisherConfig {
        endpoint: old.endpoint().to_owned(),
        replay_endpoint: old.replay_endpoint().map(str::to_owned),
        topic: TOPIC.into(),
        ..PublisherConfig::default()
    };
    drop(old);
    let deadline = Instant::now() + DEADLINE;
    loop {
        match Publisher::start(ctx, cfg.clone()) {
            Ok(p) => return p,
            Err(PublisherError::Bind { .. }) if Instant::now() < deadline => std::thread::yield_now(),
            Err(e) => panic!("restarting the publisher on {}: {e}", cfg.endpoint),
        }
    }
}

/// `gantry mock`'s publisher restarts (dropped, then a new one on the same endpoints, counting
/// from 0 again): the subscriber clears that engine's blocks, and only that engine's, then
/// follows the new process.
#[test]
fn a_restarted_publisher_clears_only_its_engine() {
    let ctx = zmq::Context::new();
    let (a, b) = (publisher(&ctx, with_replay()), publisher(&ctx, with_replay()));
    let sink = Shared::default();
    let sub = spawn(&ctx, vec![source_of(0, &a), source_of(1, &b)], &sink);
    // The old process gets far enough that the new one's first live batches are behind it
    // (a restart is told by the live sequence going backwards).
    for _ in 0..500 {
        a.publish(Vec::new());
    }
    a.publish(vec![stored(&[1, 2], None, 0)]);
    b.publish(vec![stored(&[1], None, 0)]);
    wait_nudging("both engines", &[&a, &b], || sink.of(0) == set(&chain(0, 2)) && sink.of(1) == set(&chain(0, 1)));
    // One more batch, on the live stream for sure now that the SUB has joined.
    a.publish(vec![stored(&[3], Some(2), 8)]);
    wait_until("engine 0's last batch", || sink.of(0) == set(&chain(0, 3)));
    let published = a.stats().published;
    assert!(published > 500);

    let a = restart(&ctx, a);
    // Empty batches from the new process until one reaches the subscriber (it reconnects).
    wait_nudging("the old process's blocks to go", &[&a], || sink.of(0).is_empty());
    assert_eq!(counter(&sub, 0, Counter::Resyncs), 1);
    assert!(a.stats().published < published, "seen as a restart, not as a gap");
    assert_eq!(sink.of(1), set(&chain(0, 1)), "the other engine keeps its blocks");
    // The new process's events are applied.
    a.publish(vec![stored(&[50], None, 500)]);
    a.publish(vec![stored(&[51], Some(50), 504)]);
    wait_until("the new process's blocks", || sink.of(0) == set(&chain(500, 2)));
    assert_eq!(sink.of(1), set(&chain(0, 1)));
    assert_eq!(counter(&sub, 0, Counter::Resyncs), 1);
    assert_eq!(counter(&sub, 1, Counter::Resyncs), 0);
    assert_eq!(sub.stats().totals[Counter::DecodeErrors], 0);
}

/// A consumer stalls while `gantry mock`'s publisher floods it: libzmq drops batches at the
/// high-water marks, the subscriber sees the gap once it runs again, and the replay fills it:
/// every batch applied exactly once, nothing cleared.
#[test]
fn a_gap_from_a_real_publisher_is_filled_by_replay() {
    let ctx = zmq::Context::new();
    let a = flood_publisher(&ctx, 2 * FLOOD as usize);
    let sink = Gated::default();
    let sub = spawn_gated(&ctx, vec![EngineSource { block_size: FLOOD_BS, ..source_of(0, &a) }], &sink);
    a.publish(vec![big(0)]);
    wait_nudging("batch 0", &[&a], || sink.inner.of(0).contains(&big_hash(0)));

    let hold = sink.gate.hold();
    flood(&a, 1..FLOOD);
    drop(hold);
    let want: HashSet<u64> = (0..FLOOD).map(big_hash).collect();
    wait_nudging("every batch of the flood", &[&a], || sink.inner.of(0) == want);
    let c = sub.stats().engine(0).unwrap().counters;
    assert!(c[Counter::Gaps] >= 1, "the flood overflowed nothing: no gap to test");
    assert!(c[Counter::Replays] >= 2, "the join, then the gap");
    assert_eq!(c[Counter::Resyncs], 0);
    assert_eq!(c[Counter::EventsApplied], u64::from(FLOOD), "each batch applied once");
}

/// As above, but the publisher keeps only the last 4 batches (`--kv-events-buffer-steps 4`):
/// the replay cannot reach back to the gap, so the engine is cleared and rebuilt from what the
/// replay has; another engine keeps its blocks.
#[test]
fn a_gap_a_short_replay_buffer_cannot_fill_clears_the_engine() {
    const STEPS: u32 = 4;
    let ctx = zmq::Context::new();
    let a = flood_publisher(&ctx, STEPS as usize);
    let b = publisher(&ctx, with_replay());
    let sources = vec![EngineSource { block_size: FLOOD_BS, ..source_of(0, &a) }, source_of(1, &b)];
    let sink = Gated::default();
    let sub = spawn_gated(&ctx, sources, &sink);
    a.publish(vec![big(0)]);
    b.publish(vec![stored(&[1], None, 0)]);
    wait_nudging("both engines", &[&a, &b], || {
        sink.inner.of(0).contains(&big_hash(0)) && sink.inner.of(1) == set(&chain(0, 1))
    });

    let hold = sink.gate.hold();
    flood(&a, 1..FLOOD);
    drop(hold);
    wait_nudging("batch 0, from before the gap, to go", &[&a], || !sink.inner.of(0).contains(&big_hash(0)));
    // A batch after the resync is applied on top of whatever the replay still had.
    a.publish(vec![big(FLOOD)]);
    wait_nudging("the batch after the resync", &[&a], || sink.inner.of(0).contains(&big_hash(FLOOD)));
    let c = sub.stats().engine(0).unwrap().counters;
    assert!(c[Counter::Gaps] >= 1, "the flood overflowed nothing: no gap to test");
    assert_eq!(c[Counter::Resyncs], 1);
    // Only the batches the replay could return (the last STEPS) and the new one may remain.
    let replayable: HashSet<u64> = (FLOOD - STEPS..=FLOOD).map(big_hash).collect();
    let got = sink.inner.of(0);
    assert!(
        got.is_subset(&replayable),
        "{} blocks from before the replayable window",
        got.difference(&replayable).count()
    );
    assert_eq!(sink.inner.of(1), set(&chain(0, 1)), "the other engine keeps its blocks");
    assert_eq!(counter(&sub, 1, Counter::Resyncs), 0);
}
