//! Pool choice by grid: NVIDIA Dynamo's GlobalRouter JSON config, read unchanged, and its lookups.
//!
//! # The algorithm
//!
//! Each group of pools (prefill, decode, or aggregated) has a grid: two or three axes, each a
//! range `[min, max]` cut into `resolution` equal cells, and a mapping from every cell to a pool
//! index. A request is placed on each axis with
//!
//! ```text
//! step = (max - min) / resolution
//! idx  = clamp(trunc((value - min) / step), 0, resolution - 1)
//! ```
//!
//! so values outside the range land in the edge cell (never an error) and a value exactly on a
//! boundary belongs to the upper cell (`max` itself to the last cell). The cell's pool is then
//! replaced by the first `priority_overrides` rule whose inclusive `[min_priority, max_priority]`
//! holds the request's priority, if any.
//!
//! Axes per group: prefill `[isl][ttft]`, decode `[context_length][itl]`, aggregated
//! `[ttft][itl]` or, with the optional `isl_*` keys, `[isl][ttft][itl]`. ISL and context length
//! are both the prompt's token count (as Dynamo does today). A missing latency target takes the
//! operator's default ([`DefaultTargets`], Dynamo's `--default-ttft-target` /
//! `--default-itl-target` flags, which are not JSON keys), else the axis midpoint.
//!
//! Priority retry: when enabled, a request that fails before any output was streamed is retried
//! on the pools [`GlobalRouterConfig::fallback_order`] lists — the chosen pool, then each faster
//! priority level (lower value) from the nearest to the fastest, as Dynamo does.
//!
//! # Config keys (JSON; unknown keys are ignored and reported in `warnings`)
//!
//! | key | default | meaning |
//! |---|---|---|
//! | `mode` | `"disagg"` | `"disagg"` (prefill + decode groups) or `"agg"` |
//! | `enable_priority_retry` | `false` | retry faster pools on failure before output |
//! | `num_{R}_pools` | — | pools in group `R` (`prefill`, `decode` or `agg`) |
//! | `{R}_pool_dynamo_namespaces` | — | pool names, exactly `num_{R}_pools` of them |
//! | `{R}_pool_priorities` | index | one integer per pool; lower = faster |
//! | `{R}_pool_selection_strategy.isl_min/isl_max/isl_resolution` | — | ISL axis (prefill; agg: optional, all or none) |
//! | `…ttft_min_ms/ttft_max_ms/ttft_resolution` | — | TTFT axis, ms (prefill, agg); `ttft_min`/`ttft_max` deprecated |
//! | `…context_length_min/context_length_max/context_length_resolution` | — | context axis (decode) |
//! | `…itl_min_ms/itl_max_ms/itl_resolution` | — | ITL axis, ms (decode, agg); `itl_min`/`itl_max` deprecated |
//! | `…{R}_pool_mapping` | — | nested lists of pool indices, one level per axis, in axis order |
//! | `…priority_overrides[]` | `[]` | `{min_priority, max_priority, target_pool}`, first match wins |
//!
//! Per request, [`targets_from_body`] reads the targets and priority from the OpenAI body.
//! Tests: `route/grid/tests.rs`, with Dynamo's seed example in `proxy/tests/data/`.

use std::path::{Path, PathBuf};

use serde_json::{Map, Value};

/// The group a pool belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PoolRole {
    /// Prefill-only pools (disaggregated mode).
    Prefill,
    /// Decode-only pools (disaggregated mode).
    Decode,
    /// Pools that run whole requests (aggregated mode).
    Agg,
}

impl PoolRole {
    /// The name used in config keys and in Gantry's pool roles: `prefill`, `decode` or `agg`.
    pub fn as_str(self) -> &'static str {
        match self {
            PoolRole::Prefill => "prefill",
            PoolRole::Decode => "decode",
            PoolRole::Agg => "agg",
        }
    }
}

/// What a grid axis measures.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Quantity {
    /// Prompt tokens (`isl_*`).
    Isl,
    /// Context tokens, today the prompt tokens (`context_length_*`).
    ContextLength,
    /// Time-to-first-token target, ms (`ttft_*`).
    TtftMs,
    /// Inter-token latency target, ms (`itl_*`).
    ItlMs,
}

/// One axis: `[min, max]` cut into `resolution` equal cells.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Axis {
    /// Lower end of the range.
    pub min: f64,
    /// Upper end of the range (greater than `min`).
    pub max: f64,
    /// Number of cells (at least 1).
    pub resolution: usize,
}

impl Axis {
    /// Width of one cell.
    pub fn step(&self) -> f64 {
        (self.max - self.min) / self.resolution as f64
    }

    /// Middle of the range: the value used for a missing target without a default.
    pub fn midpoint(&self) -> f64 {
        (self.min + self.max) / 2.0
    }

    /// The cell holding `value`: `clamp(trunc((value - min) / step), 0, resolution - 1)`.
    /// Values below `min` give 0, values at or above `max` the last cell; NaN gives 0.
    pub fn cell(&self, value: f64) -> usize {
        // `as` truncates toward zero and saturates: negatives and NaN become 0, huge values
        // usize::MAX, so only the upper clamp is left to do.
        (((value - self.min) / self.step()) as usize).min(self.resolution - 1)
    }
}

/// A pool grid: its axes in mapping order and the pool index of every cell.
#[derive(Debug, Clone, PartialEq)]
pub struct Grid {
    axes: Vec<(Quantity, Axis)>,
    /// Row-major: the last axis varies fastest, as in the nested JSON lists.
    cells: Vec<usize>,
}

impl Grid {
    /// The axes, outermost (first mapping index) first.
    pub fn axes(&self) -> &[(Quantity, Axis)] {
        &self.axes
    }

    /// The axis measuring `quantity`, if the grid has one.
    pub fn axis(&self, quantity: Quantity) -> Option<&Axis> {
        self.axes.iter().find(|(q, _)| *q == quantity).map(|(_, a)| a)
    }

    /// The pool index of the cell holding `value(quantity, axis)` on every axis.
    pub fn lookup(&self, mut value: impl FnMut(Quantity, &Axis) -> f64) -> usize {
        let flat = self.axes.iter().fold(0, |flat, (q, axis)| flat * axis.resolution + axis.cell(value(*q, axis)));
        self.cells[flat]
    }
}

/// `priority_overrides[]` rule: requests whose priority lies in the inclusive range go to
/// `target_pool` whatever the grid says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PriorityOverride {
    /// Inclusive lower bound.
    pub min_priority: i64,
    /// Inclusive upper bound (at least `min_priority`).
    pub max_priority: i64,
    /// Pool index to use.
    pub target_pool: usize,
}

/// One group of pools (all prefill, all decode, or all aggregated) and how to choose among them.
#[derive(Debug, Clone, PartialEq)]
pub struct PoolGroup {
    /// The group's role.
    pub role: PoolRole,
    /// Pool names (`{R}_pool_dynamo_namespaces`), by pool index.
    pub namespaces: Vec<String>,
    /// Pool speed by index (`{R}_pool_priorities`, default the index); lower = faster.
    pub priorities: Vec<i64>,
    /// The selection grid.
    pub grid: Grid,
    /// Rules applied after the grid, first match wins.
    pub priority_overrides: Vec<PriorityOverride>,
}

impl PoolGroup {
    /// The pool index for `query`: grid cell, then the first matching priority override.
    pub fn pick(&self, query: &PoolQuery, defaults: &DefaultTargets) -> usize {
        let from_grid = self.grid.lookup(|q, axis| match q {
            Quantity::Isl | Quantity::ContextLength => f64::from(query.isl),
            Quantity::TtftMs => query.ttft_target_ms.or(defaults.ttft_ms).unwrap_or_else(|| axis.midpoint()),
            Quantity::ItlMs => query.itl_target_ms.or(defaults.itl_ms).unwrap_or_else(|| axis.midpoint()),
        });
        query
            .priority
            .and_then(|p| self.priority_overrides.iter().find(|r| (r.min_priority..=r.max_priority).contains(&p)))
            .map_or(from_grid, |r| r.target_pool)
    }

    /// Pools to try, in order, after `chosen` failed before streaming: `chosen` itself, then every
    /// faster priority level from the nearest to the fastest, pools of one level in index order
    /// (Dynamo's `get_priority_retry_order`). Pools as fast as `chosen` are not tried. Empty when
    /// `chosen` is out of range.
    pub fn fallback_order(&self, chosen: usize) -> Vec<usize> {
        let Some(&own) = self.priorities.get(chosen) else { return Vec::new() };
        let mut levels: Vec<i64> = self.priorities.iter().copied().filter(|&p| p < own).collect();
        levels.sort_unstable_by(|a, b| b.cmp(a));
        levels.dedup();
        let mut order = vec![chosen];
        for level in levels {
            order.extend(self.priorities.iter().enumerate().filter(|&(_, &p)| p == level).map(|(i, _)| i));
        }
        order
    }
}

/// The groups of a config.
#[derive(Debug, Clone, PartialEq)]
pub enum Topology {
    /// `mode: "disagg"`: a prefill group and a decode group.
    Disagg {
        /// Prefill pools.
        prefill: PoolGroup,
        /// Decode pools.
        decode: PoolGroup,
    },
    /// `mode: "agg"`: one group of aggregated pools.
    Agg {
        /// Aggregated pools.
        agg: PoolGroup,
    },
}

/// Targets used when a request names none (Dynamo's `--default-ttft-target` and
/// `--default-itl-target` flags; they are not part of the JSON file). `None`: the axis midpoint.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct DefaultTargets {
    /// Default TTFT target, ms.
    pub ttft_ms: Option<f64>,
    /// Default ITL target, ms.
    pub itl_ms: Option<f64>,
}

/// A validated Dynamo GlobalRouter config.
#[derive(Debug, Clone, PartialEq)]
pub struct GlobalRouterConfig {
    /// `enable_priority_retry`: retry faster pools when a pool fails before any output.
    pub enable_priority_retry: bool,
    /// The pool groups and their grids.
    pub topology: Topology,
    /// Targets for requests that name none; set with [`GlobalRouterConfig::set_default_targets`].
    pub defaults: DefaultTargets,
    /// Ignored keys and deprecated aliases, one line each, for the caller to log.
    pub warnings: Vec<String>,
}

/// A pool chosen for a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PoolChoice<'a> {
    /// The group it belongs to.
    pub role: PoolRole,
    /// Its index in the group.
    pub index: usize,
    /// Its name (Dynamo namespace).
    pub namespace: &'a str,
}

/// What pool choice needs to know about one request.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct PoolQuery {
    /// Prompt tokens: the ISL for prefill and agg grids and the context length for decode grids.
    pub isl: u32,
    /// Time-to-first-token target, ms.
    pub ttft_target_ms: Option<f64>,
    /// Inter-token latency target, ms.
    pub itl_target_ms: Option<f64>,
    /// Priority, matched against `priority_overrides`.
    pub priority: Option<i64>,
}

impl PoolQuery {
    /// The query for a prompt of `isl` tokens carrying `targets`.
    pub fn new(isl: u32, targets: &Targets) -> PoolQuery {
        PoolQuery {
            isl,
            ttft_target_ms: targets.ttft_target_ms,
            itl_target_ms: targets.itl_target_ms,
            priority: targets.priority,
        }
    }
}

/// Routing hints found in a request body (see [`targets_from_body`]).
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Targets {
    /// TTFT target, ms (non-negative).
    pub ttft_target_ms: Option<f64>,
    /// ITL target, ms (non-negative).
    pub itl_target_ms: Option<f64>,
    /// Priority for `priority_overrides`.
    pub priority: Option<i64>,
}

/// A config problem.
#[derive(Debug, thiserror::Error)]
pub enum GridError {
    /// The file could not be read.
    #[error("reading {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// The text is not a JSON object.
    #[error("not a JSON object: {message}")]
    Json {
        /// What the parser said (with line and column).
        message: String,
    },
    /// A key is missing or its value is invalid.
    #[error("{key}: {problem}")]
    Invalid {
        /// Key path, e.g. `prefill_pool_selection_strategy.prefill_pool_mapping[2][1]`.
        key: String,
        /// What is wrong.
        problem: String,
    },
}

impl GlobalRouterConfig {
    /// Parses and validates a config. Every error names its key path.
    pub fn from_json(text: &str) -> Result<GlobalRouterConfig, GridError> {
        let value: Value = serde_json::from_str(text).map_err(|e| GridError::Json { message: e.to_string() })?;
        let Value::Object(map) = &value else {
            return Err(GridError::Json { message: format!("the top level is {}", kind(&value)) });
        };
        parse_config(&Section { prefix: String::new(), map })
    }

    /// Reads `path` and parses it with [`GlobalRouterConfig::from_json`].
    pub fn load(path: &Path) -> Result<GlobalRouterConfig, GridError> {
        let text = std::fs::read_to_string(path).map_err(|source| GridError::Read { path: path.into(), source })?;
        GlobalRouterConfig::from_json(&text)
    }

    /// Sets the targets used when a request names none; each must be a non-negative number.
    pub fn set_default_targets(&mut self, ttft_ms: Option<f64>, itl_ms: Option<f64>) -> Result<(), GridError> {
        for (key, v) in [("default_ttft_target", ttft_ms), ("default_itl_target", itl_ms)] {
            if let Some(v) = v {
                check_target(v).map_err(|problem| invalid(key, problem))?;
            }
        }
        self.defaults = DefaultTargets { ttft_ms, itl_ms };
        Ok(())
    }

    /// The group of `role`, if this config has one.
    pub fn group(&self, role: PoolRole) -> Option<&PoolGroup> {
        match (&self.topology, role) {
            (Topology::Disagg { prefill, .. }, PoolRole::Prefill) => Some(prefill),
            (Topology::Disagg { decode, .. }, PoolRole::Decode) => Some(decode),
            (Topology::Agg { agg }, PoolRole::Agg) => Some(agg),
            _ => None,
        }
    }

    /// Every group, prefill before decode.
    pub fn groups(&self) -> Vec<&PoolGroup> {
        match &self.topology {
            Topology::Disagg { prefill, decode } => vec![prefill, decode],
            Topology::Agg { agg } => vec![agg],
        }
    }

    /// The pool of `role` for `query`; None when this config has no group of that role.
    pub fn select(&self, role: PoolRole, query: &PoolQuery) -> Option<PoolChoice<'_>> {
        let group = self.group(role)?;
        let index = group.pick(query, &self.defaults);
        Some(PoolChoice { role, index, namespace: &group.namespaces[index] })
    }

    /// The prefill pool for `query` (by ISL and TTFT target); None in agg mode.
    pub fn select_prefill(&self, query: &PoolQuery) -> Option<PoolChoice<'_>> {
        self.select(PoolRole::Prefill, query)
    }

    /// The decode pool for `query` (by context length = ISL, and ITL target); None in agg mode.
    pub fn select_decode(&self, query: &PoolQuery) -> Option<PoolChoice<'_>> {
        self.select(PoolRole::Decode, query)
    }

    /// The aggregated pool for `query` (by TTFT and ITL targets, and ISL on a 3-D grid); None
    /// in disagg mode.
    pub fn select_agg(&self, query: &PoolQuery) -> Option<PoolChoice<'_>> {
        self.select(PoolRole::Agg, query)
    }

    /// Pools to try for a request whose first choice is `first`: just `first` unless
    /// `enable_priority_retry`, else [`PoolGroup::fallback_order`]. Empty when `first` is not a
    /// pool of this config.
    pub fn fallback_order(&self, first: &PoolChoice<'_>) -> Vec<PoolChoice<'_>> {
        let Some(group) = self.group(first.role).filter(|g| first.index < g.namespaces.len()) else {
            return Vec::new();
        };
        let order = if self.enable_priority_retry { group.fallback_order(first.index) } else { vec![first.index] };
        order
            .into_iter()
            .map(|index| PoolChoice { role: first.role, index, namespace: &group.namespaces[index] })
            .collect()
    }

    /// Checks that every namespace names a pool Gantry serves, with the matching role. `known`
    /// holds `(pool name, role)` with role `"agg"`, `"prefill"` or `"decode"`.
    pub fn check_pools(&self, known: &[(&str, &str)]) -> Result<(), GridError> {
        for group in self.groups() {
            let role = group.role.as_str();
            for (i, name) in group.namespaces.iter().enumerate() {
                let key = format!("{role}_pool_dynamo_namespaces[{i}]");
                match known.iter().find(|(n, _)| n == name) {
                    Some((_, r)) if *r == role => {}
                    Some((_, r)) => {
                        return Err(invalid(key, format!("pool \"{name}\" has role {r}, expected {role}")));
                    }
                    None => {
                        let same: Vec<&str> = known.iter().filter(|(_, r)| *r == role).map(|(n, _)| *n).collect();
                        let listed = if same.is_empty() { "none".to_owned() } else { same.join(", ") };
                        return Err(invalid(key, format!("no {role} pool named \"{name}\" (configured: {listed})")));
                    }
                }
            }
        }
        Ok(())
    }
}

/// Reads the routing hints of an OpenAI request body.
///
/// - TTFT / ITL targets (ms): `nvext.router.ttft_target` / `itl_target` (what Dynamo's frontend
///   forwards to its global router), else `extra_args.ttft_target` / `itl_target` (shown in the
///   GlobalRouter README). When both are given, `nvext.router` wins.
/// - Priority: `nvext.agent_hints.priority`, the field Dynamo's global router reads. The
///   top-level `priority` is vLLM's own scheduling priority (lower = sooner), a different
///   scale that goes to the engine untouched, so it is not read here.
///
/// `null` counts as absent. A target that is not a non-negative number, or a priority that is
/// not an integer, is an error naming the field (the proxy answers 400).
pub fn targets_from_body(body: &Value) -> Result<Targets, BadHint> {
    let nvext = object_at(body, "nvext", "nvext")?;
    let router = nvext.map(|n| object_at(n, "router", "nvext.router")).transpose()?.flatten();
    let hints = nvext.map(|n| object_at(n, "agent_hints", "nvext.agent_hints")).transpose()?.flatten();
    let extra = object_at(body, "extra_args", "extra_args")?;
    let target = |name: &str| -> Result<Option<f64>, BadHint> {
        for (scope, prefix) in [(router, "nvext.router"), (extra, "extra_args")] {
            if let Some(v) = scope.and_then(|s| s.get(name)).filter(|v| !v.is_null()) {
                let param = format!("{prefix}.{name}");
                let ms = match v.as_f64() {
                    Some(ms) => ms,
                    None => return Err(BadHint::new(param, format!("expected milliseconds, got {v}"))),
                };
                return check_target(ms).map(Some).map_err(|p| BadHint::new(param, p));
            }
        }
        Ok(None)
    };
    let priority = match hints.and_then(|h| h.get("priority")).filter(|v| !v.is_null()) {
        None => None,
        Some(v) => Some(v.as_i64().ok_or_else(|| {
            BadHint::new("nvext.agent_hints.priority".into(), format!("expected an integer, got {v}"))
        })?),
    };
    Ok(Targets { ttft_target_ms: target("ttft_target")?, itl_target_ms: target("itl_target")?, priority })
}

/// A routing hint in a request body that the proxy refuses with a 400.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BadHint {
    /// The field's path, e.g. `nvext.router.ttft_target` (the error's `param`).
    pub param: String,
    /// What is wrong, starting with the path.
    pub message: String,
}

impl BadHint {
    fn new(param: String, problem: String) -> BadHint {
        BadHint { message: format!("{param}: {problem}"), param }
    }
}

#[cfg(test)]
mod tests;

// ---- parsing ----

const TOP_KEYS: [&str; 2] = ["mode", "enable_priority_retry"];
const DISAGG_KEYS: [&str; 8] = [
    "num_prefill_pools",
    "num_decode_pools",
    "prefill_pool_dynamo_namespaces",
    "decode_pool_dynamo_namespaces",
    "prefill_pool_priorities",
    "decode_pool_priorities",
    "prefill_pool_selection_strategy",
    "decode_pool_selection_strategy",
];
const AGG_KEYS: [&str; 4] =
    ["num_agg_pools", "agg_pool_dynamo_namespaces", "agg_pool_priorities", "agg_pool_selection_strategy"];

fn invalid(key: impl Into<String>, problem: impl Into<String>) -> GridError {
    GridError::Invalid { key: key.into(), problem: problem.into() }
}

/// `ms` if it is a valid latency target (a non-negative number of milliseconds), else why not.
pub(crate) fn check_target(ms: f64) -> Result<f64, String> {
    if ms.is_finite() && ms >= 0.0 {
        Ok(ms)
    } else {
        Err(format!("must be a non-negative number of milliseconds, got {ms}"))
    }
}

fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "a list",
        Value::Object(_) => "an object",
    }
}

/// `parent[name]` as an object: None when absent or null, an error naming `path` otherwise.
fn object_at<'a>(parent: &'a Value, name: &str, path: &str) -> Result<Option<&'a Value>, BadHint> {
    match parent.get(name) {
        None | Some(Value::Null) => Ok(None),
        Some(v @ Value::Object(_)) => Ok(Some(v)),
        Some(v) => Err(BadHint::new(path.into(), format!("expected an object, got {}", kind(v)))),
    }
}

/// A JSON object and the key path leading to it.
struct Section<'a> {
    prefix: String,
    map: &'a Map<String, Value>,
}

impl<'a> Section<'a> {
    fn key(&self, name: &str) -> String {
        if self.prefix.is_empty() {
            name.to_owned()
        } else {
            format!("{}.{name}", self.prefix)
        }
    }

    /// The value of `name`; absent and null are the same (Python's `dict.get`).
    fn get(&self, name: &str) -> Option<&'a Value> {
        self.map.get(name).filter(|v| !v.is_null())
    }

    fn required(&self, name: &str) -> Result<&'a Value, GridError> {
        self.get(name).ok_or_else(|| invalid(self.key(name), "missing"))
    }

    fn number(&self, name: &str) -> Result<f64, GridError> {
        let v = self.required(name)?;
        v.as_f64().ok_or_else(|| invalid(self.key(name), format!("expected a number, got {v}")))
    }

    fn positive_int(&self, name: &str) -> Result<usize, GridError> {
        let v = self.required(name)?;
        v.as_u64()
            .filter(|&n| n > 0)
            .and_then(|n| usize::try_from(n).ok())
            .ok_or_else(|| invalid(self.key(name), format!("expected a positive integer, got {v}")))
    }

    fn int(&self, name: &str) -> Result<i64, GridError> {
        let v = self.required(name)?;
        v.as_i64().ok_or_else(|| invalid(self.key(name), format!("expected an integer, got {v}")))
    }

    fn object(&self, name: &str) -> Result<Section<'a>, GridError> {
        match self.required(name)? {
            Value::Object(map) => Ok(Section { prefix: self.key(name), map }),
            v => Err(invalid(self.key(name), format!("expected an object, got {}", kind(v)))),
        }
    }

    fn list(&self, name: &str) -> Result<Option<&'a Vec<Value>>, GridError> {
        match self.get(name) {
            None => Ok(None),
            Some(Value::Array(items)) => Ok(Some(items)),
            Some(v) => Err(invalid(self.key(name), format!("expected a list, got {}", kind(v)))),
        }
    }

    /// `primary`, else its deprecated `alias` (with a warning); returns the value and the key
    /// actually used, so later errors name what the file says.
    fn aliased_number(
        &self,
        primary: &str,
        alias: Option<&str>,
        warnings: &mut Vec<String>,
    ) -> Result<(f64, String), GridError> {
        let alias = alias.filter(|a| self.get(a).is_some());
        match (self.get(primary), alias) {
            (Some(_), Some(a)) => {
                warnings.push(format!("{}: ignored, {primary} is also set", self.key(a)));
                Ok((self.number(primary)?, primary.to_owned()))
            }
            (Some(_), None) => Ok((self.number(primary)?, primary.to_owned())),
            (None, Some(a)) => {
                warnings.push(format!("{}: deprecated, use {primary}", self.key(a)));
                Ok((self.number(a)?, a.to_owned()))
            }
            (None, None) => Err(invalid(self.key(primary), "missing")),
        }
    }

    fn warn_unknown(&self, known: &[&str], warnings: &mut Vec<String>) {
        for name in self.map.keys().filter(|k| !known.contains(&k.as_str())) {
            warnings.push(format!("{}: unknown key, ignored", self.key(name)));
        }
    }
}

fn parse_config(root: &Section<'_>) -> Result<GlobalRouterConfig, GridError> {
    let mut warnings = Vec::new();
    let agg = match root.get("mode") {
        None => false,
        Some(Value::String(m)) if m == "disagg" => false,
        Some(Value::String(m)) if m == "agg" => true,
        Some(v) => return Err(invalid("mode", format!("expected \"disagg\" or \"agg\", got {v}"))),
    };
    let enable_priority_retry = match root.get("enable_priority_retry") {
        None => false,
        Some(Value::Bool(b)) => *b,
        Some(v) => return Err(invalid("enable_priority_retry", format!("expected true or false, got {v}"))),
    };
    let (own, other, mode): (&[&str], &[&str], _) =
        if agg { (&AGG_KEYS, &DISAGG_KEYS, "agg") } else { (&DISAGG_KEYS, &AGG_KEYS, "disagg") };
    for name in root.map.keys() {
        if other.contains(&name.as_str()) {
            warnings.push(format!("{name}: ignored in {mode} mode"));
        } else if !own.contains(&name.as_str()) && !TOP_KEYS.contains(&name.as_str()) {
            warnings.push(format!("{name}: unknown key, ignored"));
        }
    }
    let topology = if agg {
        Topology::Agg { agg: parse_group(root, PoolRole::Agg, &mut warnings)? }
    } else {
        Topology::Disagg {
            prefill: parse_group(root, PoolRole::Prefill, &mut warnings)?,
            decode: parse_group(root, PoolRole::Decode, &mut warnings)?,
        }
    };
    Ok(GlobalRouterConfig { enable_priority_retry, topology, defaults: DefaultTargets::default(), warnings })
}

/// An axis spec: quantity, min key, deprecated min alias, max key, max alias, resolution key.
type AxisKeys = (Quantity, &'static str, Option<&'static str>, &'static str, Option<&'static str>, &'static str);

const ISL: AxisKeys = (Quantity::Isl, "isl_min", None, "isl_max", None, "isl_resolution");
const CONTEXT: AxisKeys =
    (Quantity::ContextLength, "context_length_min", None, "context_length_max", None, "context_length_resolution");
const TTFT: AxisKeys =
    (Quantity::TtftMs, "ttft_min_ms", Some("ttft_min"), "ttft_max_ms", Some("ttft_max"), "ttft_resolution");
const ITL: AxisKeys = (Quantity::ItlMs, "itl_min_ms", Some("itl_min"), "itl_max_ms", Some("itl_max"), "itl_resolution");

fn parse_group(root: &Section<'_>, role: PoolRole, warnings: &mut Vec<String>) -> Result<PoolGroup, GridError> {
    let r = role.as_str();
    let num_key = format!("num_{r}_pools");
    let pools = root.positive_int(&num_key)?;

    let ns_key = format!("{r}_pool_dynamo_namespaces");
    let ns = root.list(&ns_key)?.ok_or_else(|| invalid(&ns_key, "missing"))?;
    if ns.len() != pools {
        return Err(invalid(&ns_key, format!("has {} entries but {num_key} is {pools}", ns.len())));
    }
    let namespaces = ns
        .iter()
        .enumerate()
        .map(|(i, v)| match v.as_str() {
            Some(s) if !s.is_empty() => Ok(s.to_owned()),
            _ => Err(invalid(format!("{ns_key}[{i}]"), format!("expected a pool name, got {v}"))),
        })
        .collect::<Result<Vec<_>, _>>()?;

    let prio_key = format!("{r}_pool_priorities");
    let priorities = match root.list(&prio_key)? {
        None => (0..pools as i64).collect(),
        Some(list) if list.len() != pools => {
            return Err(invalid(&prio_key, format!("has {} entries but {num_key} is {pools}", list.len())));
        }
        Some(list) => list
            .iter()
            .enumerate()
            .map(|(i, v)| {
                v.as_i64().ok_or_else(|| invalid(format!("{prio_key}[{i}]"), format!("expected an integer, got {v}")))
            })
            .collect::<Result<Vec<_>, _>>()?,
    };

    let strategy = root.object(&format!("{r}_pool_selection_strategy"))?;
    let mapping_key = format!("{r}_pool_mapping");
    let specs: Vec<AxisKeys> = match role {
        PoolRole::Prefill => vec![ISL, TTFT],
        PoolRole::Decode => vec![CONTEXT, ITL],
        PoolRole::Agg => {
            let (_, min, _, max, _, res) = ISL;
            let present: Vec<&str> = [min, max, res].into_iter().filter(|k| strategy.get(k).is_some()).collect();
            match present.len() {
                0 => vec![TTFT, ITL],
                3 => vec![ISL, TTFT, ITL],
                _ => {
                    let absent = [min, max, res].into_iter().find(|k| !present.contains(k)).unwrap_or(min);
                    return Err(invalid(
                        strategy.key(absent),
                        "missing (isl_min, isl_max and isl_resolution are all or none)",
                    ));
                }
            }
        }
    };
    let mut known: Vec<&str> = vec![&mapping_key, "priority_overrides"];
    let mut axes = Vec::with_capacity(specs.len());
    let mut res_names = Vec::with_capacity(specs.len());
    for (quantity, min_key, min_alias, max_key, max_alias, res_key) in specs {
        known.extend([min_key, max_key, res_key].into_iter().chain(min_alias).chain(max_alias));
        let (min, min_used) = strategy.aliased_number(min_key, min_alias, warnings)?;
        let (max, max_used) = strategy.aliased_number(max_key, max_alias, warnings)?;
        let resolution = strategy.positive_int(res_key)?;
        if min >= max {
            return Err(invalid(
                strategy.key(&min_used),
                format!("must be less than {max_used} (got {min} and {max})"),
            ));
        }
        axes.push((quantity, Axis { min, max, resolution }));
        res_names.push((resolution, res_key));
    }
    strategy.warn_unknown(&known, warnings);

    let mapping = strategy.required(&mapping_key)?;
    // Not sized from the resolutions up front: their product may be absurd (or overflow) in a bad
    // file, and the mapping's own shape, checked level by level, bounds it.
    let mut cells = Vec::new();
    flatten_mapping(mapping, &strategy.key(&mapping_key), &res_names, pools, &mut cells)?;

    let mut priority_overrides = Vec::new();
    for (i, rule) in strategy.list("priority_overrides")?.into_iter().flatten().enumerate() {
        let key = format!("{}[{i}]", strategy.key("priority_overrides"));
        let Value::Object(map) = rule else {
            return Err(invalid(key, format!("expected an object, got {}", kind(rule))));
        };
        let rule = Section { prefix: key, map };
        rule.warn_unknown(&["min_priority", "max_priority", "target_pool"], warnings);
        let min_priority = rule.int("min_priority")?;
        let max_priority = rule.int("max_priority")?;
        if min_priority > max_priority {
            return Err(invalid(
                rule.key("min_priority"),
                format!("must be at most max_priority (got {min_priority} and {max_priority})"),
            ));
        }
        let target = rule.required("target_pool")?;
        let target_pool = pool_index(target, pools).map_err(|p| invalid(rule.key("target_pool"), p))?;
        priority_overrides.push(PriorityOverride { min_priority, max_priority, target_pool });
    }

    Ok(PoolGroup { role, namespaces, priorities, grid: Grid { axes, cells }, priority_overrides })
}

fn pool_index(v: &Value, pools: usize) -> Result<usize, String> {
    match v.as_i64() {
        Some(i) if (0..pools as i64).contains(&i) => Ok(i as usize),
        Some(i) => Err(format!("pool index {i} out of range ({pools} pools)")),
        None => Err(format!("expected a pool index, got {v}")),
    }
}

/// Checks that `v` nests exactly `dims` (resolution, resolution key) deep and appends its pool
/// indices row-major.
fn flatten_mapping(
    v: &Value,
    key: &str,
    dims: &[(usize, &str)],
    pools: usize,
    cells: &mut Vec<usize>,
) -> Result<(), GridError> {
    let Some(((len, res_key), inner)) = dims.split_first() else {
        cells.push(pool_index(v, pools).map_err(|p| invalid(key, p))?);
        return Ok(());
    };
    let Value::Array(items) = v else {
        return Err(invalid(key, format!("expected a list of {len} ({res_key}), got {}", kind(v))));
    };
    if items.len() != *len {
        return Err(invalid(key, format!("expected {len} entries ({res_key}), got {}", items.len())));
    }
    for (i, item) in items.iter().enumerate() {
        flatten_mapping(item, &format!("{key}[{i}]"), inner, pools, cells)?;
    }
    Ok(())
}
