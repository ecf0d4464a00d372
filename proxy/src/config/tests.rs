//! Config parsing and validation: the issue's example parses; bad values name their key.

use super::*;

const EXAMPLE: &str = r#"
[server]
listen = "127.0.0.1:8000"
workers = 2
[[model]]
name = "mock-model"
[[pool]]
name = "agg-0"
role = "agg"
policy = "round_robin"
block_size = 16
[[pool.engine]]
url = "http://127.0.0.1:8101"
model = "mock-model"
kv_events = "tcp://127.0.0.1:5557"
kv_replay = "tcp://127.0.0.1:5558"
"#;

fn parse(s: &str) -> Result<Config, ConfigError> {
    let cfg: Config =
        toml::from_str(s).map_err(|e| ConfigError::Parse { path: "test.toml".into(), message: e.to_string() })?;
    cfg.validate()?;
    Ok(cfg)
}

#[test]
fn the_documented_shape_parses() {
    let cfg = parse(EXAMPLE).unwrap();
    assert_eq!(cfg.server.workers, 2);
    assert_eq!(cfg.pool[0].engine[0].kv_replay.as_deref(), Some("tcp://127.0.0.1:5558"));
    assert_eq!((cfg.pool[0].engine[0].dp_ranks, cfg.pool[0].engine[0].kv_topic.as_str()), (1, ""), "defaults");
    assert_eq!(cfg.pool[0].policy, PolicyKind::RoundRobin);
    assert_eq!(cfg.retry.attempts, DEFAULT_RETRY_ATTEMPTS);
    assert_eq!(cfg.listen_addr().unwrap().port(), 8000);
}

#[test]
fn bad_values_name_their_key() {
    let cases = [
        (EXAMPLE.replace("workers = 2", "workers = \"two\""), "workers"),
        (EXAMPLE.replace("127.0.0.1:8000", "nowhere"), "server.listen"),
        (EXAMPLE.replace("http://127.0.0.1:8101", "127.0.0.1:8101"), "pool[0].engine[0].url"),
        (EXAMPLE.replace("http://127.0.0.1:8101", "https://127.0.0.1:8101"), "pool[0].engine[0].url"),
        (
            EXAMPLE.replace("model = \"mock-model\"\nkv_events", "model = \"other\"\nkv_events"),
            "pool[0].engine[0].model",
        ),
        (EXAMPLE.replace("policy = \"round_robin\"", "policy = \"fastest\""), "policy"),
        (EXAMPLE.replace("block_size = 16", "block_size = 0"), "pool[0].block_size"),
        (EXAMPLE.replace("kv_replay = ", "dp_ranks = 0\nkv_replay = "), "pool[0].engine[0].dp_ranks"),
        (
            EXAMPLE.replace("tcp://127.0.0.1:5557", "tcp://127.0.0.1:65535").replace("kv_replay = ", "dp_ranks = 2\nkv_replay = "),
            "pool[0].engine[0].kv_events",
        ),
        (EXAMPLE.replace("name = \"mock-model\"\n", "name = \"mock-model\"\nmax_model_len = 0\n"), "model[0].max_model_len"),
        (EXAMPLE.replace("[server]", "[server]\nbogus = 1"), "bogus"),
        (format!("{EXAMPLE}\n[retry]\nattempts = 0\n"), "retry.attempts"),
        (format!("{EXAMPLE}\n[admin]\nlisten = \"127.0.0.1:9000\"\ntoken = \"short\"\n"), "admin.token"),
        // LoRA adapters: of a configured base model, which is not itself an adapter; tokenized
        // by the base; never an engine's model.
        (EXAMPLE.replace("name = \"mock-model\"\n", "name = \"mock-model\"\n[[model]]\nname = \"a\"\nbase = \"nope\"\n"), "model[1].base"),
        (
            EXAMPLE.replace(
                "name = \"mock-model\"\n",
                "name = \"mock-model\"\n[[model]]\nname = \"a\"\nbase = \"mock-model\"\n[[model]]\nname = \"b\"\nbase = \"a\"\n",
            ),
            "model[2].base",
        ),
        (
            EXAMPLE.replace("name = \"mock-model\"\n", "name = \"mock-model\"\n[[model]]\nname = \"a\"\nbase = \"mock-model\"\ntokenizer = \"builtin\"\n"),
            "model[1].tokenizer",
        ),
        (
            EXAMPLE
                .replace("name = \"mock-model\"\n", "name = \"mock-model\"\n[[model]]\nname = \"a\"\nbase = \"mock-model\"\n")
                .replace("model = \"mock-model\"\nkv_events", "model = \"a\"\nkv_events"),
            "pool[0].engine[0].model",
        ),
        (EXAMPLE.replace("name = \"mock-model\"\n", "name = \"mock-model\"\n[[model]]\nname = \"a\"\nbase = \"a\"\n"), "model[1].base"),
        (
            EXAMPLE.replace(
                "name = \"mock-model\"\n",
                "name = \"mock-model\"\nmax_model_len = 100\n[[model]]\nname = \"a\"\nbase = \"mock-model\"\nmax_model_len = 200\n",
            ),
            "model[1].max_model_len",
        ),
    ];
    for (text, key) in cases {
        let err = parse(&text).unwrap_err().to_string();
        assert!(err.contains(key), "expected `{key}` in: {err}");
    }
}

#[test]
fn engine_urls() {
    let u = parse_engine_url("http://127.0.0.1:8101/").unwrap();
    assert_eq!(u.url, "http://127.0.0.1:8101");
    assert_eq!(u.authority, "127.0.0.1:8101");
    assert_eq!(u.addr.port(), 8101);
    assert!(parse_engine_url("http://127.0.0.1:8101/v1").is_err());
    assert!(parse_engine_url("ftp://x").is_err());
}

#[test]
fn a_lora_adapter_names_its_base_model() {
    let text = EXAMPLE.replace(
        "name = \"mock-model\"\n",
        "name = \"mock-model\"\n[[model]]\nname = \"sql-lora\"\nbase = \"mock-model\"\n",
    );
    let cfg = parse(&text).unwrap();
    assert_eq!(cfg.model[1].base.as_deref(), Some("mock-model"));
}

#[test]
fn relative_paths_are_taken_from_the_files_folder() {
    let dir = std::env::temp_dir().join(format!("gantry-config-paths-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("gantry.toml");
    let text = EXAMPLE.replace("workers = 2", "workers = 2\nglobal_router = \"router/global.json\"")
        .replace("name = \"mock-model\"\n[[pool]]", "name = \"mock-model\"\ntokenizer = \"models/m\"\n[[model]]\nname = \"b\"\ntokenizer = \"builtin\"\n[[pool]]")
        .replace("block_size = 16", "block_size = 16\nindex_path = \"/dev/shm/absolute\"");
    std::fs::write(&path, text).unwrap();
    let cfg = Config::load(&path).unwrap();
    let _ = std::fs::remove_dir_all(&dir);
    assert_eq!(cfg.server.global_router, Some(dir.join("router/global.json")));
    assert_eq!(cfg.model[0].tokenizer, Some(dir.join("models/m")));
    assert_eq!(cfg.model[1].tokenizer.as_deref(), Some(std::path::Path::new("builtin")), "a name, not a folder");
    assert_eq!(cfg.pool[0].index_path.as_deref(), Some(std::path::Path::new("/dev/shm/absolute")), "absolute stays");
}

#[test]
fn overrides_set_only_what_they_name() {
    let mut cfg = parse(EXAMPLE).unwrap();
    Overrides::default().apply(&mut cfg);
    assert_eq!((cfg.server.workers, cfg.pool[0].policy), (2, PolicyKind::RoundRobin), "none given: unchanged");
    let o = Overrides {
        listen: Some("127.0.0.1:9".into()),
        workers: Some(5),
        driver: Some("legacy".into()),
        global_router: Some("g.json".into()),
        policy: Some(PolicyKind::Kv),
    };
    o.apply(&mut cfg);
    assert_eq!(cfg.server.listen, "127.0.0.1:9");
    assert_eq!((cfg.server.workers, cfg.server.driver.as_str()), (5, "legacy"));
    assert_eq!(cfg.server.global_router.as_deref(), Some(std::path::Path::new("g.json")));
    assert!(cfg.pool.iter().all(|p| p.policy == PolicyKind::Kv));
}
