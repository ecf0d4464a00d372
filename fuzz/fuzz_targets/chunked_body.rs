//! Chunked bodies: decoding any bytes, fed in two pieces, never panics and never yields more
//! bytes than it was given.
#![no_main]

use bytes::BytesMut;
use gantry_proxy::http::chunked::{ChunkedDecoder, Decoded};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let split = data.first().map_or(0, |&b| b as usize % (data.len().max(1)));
    let mut dec = ChunkedDecoder::new();
    let mut buf = BytesMut::new();
    let mut out = 0usize;
    for piece in [&data[..split], &data[split..]] {
        buf.extend_from_slice(piece);
        loop {
            match dec.decode(&mut buf) {
                Ok(Decoded::Data(d)) => out += d.len(),
                Ok(Decoded::NeedMore) | Ok(Decoded::Done) | Err(_) => break,
            }
        }
    }
    assert!(out <= data.len());
});
