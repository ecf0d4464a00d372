//! Policies: spread, load awareness, session stickiness with bounded load, health fallback.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use super::*;
use crate::config::Role;
use crate::fleet::{now_ms, EngineState};

fn pool(policy: PolicyKind, n: usize) -> Pool {
    Pool {
        name: "p".into(),
        role: Role::Agg,
        policy,
        session_header: "x-session-id".into(),
        block_size: 16,
        engines: (0..n)
            .map(|i| Arc::new(EngineState::new(&format!("http://127.0.0.1:{}", 9000 + i), "m").unwrap()))
            .collect(),
        rr: AtomicUsize::new(0),
        index: None,
        slots: vec![None; n],
        kv: crate::route::kv::Weights::default(),
        conf: crate::config::Config::single_pool("m", &[]).pool.remove(0),
        counters: Arc::default(),
    }
}

fn input<'a>(tried: &'a [usize], session: Option<&'a [u8]>) -> PickInput<'a> {
    PickInput { tried, session, now: now_ms() }
}

#[test]
fn round_robin_cycles_and_skips_tried() {
    let p = pool(PolicyKind::RoundRobin, 3);
    let mut rng = fastrand::Rng::with_seed(1);
    let picks: Vec<usize> = (0..6).map(|_| pick(&p, &input(&[], None), &mut rng).unwrap()).collect();
    assert_eq!(picks, [0, 1, 2, 0, 1, 2]);
    for _ in 0..10 {
        assert_ne!(pick(&p, &input(&[1], None), &mut rng), Some(1));
    }
    assert_eq!(pick(&p, &input(&[0, 1, 2], None), &mut rng), None);
}

#[test]
fn least_loaded_and_power_of_two_avoid_load() {
    for policy in [PolicyKind::LeastLoaded, PolicyKind::PowerOfTwo] {
        let p = pool(policy, 4);
        p.engines[0].in_flight.store(10, Ordering::Relaxed);
        p.engines[1].in_flight.store(10, Ordering::Relaxed);
        p.engines[2].in_flight.store(10, Ordering::Relaxed);
        let mut rng = fastrand::Rng::with_seed(2);
        let to_idle = (0..1000).filter(|_| pick(&p, &input(&[], None), &mut rng) == Some(3)).count();
        let floor = if policy == PolicyKind::LeastLoaded { 1000 } else { 400 };
        assert!(to_idle >= floor, "{policy:?} sent {to_idle}/1000 to the idle engine");
    }
}

#[test]
fn session_is_sticky_until_its_engine_is_overloaded() {
    let p = pool(PolicyKind::Session, 4);
    let mut rng = fastrand::Rng::with_seed(3);
    let first = pick(&p, &input(&[], Some(b"user-42")), &mut rng).unwrap();
    for _ in 0..20 {
        assert_eq!(pick(&p, &input(&[], Some(b"user-42")), &mut rng), Some(first));
    }
    let keys: std::collections::HashSet<usize> =
        (0..200).map(|i| pick(&p, &input(&[], Some(format!("k{i}").as_bytes())), &mut rng).unwrap()).collect();
    assert_eq!(keys.len(), 4, "keys spread over every engine");
    p.engines[first].in_flight.store(50, Ordering::Relaxed);
    assert_ne!(pick(&p, &input(&[], Some(b"user-42")), &mut rng), Some(first), "bounded load moves a hot key");
}

#[test]
fn unhealthy_engines_only_when_nothing_else_is_left() {
    let p = pool(PolicyKind::RoundRobin, 2);
    p.engines[0].probe_down.store(true, Ordering::Relaxed);
    let mut rng = fastrand::Rng::with_seed(4);
    for _ in 0..10 {
        assert_eq!(pick(&p, &input(&[], None), &mut rng), Some(1));
    }
    assert_eq!(pick(&p, &input(&[1], None), &mut rng), Some(0), "the ejected engine is the last resort");
    p.engines[0].draining.store(true, Ordering::Relaxed);
    assert_eq!(pick(&p, &input(&[1], None), &mut rng), None, "draining engines get nothing");
}
