//! Canonical CBOR (`cbor2.dumps(.., canonical=True)`) of vLLM's hash inputs: str, bytes, tuple of ints, None.

/// CBOR of a text string.
pub(super) fn dumps_str(s: &str) -> Vec<u8> {
    let mut out = Vec::with_capacity(s.len() + 9);
    write_head(&mut out, 3, s.len() as u64);
    out.extend_from_slice(s.as_bytes());
    out
}

/// CBOR of `(parent: bytes, tuple(token_ids), extra)`: `83 58 20 <32 bytes> <array> <extra>`,
/// `extra` being `f6` (None) or, with a cache salt, `[["cache_salt", salt]]`.
pub(super) fn dumps_block(parent: &[u8; 32], token_ids: &[u32], salt: Option<&str>) -> Vec<u8> {
    let mut out = Vec::with_capacity(36 + 9 + 5 * token_ids.len() + 1);
    write_head(&mut out, 4, 3);
    write_head(&mut out, 2, parent.len() as u64);
    out.extend_from_slice(parent);
    write_head(&mut out, 4, token_ids.len() as u64);
    for &t in token_ids {
        write_head(&mut out, 0, u64::from(t));
    }
    match salt {
        None => out.push(0xf6),
        Some(salt) => {
            write_head(&mut out, 4, 1);
            write_head(&mut out, 4, 2);
            out.extend_from_slice(&dumps_str("cache_salt"));
            out.extend_from_slice(&dumps_str(salt));
        }
    }
    out
}

/// Initial byte `major << 5 | info` with the shortest argument encoding (canonical CBOR).
fn write_head(out: &mut Vec<u8>, major: u8, v: u64) {
    let m = major << 5;
    if v < 24 {
        out.push(m | v as u8);
    } else if v <= u64::from(u8::MAX) {
        out.extend_from_slice(&[m | 24, v as u8]);
    } else if v <= u64::from(u16::MAX) {
        out.push(m | 25);
        out.extend_from_slice(&(v as u16).to_be_bytes());
    } else if v <= u64::from(u32::MAX) {
        out.push(m | 26);
        out.extend_from_slice(&(v as u32).to_be_bytes());
    } else {
        out.push(m | 27);
        out.extend_from_slice(&v.to_be_bytes());
    }
}
