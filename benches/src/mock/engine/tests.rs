//! Scheduler: batching, chunked prefill, prefix hits, preemption, P/D leases and pulls.

use std::time::{Duration, Instant};

use gantry_kvindex::events::KvEvent;

use super::*;

fn cfg(blocks: usize, bs: usize) -> EngineConfig {
    EngineConfig {
        block_size: bs,
        num_gpu_blocks: blocks,
        max_num_seqs: 8,
        max_num_batched_tokens: 64,
        max_num_queued_reqs: 4,
        max_model_len: (blocks - 1) * bs,
        prefix_caching: true,
        hash_algo: VllmHashAlgo::Sha256,
        eos_after: None,
        timing: TimingModel { speedup: 0.0, ..TimingModel::default() },
        events_enabled: true,
        kv_lease: Duration::from_secs(30),
        kv_recompute_threshold: 4,
    }
}

fn req(prompt: Vec<u32>, max_tokens: usize) -> NewRequest {
    NewRequest {
        prompt,
        max_tokens,
        ignore_eos: true,
        seed: 1,
        lease_id: None,
        remote_prefill: None,
        cache_salt: None,
        lora: None,
    }
}

/// Steps until no work is left (bounded), returning the number of steps.
fn run(e: &mut EngineCore) -> usize {
    let mut steps = 0;
    while e.has_work() {
        let plan = e.schedule();
        if plan.is_empty() {
            break;
        }
        e.complete(plan, Instant::now());
        steps += 1;
        assert!(steps < 10_000, "engine did not converge");
    }
    steps
}

#[test]
fn request_runs_to_max_tokens_and_frees_its_blocks() {
    let mut e = EngineCore::new(cfg(64, 4), vec![100, 101, 102], None);
    let (_, out) = e.submit(req((0..10).collect(), 5), Instant::now()).unwrap();
    let steps = run(&mut e);
    assert_eq!(steps, 5, "one prefill step, then one step per further token");
    let o = out.borrow();
    assert_eq!(o.finished, Some(FinishReason::Length));
    assert_eq!(o.new_tokens.len(), 5);
    assert!(o.new_tokens.iter().all(|t| [100, 101, 102].contains(t)));
    assert_eq!(e.kv_usage(), 0.0);
    assert_eq!(e.metrics.generation_tokens, 5);
}

#[test]
fn output_is_deterministic_per_seed() {
    let outputs: Vec<Vec<u32>> = (0..2)
        .map(|_| {
            let mut e = EngineCore::new(cfg(64, 4), (100..200).collect(), None);
            let (_, out) = e.submit(req((0..10).collect(), 8), Instant::now()).unwrap();
            run(&mut e);
            let toks = out.borrow().new_tokens.clone();
            toks
        })
        .collect();
    assert_eq!(outputs[0], outputs[1]);
}

#[test]
fn second_request_hits_the_prefix_and_events_describe_it() {
    let mut e = EngineCore::new(cfg(64, 4), vec![100], None);
    let prompt: Vec<u32> = (0..13).collect();
    let (_, a) = e.submit(req(prompt.clone(), 1), Instant::now()).unwrap();
    run(&mut e);
    let ev = e.take_events();
    let stored: Vec<&gantry_kvindex::events::BlockStored> = ev
        .iter()
        .filter_map(|x| match x {
            KvEvent::BlockStored(s) => Some(s),
            _ => None,
        })
        .collect();
    assert_eq!(stored.len(), 1);
    assert_eq!(stored[0].block_hashes.len(), 3, "13 prompt tokens = 3 full blocks");
    assert_eq!(stored[0].token_ids, (0..12).collect::<Vec<u32>>());
    assert_eq!(stored[0].parent_block_hash, None);
    // The hashes are vLLM's: the chain over the prompt's full blocks.
    let want = gantry_kvindex::vllm_hash::hash_blocks(VllmHashAlgo::Sha256, &prompt, 4);
    let want: Vec<u64> = want.iter().map(gantry_kvindex::vllm_hash::digest_to_u64).collect();
    assert_eq!(stored[0].block_hashes, want);
    assert_eq!(a.borrow().cached_tokens, 0);

    let (_, b) = e.submit(req(prompt, 1), Instant::now()).unwrap();
    run(&mut e);
    assert_eq!(b.borrow().cached_tokens, 12);
    assert_eq!(e.metrics.prefix_queries, 26);
    assert_eq!(e.metrics.prefix_hits, 12);
}

/// The first `BlockStored` among the events emitted so far (taking them all).
fn first_stored(e: &mut EngineCore) -> gantry_kvindex::events::BlockStored {
    let ev = e.take_events();
    match ev.into_iter().find(|x| matches!(x, KvEvent::BlockStored(_))) {
        Some(KvEvent::BlockStored(stored)) => stored,
        _ => panic!("no BlockStored among the events"),
    }
}

/// Runs `r` to the end and returns the prompt tokens it found cached.
fn cached_tokens(e: &mut EngineCore, r: NewRequest) -> usize {
    let (_, out) = e.submit(r, Instant::now()).unwrap();
    run(e);
    let cached = out.borrow().cached_tokens;
    cached
}

#[test]
fn a_cache_salt_keys_the_first_block_and_isolates_the_cache() {
    let mut e = EngineCore::new(cfg(64, 4), vec![100], None);
    let prompt: Vec<u32> = (0..13).collect();
    let salted = |salt: &str| NewRequest { cache_salt: Some(salt.into()), ..req(prompt.clone(), 1) };
    let (_, a) = e.submit(salted("tenant-a"), Instant::now()).unwrap();
    run(&mut e);
    let stored = first_stored(&mut e);
    // vLLM's event form: the salt as the first block's only extra key, nothing on the others.
    let keys = stored.extra_keys.as_ref().expect("extra_keys present");
    assert_eq!(keys[0], Some(vec![gantry_kvindex::events::ExtraKey::Str("tenant-a".into())]));
    assert!(keys[1..].iter().all(Option::is_none));
    // vLLM's hash: the first block keyed by the salt, the chain continuing from it.
    let none = gantry_kvindex::vllm_hash::none_hash(VllmHashAlgo::Sha256);
    let b0 = gantry_kvindex::vllm_hash::hash_block_salted(VllmHashAlgo::Sha256, &none, &prompt[..4], Some("tenant-a"));
    let b1 = gantry_kvindex::vllm_hash::hash_block(VllmHashAlgo::Sha256, &b0, &prompt[4..8]);
    let digests = [b0, b1].map(|d| gantry_kvindex::vllm_hash::digest_to_u64(&d));
    assert_eq!(stored.block_hashes[..2], digests);
    assert_eq!(a.borrow().cached_tokens, 0);
    // Another salt and no salt miss; the same salt hits.
    for (req, want) in [(salted("tenant-b"), 0), (req(prompt.clone(), 1), 0), (salted("tenant-a"), 12)] {
        assert_eq!(cached_tokens(&mut e, req), want);
    }
}

#[test]
fn a_lora_adapter_keys_every_block_and_isolates_the_cache() {
    use gantry_kvindex::events::ExtraKey;
    use gantry_kvindex::vllm_hash::{digest_to_u64, hash_block_keyed, none_hash, VllmExtraKey};
    let mut e = EngineCore::new(cfg(64, 4), vec![100], None);
    let prompt: Vec<u32> = (0..13).collect();
    let sql = LoraModule { name: "sql-lora".into(), path: "/adapters/sql".into() };
    let adapter = |l: &LoraModule, salt: Option<&str>| NewRequest {
        lora: Some(l.clone()),
        cache_salt: salt.map(str::to_owned),
        ..req(prompt.clone(), 1)
    };
    e.submit(adapter(&sql, Some("tenant-a")), Instant::now()).unwrap();
    run(&mut e);
    let stored = first_stored(&mut e);
    // vLLM's event form: the adapter named, and keyed on every block, the salt after it on the first.
    assert_eq!(stored.lora_name.as_deref(), Some("sql-lora"));
    let keys = stored.extra_keys.as_ref().expect("extra_keys present");
    let name = ExtraKey::Str("sql-lora".into());
    assert_eq!(keys[0], Some(vec![name.clone(), ExtraKey::Str("tenant-a".into())]));
    assert!(keys[1..].iter().all(|k| k.as_deref() == Some(std::slice::from_ref(&name))), "{keys:?}");
    // vLLM's hash: ("lora", name, path) on every block, then ("cache_salt", salt) on the first.
    let algo = VllmHashAlgo::Sha256;
    let lora = VllmExtraKey::Lora { name: "sql-lora", path: "/adapters/sql" };
    let b0 = hash_block_keyed(algo, &none_hash(algo), &prompt[..4], &[lora, VllmExtraKey::CacheSalt("tenant-a")]);
    let b1 = hash_block_keyed(algo, &b0, &prompt[4..8], &[lora]);
    assert_eq!(stored.block_hashes[..2], [b0, b1].map(|d| digest_to_u64(&d)));
    // The base model, another adapter and another salt miss; the same adapter and salt hit.
    let other = LoraModule { name: "chat-lora".into(), ..sql.clone() };
    let cases = [
        (req(prompt.clone(), 1), 0),
        (adapter(&other, Some("tenant-a")), 0),
        (adapter(&sql, None), 0),
        (adapter(&sql, Some("tenant-a")), 12),
    ];
    for (r, want) in cases {
        assert_eq!(cached_tokens(&mut e, r), want);
    }
}

#[test]
fn last_prompt_token_is_always_computed() {
    let mut e = EngineCore::new(cfg(64, 4), vec![100], None);
    let prompt: Vec<u32> = (0..12).collect();
    e.submit(req(prompt.clone(), 1), Instant::now()).unwrap();
    run(&mut e);
    let (_, b) = e.submit(req(prompt, 1), Instant::now()).unwrap();
    run(&mut e);
    assert_eq!(b.borrow().cached_tokens, 8, "a 12-token prompt can hit at most 2 of its 3 blocks");
}

#[test]
fn chunked_prefill_respects_the_token_budget() {
    let mut c = cfg(64, 4);
    c.max_num_batched_tokens = 16;
    let mut e = EngineCore::new(c, vec![100], None);
    e.submit(req((0..40).collect(), 1), Instant::now()).unwrap();
    let mut prefill = Vec::new();
    while e.has_work() {
        let plan = e.schedule();
        prefill.push(plan.prefill_tokens);
        e.complete(plan, Instant::now());
    }
    assert_eq!(prefill, [16, 16, 8]);
}

#[test]
fn max_num_seqs_and_queue_limit() {
    let mut c = cfg(256, 4);
    c.max_num_seqs = 2;
    let mut e = EngineCore::new(c, vec![100], None);
    for _ in 0..4 {
        e.submit(req(vec![1, 2, 3], 3), Instant::now()).unwrap();
    }
    assert_eq!(e.submit(req(vec![1], 1), Instant::now()).unwrap_err(), SubmitError::QueueFull);
    let plan = e.schedule();
    assert_eq!(e.num_running(), 2);
    assert_eq!(e.num_waiting(), 2);
    e.complete(plan, Instant::now());
    run(&mut e);
    assert_eq!(e.metrics.success.iter().find(|(r, _)| *r == "length").unwrap().1, 4);
}

#[test]
fn full_cache_preempts_the_newest_and_everyone_finishes() {
    // 8 usable blocks of 2 tokens; two requests that each grow to 8 blocks.
    let mut e = EngineCore::new(cfg(9, 2), vec![100], None);
    let (_, a) = e.submit(req(vec![1, 2, 3, 4], 12), Instant::now()).unwrap();
    let (_, b) = e.submit(req(vec![5, 6, 7, 8], 12), Instant::now()).unwrap();
    run(&mut e);
    assert_eq!(a.borrow().finished, Some(FinishReason::Length));
    assert_eq!(b.borrow().finished, Some(FinishReason::Length));
    assert!(e.metrics.preemptions > 0);
    assert_eq!(a.borrow().num_output, 12);
}

#[test]
fn aborted_requests_release_their_blocks() {
    let mut e = EngineCore::new(cfg(64, 4), vec![100], None);
    let (_, out) = e.submit(req((0..20).collect(), 100), Instant::now()).unwrap();
    let plan = e.schedule();
    e.complete(plan, Instant::now());
    assert!(e.kv_usage() > 0.0);
    out.borrow_mut().aborted = true;
    e.note_abort();
    let plan = e.schedule();
    assert!(plan.is_empty());
    assert_eq!(e.kv_usage(), 0.0);
    assert_eq!(e.metrics.success.iter().find(|(r, _)| *r == "abort").unwrap().1, 1);
}

#[test]
fn eos_after_stops_unless_ignore_eos() {
    let mut c = cfg(64, 4);
    c.eos_after = Some(3);
    let mut e = EngineCore::new(c, vec![100], Some(7));
    let mut r = req(vec![1, 2, 3], 10);
    r.ignore_eos = false;
    let (_, stop) = e.submit(r, Instant::now()).unwrap();
    let (_, length) = e.submit(req(vec![1, 2, 3], 10), Instant::now()).unwrap();
    run(&mut e);
    assert_eq!(stop.borrow().finished, Some(FinishReason::Stop));
    assert_eq!(stop.borrow().new_tokens.len(), 3, "EOS is not part of the visible output");
    assert_eq!(stop.borrow().num_output, 4, "but it is counted as a generated token");
    assert_eq!(length.borrow().finished, Some(FinishReason::Length));
}

#[test]
fn prefill_lease_holds_blocks_until_pulled_or_expired() {
    let mut e = EngineCore::new(cfg(64, 4), vec![100], None);
    let mut r = req((0..10).collect(), 1);
    r.lease_id = Some("lease-1".into());
    let (_, out) = e.submit(r, Instant::now()).unwrap();
    run(&mut e);
    let lease = out.borrow().lease.clone().expect("lease info");
    assert_eq!(lease.num_tokens, 10);
    assert_eq!(lease.block_ids.len(), 3);
    assert!(e.kv_usage() > 0.0, "blocks stay held");
    let ids: Vec<u64> = lease.block_ids.iter().map(|&b| u64::from(b)).collect();
    assert_eq!(e.pull_lease("lease-1", &[999], Instant::now()), Err(PullError::BlockMismatch));
    assert_eq!(e.pull_lease("lease-1", &ids, Instant::now()), Ok(3));
    assert_eq!(e.pull_lease("lease-1", &ids, Instant::now()), Err(PullError::Unknown));
    assert_eq!(e.kv_usage(), 0.0);

    let mut r = req((0..10).collect(), 1);
    r.lease_id = Some("lease-2".into());
    e.submit(r, Instant::now()).unwrap();
    run(&mut e);
    assert_eq!(e.num_leases(), 1);
    assert_eq!(e.expire_leases(Instant::now() + Duration::from_secs(31)), 1);
    assert_eq!(e.kv_usage(), 0.0);
}

#[test]
fn decode_side_pulls_then_decodes_or_fails() {
    let remote = RemotePrefill {
        host: "127.0.0.1".into(),
        port: 1,
        request_id: "p".into(),
        block_ids: vec![1, 2, 3],
        num_tokens: 10,
    };
    let mut e = EngineCore::new(cfg(64, 4), vec![100], None);
    let mut r = req((0..10).collect(), 3);
    r.remote_prefill = Some(remote.clone());
    let (id, out) = e.submit(r, Instant::now()).unwrap();
    let plan = e.schedule();
    assert_eq!(plan.pulls.len(), 1);
    assert_eq!(plan.pulls[0].tokens, 9, "all but the last prompt token are loaded");
    assert!(plan.is_empty(), "nothing computes while the KV is in flight");
    assert_eq!(e.num_waiting(), 1);
    e.pull_done(id, Ok(()), Instant::now());
    let plan = e.schedule();
    assert_eq!(plan.prefill_tokens, 1, "only the last prompt token is computed locally");
    e.complete(plan, Instant::now());
    run(&mut e);
    assert_eq!(out.borrow().finished, Some(FinishReason::Length));

    let mut r = req((0..10).collect(), 3);
    r.remote_prefill = Some(remote);
    let (id, out) = e.submit(r, Instant::now()).unwrap();
    let plan = e.schedule();
    assert!(plan.pulls.is_empty(), "the local prefix cache now holds 2 blocks, leaving 1 token: below the threshold");
    e.complete(plan, Instant::now());
    run(&mut e);
    assert_eq!(out.borrow().finished, Some(FinishReason::Length));
    let _ = id;

    let mut e = EngineCore::new(cfg(64, 4), vec![100], None);
    let mut r = req((50..70).collect(), 3);
    r.remote_prefill =
        Some(RemotePrefill { host: "h".into(), port: 1, request_id: "x".into(), block_ids: vec![], num_tokens: 20 });
    let (id, out) = e.submit(r, Instant::now()).unwrap();
    let _ = e.schedule();
    e.pull_done(id, Err("gone".into()), Instant::now());
    assert_eq!(out.borrow().finished, Some(FinishReason::Error("gone".into())));
    assert_eq!(e.kv_usage(), 0.0);
}

/// Property: with every request small enough to fit the cache alone, `schedule` never returns
/// an empty plan while requests wait or run (a runner with an empty plan sleeps until the next
/// submit or abort, so such a state would hang the engine's last requests).
#[test]
fn random_load_with_preemption_and_aborts_never_stalls() {
    for seed in 0..40u64 {
        let mut rng = fastrand::Rng::with_seed(seed);
        let blocks = rng.usize(20..80);
        let bs = 4;
        let mut c = cfg(blocks, bs);
        c.max_num_queued_reqs = 1000;
        c.max_num_batched_tokens = rng.usize(8..64);
        c.max_num_seqs = rng.usize(1..8);
        let cap = (blocks - 1) * bs;
        let mut e = EngineCore::new(c, vec![100, 101], None);
        let mut outs = Vec::new();
        for step in 0.. {
            if step >= 1500 && !e.has_work() {
                break;
            }
            assert!(step < 200_000, "seed {seed}: did not drain");
            if step < 1500 && rng.u32(0..3) == 0 {
                // Prompts share prefixes of one of four conversations.
                let base = rng.u32(0..4) * 1000;
                let len = rng.usize(1..cap / 3);
                let shared = rng.usize(0..len + 1);
                let mut p: Vec<u32> = (0..shared as u32).map(|i| base + i).collect();
                p.extend((shared..len).map(|_| rng.u32(5000..6000)));
                let (_, o) = e.submit(req(p, rng.usize(1..(cap / 3).max(2))), Instant::now()).unwrap();
                outs.push(o);
            }
            if rng.u32(0..50) == 0 && !outs.is_empty() {
                let o = &outs[rng.usize(0..outs.len())];
                let live = o.borrow().finished.is_none() && !o.borrow().aborted;
                if live {
                    o.borrow_mut().aborted = true;
                    e.note_abort();
                }
            }
            let plan = e.schedule();
            if plan.is_empty() {
                assert!(
                    !e.has_work(),
                    "seed {seed} step {step}: stalled, {} running, {} waiting",
                    e.num_running(),
                    e.num_waiting()
                );
                continue;
            }
            e.complete(plan, Instant::now());
        }
    }
}
