//! Python `pickle.dumps(.., protocol=5)` of vLLM's hash inputs, including protocol-4+ framing.
//!
//! Framing follows CPython's pure-Python pickler (`_Framer`): the body is collected into a frame,
//! and at the start of saving each object a frame that has reached 64 KiB is flushed with a
//! `FRAME <u64 LE length>` header and a new one begun; a final frame shorter than 4 bytes gets no
//! header. Real blocks (a few thousand tokens at most) always fit in one frame; the split point for
//! a block of more than ~13k tokens is taken from `pickle.py` and not verified against `_pickle.c`.

const PROTO: u8 = 0x80;
const FRAME: u8 = 0x95;
const SHORT_BINUNICODE: u8 = 0x8c;
const BINUNICODE: u8 = 0x58;
const SHORT_BINBYTES: u8 = 0x43;
const MEMOIZE: u8 = 0x94;
const MARK: u8 = 0x28;
const TUPLE: u8 = 0x74;
const EMPTY_TUPLE: u8 = 0x29;
const TUPLE1: u8 = 0x85;
const TUPLE2: u8 = 0x86;
const TUPLE3: u8 = 0x87;
const BININT1: u8 = 0x4b;
const BININT2: u8 = 0x4d;
const BININT: u8 = 0x4a;
const LONG1: u8 = 0x8a;
const NONE: u8 = 0x4e;
const STOP: u8 = 0x2e;

/// `pickle._Framer._FRAME_SIZE_TARGET`.
const FRAME_SIZE_TARGET: usize = 64 * 1024;
/// `pickle._Framer._FRAME_SIZE_MIN`.
const FRAME_SIZE_MIN: usize = 4;

use super::VllmExtraKey;

/// Pickle of a `str`.
pub(super) fn dumps_str(s: &str) -> Vec<u8> {
    let mut p = Pickler::new();
    p.save_str(s);
    p.finish()
}

/// Pickle of `(parent: bytes, tuple(token_ids), extra)`, `extra` being `None` or the keys, e.g.
/// `(("lora", name, path), ("cache_salt", salt))`. Each string is written on its own, as
/// CPython does for distinct objects (an adapter whose name and path are one interned object
/// would be memoized there instead).
pub(super) fn dumps_block(parent: &[u8; 32], token_ids: &[u32], keys: &[VllmExtraKey<'_>]) -> Vec<u8> {
    let mut p = Pickler::new();
    p.boundary(); // save(outer tuple)
    p.boundary(); // save(parent)
    p.frame.extend_from_slice(&[SHORT_BINBYTES, parent.len() as u8]);
    p.frame.extend_from_slice(parent);
    p.frame.push(MEMOIZE);
    p.boundary(); // save(token tuple)
    match token_ids.len() {
        0 => p.frame.push(EMPTY_TUPLE), // the empty tuple is not memoized
        n @ 1..=3 => {
            for &t in token_ids {
                p.save_int(t);
            }
            p.frame.push([TUPLE1, TUPLE2, TUPLE3][n - 1]);
            p.frame.push(MEMOIZE);
        }
        _ => {
            p.frame.push(MARK);
            for &t in token_ids {
                p.save_int(t);
            }
            p.frame.extend_from_slice(&[TUPLE, MEMOIZE]);
        }
    }
    p.boundary(); // save(extra keys)
    if keys.is_empty() {
        p.frame.push(NONE);
    } else {
        if keys.len() > 3 {
            p.frame.push(MARK);
        }
        for key in keys {
            p.boundary(); // save(("lora", name, path)) or save(("cache_salt", salt))
            match key {
                VllmExtraKey::Lora { name, path } => {
                    p.save_str("lora");
                    p.save_str(name);
                    p.save_str(path);
                    p.frame.extend_from_slice(&[TUPLE3, MEMOIZE]);
                }
                VllmExtraKey::CacheSalt(salt) => {
                    p.save_str("cache_salt");
                    p.save_str(salt);
                    p.frame.extend_from_slice(&[TUPLE2, MEMOIZE]);
                }
            }
        }
        let end = match keys.len() {
            n @ 1..=3 => [TUPLE1, TUPLE2, TUPLE3][n - 1],
            _ => TUPLE,
        };
        p.frame.extend_from_slice(&[end, MEMOIZE]);
    }
    p.frame.extend_from_slice(&[TUPLE3, MEMOIZE]);
    p.finish()
}

struct Pickler {
    out: Vec<u8>,
    frame: Vec<u8>,
}

impl Pickler {
    fn new() -> Self {
        Pickler { out: vec![PROTO, 5], frame: Vec::with_capacity(128) }
    }

    /// `_Framer.commit_frame()` as called at the start of `Pickler.save`.
    fn boundary(&mut self) {
        if self.frame.len() >= FRAME_SIZE_TARGET {
            self.commit();
        }
    }

    fn commit(&mut self) {
        if self.frame.len() >= FRAME_SIZE_MIN {
            self.out.push(FRAME);
            self.out.extend_from_slice(&(self.frame.len() as u64).to_le_bytes());
        }
        self.out.append(&mut self.frame);
    }

    /// `save_str` (protocol 5), then its memoization. Strings of 64 KiB and more go outside the
    /// frame, as `_write_large_bytes` writes them; over 4 GiB (`BINUNICODE8`) is not supported.
    /// (A salt equal to `"cache_salt"` may be the same interned object in CPython and be
    /// pickled as a memo reference instead; that case is not reproduced.)
    fn save_str(&mut self, s: &str) {
        self.boundary();
        let n = s.len();
        if n <= 0xff {
            self.frame.extend_from_slice(&[SHORT_BINUNICODE, n as u8]);
            self.frame.extend_from_slice(s.as_bytes());
        } else {
            let len = u32::try_from(n).expect("pickle::save_str: strings over 4 GiB are not supported");
            let mut head = vec![BINUNICODE];
            head.extend_from_slice(&len.to_le_bytes());
            if n >= FRAME_SIZE_TARGET {
                self.commit();
                self.out.extend_from_slice(&head);
                self.out.extend_from_slice(s.as_bytes());
            } else {
                self.frame.extend_from_slice(&head);
                self.frame.extend_from_slice(s.as_bytes());
            }
        }
        self.frame.push(MEMOIZE);
    }

    /// `save_long` for a non-negative int below 2^32.
    fn save_int(&mut self, t: u32) {
        self.boundary();
        let f = &mut self.frame;
        if t <= 0xff {
            f.extend_from_slice(&[BININT1, t as u8]);
        } else if t <= 0xffff {
            f.push(BININT2);
            f.extend_from_slice(&(t as u16).to_le_bytes());
        } else if t <= 0x7fff_ffff {
            f.push(BININT);
            f.extend_from_slice(&t.to_le_bytes());
        } else {
            // encode_long: (bit_length >> 3) + 1 = 5 little-endian two's-complement bytes.
            f.extend_from_slice(&[LONG1, 5]);
            f.extend_from_slice(&t.to_le_bytes());
            f.push(0);
        }
    }

    fn finish(mut self) -> Vec<u8> {
        self.frame.push(STOP);
        self.commit();
        self.out
    }
}
