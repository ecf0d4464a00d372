//! Grid pool choice: cell edges, defaults, config errors naming their keys, Dynamo's seed example.

use serde_json::json;

use super::*;

/// A small valid disagg config: 2 prefill pools on a 2x2 (ISL 0..1000, TTFT 0..100 ms) grid, 3
/// decode pools on a 2x3 (context 0..1000, ITL 0..30 ms) grid.
fn disagg() -> Value {
    json!({
        "num_prefill_pools": 2,
        "num_decode_pools": 3,
        "prefill_pool_dynamo_namespaces": ["p-fast", "p-slow"],
        "decode_pool_dynamo_namespaces": ["d-fast", "d-mid", "d-slow"],
        "prefill_pool_selection_strategy": {
            "isl_min": 0, "isl_max": 1000, "isl_resolution": 2,
            "ttft_min_ms": 0, "ttft_max_ms": 100, "ttft_resolution": 2,
            "prefill_pool_mapping": [[0, 1], [0, 0]]
        },
        "decode_pool_selection_strategy": {
            "context_length_min": 0, "context_length_max": 1000, "context_length_resolution": 2,
            "itl_min_ms": 0, "itl_max_ms": 30, "itl_resolution": 3,
            "decode_pool_mapping": [[0, 1, 2], [0, 0, 1]]
        }
    })
}

/// A 2-pool agg config on a TTFT x ITL grid (Dynamo's agg test grid).
fn agg() -> Value {
    json!({
        "mode": "agg",
        "num_agg_pools": 2,
        "agg_pool_dynamo_namespaces": ["a-fast", "a-slow"],
        "agg_pool_selection_strategy": {
            "ttft_min_ms": 10, "ttft_max_ms": 3000, "ttft_resolution": 2,
            "itl_min_ms": 5, "itl_max_ms": 200, "itl_resolution": 2,
            "agg_pool_mapping": [[0, 1], [1, 1]]
        }
    })
}

fn parse(v: &Value) -> GlobalRouterConfig {
    GlobalRouterConfig::from_json(&v.to_string()).unwrap_or_else(|e| panic!("{e}"))
}

/// The error for `base` changed by `edit`, as (key, problem).
fn error(mut base: Value, edit: impl FnOnce(&mut Value)) -> (String, String) {
    edit(&mut base);
    match GlobalRouterConfig::from_json(&base.to_string()) {
        Err(GridError::Invalid { key, problem }) => (key, problem),
        other => panic!("expected an Invalid error, got {other:?}"),
    }
}

fn q(isl: u32, ttft: Option<f64>, itl: Option<f64>) -> PoolQuery {
    PoolQuery { isl, ttft_target_ms: ttft, itl_target_ms: itl, priority: None }
}

fn prefill(cfg: &GlobalRouterConfig, query: PoolQuery) -> usize {
    cfg.select_prefill(&query).unwrap().index
}

fn decode(cfg: &GlobalRouterConfig, query: PoolQuery) -> usize {
    cfg.select_decode(&query).unwrap().index
}

// ---- grid cells ----

const TTFT_AXIS: Axis = Axis { min: 10.0, max: 1000.0, resolution: 2 };

#[test]
fn grid_below_min_is_cell_zero() {
    assert_eq!(TTFT_AXIS.cell(9.999), 0);
    assert_eq!(TTFT_AXIS.cell(-1e9), 0);
    assert_eq!(Axis { min: 0.0, max: 30.0, resolution: 3 }.cell(-9.0), 0);
}

#[test]
fn grid_above_max_is_last_cell() {
    assert_eq!(TTFT_AXIS.cell(1000.5), 1);
    assert_eq!(TTFT_AXIS.cell(1e300), 1);
    assert_eq!(Axis { min: 0.0, max: 30.0, resolution: 3 }.cell(31.0), 2);
}

#[test]
fn grid_exactly_max_is_last_cell() {
    assert_eq!(TTFT_AXIS.cell(1000.0), 1);
    assert_eq!(Axis { min: 0.0, max: 30.0, resolution: 3 }.cell(30.0), 2);
}

#[test]
fn grid_cell_boundary_belongs_to_upper_cell() {
    // step = 495: 505 starts cell 1.
    assert_eq!(TTFT_AXIS.cell(505.0), 1);
    assert_eq!(TTFT_AXIS.cell(504.999), 0);
    let itl = Axis { min: 0.0, max: 30.0, resolution: 3 };
    assert_eq!((itl.cell(9.99), itl.cell(10.0), itl.cell(20.0)), (0, 1, 2));
    assert_eq!(TTFT_AXIS.cell(10.0), 0, "min itself is cell 0");
}

#[test]
fn grid_lookup_reads_both_axes_row_major() {
    let cfg = parse(&disagg());
    // decode_pool_mapping [[0, 1, 2], [0, 0, 1]]: [ctx][itl].
    assert_eq!(decode(&cfg, q(10, None, Some(25.0))), 2);
    assert_eq!(decode(&cfg, q(10, None, Some(15.0))), 1);
    assert_eq!(decode(&cfg, q(900, None, Some(25.0))), 1);
    assert_eq!(decode(&cfg, q(900, None, Some(1.0))), 0);
    // prefill_pool_mapping [[0, 1], [0, 0]]: [isl][ttft].
    assert_eq!(prefill(&cfg, q(10, Some(80.0), None)), 1);
    assert_eq!(prefill(&cfg, q(600, Some(80.0), None)), 0);
    assert_eq!(cfg.select_prefill(&q(10, Some(80.0), None)).unwrap().namespace, "p-slow");
}

#[test]
fn grid_missing_target_uses_configured_default_else_midpoint() {
    let mut cfg = parse(&disagg());
    // Midpoints: TTFT 50 → cell 1 (pool 1 for short prompts); ITL 15 → cell 1 (pool 1).
    assert_eq!(prefill(&cfg, q(10, None, None)), 1);
    assert_eq!(decode(&cfg, q(10, None, None)), 1);
    cfg.set_default_targets(Some(20.0), Some(25.0)).unwrap();
    assert_eq!(prefill(&cfg, q(10, None, None)), 0);
    assert_eq!(decode(&cfg, q(10, None, None)), 2);
    // A request's own target still wins over the default.
    assert_eq!(prefill(&cfg, q(10, Some(90.0), None)), 1);
    assert_eq!(decode(&cfg, q(10, None, Some(0.0))), 0, "an explicit 0 is a target, not absent");
}

#[test]
fn grid_default_target_must_be_non_negative_number() {
    let mut cfg = parse(&disagg());
    for bad in [f64::NAN, -1.0, f64::INFINITY] {
        let e = cfg.set_default_targets(Some(bad), None).unwrap_err();
        assert!(e.to_string().starts_with("default_ttft_target: "), "{e}");
        let e = cfg.set_default_targets(None, Some(bad)).unwrap_err();
        assert!(e.to_string().starts_with("default_itl_target: "), "{e}");
    }
    assert_eq!(cfg.defaults, DefaultTargets::default(), "a rejected default leaves the old ones");
}

// ---- request targets ----

#[test]
fn grid_targets_read_from_nvext_router_and_extra_args() {
    let t = targets_from_body(&json!({"nvext": {"router": {"ttft_target": 120, "itl_target": 7.5}}})).unwrap();
    assert_eq!((t.ttft_target_ms, t.itl_target_ms, t.priority), (Some(120.0), Some(7.5), None));
    let t = targets_from_body(&json!({"extra_args": {"ttft_target": 100, "itl_target": 20}})).unwrap();
    assert_eq!((t.ttft_target_ms, t.itl_target_ms), (Some(100.0), Some(20.0)));
    let t = targets_from_body(&json!({
        "nvext": {"router": {"ttft_target": 1}},
        "extra_args": {"ttft_target": 2, "itl_target": 3}
    }))
    .unwrap();
    assert_eq!((t.ttft_target_ms, t.itl_target_ms), (Some(1.0), Some(3.0)), "nvext wins, per field");
    let t = targets_from_body(&json!({"model": "m", "nvext": {"router": {"ttft_target": null}}})).unwrap();
    assert_eq!(t, Targets::default());
}

#[test]
fn grid_targets_priority_from_agent_hints() {
    let t = targets_from_body(&json!({"nvext": {"agent_hints": {"priority": -3}}, "priority": 9})).unwrap();
    assert_eq!(t.priority, Some(-3), "vLLM's top-level priority is not ours");
    let e = targets_from_body(&json!({"nvext": {"agent_hints": {"priority": 1.5}}})).unwrap_err().message;
    assert_eq!(e, "nvext.agent_hints.priority: expected an integer, got 1.5");
}

#[test]
fn grid_negative_target_rejected() {
    let e = targets_from_body(&json!({"nvext": {"router": {"ttft_target": -5}}})).unwrap_err().message;
    assert!(e.starts_with("nvext.router.ttft_target: must be a non-negative"), "{e}");
    let e = targets_from_body(&json!({"extra_args": {"itl_target": -0.5}})).unwrap_err().message;
    assert!(e.starts_with("extra_args.itl_target: "), "{e}");
}

#[test]
fn grid_nan_target_rejected() {
    // JSON has no NaN literal: a NaN arrives as a string (and the grid never sees one).
    let e = targets_from_body(&json!({"nvext": {"router": {"itl_target": "NaN"}}})).unwrap_err().message;
    assert_eq!(e, "nvext.router.itl_target: expected milliseconds, got \"NaN\"");
    assert!(serde_json::from_str::<Value>(r#"{"extra_args": {"ttft_target": NaN}}"#).is_err());
}

#[test]
fn grid_string_target_rejected() {
    let e = targets_from_body(&json!({"extra_args": {"ttft_target": "100"}})).unwrap_err().message;
    assert_eq!(e, "extra_args.ttft_target: expected milliseconds, got \"100\"");
    let e = targets_from_body(&json!({"nvext": {"router": {"ttft_target": true}}})).unwrap_err().message;
    assert!(e.starts_with("nvext.router.ttft_target: "), "{e}");
    let e = targets_from_body(&json!({"nvext": "fast"})).unwrap_err();
    assert_eq!((e.param.as_str(), e.message.as_str()), ("nvext", "nvext: expected an object, got a string"));
    let e = targets_from_body(&json!({"extra_args": {"itl_target": -1}})).unwrap_err();
    assert_eq!(e.param, "extra_args.itl_target", "the error names the field, for the 400's `param`");
}

// ---- config errors ----

#[test]
fn grid_error_resolution_zero() {
    let (key, problem) = error(disagg(), |v| v["prefill_pool_selection_strategy"]["isl_resolution"] = json!(0));
    assert_eq!(key, "prefill_pool_selection_strategy.isl_resolution");
    assert_eq!(problem, "expected a positive integer, got 0");
    let (key, _) = error(disagg(), |v| v["decode_pool_selection_strategy"]["itl_resolution"] = json!(-2));
    assert_eq!(key, "decode_pool_selection_strategy.itl_resolution");
}

#[test]
fn grid_error_wrong_type() {
    let (key, problem) = error(disagg(), |v| v["prefill_pool_selection_strategy"]["isl_resolution"] = json!("ten"));
    assert_eq!(
        format!("{key}: {problem}"),
        "prefill_pool_selection_strategy.isl_resolution: expected a positive integer, got \"ten\""
    );
    let (key, problem) = error(disagg(), |v| v["decode_pool_selection_strategy"]["itl_max_ms"] = json!([1]));
    assert_eq!(
        (key.as_str(), problem.as_str()),
        ("decode_pool_selection_strategy.itl_max_ms", "expected a number, got [1]")
    );
    let (key, _) = error(disagg(), |v| v["enable_priority_retry"] = json!("yes"));
    assert_eq!(key, "enable_priority_retry");
    let (key, _) = error(disagg(), |v| v["mode"] = json!("hybrid"));
    assert_eq!(key, "mode");
}

#[test]
fn grid_error_min_not_below_max() {
    let (key, problem) = error(disagg(), |v| v["decode_pool_selection_strategy"]["itl_min_ms"] = json!(30));
    assert_eq!(key, "decode_pool_selection_strategy.itl_min_ms");
    assert!(problem.starts_with("must be less than itl_max_ms"), "{problem}");
    let (key, problem) = error(disagg(), |v| v["prefill_pool_selection_strategy"]["isl_min"] = json!(5000));
    assert_eq!(key, "prefill_pool_selection_strategy.isl_min");
    assert!(problem.starts_with("must be less than isl_max"), "{problem}");
}

#[test]
fn grid_error_names_the_alias_actually_used() {
    let (key, problem) = error(disagg(), |v| {
        let s = v["prefill_pool_selection_strategy"].as_object_mut().unwrap();
        s.remove("ttft_min_ms");
        s.insert("ttft_min".into(), json!(500));
    });
    assert_eq!(key, "prefill_pool_selection_strategy.ttft_min");
    assert!(problem.starts_with("must be less than ttft_max_ms"), "{problem}");
}

#[test]
fn grid_error_mapping_wrong_shape() {
    let (key, problem) =
        error(disagg(), |v| v["prefill_pool_selection_strategy"]["prefill_pool_mapping"] = json!([[0, 1]]));
    assert_eq!(key, "prefill_pool_selection_strategy.prefill_pool_mapping");
    assert_eq!(problem, "expected 2 entries (isl_resolution), got 1");
    let (key, problem) =
        error(disagg(), |v| v["decode_pool_selection_strategy"]["decode_pool_mapping"] = json!([[0, 1, 2], [0, 1]]));
    assert_eq!(key, "decode_pool_selection_strategy.decode_pool_mapping[1]");
    assert_eq!(problem, "expected 3 entries (itl_resolution), got 2");
    let (key, _) = error(disagg(), |v| v["prefill_pool_selection_strategy"]["prefill_pool_mapping"] = json!([0, 1]));
    assert_eq!(key, "prefill_pool_selection_strategy.prefill_pool_mapping[0]");
}

#[test]
fn grid_error_absurd_resolutions_name_the_mapping() {
    // Resolutions whose product overflows: a config error naming the mapping, not an abort.
    let (key, problem) = error(disagg(), |v| {
        v["prefill_pool_selection_strategy"]["isl_resolution"] = json!(u64::MAX);
        v["prefill_pool_selection_strategy"]["ttft_resolution"] = json!(u64::MAX);
    });
    assert_eq!(key, "prefill_pool_selection_strategy.prefill_pool_mapping");
    assert_eq!(problem, format!("expected {} entries (isl_resolution), got 2", u64::MAX));
}

#[test]
fn grid_error_pool_index_out_of_range() {
    let (key, problem) = error(disagg(), |v| {
        v["prefill_pool_selection_strategy"]["isl_resolution"] = json!(3);
        v["prefill_pool_selection_strategy"]["prefill_pool_mapping"] = json!([[0, 1], [1, 0], [0, 7]]);
    });
    assert_eq!(
        format!("{key}: {problem}"),
        "prefill_pool_selection_strategy.prefill_pool_mapping[2][1]: pool index 7 out of range (2 pools)"
    );
    let (key, problem) =
        error(disagg(), |v| v["decode_pool_selection_strategy"]["decode_pool_mapping"][0][0] = json!(-1));
    assert_eq!(key, "decode_pool_selection_strategy.decode_pool_mapping[0][0]");
    assert_eq!(problem, "pool index -1 out of range (3 pools)");
}

#[test]
fn grid_error_namespace_count_mismatch() {
    let (key, problem) = error(disagg(), |v| v["num_decode_pools"] = json!(2));
    assert_eq!(key, "decode_pool_dynamo_namespaces");
    assert_eq!(problem, "has 3 entries but num_decode_pools is 2");
    let (key, problem) = error(agg(), |v| v["agg_pool_dynamo_namespaces"] = json!(["only-one"]));
    assert_eq!(
        (key.as_str(), problem.as_str()),
        ("agg_pool_dynamo_namespaces", "has 1 entries but num_agg_pools is 2")
    );
    let (key, _) = error(disagg(), |v| v["prefill_pool_priorities"] = json!([0]));
    assert_eq!(key, "prefill_pool_priorities");
    let (key, _) = error(disagg(), |v| v["prefill_pool_priorities"] = json!([0, false]));
    assert_eq!(key, "prefill_pool_priorities[1]");
}

#[test]
fn grid_error_missing_keys() {
    let (key, problem) = error(disagg(), |v| {
        v.as_object_mut().unwrap().remove("decode_pool_selection_strategy");
    });
    assert_eq!((key.as_str(), problem.as_str()), ("decode_pool_selection_strategy", "missing"));
    let (key, _) = error(disagg(), |v| {
        v["prefill_pool_selection_strategy"].as_object_mut().unwrap().remove("ttft_max_ms");
    });
    assert_eq!(key, "prefill_pool_selection_strategy.ttft_max_ms");
    let (key, _) = error(agg(), |v| {
        v.as_object_mut().unwrap().remove("num_agg_pools");
    });
    assert_eq!(key, "num_agg_pools");
}

#[test]
fn grid_error_priority_override_rules() {
    let (key, problem) = error(disagg(), |v| {
        v["decode_pool_selection_strategy"]["priority_overrides"] = json!([{"min_priority": 0, "max_priority": 1, "target_pool": 1}, {"min_priority": 5, "max_priority": 9, "target_pool": 3}]);
    });
    assert_eq!(key, "decode_pool_selection_strategy.priority_overrides[1].target_pool");
    assert_eq!(problem, "pool index 3 out of range (3 pools)");
    let (key, _) = error(disagg(), |v| {
        v["prefill_pool_selection_strategy"]["priority_overrides"] =
            json!([{"min_priority": 9, "max_priority": 5, "target_pool": 0}]);
    });
    assert_eq!(key, "prefill_pool_selection_strategy.priority_overrides[0].min_priority");
}

#[test]
fn grid_error_not_json_or_not_an_object() {
    assert!(matches!(GlobalRouterConfig::from_json("{"), Err(GridError::Json { .. })));
    assert!(matches!(GlobalRouterConfig::from_json("[1]"), Err(GridError::Json { .. })));
    let missing = GlobalRouterConfig::load(Path::new("/nonexistent/global_router.json"));
    assert!(matches!(missing, Err(GridError::Read { .. })));
}

// ---- warnings ----

#[test]
fn grid_deprecated_aliases_accepted_with_warning() {
    let mut v = disagg();
    let s = v["decode_pool_selection_strategy"].as_object_mut().unwrap();
    let (min, max) = (s.remove("itl_min_ms").unwrap(), s.remove("itl_max_ms").unwrap());
    s.insert("itl_min".into(), min);
    s.insert("itl_max".into(), max);
    let with_alias = parse(&v);
    assert_eq!(with_alias.topology, parse(&disagg()).topology);
    assert_eq!(
        with_alias.warnings,
        [
            "decode_pool_selection_strategy.itl_min: deprecated, use itl_min_ms",
            "decode_pool_selection_strategy.itl_max: deprecated, use itl_max_ms"
        ]
    );
    assert!(parse(&disagg()).warnings.is_empty());
}

#[test]
fn grid_unknown_keys_ignored_with_warning() {
    let mut v = disagg();
    v["comment"] = json!("hi");
    v["num_agg_pools"] = json!(4);
    v["prefill_pool_selection_strategy"]["ttft_min"] = json!(999);
    v["decode_pool_selection_strategy"]["smoothing"] = json!(true);
    let cfg = parse(&v);
    assert_eq!(cfg.topology, parse(&disagg()).topology, "ignored keys change nothing");
    let mut w = cfg.warnings.clone();
    w.sort();
    assert_eq!(
        w,
        [
            "comment: unknown key, ignored",
            "decode_pool_selection_strategy.smoothing: unknown key, ignored",
            "num_agg_pools: ignored in disagg mode",
            "prefill_pool_selection_strategy.ttft_min: ignored, ttft_min_ms is also set",
        ]
    );
}

// ---- priority overrides and retry ----

#[test]
fn grid_priority_overrides_first_match_wins() {
    let mut v = disagg();
    v["decode_pool_selection_strategy"]["priority_overrides"] = json!([
        {"min_priority": 10, "max_priority": 20, "target_pool": 2},
        {"min_priority": 15, "max_priority": 100, "target_pool": 1},
    ]);
    let cfg = parse(&v);
    let with = |priority| PoolQuery { priority, ..q(10, None, Some(1.0)) };
    assert_eq!(decode(&cfg, with(None)), 0, "no priority: the grid");
    assert_eq!(decode(&cfg, with(Some(9))), 0, "no rule matches: the grid");
    assert_eq!(decode(&cfg, with(Some(10))), 2, "min is inclusive");
    assert_eq!(decode(&cfg, with(Some(15))), 2, "both match: the first wins");
    assert_eq!(decode(&cfg, with(Some(20))), 2, "max is inclusive");
    assert_eq!(decode(&cfg, with(Some(21))), 1);
    assert_eq!(decode(&cfg, with(Some(100))), 1);
    assert_eq!(decode(&cfg, with(Some(101))), 0);
    assert_eq!(prefill(&cfg, PoolQuery { priority: Some(15), ..q(10, Some(90.0), None) }), 1, "per-group rules");
}

#[test]
fn grid_fallback_order_walks_faster_pools_nearest_first() {
    let mut v = disagg();
    v["enable_priority_retry"] = json!(true);
    let cfg = parse(&v);
    let group = cfg.group(PoolRole::Decode).unwrap();
    assert_eq!(group.priorities, [0, 1, 2], "default priorities are the indices");
    // Dynamo's README example: selected pool 2 retries pool 1, then pool 0.
    assert_eq!(group.fallback_order(2), [2, 1, 0]);
    assert_eq!(group.fallback_order(0), [0], "the fastest pool has nothing faster");
    let first = cfg.select_decode(&q(10, None, Some(25.0))).unwrap();
    let names: Vec<&str> = cfg.fallback_order(&first).iter().map(|c| c.namespace).collect();
    assert_eq!(names, ["d-slow", "d-mid", "d-fast"]);

    v["decode_pool_priorities"] = json!([5, 0, 5]);
    let cfg = parse(&v);
    let group = cfg.group(PoolRole::Decode).unwrap();
    assert_eq!(group.fallback_order(0), [0, 1], "an equally fast pool is not a fallback");
    assert_eq!(group.fallback_order(1), [1]);
    assert_eq!(group.fallback_order(3), Vec::<usize>::new());

    v["decode_pool_priorities"] = json!([3, 1, 7]);
    let group = parse(&v).group(PoolRole::Decode).unwrap().clone();
    assert_eq!(group.fallback_order(2), [2, 0, 1]);
}

#[test]
fn grid_fallback_order_without_priority_retry_is_the_choice_alone() {
    let cfg = parse(&disagg());
    let first = cfg.select_decode(&q(10, None, Some(25.0))).unwrap();
    assert_eq!(cfg.fallback_order(&first), [first]);
    let foreign = PoolChoice { role: PoolRole::Agg, index: 0, namespace: "x" };
    assert!(cfg.fallback_order(&foreign).is_empty());
}

// ---- agg ----

#[test]
fn grid_agg_two_dimensional() {
    let cfg = parse(&agg());
    assert!(cfg.select_prefill(&q(1, None, None)).is_none());
    let pick = |ttft, itl| cfg.select_agg(&q(5000, ttft, itl)).unwrap().index;
    // Dynamo's agg tests: TTFT boundary 1505, ITL boundary 102.5; mapping [[0, 1], [1, 1]].
    assert_eq!(pick(Some(100.0), Some(10.0)), 0);
    assert_eq!(pick(Some(100.0), Some(150.0)), 1);
    assert_eq!(pick(Some(2000.0), Some(10.0)), 1);
    assert_eq!(pick(Some(0.0), Some(0.0)), 0, "both below min");
    assert_eq!(pick(Some(1504.9), Some(102.4)), 0);
    assert_eq!(pick(Some(1505.0), Some(102.4)), 1);
    assert_eq!(pick(Some(100.0), None), 1, "ITL midpoint 102.5 is cell 1");
    assert_eq!(cfg.select_agg(&q(0, Some(100.0), Some(10.0))).unwrap().namespace, "a-fast");
}

#[test]
fn grid_agg_three_dimensional_with_isl() {
    let mut v = agg();
    let s = &mut v["agg_pool_selection_strategy"];
    s["isl_min"] = json!(0);
    s["isl_max"] = json!(8000);
    s["isl_resolution"] = json!(2);
    s["agg_pool_mapping"] = json!([[[0, 1], [1, 1]], [[1, 0], [0, 0]]]);
    let cfg = parse(&v);
    let pick = |isl, ttft, itl| cfg.select_agg(&q(isl, Some(ttft), Some(itl))).unwrap().index;
    assert_eq!(pick(100, 100.0, 10.0), 0);
    assert_eq!(pick(100, 100.0, 150.0), 1);
    assert_eq!(pick(4000, 100.0, 10.0), 1, "ISL boundary starts the second plane");
    assert_eq!(pick(3999, 100.0, 10.0), 0);
    assert_eq!(pick(9000, 100.0, 150.0), 0);
    assert_eq!(pick(9000, 2000.0, 10.0), 0);
    let qty: Vec<Quantity> = cfg.group(PoolRole::Agg).unwrap().grid.axes().iter().map(|(q, _)| *q).collect();
    assert_eq!(qty, [Quantity::Isl, Quantity::TtftMs, Quantity::ItlMs]);

    // A 3-D mapping needs the isl axis, and the isl keys come all together.
    let (key, problem) = error(agg(), |v| {
        v["agg_pool_selection_strategy"]["agg_pool_mapping"] = json!([[[0, 1], [1, 1]], [[1, 0], [0, 0]]])
    });
    assert_eq!(key, "agg_pool_selection_strategy.agg_pool_mapping[0][0]");
    assert!(problem.starts_with("expected a pool index"), "{problem}");
    let (key, problem) = error(agg(), |v| v["agg_pool_selection_strategy"]["isl_max"] = json!(8000));
    assert_eq!(key, "agg_pool_selection_strategy.isl_min");
    assert!(problem.contains("all or none"), "{problem}");
}

// ---- pools known to the proxy ----

#[test]
fn grid_check_pools_names_unknown_and_mismatched_pools() {
    let cfg = parse(&disagg());
    let mut known = vec![
        ("p-fast", "prefill"),
        ("p-slow", "prefill"),
        ("d-fast", "decode"),
        ("d-mid", "decode"),
        ("d-slow", "decode"),
    ];
    cfg.check_pools(&known).unwrap();
    known[3] = ("d-mid", "agg");
    let e = cfg.check_pools(&known).unwrap_err().to_string();
    assert_eq!(e, "decode_pool_dynamo_namespaces[1]: pool \"d-mid\" has role agg, expected decode");
    known.remove(1);
    let e = cfg.check_pools(&known).unwrap_err().to_string();
    assert_eq!(e, "prefill_pool_dynamo_namespaces[1]: no prefill pool named \"p-slow\" (configured: p-fast)");
}

// ---- Dynamo's seed example ----

/// The GlobalRouter ConfigMap of Dynamo's `examples/global_planner/vllm-2p1d.yaml`
/// (ai-dynamo/dynamo; values unchanged, `${K8S_NAMESPACE}` left as written), the example whose
/// strategies use the deprecated `ttft_min`/`ttft_max`/`itl_min`/`itl_max` keys.
const SEED: &str = include_str!("../../../tests/data/global_router_seed.json");

#[test]
fn grid_seed_example_parses_with_alias_warnings() {
    let cfg = GlobalRouterConfig::from_json(SEED).unwrap();
    assert!(!cfg.enable_priority_retry);
    let prefill = cfg.group(PoolRole::Prefill).unwrap();
    assert_eq!(prefill.namespaces, ["${K8S_NAMESPACE}-prefill-pool-0", "${K8S_NAMESPACE}-prefill-pool-1"]);
    assert_eq!(prefill.grid.axis(Quantity::TtftMs), Some(&Axis { min: 10.0, max: 1000.0, resolution: 2 }));
    assert_eq!(prefill.grid.axis(Quantity::Isl), Some(&Axis { min: 0.0, max: 32000.0, resolution: 2 }));
    let decode = cfg.group(PoolRole::Decode).unwrap();
    assert_eq!(decode.namespaces, ["${K8S_NAMESPACE}-decode-pool-0"]);
    assert_eq!(decode.grid.axis(Quantity::ItlMs), Some(&Axis { min: 10.0, max: 100.0, resolution: 2 }));
    assert_eq!(cfg.warnings.len(), 4, "{:?}", cfg.warnings);
    assert!(cfg.warnings.iter().all(|w| w.contains(": deprecated, use ")), "{:?}", cfg.warnings);
}

#[test]
fn grid_seed_example_routes_as_dynamo_documents() {
    // Expected pools come from Dynamo's docs for this example: the GlobalRouter README's pool
    // selection formula (step = (max - min) / resolution, clamped) over the ConfigMap's grids —
    // prefill `[[0,1],[0,1]]` over ISL 0..32000 (step 16000) x TTFT 10..1000 ms (step 495, so
    // TTFT < 505 ms → prefill-pool-0, else prefill-pool-1, whatever the ISL), decode
    // `[[0,0],[0,0]]` (always decode-pool-0) — and the deployment's `--default-ttft-target 100
    // --default-itl-target 10` flags for requests that name no target.
    let mut cfg = GlobalRouterConfig::from_json(SEED).unwrap();
    cfg.set_default_targets(Some(100.0), Some(10.0)).unwrap();
    let table: [(u32, Option<f64>, Option<f64>, &str); 9] = [
        (100, Some(50.0), Some(20.0), "prefill-pool-0"),
        (100, Some(800.0), Some(20.0), "prefill-pool-1"),
        (30_000, Some(50.0), Some(90.0), "prefill-pool-0"),
        (30_000, Some(800.0), Some(90.0), "prefill-pool-1"),
        (16_000, Some(504.0), Some(55.0), "prefill-pool-0"),
        (16_000, Some(505.0), Some(55.0), "prefill-pool-1"),
        (50_000, Some(5_000.0), Some(500.0), "prefill-pool-1"),
        (0, Some(0.0), Some(0.0), "prefill-pool-0"),
        (2_000, None, None, "prefill-pool-0"),
    ];
    for (isl, ttft, itl, want) in table {
        let query = q(isl, ttft, itl);
        let got = cfg.select_prefill(&query).unwrap().namespace;
        assert_eq!(got, format!("${{K8S_NAMESPACE}}-{want}"), "isl {isl} ttft {ttft:?}");
        assert_eq!(cfg.select_decode(&query).unwrap().namespace, "${K8S_NAMESPACE}-decode-pool-0");
    }
    // Without the deployment's defaults the TTFT midpoint (505 ms) picks the relaxed pool.
    cfg.set_default_targets(None, None).unwrap();
    assert_eq!(cfg.select_prefill(&q(2_000, None, None)).unwrap().index, 1);
}
