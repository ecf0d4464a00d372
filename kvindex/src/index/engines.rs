//! One engine-table entry (`ENGINE_WORDS` words of the segment): a seqlock over the slot's name.
//!
//! | word | content |
//! |---|---|
//! | 0 | bits 0–31: seqlock version (odd while the writer changes the entry); bit 32: [`USED`] |
//! | 1 | exact-table blocks the engine holds (a counter, outside the seqlock) |
//! | 2 | name length in bytes |
//! | 3.. | the name, [`MAX_ENGINE_NAME`] bytes, little-endian, zero-padded |
//!
//! The writer makes the version odd, writes the name, then stores the even version with the used
//! flag (release); a reader copies the name between two loads of word 0 and retries (a bounded
//! number of times) when they differ or are odd. The loom test below model-checks it.

use super::layout::MAX_ENGINE_NAME;
use crate::sync::{fence, spin, AtomicU64};
use std::sync::atomic::Ordering::{Acquire, Relaxed, Release};

/// Word 0: the slot is in use.
pub(crate) const USED: u64 = 1 << 32;
/// Attempts a reader makes before giving up.
const MAX_ATTEMPTS: usize = 64;

/// Whether the slot is in use (the writer's view).
pub(crate) fn used(e: &[AtomicU64]) -> bool {
    e[0].load(Relaxed) & USED != 0
}

/// Gives the slot `name` (in use) or none (free), and zeroes its block count. Only the writer
/// calls this; a version left odd by a writer that died is closed first.
pub(crate) fn write(e: &[AtomicU64], name: Option<&str>) {
    let bytes = name.unwrap_or("").as_bytes();
    assert!(bytes.len() <= MAX_ENGINE_NAME, "engine name of {} bytes", bytes.len());
    let v = e[0].load(Relaxed) as u32;
    let v = v.wrapping_add(v & 1);
    e[0].store(u64::from(v.wrapping_add(1)), Relaxed);
    fence(Release);
    e[1].store(0, Relaxed);
    e[2].store(bytes.len() as u64, Relaxed);
    let mut padded = [0u8; MAX_ENGINE_NAME];
    padded[..bytes.len()].copy_from_slice(bytes);
    for (w, chunk) in e[3..].iter().zip(padded.chunks_exact(8)) {
        w.store(u64::from_le_bytes(chunk.try_into().expect("8-byte chunk")), Relaxed);
    }
    let used = if name.is_some() { USED } else { 0 };
    e[0].store(used | u64::from(v.wrapping_add(2)), Release);
}

/// The slot's name, copied into `buf` under the seqlock: None when the slot is free or no stable
/// view came within the retry budget.
pub(crate) fn read_name<'b>(e: &[AtomicU64], buf: &'b mut [u8; MAX_ENGINE_NAME]) -> Option<&'b [u8]> {
    for _ in 0..MAX_ATTEMPTS {
        let v1 = e[0].load(Acquire);
        if v1 & 1 == 1 {
            spin();
            continue;
        }
        if v1 & USED == 0 {
            return None;
        }
        let len = (e[2].load(Relaxed) as usize).min(MAX_ENGINE_NAME);
        for (chunk, w) in buf.chunks_exact_mut(8).zip(&e[3..]) {
            chunk.copy_from_slice(&w.load(Relaxed).to_le_bytes());
        }
        fence(Acquire);
        if e[0].load(Relaxed) == v1 {
            return Some(&buf[..len]);
        }
    }
    None
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;
    use crate::index::layout::ENGINE_WORDS;

    #[test]
    fn names_are_written_read_and_freed() {
        let e: Vec<AtomicU64> = (0..ENGINE_WORDS).map(|_| AtomicU64::new(0)).collect();
        let mut buf = [0u8; MAX_ENGINE_NAME];
        assert_eq!(read_name(&e, &mut buf), None);
        let long = "h".repeat(MAX_ENGINE_NAME);
        for name in ["http://10.0.0.1:8000", long.as_str(), "x"] {
            write(&e, Some(name));
            assert!(used(&e));
            assert_eq!(read_name(&e, &mut buf), Some(name.as_bytes()));
        }
        write(&e, None);
        assert!(!used(&e));
        assert_eq!(read_name(&e, &mut buf), None);
        // A writer that died mid-write: readers give up; the next write closes the version.
        e[0].store(e[0].load(Relaxed) + 1, Relaxed);
        assert_eq!(read_name(&e, &mut buf), None);
        write(&e, Some("back"));
        assert_eq!(e[0].load(Relaxed) & 1, 0);
        assert_eq!(read_name(&e, &mut buf), Some(&b"back"[..]));
    }
}

#[cfg(all(test, loom))]
mod loom_tests {
    use super::*;
    use crate::index::layout::ENGINE_WORDS;
    use loom::sync::Arc;

    /// While the writer renames a slot, a reader sees the old name, the new one or nothing
    /// (retries spent), never a mix of the two.
    #[test]
    fn a_name_is_never_torn() {
        let mut model = loom::model::Builder::new();
        model.preemption_bound = Some(2);
        model.check(|| {
            let e: Arc<Vec<AtomicU64>> = Arc::new((0..ENGINE_WORDS).map(|_| AtomicU64::new(0)).collect());
            write(&e, Some("first-engine"));
            let w = e.clone();
            let writer = loom::thread::spawn(move || write(&w, Some("second")));
            let mut buf = [0u8; MAX_ENGINE_NAME];
            if let Some(n) = read_name(&e, &mut buf) {
                assert!(n == b"first-engine" || n == b"second", "torn name {:?}", String::from_utf8_lossy(n));
            }
            writer.join().unwrap();
            assert_eq!(read_name(&e, &mut buf), Some(&b"second"[..]));
        });
    }
}
