//! Minimal msgpack writer with msgspec's choice of encodings (smallest int/str/array/map/bin form, float64).
//!
//! Writing into a `Vec<u8>` cannot fail, so every function is infallible. The encodings are the
//! msgpack spec's compact forms, which is what msgspec emits; `events/tests.rs` cross-checks the
//! output against `rmp`/`rmpv`.

/// `nil`.
pub(crate) fn write_nil(out: &mut Vec<u8>) {
    out.push(0xc0);
}

/// Non-negative integer in the smallest form: positive fixint, uint8, uint16, uint32, uint64.
pub(crate) fn write_uint(out: &mut Vec<u8>, v: u64) {
    if v < 0x80 {
        out.push(v as u8);
    } else if v <= u64::from(u8::MAX) {
        out.extend_from_slice(&[0xcc, v as u8]);
    } else if v <= u64::from(u16::MAX) {
        out.push(0xcd);
        out.extend_from_slice(&(v as u16).to_be_bytes());
    } else if v <= u64::from(u32::MAX) {
        out.push(0xce);
        out.extend_from_slice(&(v as u32).to_be_bytes());
    } else {
        out.push(0xcf);
        out.extend_from_slice(&v.to_be_bytes());
    }
}

/// Signed integer: non-negative values use the unsigned forms (as msgspec does), negative values
/// negative fixint, int8, int16, int32, int64.
pub(crate) fn write_int(out: &mut Vec<u8>, v: i64) {
    if v >= 0 {
        write_uint(out, v as u64);
    } else if v >= -32 {
        out.push(v as i8 as u8);
    } else if v >= i64::from(i8::MIN) {
        out.extend_from_slice(&[0xd0, v as i8 as u8]);
    } else if v >= i64::from(i16::MIN) {
        out.push(0xd1);
        out.extend_from_slice(&(v as i16).to_be_bytes());
    } else if v >= i64::from(i32::MIN) {
        out.push(0xd2);
        out.extend_from_slice(&(v as i32).to_be_bytes());
    } else {
        out.push(0xd3);
        out.extend_from_slice(&v.to_be_bytes());
    }
}

/// float64 (`0xcb`); msgspec never narrows Python floats to float32.
pub(crate) fn write_f64(out: &mut Vec<u8>, v: f64) {
    out.push(0xcb);
    out.extend_from_slice(&v.to_bits().to_be_bytes());
}

/// UTF-8 string: fixstr, str8, str16, str32.
pub(crate) fn write_str(out: &mut Vec<u8>, s: &str) {
    let n = s.len();
    if n < 32 {
        out.push(0xa0 | n as u8);
    } else if n <= usize::from(u8::MAX) {
        out.extend_from_slice(&[0xd9, n as u8]);
    } else if n <= usize::from(u16::MAX) {
        out.push(0xda);
        out.extend_from_slice(&(n as u16).to_be_bytes());
    } else {
        out.push(0xdb);
        out.extend_from_slice(&len32(n).to_be_bytes());
    }
    out.extend_from_slice(s.as_bytes());
}

/// Binary: bin8, bin16, bin32.
pub(crate) fn write_bin(out: &mut Vec<u8>, b: &[u8]) {
    let n = b.len();
    if n <= usize::from(u8::MAX) {
        out.extend_from_slice(&[0xc4, n as u8]);
    } else if n <= usize::from(u16::MAX) {
        out.push(0xc5);
        out.extend_from_slice(&(n as u16).to_be_bytes());
    } else {
        out.push(0xc6);
        out.extend_from_slice(&len32(n).to_be_bytes());
    }
    out.extend_from_slice(b);
}

/// Array header: fixarray, array16, array32.
pub(crate) fn write_array_len(out: &mut Vec<u8>, n: usize) {
    if n < 16 {
        out.push(0x90 | n as u8);
    } else if n <= usize::from(u16::MAX) {
        out.push(0xdc);
        out.extend_from_slice(&(n as u16).to_be_bytes());
    } else {
        out.push(0xdd);
        out.extend_from_slice(&len32(n).to_be_bytes());
    }
}

/// Map header: fixmap, map16, map32.
pub(crate) fn write_map_len(out: &mut Vec<u8>, n: usize) {
    if n < 16 {
        out.push(0x80 | n as u8);
    } else {
        write_map16_len(out, n);
    }
}

/// Map header forced to at least the map16 form (`de nn nn`), as msgspec writes a struct whose
/// declared field count exceeds 15 even when fewer fields are present (see `events.rs`).
pub(crate) fn write_map16_len(out: &mut Vec<u8>, n: usize) {
    if n <= usize::from(u16::MAX) {
        out.push(0xde);
        out.extend_from_slice(&(n as u16).to_be_bytes());
    } else {
        out.push(0xdf);
        out.extend_from_slice(&len32(n).to_be_bytes());
    }
}

/// msgpack cannot express lengths of 2^32 or more; such a batch would be a caller bug far beyond
/// any real vLLM batch, so fail loudly instead of writing a corrupt header.
fn len32(n: usize) -> u32 {
    u32::try_from(n).unwrap_or_else(|_| panic!("msgpack length {n} exceeds u32::MAX"))
}
