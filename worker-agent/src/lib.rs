//! `gantry-agent`: the per-GPU worker agent (engine registration, KV transfer over NIXL).
//!
//! Not built yet: this crate is intentionally empty until its issue is taken. See
//! `ARCHITECTURE.md` for what it will own.
#![forbid(unsafe_code)]
