//! Unit tests of head parsing, framing, chunked coding and SSE parsing.

use bytes::BytesMut;

use super::chunked::{encode_chunk, ChunkedDecoder, Decoded, LAST_CHUNK};
use super::sse::{is_token_event, json_uint_after, SseParser};
use super::*;

fn parse_req(s: &str) -> Result<Option<RequestHead>, HttpError> {
    let mut b = BytesMut::from(s.as_bytes());
    RequestHead::parse(&mut b, DEFAULT_MAX_HEADERS, DEFAULT_MAX_HEAD_BYTES)
}

#[test]
fn request_head_fields_and_leftover() {
    let mut b = BytesMut::from(
        &b"POST /v1/completions?x=1 HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\nX-Multi: 1\r\nx-multi: 2\r\n\r\nabcGET"
            [..],
    );
    let h = RequestHead::parse(&mut b, 100, 65536).unwrap().unwrap();
    assert_eq!(h.method, Method::Post);
    assert_eq!(h.target(), "/v1/completions?x=1");
    assert_eq!(h.path(), "/v1/completions");
    assert_eq!(h.headers().get("content-length"), Some(&b"3"[..]));
    assert_eq!(h.headers().get("X-MULTI"), Some(&b"1"[..]));
    assert_eq!(h.headers().len(), 4);
    assert!(h.keep_alive());
    assert_eq!(&b[..], b"abcGET", "body and the next request stay in the buffer");
    assert_eq!(framing_from_headers(&h.headers()).unwrap(), BodyFraming::Length(3));
}

#[test]
fn partial_heads_need_more_and_limits_apply() {
    assert!(parse_req("GET / HTTP/1.1\r\nHost: a\r\n").unwrap().is_none());
    let big = format!("GET / HTTP/1.1\r\nX: {}\r\n\r\n", "a".repeat(DEFAULT_MAX_HEAD_BYTES));
    assert!(matches!(parse_req(&big), Err(HttpError::HeadTooLarge { .. })));
    let unfinished = format!("GET / HTTP/1.1\r\nX: {}", "a".repeat(DEFAULT_MAX_HEAD_BYTES + 1));
    assert!(matches!(parse_req(&unfinished), Err(HttpError::HeadTooLarge { .. })));
    let mut many = String::from("GET / HTTP/1.1\r\n");
    for i in 0..=DEFAULT_MAX_HEADERS {
        many.push_str(&format!("h{i}: v\r\n"));
    }
    many.push_str("\r\n");
    let err = parse_req(&many).unwrap_err();
    assert!(matches!(err, HttpError::TooManyHeaders { .. }));
    assert_eq!(err.status(), 431);
    assert!(matches!(parse_req("GET / HTTP/1.1\r\nBad Header\r\n\r\n"), Err(HttpError::Parse(_))));
}

#[test]
fn keep_alive_rules() {
    let cases = [
        ("GET / HTTP/1.1\r\n\r\n", true),
        ("GET / HTTP/1.1\r\nConnection: close\r\n\r\n", false),
        ("GET / HTTP/1.1\r\nConnection: foo, Close\r\n\r\n", false),
        ("GET / HTTP/1.0\r\n\r\n", false),
        ("GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n", true),
    ];
    for (raw, want) in cases {
        assert_eq!(parse_req(raw).unwrap().unwrap().keep_alive(), want, "{raw:?}");
    }
}

#[test]
fn framing_rules() {
    let cases: [(&str, Result<BodyFraming, ()>); 7] = [
        ("", Ok(BodyFraming::None)),
        ("Content-Length: 10\r\n", Ok(BodyFraming::Length(10))),
        ("Content-Length: 10\r\nContent-Length: 10\r\n", Ok(BodyFraming::Length(10))),
        ("Content-Length: 10\r\nContent-Length: 11\r\n", Err(())),
        ("Content-Length: -1\r\n", Err(())),
        ("Transfer-Encoding: gzip, chunked\r\nContent-Length: 5\r\n", Ok(BodyFraming::Chunked)),
        ("Transfer-Encoding: gzip\r\n", Err(())),
    ];
    for (hdrs, want) in cases {
        let h = parse_req(&format!("POST / HTTP/1.1\r\n{hdrs}\r\n")).unwrap().unwrap();
        assert_eq!(framing_from_headers(&h.headers()).map_err(|_| ()), want, "{hdrs:?}");
    }
}

fn decode_all(wire: &[u8], split_every: usize) -> Result<(Vec<u8>, Vec<u8>), HttpError> {
    let mut dec = ChunkedDecoder::new();
    let mut buf = BytesMut::new();
    let mut out = Vec::new();
    for (i, piece) in wire.chunks(split_every).enumerate() {
        buf.extend_from_slice(piece);
        loop {
            match dec.decode(&mut buf)? {
                Decoded::Data(d) => out.extend_from_slice(&d),
                Decoded::NeedMore => break,
                Decoded::Done => {
                    let fed = ((i + 1) * split_every).min(wire.len());
                    let mut rest = buf.to_vec();
                    rest.extend_from_slice(&wire[fed..]);
                    return Ok((out, rest));
                }
            }
        }
    }
    Err(HttpError::UnexpectedEof("test body"))
}

#[test]
fn chunked_roundtrip_at_every_split() {
    let mut wire = Vec::new();
    let parts: [&[u8]; 4] = [b"hello", b" ", &[b'x'; 300], b"world\r\n"];
    for p in parts {
        encode_chunk(&mut wire, p);
    }
    wire.extend_from_slice(LAST_CHUNK);
    wire.extend_from_slice(b"NEXT");
    let want: Vec<u8> = parts.concat();
    for split in 1..=wire.len() {
        let (got, rest) = decode_all(&wire, split).unwrap();
        assert_eq!(got, want, "split {split}");
        assert_eq!(rest, b"NEXT", "split {split}");
    }
}

#[test]
fn chunked_extensions_trailers_and_errors() {
    let (got, _) = decode_all(b"5;ext=1\r\nhello\r\n0\r\nTrailer: x\r\n\r\n", 3).unwrap();
    assert_eq!(got, b"hello");
    for bad in [&b"zz\r\n"[..], b"5\r\nhelloXX0\r\n\r\n", b"ffffffffffffffffff\r\n"] {
        assert!(matches!(decode_all(bad, 64), Err(HttpError::BadChunk(_))), "{bad:?}");
    }
    let long = vec![b'1'; 2000];
    assert!(matches!(decode_all(&long, 64), Err(HttpError::BadChunk(_))));
}

#[test]
fn sse_events_split_anywhere() {
    let wire = b"data: {\"a\":1}\n\n: keep-alive\n\ndata: x\r\ndata: y\r\n\r\nevent: e\ndata: [DONE]\n\n";
    for split in 1..=wire.len() {
        let mut p = SseParser::new();
        let mut events = Vec::new();
        for piece in wire.chunks(split) {
            assert!(p.push(piece));
            while let Some(e) = p.next_event() {
                events.push(e);
            }
        }
        let data: Vec<&str> = events.iter().map(|e| e.data.as_str()).collect();
        assert_eq!(data, ["{\"a\":1}", "x\ny", "[DONE]"], "split {split}");
        assert_eq!(events[2].event.as_deref(), Some("e"));
    }
}

#[test]
fn sse_scanner_events_split_anywhere() {
    use super::sse::SseScanner;
    let wire = b"data: {\"a\":1}\n\n: keep-alive\n\ndata: x\ndata: y\n\ndata: [DONE]\n\n";
    let want: Vec<&[u8]> = vec![b"data: {\"a\":1}", b": keep-alive", b"data: x\ndata: y", b"data: [DONE]"];
    for split in 1..=wire.len() {
        let mut sc = SseScanner::new();
        let mut got: Vec<Vec<u8>> = Vec::new();
        for piece in wire.chunks(split) {
            sc.feed(piece, |e| got.push(e.to_vec()));
        }
        assert_eq!(got, want, "split {split}");
    }
}

#[test]
fn openai_events_are_scanned_for_tokens_and_usage() {
    assert!(is_token_event(br#"data: {"choices":[{"delta":{"content":" ba"}}]}"#));
    assert!(is_token_event(br#"{"choices":[{"text":"x"}]}"#));
    // A reasoning model's thinking is its first output.
    assert!(is_token_event(br#"{"choices":[{"delta":{"reasoning_content":"Let"}}]}"#));
    assert!(is_token_event(br#"{"choices":[{"delta":{"reasoning":"Let"}}]}"#));
    assert!(!is_token_event(br#"{"choices":[{"delta":{"role":"assistant","content":""}}]}"#));
    assert!(!is_token_event(br#"{"choices":[],"usage":{"completion_tokens":3}}"#));
    let usage = br#"{"usage":{"prompt_tokens":5,"completion_tokens": 17,"x":1}}"#;
    assert_eq!(json_uint_after(usage, b"\"completion_tokens\":"), Some(17));
    assert_eq!(json_uint_after(usage, b"\"cached_tokens\":"), None);
    assert_eq!(json_uint_after(br#"{"n":-1}"#, b"\"n\":"), None);
}
