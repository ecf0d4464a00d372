//! The replay's trace parsers (Mooncake JSON Lines, Azure CSV and its timestamps): any text gives
//! records or a line-numbered error, never a panic or an overflow, and every record is usable.
#![no_main]

use gantry_bench::bench::trace::{parse_azure, parse_datetime_ms, parse_mooncake, TraceRecord};
use libfuzzer_sys::fuzz_target;

fn check(records: &[TraceRecord], limit: usize) {
    assert!(records.len() <= limit, "{} records past the limit {limit}", records.len());
    for r in records {
        assert!(r.timestamp_ms.is_finite(), "timestamp {}", r.timestamp_ms);
        assert!(r.input_length >= 1 && r.output_length >= 1, "lengths {} / {}", r.input_length, r.output_length);
    }
}

fn check_err(text: &str, (line, problem): &(usize, String)) {
    assert!(*line >= 1 && *line <= text.lines().count().max(1), "error line {line} outside the text");
    assert!(!problem.is_empty());
}

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let limit = usize::from(data.first().copied().unwrap_or(0) % 8) + 1;
    match parse_mooncake(text, limit) {
        Ok(r) => {
            check(&r, limit);
            assert!(r.iter().all(|r| r.timestamp_ms >= 0.0));
        }
        Err(e) => check_err(text, &e),
    }
    match parse_azure(text, limit) {
        Ok(r) => check(&r, limit),
        Err(e) => check_err(text, &e),
    }
    for line in text.lines() {
        if let Some(ms) = parse_datetime_ms(line) {
            assert!(ms.is_finite(), "{line:?} gave {ms}");
        }
    }
});
