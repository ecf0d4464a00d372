//! The built-in tokenizer: encode never panics and decode(encode(s)) == s for valid UTF-8.
#![no_main]

use gantry_tokenizer::Tokenizer;
use libfuzzer_sys::fuzz_target;
use std::sync::OnceLock;

fuzz_target!(|data: &[u8]| {
    static TOK: OnceLock<Tokenizer> = OnceLock::new();
    let tok = TOK.get_or_init(Tokenizer::builtin);
    if let Ok(s) = std::str::from_utf8(data) {
        let ids = tok.encode(s, true).expect("the built-in tokenizer encodes any text");
        assert_eq!(tok.decode(&ids, false).expect("own ids decode"), s);
    }
});
