//! Canonical CBOR (`cbor2.dumps(.., canonical=True)`) of vLLM's hash inputs: str, bytes, tuple of ints, None.

use super::VllmExtraKey;

/// CBOR of a text string.
pub(super) fn dumps_str(s: &str) -> Vec<u8> {
    let mut out = Vec::with_capacity(s.len() + 9);
    write_head(&mut out, 3, s.len() as u64);
    out.extend_from_slice(s.as_bytes());
    out
}

/// CBOR of `(parent: bytes, tuple(token_ids), extra)`: `83 58 20 <32 bytes> <array> <extra>`,
/// `extra` being `f6` (None) or the keys, e.g. `[["lora", name, path], ["cache_salt", salt]]`.
pub(super) fn dumps_block(parent: &[u8; 32], token_ids: &[u32], keys: &[VllmExtraKey<'_>]) -> Vec<u8> {
    let mut out = Vec::with_capacity(36 + 9 + 5 * token_ids.len() + 1);
    write_head(&mut out, 4, 3);
    write_head(&mut out, 2, parent.len() as u64);
    out.extend_from_slice(parent);
    write_head(&mut out, 4, token_ids.len() as u64);
    for &t in token_ids {
        write_head(&mut out, 0, u64::from(t));
    }
    if keys.is_empty() {
        out.push(0xf6);
        return out;
    }
    write_head(&mut out, 4, keys.len() as u64);
    for key in keys {
        let fields: &[&str] = match key {
            VllmExtraKey::Lora { name, path } => &["lora", name, path],
            VllmExtraKey::CacheSalt(salt) => &["cache_salt", salt],
        };
        write_head(&mut out, 4, fields.len() as u64);
        for f in fields {
            out.extend_from_slice(&dumps_str(f));
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
