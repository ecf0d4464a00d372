//! Unit tests of the parts that need no sockets: percentiles, parsers, prompt shapes.

use super::client::{completion_tokens, Api, Url};
use super::scrape;
use super::stats::{percentile, timeline, Completion, Dist};
use super::trace::{parse_datetime_ms, parse_mooncake, TraceRecord};
use super::workload::{LengthDist, Synthetic, TraceScale};

#[test]
fn percentiles_interpolate_between_order_statistics() {
    let mut v: Vec<f64> = (1..=100).map(f64::from).rev().collect();
    let d = Dist::of(&mut v);
    assert_eq!((d.count, d.min, d.max, d.mean), (100, 1.0, 100.0, 50.5));
    assert!((d.p50 - 50.5).abs() < 1e-9);
    assert!((d.p90 - 90.1).abs() < 1e-9);
    assert!((d.p99 - 99.01).abs() < 1e-9);
    assert_eq!(percentile(&[7.0], 99.0), 7.0);
    assert_eq!(Dist::of(&mut []), Dist::default());
}

#[test]
fn timeline_buckets_by_completion_time() {
    let c = |end_s, ok, ttft_ms, e2e_ms, output_tokens| Completion { end_s, ok, ttft_ms, e2e_ms, output_tokens };
    let ev = [c(0.5, true, Some(10.0), 20.0, 4), c(1.5, true, None, 30.0, 2), c(1.7, false, None, 1.0, 0)];
    let b = timeline(&ev, 1.8, 1.0);
    assert_eq!(b.len(), 2);
    assert!((b[1].rps - 1.0 / 0.8).abs() < 1e-9, "the last interval is 0.8 s long: {}", b[1].rps);
    assert_eq!((b[0].completed, b[0].failed, b[0].ttft_p50_ms), (1, 0, 10.0));
    assert_eq!((b[1].completed, b[1].failed, b[1].e2e_p50_ms, b[1].output_tokens_per_s), (1, 1, 30.0, 2.0 / 0.8));
}

#[test]
fn sse_payloads_are_scanned_for_usage() {
    assert_eq!(completion_tokens(br#"{"usage":{"prompt_tokens":5,"completion_tokens": 17,"x":1}}"#), Some(17));
    assert_eq!(completion_tokens(b"{}"), None);
}

#[test]
fn urls_name_their_problem() {
    let u = Url::parse("http://127.0.0.1:8000/").expect("valid");
    assert_eq!(u.api_path(Api::Chat), "/v1/chat/completions");
    let u = Url::parse("http://127.0.0.1:8000/v1").expect("valid");
    assert_eq!(u.api_path(Api::Completions), "/v1/completions");
    assert!(Url::parse("https://example.com").unwrap_err().contains("only http://"));
    assert!(Url::parse("http:///x").unwrap_err().contains("no host"));
}

#[test]
fn metrics_counters_sum_over_label_sets() {
    let text = "# HELP x\nvllm:prefix_cache_hits_total{engine=\"0\"} 30\nvllm:prefix_cache_queries_total{engine=\"0\"} 100\n\
                vllm:request_success_total{finished_reason=\"length\",model_name=\"a b\"} 4\n\
                vllm:request_success_total{finished_reason=\"stop\"} 1 1700000000\nvllm:prefix_cache_hits_total_created 5\n";
    let c = scrape::parse(text);
    assert_eq!((c.prefix_hits, c.prefix_queries, c.requests), (30.0, 100.0, 5.0));
}

#[test]
fn mooncake_lines_and_timestamps_parse() {
    let r =
        parse_mooncake("{\"timestamp\":5,\"input_length\":3,\"output_length\":0,\"hash_ids\":[1]}\n", 10).expect("ok");
    assert_eq!((r[0].timestamp_ms, r[0].output_length), (5.0, 1));
    assert_eq!(parse_mooncake("{\"timestamp\":-1,\"input_length\":3,\"output_length\":1}", 10).unwrap_err().0, 1);
    assert_eq!(parse_datetime_ms("1970-01-02 00:00:01.5"), Some(86_401_500.0));
    assert_eq!(parse_datetime_ms("2023-13-01 00:00:00"), None);
    assert_eq!(parse_datetime_ms("2023-11-16 18:15:46.6805900"), Some(1_700_158_546_680.59));
    assert_eq!(parse_datetime_ms("0000-03-01 00:00:00"), Some(-62_162_035_200_000.0));
    // Leap days exist only in leap years (every 4th, not every 100th, every 400th).
    assert_eq!(parse_datetime_ms("2024-02-29 00:00:00"), Some(1_709_164_800_000.0));
    assert_eq!(parse_datetime_ms("2000-02-29 00:00:00"), Some(951_782_400_000.0));
    // Signs, overlong fields and out-of-range values are refused, not overflowed.
    for bad in [
        "9223372036854775807-01-01 00:00:00",
        "-1-01-01 00:00:00",
        "2023-+1-01 00:00:00",
        "2023-01-01 -1:00:00",
        "2023-01-01 24:00:00",
        "2023-01-00 00:00:00",
        "2023-02-29 00:00:00",
        "1900-02-29 00:00:00",
        "2023-02-31 00:00:00",
        "2023-04-31 00:00:00",
        "2023-01-01 00:00:61",
        "2023-01-01 00:00:00.",
        "10000-01-01 00:00:00",
    ] {
        assert_eq!(parse_datetime_ms(bad), None, "{bad}");
    }
}

#[test]
fn synthetic_prompts_have_the_asked_shape() {
    let s = Synthetic {
        isl: 50,
        osl: 7,
        isl_dist: LengthDist::Fixed,
        osl_dist: LengthDist::Uniform,
        prefix_groups: 3,
        prefix_len: 20,
        seed: 1,
    };
    let tok = gantry_tokenizer::Tokenizer::builtin();
    let (a, b, c) = (s.job(0), s.job(3), s.job(1));
    for j in [&a, &b, &c] {
        assert_eq!(tok.encode(&j.prompt, false).expect("encodes").len(), 50);
        assert!((3..=10).contains(&j.max_tokens), "{}", j.max_tokens);
    }
    let (ta, tb, tc) = (
        tok.encode(&a.prompt, false).unwrap(),
        tok.encode(&b.prompt, false).unwrap(),
        tok.encode(&c.prompt, false).unwrap(),
    );
    let common = |x: &[u32], y: &[u32]| x.iter().zip(y).take_while(|(p, q)| p == q).count();
    assert!((20..22).contains(&common(&ta, &tb)), "same group shares the 20-token prefix");
    assert!(common(&ta, &tc) < 2, "other groups do not");
    assert_eq!(s.job(5), s.job(5), "deterministic");
}

#[test]
fn trace_scale_keeps_lengths_and_short_blocks() {
    let sc = TraceScale { block_tokens: 512, token_scale: 0.01 };
    let r = TraceRecord { timestamp_ms: 0.0, input_length: 1100, output_length: 300, hash_ids: vec![0, 1, 2] };
    let j = sc.job(0, &r);
    assert_eq!((sc.block_words(), j.input_tokens, j.max_tokens), (5, 11, 3));
    assert_eq!(j.prompt.split(' ').filter(|w| !w.is_empty()).count(), 11);
}
