//! Publisher over real libzmq loopback sockets: live PUB stream, DEALER replay, buffer bounds, bad requests, bind errors.

use std::time::{Duration, Instant};

use gantry_kvindex::{
    BlockRemoved, BlockStored, KvEvent, Publisher, PublisherConfig, PublisherError, ReplayFraming, WireFormat,
};
use rmpv::Value;

const TOPIC: &str = "kv-events";
const DEADLINE: Duration = Duration::from_secs(10);
const END: [u8; 8] = [0xff; 8];

type Msg = Vec<Vec<u8>>;

fn config(replay: bool) -> PublisherConfig {
    PublisherConfig {
        endpoint: "tcp://127.0.0.1:*".into(),
        replay_endpoint: replay.then(|| "tcp://127.0.0.1:0".into()),
        topic: TOPIC.into(),
        ..PublisherConfig::default()
    }
}

fn stored(n: u32) -> Vec<KvEvent> {
    vec![
        KvEvent::BlockStored(BlockStored {
            block_hashes: vec![u64::from(n) * 1_000_003],
            token_ids: (0..4).map(|i| n * 4 + i).collect(),
            block_size: 4,
            medium: Some("GPU".into()),
            extra_keys: Some(vec![None]),
            group_idx: Some(0),
            kv_cache_spec_kind: Some("full_attention".into()),
            ..BlockStored::default()
        }),
        KvEvent::BlockRemoved(BlockRemoved { block_hashes: vec![7], medium: Some("GPU".into()), group_idx: Some(0) }),
    ]
}

/// Polls `cond` until it holds or the deadline passes (a poll interval, not a synchronisation sleep).
fn wait_until(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + DEADLINE;
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(1));
    }
}

fn socket(ctx: &zmq::Context, kind: zmq::SocketType) -> zmq::Socket {
    let s = ctx.socket(kind).unwrap();
    s.set_linger(0).unwrap();
    s.set_rcvtimeo(50).unwrap();
    s
}

/// Receives one message, retrying on the 50 ms receive timeout until `DEADLINE`.
fn recv(sock: &zmq::Socket) -> Msg {
    try_recv(sock, DEADLINE).expect("no message before the deadline")
}

fn try_recv(sock: &zmq::Socket, within: Duration) -> Option<Msg> {
    let deadline = Instant::now() + within;
    loop {
        match sock.recv_multipart(0) {
            Ok(m) => return Some(m),
            Err(zmq::Error::EAGAIN) if Instant::now() < deadline => continue,
            Err(zmq::Error::EAGAIN) => return None,
            Err(e) => panic!("recv: {e}"),
        }
    }
}

fn seq_of(frame: &[u8]) -> u64 {
    u64::from_be_bytes(frame.try_into().expect("8-byte seq frame"))
}

/// Subscribes and publishes probe batches until the first one arrives (PUB/SUB slow joiner).
/// Returns the first live message received and the number of probes published.
fn join_stream(p: &Publisher, sub: &zmq::Socket) -> (Msg, u64) {
    let deadline = Instant::now() + DEADLINE;
    let mut n = 0;
    loop {
        assert!(Instant::now() < deadline, "subscriber never joined");
        p.publish(stored(n));
        n += 1;
        if let Some(m) = try_recv(sub, Duration::from_millis(20)) {
            return (m, u64::from(n));
        }
    }
}

fn dealer(ctx: &zmq::Context, p: &Publisher) -> zmq::Socket {
    let d = socket(ctx, zmq::DEALER);
    d.connect(p.replay_endpoint().expect("replay enabled")).unwrap();
    d
}

/// Sends a replay request from `start` and collects the data messages up to the end marker
/// (returned separately), with the DEALER's leading empty delimiter checked and removed.
fn replay(d: &zmq::Socket, start: u64) -> (Vec<Msg>, Msg) {
    d.send_multipart([&[][..], &start.to_be_bytes()], 0).unwrap();
    let mut data = Vec::new();
    loop {
        let mut m = recv(d);
        assert_eq!(m.remove(0), b"", "delimiter");
        let is_end = match m.len() {
            3 => m[1] == END, // 0.33: [topic, seq, payload] / [<empty>, FF×8, <empty>]
            2 => m[0] == END, // legacy: [seq, payload] / [FF×8, <empty>]
            n => panic!("unexpected replay message of {n} frames"),
        };
        if is_end {
            return (data, m);
        }
        data.push(m);
    }
}

fn decode(payload: &[u8]) -> Vec<Value> {
    let v = rmpv::decode::read_value(&mut &payload[..]).expect("payload is msgpack");
    let Value::Array(items) = v else { panic!("batch is not an array: {v}") };
    items
}

#[test]
fn live_stream_and_replay_v033() {
    let ctx = zmq::Context::new();
    let p = Publisher::start(&ctx, config(true)).unwrap();
    let sub = socket(&ctx, zmq::SUB);
    sub.connect(p.endpoint()).unwrap();
    sub.set_subscribe(TOPIC.as_bytes()).unwrap();

    let (first, probes) = join_stream(&p, &sub);
    let first_seq = seq_of(&first[1]);
    let total = probes + 3;
    // Everything published after joining arrives in order, 3 frames each.
    let mut live = vec![first];
    for n in 0..3 {
        p.publish(stored(100 + n));
    }
    wait_until("all batches published", || p.stats().published == total);
    while seq_of(&live.last().unwrap()[1]) < total - 1 {
        live.push(recv(&sub));
    }
    assert!(live.len() >= 4);
    for (i, m) in live.iter().enumerate() {
        assert_eq!(m.len(), 3);
        assert_eq!(m[0], TOPIC.as_bytes());
        assert_eq!(seq_of(&m[1]), first_seq + i as u64);
        let batch = decode(&m[2]);
        assert_eq!(batch.len(), 3);
        let ts = batch[0].as_f64().expect("ts is float64");
        assert_eq!(m[2][1], 0xcb, "ts is encoded as float64");
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap();
        assert!((now.as_secs_f64() - ts).abs() < 60.0, "ts {ts} is not now");
        assert_eq!(batch[2].as_u64(), Some(0), "data_parallel_rank");
        let events = batch[1].as_array().unwrap();
        assert_eq!(events[0]["type"].as_str(), Some("BlockStored"));
        assert_eq!(events[1]["type"].as_str(), Some("BlockRemoved"));
    }

    // Replay from 0: every batch since start, seq 0.., byte-identical to the live ones.
    let d = dealer(&ctx, &p);
    let (data, end) = replay(&d, 0);
    assert_eq!(end, [&b""[..], &END, &[]]);
    assert_eq!(data.len() as u64, total);
    for (i, m) in data.iter().enumerate() {
        assert_eq!(m.len(), 3, "[topic, seq, payload]");
        assert_eq!(m[0], TOPIC.as_bytes());
        assert_eq!(seq_of(&m[1]), i as u64);
    }
    for m in &live {
        assert_eq!(&data[seq_of(&m[1]) as usize], m, "replayed batch differs from the live one");
    }
    // Replay from the middle.
    let (tail, _) = replay(&d, first_seq + 2);
    assert_eq!(tail, data[first_seq as usize + 2..]);
    assert_eq!(p.stats().replay_requests, 2);
    assert_eq!(p.stats().dropped, 0);
}

#[test]
fn replay_is_prompt_on_an_idle_publisher() {
    let ctx = zmq::Context::new();
    let p = Publisher::start(&ctx, config(true)).unwrap();
    p.publish(stored(1));
    wait_until("published", || p.stats().published == 1);
    let d = dealer(&ctx, &p);
    replay(&d, 0); // connection established
                   // vLLM polls every 100 ms; this publisher is woken by the request itself.
    let best = (0..5)
        .map(|_| {
            let t = Instant::now();
            replay(&d, 0);
            t.elapsed()
        })
        .min()
        .unwrap();
    assert!(best < Duration::from_millis(50), "replay round trip took {best:?}");
}

#[test]
fn legacy_replay_framing() {
    let ctx = zmq::Context::new();
    let cfg = PublisherConfig { replay_framing: ReplayFraming::Legacy, format: WireFormat::Array, ..config(true) };
    let p = Publisher::start(&ctx, cfg).unwrap();
    p.publish(stored(1));
    p.publish(vec![KvEvent::AllBlocksCleared]);
    wait_until("published", || p.stats().published == 2);
    let (data, end) = replay(&dealer(&ctx, &p), 0);
    assert_eq!(end, [&END[..], &[]]);
    assert_eq!(data.len(), 2);
    for (i, m) in data.iter().enumerate() {
        assert_eq!(m.len(), 2, "[seq, payload] without topic");
        assert_eq!(seq_of(&m[0]), i as u64);
    }
    let cleared = decode(&data[1][1]);
    assert_eq!(cleared[1], Value::Array(vec![Value::Array(vec!["AllBlocksCleared".into()])]));
    let first = decode(&data[0][1]);
    assert_eq!(first[1][0].as_array().unwrap().len(), 12, "0.23 BlockStored array");
}

#[test]
fn replay_buffer_keeps_last_buffer_steps_batches() {
    let ctx = zmq::Context::new();
    let p = Publisher::start(&ctx, PublisherConfig { buffer_steps: 3, ..config(true) }).unwrap();
    for n in 0..5 {
        p.publish(stored(n));
    }
    wait_until("5 published", || p.stats().published == 5);
    let d = dealer(&ctx, &p);
    let seqs = |start| -> Vec<u64> { replay(&d, start).0.iter().map(|m| seq_of(&m[1])).collect() };
    assert_eq!(seqs(0), [2, 3, 4]);
    assert_eq!(seqs(3), [3, 4]);
    assert_eq!(seqs(99), Vec::<u64>::new());
}

#[test]
fn malformed_replay_requests_are_ignored() {
    let ctx = zmq::Context::new();
    let p = Publisher::start(&ctx, config(true)).unwrap();
    p.publish(stored(1));
    wait_until("published", || p.stats().published == 1);
    let d = dealer(&ctx, &p);
    d.send(&0u64.to_be_bytes()[..], 0).unwrap(); // 2 frames at the ROUTER
    d.send_multipart([&[][..], &0u64.to_be_bytes(), b"extra"], 0).unwrap(); // 4 frames
    wait_until("both ignored", || p.stats().replay_requests_ignored == 2);
    assert!(try_recv(&d, Duration::from_millis(100)).is_none(), "no reply to a bad request");
    // Still serving.
    let (data, _) = replay(&d, 0);
    assert_eq!(data.len(), 1);
    p.publish(stored(2));
    wait_until("published after bad requests", || p.stats().published == 2);
    assert_eq!(p.stats().replay_requests, 1);
}

#[test]
fn bind_conflict_names_the_endpoint() {
    let ctx = zmq::Context::new();
    let a = Publisher::start(&ctx, config(true)).unwrap();
    assert!(!a.endpoint().ends_with(":*") && !a.endpoint().ends_with(":0"), "{}", a.endpoint());
    let taken = a.endpoint().to_owned();
    let err = Publisher::start(&ctx, PublisherConfig { endpoint: taken.clone(), ..config(false) })
        .err()
        .expect("second bind must fail");
    assert!(matches!(err, PublisherError::Bind { .. }), "{err:?}");
    assert!(err.to_string().contains(&taken), "{err}");

    let taken = a.replay_endpoint().unwrap().to_owned();
    let err = Publisher::start(&ctx, PublisherConfig { replay_endpoint: Some(taken.clone()), ..config(false) })
        .err()
        .expect("replay bind must fail");
    assert!(err.to_string().contains(&taken), "{err}");
    assert!(err.to_string().contains("replay"), "{err}");
}

#[test]
fn connect_mode_reaches_a_bound_subscriber() {
    let ctx = zmq::Context::new();
    let sub = socket(&ctx, zmq::SUB);
    sub.bind("tcp://127.0.0.1:*").unwrap();
    sub.set_subscribe(b"").unwrap();
    let ep = sub.get_last_endpoint().unwrap().unwrap();
    let p = Publisher::start(
        &ctx,
        PublisherConfig { endpoint: ep.clone(), topic: String::new(), bind: false, ..config(false) },
    )
    .unwrap();
    assert_eq!(p.endpoint(), ep);
    assert_eq!(p.replay_endpoint(), None);
    let (m, _) = join_stream(&p, &sub);
    assert_eq!(m[0], b"", "empty topic frame");
    assert_eq!(m.len(), 3);
}

#[test]
fn full_queue_drops_and_counts() {
    let ctx = zmq::Context::new();
    let p = Publisher::start(&ctx, PublisherConfig { max_queue_size: 1, ..config(false) }).unwrap();
    const N: u64 = 2_000;
    for n in 0..N {
        p.publish(stored(n as u32));
    }
    wait_until("every batch published or dropped", || {
        let s = p.stats();
        s.published + s.dropped == N
    });
}

#[test]
fn drop_releases_the_port() {
    let ctx = zmq::Context::new();
    let p = Publisher::start(&ctx, config(true)).unwrap();
    let cfg = PublisherConfig {
        endpoint: p.endpoint().to_owned(),
        replay_endpoint: p.replay_endpoint().map(str::to_owned),
        ..config(true)
    };
    p.publish(stored(0));
    drop(p);
    // libzmq closes the listener asynchronously; retry until the port is free again.
    let deadline = Instant::now() + DEADLINE;
    loop {
        match Publisher::start(&ctx, cfg.clone()) {
            Ok(_) => break,
            Err(_) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(5)),
            Err(e) => panic!("port not released: {e}"),
        }
    }
}
