//! The allocator the proxy runs on (mimalloc, the `gantry` binary's global allocator) and its
//! settings.
//!
//! Request paths allocate and free small buffers on every worker thread. mimalloc returns pages
//! that stay free for its `purge_delay` (1 s in mimalloc 3) to the OS, and the next request that
//! needs them takes page faults on them again: in the routing-decision bench
//! (`proxy/benches/route.rs`, 256 engines, 2 k-token prompts) that shows as a p99 of 41–57 µs
//! against 32–42 µs with purging off, same build, runs alternated. So the proxy keeps freed
//! memory committed: its resident size stays at its peak instead of shrinking a second after a
//! burst, which suits a long-running service whose memory is bounded by its connections.
//! `MIMALLOC_PURGE_DELAY` (or its old name `MIMALLOC_RESET_DELAY`) in the environment still
//! decides (milliseconds; `-1` never).

pub use mimalloc::MiMalloc;

/// mimalloc 3's `mi_option_purge_delay` (its place in `mi_option_e`; the Rust bindings only name
/// the options older releases had). `tests::purge_delay_is_option_15` checks it.
const MI_OPTION_PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;

/// Whether the environment sets the purge delay: mimalloc read it when the process loaded, and
/// matches these names without regard to case.
fn purge_delay_in_env() -> bool {
    std::env::vars_os().any(|(k, _)| {
        k.to_str().is_some_and(|k| {
            k.eq_ignore_ascii_case("MIMALLOC_PURGE_DELAY") || k.eq_ignore_ascii_case("MIMALLOC_RESET_DELAY")
        })
    })
}

/// Makes mimalloc keep freed memory committed (see the module docs), unless the environment sets
/// the purge delay.
///
/// # Safety
/// Call it first thing in `main`, before any other thread exists: it writes mimalloc's option
/// table with a plain store, which threads allocating through mimalloc read without
/// synchronisation.
pub unsafe fn keep_freed_memory() {
    if purge_delay_in_env() {
        return;
    }
    // SAFETY: `mi_option_set` stores one entry of mimalloc's option table; 15 is an option index
    // of the linked mimalloc 3 (the test below reads its documented default there), and the
    // caller guarantees no other thread is reading the table.
    unsafe { libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, -1) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn purge_delay_is_option_15() {
        if purge_delay_in_env() {
            eprintln!("skipped: MIMALLOC_PURGE_DELAY is set, so option 15 holds that, not the default");
            return;
        }
        // SAFETY: reading an option index the linked mimalloc defines.
        let read = || unsafe { libmimalloc_sys::mi_option_get(MI_OPTION_PURGE_DELAY) };
        // mimalloc 3's `purge_delay` default; its neighbours (a deprecated 1 and `use_numa_nodes`
        // 0) and mimalloc 2's default (10) read differently.
        assert_eq!(read(), 1000, "option {MI_OPTION_PURGE_DELAY} is not purge_delay in the linked mimalloc");
        // SAFETY: this test binary allocates through the system allocator: no thread reads
        // mimalloc's option table meanwhile.
        unsafe { keep_freed_memory() };
        assert_eq!(read(), -1, "the purge delay was not set");
    }
}
