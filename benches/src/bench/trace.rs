//! Trace files: Mooncake JSON Lines and the Azure LLM inference CSVs, parsed into
//! [`TraceRecord`]s with arrival times in milliseconds from the first record.
//!
//! * Mooncake (`*.jsonl`): one object per line with `timestamp` (ms), `input_length`,
//!   `output_length` and `hash_ids` (512-token prefix block ids). Blank lines are skipped.
//! * Azure (`*.csv`): header `TIMESTAMP,ContextTokens,GeneratedTokens`, timestamps
//!   `YYYY-MM-DD HH:MM:SS[.fffffff]`; no block ids, so every prompt is unique.
//!
//! A bad line fails the whole parse with `file:line: what is wrong`.

use std::path::{Path, PathBuf};

/// One traced request.
#[derive(Debug, Clone, PartialEq)]
pub struct TraceRecord {
    /// Arrival, ms from the trace's first record.
    pub timestamp_ms: f64,
    /// Prompt tokens.
    pub input_length: u32,
    /// Generated tokens.
    pub output_length: u32,
    /// Prefix block ids (empty for Azure).
    pub hash_ids: Vec<u64>,
}

/// Which format a trace file is in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum TraceFormat {
    /// By extension: `.csv` is Azure, anything else Mooncake.
    Auto,
    /// Mooncake JSON Lines.
    Mooncake,
    /// Azure LLM inference CSV.
    Azure,
}

/// Why a trace could not be read.
#[derive(Debug, thiserror::Error)]
pub enum TraceError {
    /// The file could not be read.
    #[error("reading trace {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// A line is malformed.
    #[error("{path}:{line}: {problem}")]
    Line {
        /// The file.
        path: PathBuf,
        /// 1-based line number.
        line: usize,
        /// What is wrong with it.
        problem: String,
    },
    /// The file holds no records.
    #[error("{path}: the trace holds no records")]
    Empty {
        /// The file.
        path: PathBuf,
    },
}

/// Reads a trace file, at most `limit` records (all when `None`).
pub fn load(path: &Path, format: TraceFormat, limit: Option<usize>) -> Result<Vec<TraceRecord>, TraceError> {
    let text = std::fs::read_to_string(path).map_err(|source| TraceError::Io { path: path.to_owned(), source })?;
    let format = match format {
        TraceFormat::Auto if path.extension().is_some_and(|e| e.eq_ignore_ascii_case("csv")) => TraceFormat::Azure,
        TraceFormat::Auto => TraceFormat::Mooncake,
        f => f,
    };
    let limit = limit.unwrap_or(usize::MAX);
    let bad = |line: usize, problem: String| TraceError::Line { path: path.to_owned(), line, problem };
    let mut records = match format {
        TraceFormat::Azure => parse_azure(&text, limit).map_err(|(l, p)| bad(l, p))?,
        _ => parse_mooncake(&text, limit).map_err(|(l, p)| bad(l, p))?,
    };
    if records.is_empty() {
        return Err(TraceError::Empty { path: path.to_owned() });
    }
    // Arrival order; the sort is stable so equal timestamps keep their file order.
    records.sort_by(|a, b| a.timestamp_ms.total_cmp(&b.timestamp_ms));
    let t0 = records[0].timestamp_ms;
    for r in &mut records {
        r.timestamp_ms -= t0;
    }
    Ok(records)
}

#[derive(serde::Deserialize)]
struct MooncakeLine {
    timestamp: f64,
    input_length: u32,
    output_length: u32,
    #[serde(default)]
    hash_ids: Vec<u64>,
}

/// Parses Mooncake JSON Lines; an error is `(1-based line, problem)`.
pub fn parse_mooncake(text: &str, limit: usize) -> Result<Vec<TraceRecord>, (usize, String)> {
    let mut out = Vec::new();
    for (n, line) in text.lines().enumerate() {
        if out.len() >= limit {
            break;
        }
        if line.trim().is_empty() {
            continue;
        }
        let l: MooncakeLine = serde_json::from_str(line).map_err(|e| {
            (n + 1, format!("not a Mooncake record ({e}); expected {{\"timestamp\", \"input_length\", \"output_length\", \"hash_ids\"}}"))
        })?;
        if !(l.timestamp.is_finite() && l.timestamp >= 0.0) {
            return Err((n + 1, format!("timestamp {} is not a non-negative number of ms", l.timestamp)));
        }
        if l.input_length == 0 {
            return Err((n + 1, "input_length is 0".into()));
        }
        out.push(TraceRecord {
            timestamp_ms: l.timestamp,
            input_length: l.input_length,
            output_length: l.output_length.max(1),
            hash_ids: l.hash_ids,
        });
    }
    Ok(out)
}

/// Parses an Azure LLM inference CSV; an error is `(1-based line, problem)`.
pub fn parse_azure(text: &str, limit: usize) -> Result<Vec<TraceRecord>, (usize, String)> {
    let mut lines = text.lines().enumerate();
    match lines.next() {
        Some((_, h)) if h.trim().eq_ignore_ascii_case("TIMESTAMP,ContextTokens,GeneratedTokens") => {}
        Some((_, h)) => return Err((1, format!("header `{h}` is not `TIMESTAMP,ContextTokens,GeneratedTokens`"))),
        None => return Ok(Vec::new()),
    }
    let mut out = Vec::new();
    for (n, line) in lines {
        if out.len() >= limit {
            break;
        }
        if line.trim().is_empty() {
            continue;
        }
        let f: Vec<&str> = line.split(',').map(str::trim).collect();
        let [ts, ctx, gen] = f[..] else {
            return Err((n + 1, format!("expected 3 comma-separated fields, found {}", f.len())));
        };
        let timestamp_ms = parse_datetime_ms(ts)
            .ok_or_else(|| (n + 1, format!("bad TIMESTAMP `{ts}` (expected YYYY-MM-DD HH:MM:SS[.fraction])")))?;
        let num = |s: &str, what: &str| s.parse::<u32>().map_err(|_| (n + 1, format!("bad {what} `{s}`")));
        let input_length = num(ctx, "ContextTokens")?.max(1);
        let output_length = num(gen, "GeneratedTokens")?.max(1);
        out.push(TraceRecord { timestamp_ms, input_length, output_length, hash_ids: Vec::new() });
    }
    Ok(out)
}

/// `YYYY-MM-DD HH:MM:SS[.fraction]` as ms since 1970-01-01 (UTC, proleptic Gregorian); years
/// 0000–9999, fields as unsigned decimal digits (so no arithmetic below can overflow).
pub fn parse_datetime_ms(s: &str) -> Option<f64> {
    fn field(p: &str, max: i64) -> Option<i64> {
        if p.is_empty() || p.len() > 4 || !p.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        p.parse::<i64>().ok().filter(|v| *v <= max)
    }
    let (date, time) = s.split_once([' ', 'T'])?;
    let mut d = date.split('-');
    let (y, m, day) = (field(d.next()?, 9999)?, field(d.next()?, 12)?, field(d.next()?, 31)?);
    let leap = y % 4 == 0 && (y % 100 != 0 || y % 400 == 0);
    let month_days = match m {
        2 if leap => 29,
        2 => 28,
        4 | 6 | 9 | 11 => 30,
        _ => 31,
    };
    if d.next().is_some() || m == 0 || day == 0 || day > month_days {
        return None;
    }
    let (hms, frac) = match time.split_once('.') {
        Some((a, b)) => (a, Some(b)),
        None => (time, None),
    };
    let mut t = hms.split(':');
    let (hh, mm, ss) = (field(t.next()?, 23)?, field(t.next()?, 59)?, field(t.next()?, 60)?);
    if t.next().is_some() {
        return None;
    }
    let frac_s = match frac {
        Some(f) if !f.is_empty() && f.bytes().all(|b| b.is_ascii_digit()) => format!("0.{f}").parse::<f64>().ok()?,
        Some(_) => return None,
        None => 0.0,
    };
    // Days from civil (Howard Hinnant's algorithm).
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    let secs = days * 86_400 + hh * 3600 + mm * 60 + ss;
    Some(secs as f64 * 1000.0 + frac_s * 1000.0)
}
