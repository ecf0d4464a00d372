//! KV-aware routing (`kv`) and grid pool choice, against mock engines that publish real KV
//! events over ZMQ.

use super::*;
use gantry_proxy::config::PolicyKind;

/// Four mock engines with events and replay, and a `kv` proxy following them.
fn kv_stack(extra_mock: &[&str], policy: PolicyKind) -> (MockServer, ProxyServer) {
    kv_stack_with(extra_mock, policy, |_| {})
}

/// [`kv_stack`], with `edit` applied to the proxy's config last.
fn kv_stack_with(
    extra_mock: &[&str],
    policy: PolicyKind,
    edit: impl FnOnce(&mut gantry_proxy::config::Config),
) -> (MockServer, ProxyServer) {
    let mut flags = vec!["--engines", "4", "--kv-events-port", "0", "--kv-replay-port", "0"];
    flags.extend_from_slice(extra_mock);
    let m = mock(&flags);
    let urls: Vec<String> = m.engines.iter().map(|e| e.url()).collect();
    let dir = scratch_dir("gantry-route");
    let p = proxy(&urls, "auto", |cfg| {
        cfg.model[0].tokenizer = Some("builtin".into());
        cfg.pool[0].policy = policy;
        cfg.pool[0].index_path = Some(dir.join("index"));
        cfg.pool[0].index_capacity = 1 << 14;
        for (e, a) in cfg.pool[0].engine.iter_mut().zip(&m.engines) {
            e.kv_events.clone_from(&a.kv_events);
            e.kv_replay.clone_from(&a.kv_replay);
        }
        edit(cfg);
    });
    (m, p)
}

/// A new, empty directory of its own under the system's temp dir, named after `prefix`.
fn scratch_dir(prefix: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("{prefix}-{}-{}", std::process::id(), fastrand::u64(..)));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// A chat request whose prompt starts with `prefix_words` words of group `group`, then a
/// unique tail.
fn shared_prefix_chat(group: usize, prefix_words: usize, tail: usize) -> Value {
    let prefix = gantry_tokenizer::builtin_word_text(group * 997, prefix_words);
    let unique = gantry_tokenizer::builtin_word_text(5000 + tail * 13, 24);
    json!({"model": "mock-model", "max_tokens": 1, "messages": [
        {"role": "system", "content": prefix},
        {"role": "user", "content": unique}
    ]})
}

fn prefix_hit_rate(m: &MockServer) -> f64 {
    let (mut hits, mut queries) = (0.0, 0.0);
    for e in &m.engines {
        let text = String::from_utf8(get(e.http, "/metrics").body).unwrap();
        hits += metric(&text, "vllm:prefix_cache_hits_total");
        queries += metric(&text, "vllm:prefix_cache_queries_total");
    }
    hits / queries.max(1.0)
}

#[test]
fn proxy_tokens_equal_the_mock_tokenize_endpoint() {
    use gantry_proxy::route::prompt::{Endpoint, PromptContent, PromptInput};
    let m = mock(&[]);
    let tok = gantry_tokenizer::Tokenizer::builtin();
    let mut cache = gantry_tokenizer::EncodeCache::default();
    let words = gantry_tokenizer::builtin_word_text(3, 50);
    let cases = [
        (
            Endpoint::Chat,
            json!({"model": "mock-model", "messages": [{"role": "system", "content": words}, {"role": "user", "content": "Hi, there!"}]}),
        ),
        (
            Endpoint::Chat,
            json!({"model": "mock-model", "messages": [{"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}], "add_generation_prompt": false}),
        ),
        (Endpoint::Completions, json!({"model": "mock-model", "prompt": format!("Once upon{words}")})),
    ];
    for (ep, body) in cases {
        let ours = match PromptInput::read(&body, ep, Some(&tok), &mut cache, None, None).unwrap().content {
            PromptContent::Tokens(ids) => ids,
            PromptContent::Text(_) => panic!("a tokenizer was given"),
        };
        let theirs = post(m.engines[0].http, "/tokenize", &body).json()["tokens"].clone();
        let theirs: Vec<u32> = serde_json::from_value(theirs).unwrap();
        assert_eq!(ours, theirs, "{body}");
    }
}

#[test]
fn shared_prefixes_go_to_their_holder_until_it_is_loaded() {
    // Decode of at least 40 ms per token keeps streams in flight long enough to load an engine.
    let (m, p) = kv_stack(&["--speedup", "1", "--decode-min-ms", "40"], PolicyKind::Kv);
    // The first request goes to engine 2 directly, past the proxy: only its KV events can tell
    // the index (the proxy made no prediction). Wait for them, reading the same shared-memory
    // segment the proxy reads.
    let first = post(m.engines[2].http, "/v1/chat/completions", &shared_prefix_chat(1, 400, 0));
    assert_eq!(first.status, 200, "{}", String::from_utf8_lossy(&first.body));
    let holder = m.engines[2].url();
    let index = p.fleet.load().pools[0].index.clone().unwrap();
    let slot = index.slot_of(&holder).unwrap();
    let reader = gantry_kvindex::index::IndexReader::open(index.path.clone()).unwrap();
    let hashes = prompt_hashes(&shared_prefix_chat(1, 400, 1));
    let mut overlaps = reader.new_overlaps();
    wait_until("the holder's events in the index", Duration::from_secs(10), || {
        reader.overlaps(&hashes, &mut overlaps);
        overlaps.get(slot) >= 400 / 16
    });
    for tail in 1..6 {
        let r = post(p.addr, "/v1/chat/completions", &shared_prefix_chat(1, 400, tail));
        assert_eq!(
            r.header("x-gantry-engine"),
            Some(holder.as_str()),
            "request {tail} left the holder (overlap {:?})",
            r.header("x-gantry-overlap-blocks")
        );
        let overlap: u32 = r.header("x-gantry-overlap-blocks").unwrap().parse().unwrap();
        assert!(overlap >= 400 / 16, "request {tail}: overlap {overlap} blocks");
    }
    // What routing predicted of those five, against what the holder reported cached; and the
    // decisions and their cost terms.
    let text = String::from_utf8(get(p.addr, "/metrics").body).unwrap();
    let pool = |name: &str| metric(&text, &format!("{name}{{pool=\"agg-0\"}}"));
    let (predicted, reported) =
        (pool("gantry_route_accuracy_predicted_tokens_total"), pool("gantry_route_accuracy_reported_tokens_total"));
    assert!(predicted >= 5.0 * 400.0, "predicted {predicted} cached tokens");
    assert!((0.8..=1.25).contains(&(reported / predicted)), "reported {reported}, predicted {predicted}");
    assert_eq!(metric(&text, "gantry_route_decisions_total{pool=\"agg-0\",outcome=\"overlap\"}"), 5.0);
    let (prompt, uncached) =
        (pool("gantry_pool_prompt_tokens_total"), pool("gantry_pool_uncached_prompt_tokens_total"));
    assert_eq!(uncached, prompt - predicted, "uncached demand: the prompts less what the index held");
    assert!(uncached > 0.0, "each prompt's own tail is uncached");
    assert!(pool("gantry_route_cost_prefill_blocks_total") > 0.0, "{text}");
    // Six long streams at once: past the in-flight bound (2 × mean + 1) the holder is passed
    // over, so they spread.
    let mut stream_body = shared_prefix_chat(1, 400, 99);
    stream_body["max_tokens"] = json!(40);
    stream_body["stream"] = json!(true);
    let engines: Vec<String> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..6)
            .map(|i| {
                let mut b = stream_body.clone();
                b["messages"][1]["content"] = json!(format!("stream {i}"));
                let addr = p.addr;
                s.spawn(move || {
                    let r = post(addr, "/v1/chat/completions", &b);
                    assert_eq!(r.status, 200);
                    r.header("x-gantry-engine").unwrap().to_owned()
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let distinct: std::collections::HashSet<&String> = engines.iter().collect();
    assert!(distinct.len() >= 2, "six concurrent streams all went to one engine: {engines:?}");
    // Unloaded again, the prefix goes back to an engine that holds it.
    let back = post(p.addr, "/v1/chat/completions", &shared_prefix_chat(1, 400, 7));
    let overlap: u32 = back.header("x-gantry-overlap-blocks").unwrap().parse().unwrap();
    assert!(overlap >= 400 / 16, "after the burst: overlap {overlap}");
    let text = String::from_utf8(get(p.addr, "/metrics").body).unwrap();
    assert!(metric(&text, "gantry_route_decisions_total{pool=\"agg-0\",outcome=\"overlap\"}") >= 6.0, "{text}");
    assert!(metric(&text, "gantry_route_index_available{pool=\"agg-0\"}") == 1.0);
    drop(m);
}

/// The proxy's block hashes of `body`'s chat prompt (built-in tokenizer, 16-token blocks).
fn prompt_hashes(body: &Value) -> Vec<u64> {
    adapter_prompt_hashes(body, None)
}

/// [`prompt_hashes`] of a request to LoRA adapter `lora` (None: the base model).
fn adapter_prompt_hashes(body: &Value, lora: Option<&str>) -> Vec<u64> {
    use gantry_proxy::route::prompt::{Endpoint, PromptInput};
    let tok = gantry_tokenizer::Tokenizer::builtin();
    let input = PromptInput::read(body, Endpoint::Chat, Some(&tok), &mut Default::default(), None, lora).unwrap();
    input.hash(16, gantry_kvindex::hash::DEFAULT_SEED).hashes
}

#[test]
fn engines_joining_and_leaving_on_reload_are_followed_and_released() {
    let m = mock(&["--engines", "2", "--kv-events-port", "0", "--kv-replay-port", "0"]);
    let dir = scratch_dir("gantry-route-join");
    let index_path = dir.join("index");
    let conf = |engines: &[usize]| events_pool_conf(&m, engines, &index_path, 1 << 14);
    let (u0, u1) = (m.engines[0].url(), m.engines[1].url());
    let mut p = serve::spawn(conf(&[0]), None).expect("proxy starts");
    let reader = gantry_kvindex::index::IndexReader::open(&index_path).unwrap();
    let s0 = reader.engine_slot(&u0).expect("registered at start");
    assert_eq!(reader.engine_slot(&u1), None);

    p.apply(conf(&[0, 1])).unwrap();
    let s1 = reader.engine_slot(&u1).expect("registered by the reload");
    assert_eq!(reader.engine_slot(&u0), Some(s0), "an engine that stays keeps its slot");
    // Engine 1's own KV events reach the index, and through the proxy the prefix goes to it.
    prefix_routed_to_its_holder(&m, 1, &p, &reader, s1, 3);
    let hashes = prompt_hashes(&shared_prefix_chat(3, 200, 1));
    let mut out = reader.new_overlaps();

    // Engine 1 leaves: released (blocks and name) before the reload returns.
    p.apply(conf(&[0])).unwrap();
    assert_eq!(reader.engine_slot(&u1), None);
    reader.overlaps(&hashes, &mut out);
    assert_eq!(out.get(s1), 0);
    assert_eq!(
        post(p.addr, "/v1/chat/completions", &shared_prefix_chat(3, 200, 2)).header("x-gantry-engine"),
        Some(u0.as_str())
    );

    // The admin API: an engine added there gets a slot (no events: routed on predictions), and
    // loses it when deleted.
    let admin = p.admin.unwrap();
    let add = json!({"url": u1, "model": "mock-model", "pool": "agg-0"});
    assert_eq!(admin_call(admin, "POST", "/admin/engines", "admin-secret", add).0, 201);
    assert!(reader.engine_slot(&u1).is_some(), "registered by the admin edit");
    assert_eq!(admin_call(admin, "DELETE", "/admin/engines", "admin-secret", json!({"url": u1})).0, 200);
    assert_eq!(reader.engine_slot(&u1), None, "released by the admin edit");
    drop(p);
    let _ = std::fs::remove_dir_all(&dir);
}

/// One `kv` pool of `m`'s `engines` (their KV events followed), its index at `index_path` with
/// `capacity` blocks, an admin API, one worker, no health probes.
fn events_pool_conf(m: &MockServer, engines: &[usize], index_path: &std::path::Path, capacity: usize) -> Config {
    let urls: Vec<String> = engines.iter().map(|&i| m.engines[i].url()).collect();
    let mut cfg = Config::single_pool("mock-model", &urls);
    cfg.server.listen = "127.0.0.1:0".into();
    cfg.server.workers = 1;
    cfg.health.interval_ms = 0;
    cfg.model[0].tokenizer = Some("builtin".into());
    cfg.pool[0].policy = PolicyKind::Kv;
    cfg.pool[0].index_path = Some(index_path.to_path_buf());
    cfg.pool[0].index_capacity = capacity;
    cfg.admin = Some(gantry_proxy::config::AdminConf { listen: "127.0.0.1:0".into(), token: "admin-secret".into() });
    for (e, &i) in cfg.pool[0].engine.iter_mut().zip(engines) {
        e.kv_events.clone_from(&m.engines[i].kv_events);
        e.kv_replay.clone_from(&m.engines[i].kv_replay);
    }
    cfg
}

/// Engine `engine` of `m` caches group `group`'s 200-word prefix (sent to it directly); once its
/// events show the blocks at `slot` in `reader`'s index, the proxy `p` sends the group's next
/// prompt there.
fn prefix_routed_to_its_holder(
    m: &MockServer,
    engine: usize,
    p: &ProxyServer,
    reader: &gantry_kvindex::index::IndexReader,
    slot: gantry_kvindex::sink::EngineSlot,
    group: usize,
) {
    assert_eq!(post(m.engines[engine].http, "/v1/chat/completions", &shared_prefix_chat(group, 200, 0)).status, 200);
    let hashes = prompt_hashes(&shared_prefix_chat(group, 200, 1));
    let mut out = reader.new_overlaps();
    wait_until("the engine's events in the index", Duration::from_secs(10), || {
        reader.overlaps(&hashes, &mut out);
        out.get(slot) >= 200 / 16
    });
    let r = post(p.addr, "/v1/chat/completions", &shared_prefix_chat(group, 200, 1));
    assert_eq!(r.status, 200);
    let holder = m.engines[engine].url();
    assert_eq!(r.header("x-gantry-engine"), Some(holder.as_str()), "overlap {:?}", r.header("x-gantry-overlap-blocks"));
}

/// A reload that resizes a pool's index replaces it at once, at the same path: the old segment
/// is retired, the new one has the new size and the engines, their events reach it, and routing
/// uses it.
#[test]
fn a_reload_that_resizes_the_index_replaces_it_at_once() {
    let m = mock(&["--engines", "2", "--kv-events-port", "0", "--kv-replay-port", "0"]);
    let dir = scratch_dir("gantry-route-resize");
    let index_path = dir.join("index");
    let mut p = serve::spawn(events_pool_conf(&m, &[0, 1], &index_path, 1 << 14), None).expect("proxy starts");
    let old = gantry_kvindex::index::IndexReader::open(&index_path).unwrap();
    let old_capacity = old.stats().capacity;

    p.apply(events_pool_conf(&m, &[0, 1], &index_path, 1 << 15)).unwrap();
    assert!(old.is_retired(), "the old segment is retired by its replacement");
    let new = gantry_kvindex::index::IndexReader::open(&index_path).unwrap();
    assert!(new.stats().capacity > old_capacity, "{} blocks, was {old_capacity}", new.stats().capacity);
    let u1 = m.engines[1].url();
    let s1 = new.engine_slot(&u1).expect("the engines are registered in the new index");
    let text = String::from_utf8(get(p.addr, "/metrics").body).unwrap();
    assert_eq!(metric(&text, "gantry_route_index_available{pool=\"agg-0\"}"), 1.0, "{text}");

    // Engine 1's events reach the new index, and the proxy routes the prefix to it.
    prefix_routed_to_its_holder(&m, 1, &p, &new, s1, 4);
    drop(p);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_cache_salt_is_routed_on_its_own_chain() {
    let (m, p) = kv_stack(&[], PolicyKind::Kv);
    let salted = |salt: Option<&str>, tail: usize| {
        let mut b = shared_prefix_chat(5, 300, tail);
        if let Some(s) = salt {
            b["cache_salt"] = json!(s);
        }
        b
    };
    // Engine 2 caches a salted prompt (sent to it directly: no prediction of the proxy's is
    // involved), and its events, which carry the salt as the first block's extra key, reach
    // the index under the same hashes the proxy computes for that salt.
    let e2 = &m.engines[2];
    assert_eq!(post(e2.http, "/v1/chat/completions", &salted(Some("tenant-a"), 0)).status, 200);
    let reader =
        gantry_kvindex::index::IndexReader::open(p.fleet.load().pools[0].index.as_ref().unwrap().path.clone()).unwrap();
    let slot = reader.engine_slot(&e2.url()).expect("engine 2 is registered");
    let hashes = prompt_hashes(&salted(Some("tenant-a"), 1));
    let mut out = reader.new_overlaps();
    wait_until("engine 2's salted blocks in the index", Duration::from_secs(10), || {
        reader.overlaps(&hashes, &mut out);
        out.get(slot) >= 300 / 16
    });
    reader.overlaps(&prompt_hashes(&salted(None, 1)), &mut out);
    assert_eq!(out.get(slot), 0, "the unsalted prompt has another chain");

    // Through the proxy: the same salt goes to engine 2; no salt, or another, overlaps nothing.
    let r = post(p.addr, "/v1/chat/completions", &salted(Some("tenant-a"), 1));
    assert_eq!(r.header("x-gantry-engine"), Some(e2.url().as_str()));
    let overlap = |r: &Reply| r.header("x-gantry-overlap-blocks").unwrap().parse::<u32>().unwrap();
    assert!(overlap(&r) >= 300 / 16, "overlap {}", overlap(&r));
    assert_eq!(r.json()["usage"]["prompt_tokens_details"]["cached_tokens"].as_u64().map(|t| t >= 300), Some(true));
    for other in [salted(None, 2), salted(Some("tenant-b"), 2)] {
        let r = post(p.addr, "/v1/chat/completions", &other);
        assert_eq!(r.status, 200);
        assert_eq!(overlap(&r), 0, "{}", other["cache_salt"]);
    }
}

#[test]
fn a_lora_adapter_is_routed_on_its_own_chain() {
    let (m, p) = kv_stack_with(&["--lora-modules", "sql-lora=/adapters/sql"], PolicyKind::Kv, |cfg| {
        cfg.model.push(gantry_proxy::config::ModelConf {
            name: "sql-lora".into(),
            tokenizer: None,
            max_model_len: None,
            base: Some("mock-model".into()),
        });
    });
    let chat = |model: &str, tail: usize| {
        let mut b = shared_prefix_chat(6, 300, tail);
        b["model"] = json!(model);
        b
    };
    // Engine 1 caches a prompt under the adapter (sent to it directly); its events name the
    // adapter on every block, and reach the index under the hashes the proxy computes for it.
    let e1 = &m.engines[1];
    assert_eq!(post(e1.http, "/v1/chat/completions", &chat("sql-lora", 0)).status, 200);
    let reader =
        gantry_kvindex::index::IndexReader::open(p.fleet.load().pools[0].index.as_ref().unwrap().path.clone()).unwrap();
    let slot = reader.engine_slot(&e1.url()).expect("engine 1 is registered");
    let mut out = reader.new_overlaps();
    let hashes = adapter_prompt_hashes(&chat("sql-lora", 1), Some("sql-lora"));
    wait_until("engine 1's adapter blocks in the index", Duration::from_secs(10), || {
        reader.overlaps(&hashes, &mut out);
        out.get(slot) >= 300 / 16
    });
    reader.overlaps(&prompt_hashes(&chat("mock-model", 1)), &mut out);
    assert_eq!(out.get(slot), 0, "the base model's prompt has another chain");

    // Through the proxy: the adapter's request goes to engine 1 (the base model's engines serve
    // it) and answers as the adapter; the base model's same prompt overlaps nothing.
    let r = post(p.addr, "/v1/chat/completions", &chat("sql-lora", 1));
    assert_eq!(r.status, 200);
    assert_eq!(r.header("x-gantry-engine"), Some(e1.url().as_str()));
    let overlap = |r: &Reply| r.header("x-gantry-overlap-blocks").unwrap().parse::<u32>().unwrap();
    assert!(overlap(&r) >= 300 / 16, "overlap {}", overlap(&r));
    assert_eq!(r.json()["model"], "sql-lora");
    assert_eq!(r.json()["usage"]["prompt_tokens_details"]["cached_tokens"].as_u64().map(|t| t >= 300), Some(true));
    let base = post(p.addr, "/v1/chat/completions", &chat("mock-model", 2));
    assert_eq!((base.status, overlap(&base)), (200, 0));
    assert_eq!(get(p.addr, "/health").status, 200, "the adapter is served by the base model's engines");

    // Requests are counted by the model they named: the adapter's apart from its base's.
    let mut bad = chat("sql-lora", 3);
    bad["messages"] = json!([]);
    assert_eq!(post(p.addr, "/v1/chat/completions", &bad).status, 400);
    let text = String::from_utf8(get(p.addr, "/metrics").body).unwrap();
    let count = |labels: &str| metric(&text, &format!("gantry_model_requests_total{{{labels}}}"));
    assert_eq!(count("model=\"sql-lora\",base=\"mock-model\",status=\"200\""), 1.0, "{text}");
    assert_eq!(count("model=\"sql-lora\",base=\"mock-model\",status=\"400\""), 1.0, "{text}");
    assert_eq!(count("model=\"mock-model\",base=\"mock-model\",status=\"200\""), 1.0, "{text}");
}

#[test]
fn kv_beats_round_robin_on_the_engines_prefix_hit_rate() {
    let run = |policy: PolicyKind| {
        let (m, p) = kv_stack(&[], policy);
        // 7 groups × 8 requests, interleaved; each shares a 320-token system prompt. (7, not a
        // multiple of the 4 engines, so round robin does not pin each group by accident.)
        for tail in 0..8 {
            for group in 0..7 {
                let r = post(p.addr, "/v1/chat/completions", &shared_prefix_chat(group, 320, tail * 8 + group));
                assert_eq!(r.status, 200);
            }
        }
        let rate = prefix_hit_rate(&m);
        drop(p);
        rate
    };
    let kv = run(PolicyKind::Kv);
    let rr = run(PolicyKind::RoundRobin);
    eprintln!("engine prefix hit rate: kv {kv:.3}, round_robin {rr:.3}");
    assert!(kv >= rr + 0.15, "kv {kv:.3} vs round_robin {rr:.3}");
}

#[test]
fn bad_prompts_and_targets_get_a_400_naming_the_field() {
    let (_m, p) = kv_stack(&[], PolicyKind::Kv);
    let cases = [
        (json!({"model": "mock-model", "messages": []}), "messages"),
        (json!({"model": "mock-model", "prompt": [1, 2, 99_999_999]}), "prompt"),
        (
            json!({"model": "mock-model", "messages": [{"role": "user", "content": "hi"}], "nvext": {"router": {"ttft_target": -5}}}),
            "nvext.router.ttft_target",
        ),
        (
            json!({"model": "mock-model", "messages": [{"role": "user", "content": "hi"}], "extra_args": {"itl_target": "fast"}}),
            "extra_args.itl_target",
        ),
        (
            json!({"model": "mock-model", "messages": [{"role": "user", "content": "hi"}], "cache_salt": ""}),
            "cache_salt",
        ),
    ];
    for (body, param) in cases {
        let path = if body.get("prompt").is_some() { "/v1/completions" } else { "/v1/chat/completions" };
        let r = post(p.addr, path, &body);
        assert_eq!(r.status, 400, "{body}");
        assert_eq!(r.json()["error"]["param"], json!(param), "{body}: {}", String::from_utf8_lossy(&r.body));
    }
}

#[test]
fn the_engines_context_length_is_learned_and_longer_prompts_get_a_400_at_the_proxy() {
    // No `max_model_len` in the proxy's config: the prober reads it from the engine's /v1/models.
    // (The proxy reads prompts where routing needs them: a `kv` pool, or a grid.)
    let m = mock(&["--max-model-len", "64"]);
    let p = proxy(&[m.engines[0].url()], "auto", |cfg| {
        cfg.model[0].tokenizer = Some("builtin".into());
        cfg.pool[0].policy = PolicyKind::Kv;
        cfg.pool[0].index_path = Some(scratch_dir("gantry-context").join("index"));
        cfg.health.interval_ms = 20;
    });
    wait_until("the engine's context length learned", Duration::from_secs(10), || {
        p.fleet.load().model("mock-model").and_then(|i| i.context_len()) == Some(64)
    });
    let words = |n| gantry_tokenizer::builtin_word_text(0, n);
    let long = post(p.addr, "/v1/completions", &json!({"model": "mock-model", "prompt": words(64), "max_tokens": 1}));
    assert_eq!(long.status, 400, "{}", String::from_utf8_lossy(&long.body));
    assert_eq!(long.header("x-gantry-engine"), None, "refused by the proxy, not the engine");
    assert!(long.json()["error"]["message"].as_str().unwrap().contains("maximum context length is 64"));
    let fits = post(p.addr, "/v1/completions", &json!({"model": "mock-model", "prompt": words(40), "max_tokens": 1}));
    assert_eq!(fits.status, 200, "{}", String::from_utf8_lossy(&fits.body));
}

#[test]
fn an_unavailable_index_degrades_the_pool_to_load_only_routing() {
    let m = mock(&["--engines", "2"]);
    let urls: Vec<String> = m.engines.iter().map(|e| e.url()).collect();
    let p = proxy(&urls, "auto", |cfg| {
        cfg.model[0].tokenizer = Some("builtin".into());
        cfg.pool[0].policy = PolicyKind::Kv;
        cfg.pool[0].index_path = Some("/proc/gantry-no-such-dir/index".into());
    });
    let r = post(p.addr, "/v1/chat/completions", &chat(2));
    assert_eq!(r.status, 200);
    assert_eq!(r.header("x-gantry-overlap-blocks"), Some("0"));
    let text = String::from_utf8(get(p.addr, "/metrics").body).unwrap();
    assert_eq!(metric(&text, "gantry_route_index_available{pool=\"agg-0\"}"), 0.0);
    assert_eq!(metric(&text, "gantry_route_decisions_total{pool=\"agg-0\",outcome=\"load_only\"}"), 1.0);
}

#[test]
fn the_grid_picks_pools_by_request_targets_defaults_and_priority() {
    let m = mock(&["--engines", "3"]);
    let dir = scratch_dir("gantry-grid-targets");
    // TTFT below the axis' midpoint (505 ms) goes to `fast`, above to `cheap`; priorities 10..=100
    // go to `vip` whatever their targets.
    let grid = json!({
        "mode": "agg",
        "num_agg_pools": 3,
        "agg_pool_dynamo_namespaces": ["fast", "cheap", "vip"],
        "agg_pool_selection_strategy": {
            "ttft_min_ms": 10, "ttft_max_ms": 1000, "ttft_resolution": 2,
            "itl_min_ms": 5, "itl_max_ms": 100, "itl_resolution": 1,
            "agg_pool_mapping": [[0], [1]],
            "priority_overrides": [{"min_priority": 10, "max_priority": 100, "target_pool": 2}]
        }
    });
    let path = dir.join("global_router.json");
    std::fs::write(&path, grid.to_string()).unwrap();
    let urls: Vec<String> = m.engines.iter().map(|e| e.url()).collect();
    let p = proxy(&urls[..1], "auto", |cfg| {
        cfg.model[0].tokenizer = Some("builtin".into());
        let base = cfg.pool[0].clone();
        cfg.pool = ["fast", "cheap", "vip"]
            .iter()
            .zip(&urls)
            .map(|(name, url)| {
                let mut pool = base.clone();
                pool.name = (*name).into();
                pool.engine[0].url.clone_from(url);
                pool
            })
            .collect();
        cfg.server.global_router = Some(path.clone());
        // A request without a TTFT target is held to 0 ms: the `fast` cell, and always over it.
        cfg.routing.default_ttft_target_ms = Some(0.0);
    });
    let with = |extra: Value| {
        let mut body = chat(2);
        body.as_object_mut().unwrap().extend(extra.as_object().unwrap().clone());
        post(p.addr, "/v1/chat/completions", &body)
    };
    let cases = [
        (json!({"nvext": {"router": {"ttft_target": 500}}}), "fast"),
        (json!({"extra_args": {"ttft_target": 800}}), "cheap"),
        (json!({}), "fast"),
        (json!({"nvext": {"router": {"ttft_target": 800}, "agent_hints": {"priority": 50}}}), "vip"),
    ];
    let mut usage: std::collections::HashMap<&str, (f64, f64)> = std::collections::HashMap::new();
    for (extra, pool) in cases {
        let r = with(extra.clone());
        assert_eq!(r.status, 200, "{extra}");
        assert_eq!(r.header("x-gantry-pool"), Some(pool), "{extra}");
        let u = &r.json()["usage"];
        let (prompt, cached) =
            (u["prompt_tokens"].as_f64().unwrap(), u["prompt_tokens_details"]["cached_tokens"].as_f64().unwrap());
        let e = usage.entry(pool).or_default();
        *e = (e.0 + prompt, e.1 + prompt - cached);
    }

    // The planner's demand counters, per pool, from what the engines reported.
    let text = String::from_utf8(get(p.addr, "/metrics").body).unwrap();
    for (pool, (prompt, uncached)) in usage {
        assert_eq!(metric(&text, &format!("gantry_pool_prompt_tokens_total{{pool=\"{pool}\"}}")), prompt, "{pool}");
        assert_eq!(
            metric(&text, &format!("gantry_pool_uncached_prompt_tokens_total{{pool=\"{pool}\"}}")),
            uncached,
            "{pool}"
        );
    }
    // Only the request held to the default 0 ms target went over it (the mock answers in
    // milliseconds; the others' targets are 500 and 800 ms).
    assert_eq!(metric(&text, "gantry_pool_over_ttft_target_total{pool=\"fast\"}"), 1.0, "{text}");
    assert_eq!(metric(&text, "gantry_pool_over_ttft_target_total{pool=\"cheap\"}"), 0.0);
}

#[test]
fn the_global_router_grid_picks_the_pool_by_prompt_length() {
    let m = mock(&["--engines", "2"]);
    let dir = scratch_dir("gantry-grid");
    let grid = json!({
        "mode": "agg",
        "num_agg_pools": 2,
        "agg_pool_dynamo_namespaces": ["short", "long"],
        "agg_pool_selection_strategy": {
            "isl_min": 0, "isl_max": 200, "isl_resolution": 2,
            "ttft_min_ms": 10, "ttft_max_ms": 1000, "ttft_resolution": 1,
            "itl_min_ms": 5, "itl_max_ms": 100, "itl_resolution": 1,
            "agg_pool_mapping": [[[0]], [[1]]]
        }
    });
    let path = dir.join("global_router.json");
    std::fs::write(&path, grid.to_string()).unwrap();
    let urls: Vec<String> = m.engines.iter().map(|e| e.url()).collect();
    let p = proxy(&urls[..1], "auto", |cfg| {
        cfg.model[0].tokenizer = Some("builtin".into());
        let mut long = cfg.pool[0].clone();
        cfg.pool[0].name = "short".into();
        long.name = "long".into();
        long.engine[0].url = urls[1].clone();
        cfg.pool.push(long);
        cfg.server.global_router = Some(path.clone());
    });
    let short = post(p.addr, "/v1/chat/completions", &chat(1));
    assert_eq!(short.header("x-gantry-pool"), Some("short"));
    let long = post(p.addr, "/v1/chat/completions", &shared_prefix_chat(0, 300, 0));
    assert_eq!(long.header("x-gantry-pool"), Some("long"));
    assert_eq!(long.header("x-gantry-engine"), Some(urls[1].as_str()));

    // A config whose namespaces name no pool is refused at startup, naming the key.
    std::fs::write(&path, grid.to_string().replace("\"long\"", "\"nowhere\"")).unwrap();
    let mut cfg = Config::single_pool("mock-model", &urls);
    cfg.server.listen = "127.0.0.1:0".into();
    cfg.pool[0].name = "short".into();
    cfg.server.global_router = Some(path);
    let err = serve::spawn(cfg, None).unwrap_err().to_string();
    assert!(err.starts_with("invalid `server.global_router`: "), "the error names the setting: {err}");
    assert!(err.contains("agg_pool_dynamo_namespaces[1]") && err.contains("nowhere"), "{err}");
}
