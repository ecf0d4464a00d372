//! Request heads: parsing never panics, and a parsed head's accessors are consistent.
#![no_main]

use bytes::BytesMut;
use gantry_proxy::http::{RequestHead, DEFAULT_MAX_HEADERS};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let mut buf = BytesMut::from(data);
    if let Ok(Some(head)) = RequestHead::parse(&mut buf, DEFAULT_MAX_HEADERS, 64 * 1024) {
        assert!(head.path().len() <= head.target().len());
        assert!(head.headers().len() <= DEFAULT_MAX_HEADERS);
        let _ = head.keep_alive();
        for (name, _) in head.headers().iter() {
            assert!(!name.is_empty());
        }
        assert_eq!(head.raw().len() + buf.len(), data.len());
    }
});
