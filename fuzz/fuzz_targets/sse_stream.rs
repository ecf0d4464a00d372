//! SSE streams: any bytes in any split give events without panicking, and the same events
//! whatever the split.
#![no_main]

use gantry_proxy::http::sse::SseParser;
use libfuzzer_sys::fuzz_target;

fn events(pieces: &[&[u8]]) -> Vec<(Option<String>, String)> {
    let mut p = SseParser::new();
    let mut out = Vec::new();
    for piece in pieces {
        p.push(piece);
        while let Some(e) = p.next_event() {
            out.push((e.event, e.data));
        }
    }
    out
}

fuzz_target!(|data: &[u8]| {
    let whole = events(&[data]);
    let split = data.len() / 2;
    assert_eq!(whole, events(&[&data[..split], &data[split..]]));
});
