//! Zero-copy decoder for vLLM KV-event batches, both wire forms (spec §1.5, §1.6).
//!
//! [`decode_batch`] reads one payload frame into a [`DecodedBatch`] that borrows its strings and
//! extra keys from the payload. It is a hand-written cursor over `&[u8]` (no serde, no generic
//! value tree): the only allocations are the `Vec`s of the result (events, and per
//! `BlockStored`/`BlockRemoved` its hashes, tokens and extra-key slices).
//!
//! # What it accepts
//!
//! * The batch: a msgpack array of 2 or 3 elements `[ts, events, data_parallel_rank?]`; `ts` may
//!   be a float (32 or 64) or any integer; the rank is an integer or `nil`.
//! * Each event: a tagged **map** (vLLM >= 0.24) with the `"type"` key anywhere and the fields in
//!   any order (unknown keys are skipped and counted in [`DecodedBatch::unknown_fields`]), or a
//!   tagged **array** (vLLM <= 0.23) read by position; an array may have any length >= 1, fields
//!   it does not reach are `None`/empty and positions beyond the known ones are skipped and
//!   counted. Events with an unknown tag are skipped and counted in
//!   [`DecodedBatch::unknown_events`]; they do not fail the batch.
//! * Block hashes: any msgpack integer, signed or unsigned, is
//!   reinterpreted as `u64` (two's complement, so the negative Python `hash()` values of old vLLM
//!   map to distinct `u64`s). A **bin** hash (`VLLM_KV_EVENTS_USE_INT_BLOCK_HASHES=0`) is folded
//!   to `u64` exactly as vLLM folds digests in int mode: its last 8 bytes read big-endian
//!   (`int.from_bytes(digest, "big") & (2^64-1)`, shorter digests zero-extended). So the same
//!   engine gives the same `u64` in both modes, and hashes stay allocation-free and `Copy`; the
//!   cost is that two digests equal in their last 8 bytes collide, which is the 64-bit collision
//!   rate int mode already has.
//! * `extra_keys`: per block, the raw msgpack bytes of its entry (`None` for `nil`), so the
//!   subscriber can hash them with [`crate::hash::extra_hash`] without building a value tree.
//!
//! A known field with the wrong msgpack type, a token outside `u32`, invalid UTF-8 in a string the
//! decoder reads, or bytes after the batch are errors ([`DecodeError`]) for the whole batch: such
//! a payload was not produced by msgspec.
//!
//! # Bounds
//!
//! No input panics. Every length read from the input is checked against the bytes that remain
//! before anything is allocated for it (each element takes at least one byte), so a result never
//! holds more than a small constant times the payload size; values skipped or sliced are nested
//! at most [`MAX_DEPTH`] deep.
//!
//! Read first: `worked_example_map_form` in `decode/tests.rs` (the spec §1.9 bytes); the fuzz
//! target `fuzz/fuzz_targets/kv_event_batch.rs` runs this decoder on arbitrary input.

#![forbid(unsafe_code)]

/// Most levels of arrays/maps the decoder descends into (counting from the batch) when it skips
/// or slices a value: unknown fields, unknown events, extra keys. vLLM's events nest at most 5
/// deep; deeper input is an error, so hostile input cannot exhaust the stack.
pub const MAX_DEPTH: usize = 32;

/// Depth of an event's field values: batch (0) -> events (1) -> event (2) -> field (3).
const FIELD_DEPTH: usize = 3;

/// One decoded batch, borrowing from the payload it was decoded from.
#[derive(Debug, Clone, PartialEq)]
pub struct DecodedBatch<'a> {
    /// Seconds since the Unix epoch at publish (an integer `ts` is converted).
    pub ts: f64,
    /// The events with a known tag, in order.
    pub events: Vec<DecodedEvent<'a>>,
    /// The publisher's data-parallel rank (`None` when absent or `nil`).
    pub data_parallel_rank: Option<i64>,
    /// Events skipped because their tag is not one this decoder knows.
    pub unknown_events: u32,
    /// Map keys (or legacy array positions) of known events that were skipped.
    pub unknown_fields: u32,
}

/// One event with a known tag.
#[derive(Debug, Clone, PartialEq)]
pub enum DecodedEvent<'a> {
    /// `BlockStored`.
    BlockStored(StoredEvent<'a>),
    /// `BlockRemoved`.
    BlockRemoved(RemovedEvent<'a>),
    /// `AllBlocksCleared`: the engine's prefix cache was reset.
    AllBlocksCleared,
}

/// A decoded `BlockStored` (spec §1.5). Absent and `nil` fields are `None` (empty for the lists).
#[derive(Debug, Clone, PartialEq, Default)]
pub struct StoredEvent<'a> {
    /// One vLLM hash per stored block (see the module doc for how ints and bins become `u64`).
    pub block_hashes: Vec<u64>,
    /// vLLM hash of the block before the first one; `None` when the first block starts a prompt.
    pub parent_block_hash: Option<u64>,
    /// The tokens of all blocks, concatenated.
    pub token_ids: Vec<u32>,
    /// Tokens per block.
    pub block_size: Option<u32>,
    /// Deprecated LoRA int id.
    pub lora_id: Option<i64>,
    /// Storage tier (`"GPU"` for the engine's own KV cache).
    pub medium: Option<&'a str>,
    /// LoRA adapter name.
    pub lora_name: Option<&'a str>,
    /// Per block, the raw msgpack encoding of its `extra_keys` entry (`None` for `nil`).
    pub extra_keys: Option<Vec<Option<&'a [u8]>>>,
    /// KV-cache group index.
    pub group_idx: Option<i64>,
    /// KV-cache spec kind (`"full_attention"`, `"sliding_window"`, ...).
    pub kv_cache_spec_kind: Option<&'a str>,
    /// Sliding-window size of the group.
    pub kv_cache_spec_sliding_window: Option<i64>,
}

/// A decoded `BlockRemoved`.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct RemovedEvent<'a> {
    /// The evicted vLLM hashes.
    pub block_hashes: Vec<u64>,
    /// Storage tier.
    pub medium: Option<&'a str>,
    /// KV-cache group index.
    pub group_idx: Option<i64>,
}

/// Why a payload could not be decoded. `at` is the byte offset in the payload.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// The input ends inside a value.
    #[error("kv-event batch truncated at byte {at}")]
    Truncated {
        /// Offset where more bytes were needed.
        at: usize,
    },
    /// A value has a msgpack type the field does not allow.
    #[error("kv-event batch: byte {at}: expected {expected}, found msgpack marker 0x{marker:02x}")]
    UnexpectedType {
        /// Offset of the value's marker byte.
        at: usize,
        /// What the decoder wanted there.
        expected: &'static str,
        /// The marker it found.
        marker: u8,
    },
    /// A length prefix promises more elements or bytes than the input holds.
    #[error("kv-event batch: byte {at}: length {len} exceeds the {remaining} bytes left")]
    LengthOverrun {
        /// Offset of the length's marker byte.
        at: usize,
        /// The length read.
        len: u64,
        /// Bytes left after the header.
        remaining: usize,
    },
    /// An integer does not fit the field (a token outside `u32`, a count outside `i64`, ...).
    #[error("kv-event batch: byte {at}: {what} out of range")]
    OutOfRange {
        /// Offset of the value.
        at: usize,
        /// Which field.
        what: &'static str,
    },
    /// A string is not valid UTF-8.
    #[error("kv-event batch: byte {at}: string is not UTF-8")]
    InvalidUtf8 {
        /// Offset of the string's marker byte.
        at: usize,
    },
    /// Arrays or maps nest deeper than [`MAX_DEPTH`].
    #[error("kv-event batch: byte {at}: nesting deeper than {MAX_DEPTH}")]
    TooDeep {
        /// Offset of the value that went too deep.
        at: usize,
    },
    /// The structure is not a `KVEventBatch` (wrong batch length, event without a tag, ...).
    #[error("kv-event batch: byte {at}: {what}")]
    Malformed {
        /// Offset of the offending value.
        at: usize,
        /// What is wrong.
        what: &'static str,
    },
}

/// Decodes one `KVEventBatch` payload (the third frame of a live message, spec §1.3). See the
/// module doc for what is accepted.
pub fn decode_batch(payload: &[u8]) -> Result<DecodedBatch<'_>, DecodeError> {
    let mut r = Reader { buf: payload, pos: 0 };
    let at = r.pos;
    let n = r.array_len()?;
    if n != 2 && n != 3 {
        return Err(DecodeError::Malformed { at, what: "a batch must be an array of 2 or 3 elements" });
    }
    let ts = r.f64_or_int()?;
    let n_events = r.array_len()?;
    let mut batch = DecodedBatch {
        ts,
        // Grows as events decode; a claimed length is never trusted for the allocation.
        events: Vec::with_capacity(n_events.min(16)),
        data_parallel_rank: None,
        unknown_events: 0,
        unknown_fields: 0,
    };
    for _ in 0..n_events {
        r.event(&mut batch)?;
    }
    if n == 3 {
        batch.data_parallel_rank = r.opt_i64("data_parallel_rank")?;
    }
    if r.pos != payload.len() {
        return Err(DecodeError::Malformed { at: r.pos, what: "bytes after the batch" });
    }
    Ok(batch)
}

/// Which known event a tag names.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Tag {
    Stored,
    Removed,
    Cleared,
}

impl Tag {
    fn parse(tag: &[u8]) -> Option<Tag> {
        match tag {
            b"BlockStored" => Some(Tag::Stored),
            b"BlockRemoved" => Some(Tag::Removed),
            b"AllBlocksCleared" => Some(Tag::Cleared),
            _ => None,
        }
    }
}

/// A cursor over the payload. `Copy`, so looking ahead is a copy of two words.
#[derive(Clone, Copy)]
struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

type Res<T> = Result<T, DecodeError>;

impl<'a> Reader<'a> {
    fn remaining(&self) -> usize {
        self.buf.len() - self.pos
    }

    fn peek(&self) -> Res<u8> {
        self.buf.get(self.pos).copied().ok_or(DecodeError::Truncated { at: self.pos })
    }

    fn byte(&mut self) -> Res<u8> {
        let b = self.peek()?;
        self.pos += 1;
        Ok(b)
    }

    fn take(&mut self, n: usize) -> Res<&'a [u8]> {
        if n > self.remaining() {
            return Err(DecodeError::Truncated { at: self.buf.len() });
        }
        let s = &self.buf[self.pos..self.pos + n];
        self.pos += n;
        Ok(s)
    }

    fn be<const N: usize>(&mut self) -> Res<[u8; N]> {
        let mut out = [0u8; N];
        out.copy_from_slice(self.take(N)?);
        Ok(out)
    }

    fn len_u8(&mut self) -> Res<usize> {
        Ok(usize::from(self.byte()?))
    }

    fn len_u16(&mut self) -> Res<usize> {
        Ok(usize::from(u16::from_be_bytes(self.be()?)))
    }

    fn len_u32(&mut self) -> Res<usize> {
        // usize is at least 32 bits on every target this crate builds for.
        Ok(u32::from_be_bytes(self.be()?) as usize)
    }

    fn unexpected<T>(&self, at: usize, expected: &'static str) -> Res<T> {
        Err(DecodeError::UnexpectedType { at, expected, marker: self.buf[at] })
    }

    /// `len` elements of at least `min_bytes` each must fit in what remains.
    fn check_len(&self, at: usize, len: usize, min_bytes: usize) -> Res<usize> {
        if len.saturating_mul(min_bytes) > self.remaining() {
            return Err(DecodeError::LengthOverrun { at, len: len as u64, remaining: self.remaining() });
        }
        Ok(len)
    }

    /// Consumes a `nil` if one is next.
    fn nil(&mut self) -> Res<bool> {
        if self.peek()? == 0xc0 {
            self.pos += 1;
            Ok(true)
        } else {
            Ok(false)
        }
    }

    /// An array header; the length is checked against the remaining bytes.
    fn array_len(&mut self) -> Res<usize> {
        let at = self.pos;
        let len = match self.byte()? {
            m @ 0x90..=0x9f => usize::from(m & 0x0f),
            0xdc => self.len_u16()?,
            0xdd => self.len_u32()?,
            _ => return self.unexpected(at, "an array"),
        };
        self.check_len(at, len, 1)
    }

    /// A map header; the length is checked against the remaining bytes (two values per entry).
    fn map_len(&mut self) -> Res<usize> {
        let at = self.pos;
        let len = match self.byte()? {
            m @ 0x80..=0x8f => usize::from(m & 0x0f),
            0xde => self.len_u16()?,
            0xdf => self.len_u32()?,
            _ => return self.unexpected(at, "a map"),
        };
        self.check_len(at, len, 2)
    }

    /// A string's bytes, not checked for UTF-8 (for keys and tags, compared with ASCII names).
    fn str_bytes(&mut self) -> Res<&'a [u8]> {
        let at = self.pos;
        let len = match self.byte()? {
            m @ 0xa0..=0xbf => usize::from(m & 0x1f),
            0xd9 => self.len_u8()?,
            0xda => self.len_u16()?,
            0xdb => self.len_u32()?,
            _ => return self.unexpected(at, "a string"),
        };
        self.check_len(at, len, 1)?;
        self.take(len)
    }

    fn str(&mut self) -> Res<&'a str> {
        let at = self.pos;
        std::str::from_utf8(self.str_bytes()?).map_err(|_| DecodeError::InvalidUtf8 { at })
    }

    fn opt_str(&mut self) -> Res<Option<&'a str>> {
        if self.nil()? {
            return Ok(None);
        }
        self.str().map(Some)
    }

    /// Any msgpack integer, widened to `i128` (which holds both `u64` and `i64`).
    fn int(&mut self) -> Res<i128> {
        let at = self.pos;
        let m = self.byte()?;
        Ok(match m {
            0x00..=0x7f => i128::from(m),
            0xe0..=0xff => i128::from(m as i8),
            0xcc => i128::from(self.byte()?),
            0xcd => i128::from(u16::from_be_bytes(self.be()?)),
            0xce => i128::from(u32::from_be_bytes(self.be()?)),
            0xcf => i128::from(u64::from_be_bytes(self.be()?)),
            0xd0 => i128::from(self.byte()? as i8),
            0xd1 => i128::from(i16::from_be_bytes(self.be()?)),
            0xd2 => i128::from(i32::from_be_bytes(self.be()?)),
            0xd3 => i128::from(i64::from_be_bytes(self.be()?)),
            _ => return self.unexpected(at, "an integer"),
        })
    }

    fn opt_i64(&mut self, what: &'static str) -> Res<Option<i64>> {
        if self.nil()? {
            return Ok(None);
        }
        let at = self.pos;
        let v = self.int()?;
        i64::try_from(v).map(Some).map_err(|_| DecodeError::OutOfRange { at, what })
    }

    fn opt_u32(&mut self, what: &'static str) -> Res<Option<u32>> {
        if self.nil()? {
            return Ok(None);
        }
        let at = self.pos;
        let v = self.int()?;
        u32::try_from(v).map(Some).map_err(|_| DecodeError::OutOfRange { at, what })
    }

    /// A token id: an integer in `0..2^32`. Positive fixint, uint16 and uint32 (the forms msgspec
    /// writes for most token ids) take a short path.
    fn token(&mut self) -> Res<u32> {
        let at = self.pos;
        match self.peek()? {
            m @ 0x00..=0x7f => {
                self.pos += 1;
                Ok(u32::from(m))
            }
            0xcd => {
                self.pos += 1;
                Ok(u32::from(u16::from_be_bytes(self.be()?)))
            }
            0xce => {
                self.pos += 1;
                Ok(u32::from_be_bytes(self.be()?))
            }
            _ => {
                let v = self.int()?;
                u32::try_from(v).map_err(|_| DecodeError::OutOfRange { at, what: "token id" })
            }
        }
    }

    /// A block hash: any integer reinterpreted as `u64`, or a bin folded to its last 8 bytes read
    /// big-endian (see the module doc).
    fn hash(&mut self) -> Res<u64> {
        let at = self.pos;
        let len = match self.peek()? {
            0xc4 => {
                self.pos += 1;
                self.len_u8()?
            }
            0xc5 => {
                self.pos += 1;
                self.len_u16()?
            }
            0xc6 => {
                self.pos += 1;
                self.len_u32()?
            }
            _ => {
                let v = match self.int() {
                    Ok(v) => v,
                    Err(DecodeError::UnexpectedType { .. }) => return self.unexpected(at, "a block hash (int or bin)"),
                    Err(e) => return Err(e),
                };
                // msgpack ints lie in i64::MIN..=u64::MAX: negative ones wrap to two's complement.
                return Ok(if v < 0 { v as i64 as u64 } else { v as u64 });
            }
        };
        self.check_len(at, len, 1)?;
        let bytes = self.take(len)?;
        let tail = &bytes[bytes.len().saturating_sub(8)..];
        Ok(tail.iter().fold(0u64, |acc, &b| (acc << 8) | u64::from(b)))
    }

    fn opt_hash(&mut self) -> Res<Option<u64>> {
        if self.nil()? {
            return Ok(None);
        }
        self.hash().map(Some)
    }

    /// `nil` (empty) or an array of hashes.
    fn hashes(&mut self) -> Res<Vec<u64>> {
        if self.nil()? {
            return Ok(Vec::new());
        }
        let n = self.array_len()?;
        let mut out = Vec::with_capacity(n);
        for _ in 0..n {
            out.push(self.hash()?);
        }
        Ok(out)
    }

    /// `nil` (empty) or an array of token ids.
    fn tokens(&mut self) -> Res<Vec<u32>> {
        if self.nil()? {
            return Ok(Vec::new());
        }
        let n = self.array_len()?;
        let mut out = Vec::with_capacity(n);
        for _ in 0..n {
            out.push(self.token()?);
        }
        Ok(out)
    }

    /// `nil` or an array of per-block entries, each kept as its raw msgpack bytes.
    fn extra_keys(&mut self) -> Res<Option<Vec<Option<&'a [u8]>>>> {
        if self.nil()? {
            return Ok(None);
        }
        let n = self.array_len()?;
        let mut out = Vec::with_capacity(n);
        for _ in 0..n {
            if self.nil()? {
                out.push(None);
            } else {
                let start = self.pos;
                self.skip(FIELD_DEPTH + 1)?; // an entry of the extra_keys field
                out.push(Some(&self.buf[start..self.pos]));
            }
        }
        Ok(Some(out))
    }

    /// A float (32 or 64 bit) or any integer, as `f64`.
    fn f64_or_int(&mut self) -> Res<f64> {
        match self.peek()? {
            0xca => {
                self.pos += 1;
                Ok(f64::from(f32::from_be_bytes(self.be()?)))
            }
            0xcb => {
                self.pos += 1;
                Ok(f64::from_be_bytes(self.be()?))
            }
            _ => {
                let at = self.pos;
                match self.int() {
                    Ok(v) => Ok(v as f64),
                    Err(DecodeError::UnexpectedType { .. }) => self.unexpected(at, "a float or integer timestamp"),
                    Err(e) => Err(e),
                }
            }
        }
    }

    /// Skips one value of any type; `depth` is the nesting level of the value itself.
    fn skip(&mut self, depth: usize) -> Res<()> {
        let at = self.pos;
        let m = self.byte()?;
        let (bytes, items) = match m {
            0x00..=0x7f | 0xe0..=0xff | 0xc0 | 0xc2 | 0xc3 => (0, 0),
            0x80..=0x8f => (0, 2 * usize::from(m & 0x0f)),
            0x90..=0x9f => (0, usize::from(m & 0x0f)),
            0xa0..=0xbf => (usize::from(m & 0x1f), 0),
            0xc4 | 0xd9 => (self.len_u8()?, 0),
            0xc5 | 0xda => (self.len_u16()?, 0),
            0xc6 | 0xdb => (self.len_u32()?, 0),
            0xc7 => (self.len_u8()? + 1, 0), // ext8: length, type byte, data
            0xc8 => (self.len_u16()? + 1, 0),
            0xc9 => (self.len_u32()?.saturating_add(1), 0),
            0xca => (4, 0),
            0xcb => (8, 0),
            0xcc | 0xd0 => (1, 0),
            0xcd | 0xd1 => (2, 0),
            0xce | 0xd2 => (4, 0),
            0xcf | 0xd3 => (8, 0),
            0xd4 => (2, 0), // fixext: type byte + 1, 2, 4, 8, 16 data bytes
            0xd5 => (3, 0),
            0xd6 => (5, 0),
            0xd7 => (9, 0),
            0xd8 => (17, 0),
            0xdc => (0, self.len_u16()?),
            0xdd => (0, self.len_u32()?),
            0xde => (0, self.len_u16()?.saturating_mul(2)),
            0xdf => (0, self.len_u32()?.saturating_mul(2)),
            0xc1 => return Err(DecodeError::Malformed { at, what: "reserved msgpack marker 0xc1" }),
        };
        if bytes > 0 {
            self.check_len(at, bytes, 1)?;
            self.pos += bytes;
        }
        if items > 0 {
            if depth >= MAX_DEPTH {
                return Err(DecodeError::TooDeep { at });
            }
            self.check_len(at, items, 1)?;
            for _ in 0..items {
                self.skip(depth + 1)?;
            }
        }
        Ok(())
    }

    /// Decodes one event (map or array form) into `batch`.
    fn event(&mut self, batch: &mut DecodedBatch<'a>) -> Res<()> {
        let at = self.pos;
        match self.peek()? {
            0x80..=0x8f | 0xde | 0xdf => {
                let n = self.map_len()?;
                self.map_event(at, n, batch)
            }
            0x90..=0x9f | 0xdc | 0xdd => {
                let n = self.array_len()?;
                self.array_event(at, n, batch)
            }
            _ => self.unexpected(at, "an event (map or array)"),
        }
    }

    /// Finds the `"type"` value of a map event whose `n` entries start here, without consuming.
    fn find_tag(mut self, at: usize, n: usize) -> Res<&'a [u8]> {
        for _ in 0..n {
            if self.str_bytes()? == b"type" {
                return self.str_bytes();
            }
            self.skip(FIELD_DEPTH)?;
        }
        Err(DecodeError::Malformed { at, what: "event map without a \"type\" key" })
    }

    fn map_event(&mut self, at: usize, n: usize, batch: &mut DecodedBatch<'a>) -> Res<()> {
        let Some(tag) = Tag::parse(self.find_tag(at, n)?) else {
            for _ in 0..n {
                self.str_bytes()?;
                self.skip(FIELD_DEPTH)?;
            }
            batch.unknown_events += 1;
            return Ok(());
        };
        let mut stored = StoredEvent::default();
        let mut removed = RemovedEvent::default();
        for _ in 0..n {
            let key = self.str_bytes()?;
            match (tag, key) {
                (_, b"type") => {
                    self.str_bytes()?;
                }
                (Tag::Stored, b"block_hashes") => stored.block_hashes = self.hashes()?,
                (Tag::Stored, b"parent_block_hash") => stored.parent_block_hash = self.opt_hash()?,
                (Tag::Stored, b"token_ids") => stored.token_ids = self.tokens()?,
                (Tag::Stored, b"block_size") => stored.block_size = self.opt_u32("block_size")?,
                (Tag::Stored, b"lora_id") => stored.lora_id = self.opt_i64("lora_id")?,
                (Tag::Stored, b"medium") => stored.medium = self.opt_str()?,
                (Tag::Stored, b"lora_name") => stored.lora_name = self.opt_str()?,
                (Tag::Stored, b"extra_keys") => stored.extra_keys = self.extra_keys()?,
                (Tag::Stored, b"group_idx") => stored.group_idx = self.opt_i64("group_idx")?,
                (Tag::Stored, b"kv_cache_spec_kind") => stored.kv_cache_spec_kind = self.opt_str()?,
                (Tag::Stored, b"kv_cache_spec_sliding_window") => {
                    stored.kv_cache_spec_sliding_window = self.opt_i64("kv_cache_spec_sliding_window")?
                }
                (Tag::Removed, b"block_hashes") => removed.block_hashes = self.hashes()?,
                (Tag::Removed, b"medium") => removed.medium = self.opt_str()?,
                (Tag::Removed, b"group_idx") => removed.group_idx = self.opt_i64("group_idx")?,
                _ => {
                    batch.unknown_fields += 1;
                    self.skip(FIELD_DEPTH)?;
                }
            }
        }
        batch.events.push(match tag {
            Tag::Stored => DecodedEvent::BlockStored(stored),
            Tag::Removed => DecodedEvent::BlockRemoved(removed),
            Tag::Cleared => DecodedEvent::AllBlocksCleared,
        });
        Ok(())
    }

    fn array_event(&mut self, at: usize, n: usize, batch: &mut DecodedBatch<'a>) -> Res<()> {
        if n == 0 {
            return Err(DecodeError::Malformed { at, what: "empty event array (no tag)" });
        }
        let Some(tag) = Tag::parse(self.str_bytes()?) else {
            for _ in 1..n {
                self.skip(FIELD_DEPTH)?;
            }
            batch.unknown_events += 1;
            return Ok(());
        };
        let event = match tag {
            Tag::Stored => {
                let mut e = StoredEvent::default();
                for i in 1..n {
                    match i {
                        1 => e.block_hashes = self.hashes()?,
                        2 => e.parent_block_hash = self.opt_hash()?,
                        3 => e.token_ids = self.tokens()?,
                        4 => e.block_size = self.opt_u32("block_size")?,
                        5 => e.lora_id = self.opt_i64("lora_id")?,
                        6 => e.medium = self.opt_str()?,
                        7 => e.lora_name = self.opt_str()?,
                        8 => e.extra_keys = self.extra_keys()?,
                        9 => e.group_idx = self.opt_i64("group_idx")?,
                        10 => e.kv_cache_spec_kind = self.opt_str()?,
                        11 => e.kv_cache_spec_sliding_window = self.opt_i64("kv_cache_spec_sliding_window")?,
                        _ => {
                            batch.unknown_fields += 1;
                            self.skip(FIELD_DEPTH)?;
                        }
                    }
                }
                DecodedEvent::BlockStored(e)
            }
            Tag::Removed => {
                let mut e = RemovedEvent::default();
                for i in 1..n {
                    match i {
                        1 => e.block_hashes = self.hashes()?,
                        2 => e.medium = self.opt_str()?,
                        3 => e.group_idx = self.opt_i64("group_idx")?,
                        _ => {
                            batch.unknown_fields += 1;
                            self.skip(FIELD_DEPTH)?;
                        }
                    }
                }
                DecodedEvent::BlockRemoved(e)
            }
            Tag::Cleared => {
                for _ in 1..n {
                    batch.unknown_fields += 1;
                    self.skip(FIELD_DEPTH)?;
                }
                DecodedEvent::AllBlocksCleared
            }
        };
        batch.events.push(event);
        Ok(())
    }
}

#[cfg(test)]
mod tests;
