//! Unit tests for the publisher's config checks and helpers (socket behaviour: `tests/publisher.rs`).

use super::*;

#[test]
fn defaults_match_vllm() {
    let cfg = PublisherConfig::default();
    assert_eq!(cfg.endpoint, "tcp://*:5557");
    assert_eq!(cfg.replay_endpoint, None);
    assert_eq!(cfg.topic, "");
    assert_eq!((cfg.buffer_steps, cfg.hwm, cfg.max_queue_size), (10_000, 100_000, 100_000));
    assert_eq!((cfg.format, cfg.replay_framing, cfg.bind), (WireFormat::Map, ReplayFraming::V033, true));
    assert!(cfg.validate().is_ok());
    assert_eq!(replay_hwm(cfg.buffer_steps), Some(20_002));
}

#[test]
fn validate_names_the_bad_key() {
    type Mutate = fn(&mut PublisherConfig);
    let cases: [(&str, Mutate); 6] = [
        ("endpoint", |c| c.endpoint.clear()),
        ("endpoint", |c| c.endpoint = "127.0.0.1:5557".into()),
        ("replay_endpoint", |c| c.replay_endpoint = Some("tcp://a\0b:1".into())),
        ("max_queue_size", |c| c.max_queue_size = 0),
        ("hwm", |c| c.hwm = -1),
        ("buffer_steps", |c| c.buffer_steps = usize::MAX),
    ];
    for (key, mutate) in cases {
        let mut cfg = PublisherConfig::default();
        mutate(&mut cfg);
        let err = cfg.validate().expect_err(key);
        assert!(matches!(err, PublisherError::InvalidConfig { key: k, .. } if k == key), "{err}");
        assert!(err.to_string().contains(key), "{err}");
    }
}

#[test]
fn start_seq_is_big_endian_of_any_length() {
    assert_eq!(parse_start_seq(&5u64.to_be_bytes()), 5);
    assert_eq!(parse_start_seq(&[]), 0);
    assert_eq!(parse_start_seq(&[1, 0]), 256);
    assert_eq!(parse_start_seq(&[0, 0, 0, 0, 0, 0, 0, 0, 0, 7]), 7);
    assert_eq!(parse_start_seq(&[1, 0, 0, 0, 0, 0, 0, 0, 0]), u64::MAX);
}

#[test]
fn ephemeral_port_spelling() {
    assert_eq!(bind_address("tcp://127.0.0.1:0"), "tcp://127.0.0.1:*");
    assert_eq!(bind_address("tcp://127.0.0.1:*"), "tcp://127.0.0.1:*");
    assert_eq!(bind_address("tcp://127.0.0.1:5550"), "tcp://127.0.0.1:5550");
    assert_eq!(bind_address("ipc:///tmp/x:0"), "ipc:///tmp/x:0");
}

#[test]
fn publisher_is_send() {
    fn assert_send<T: Send>() {}
    assert_send::<Publisher>();
    assert_send::<PublisherConfig>();
    assert_send::<PublisherError>();
}
