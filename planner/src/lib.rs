//! `gantry-planner`: the replica planner (predictors, performance model, connectors).
//!
//! Not built yet: this crate is intentionally empty until its issue is taken. See
//! `ARCHITECTURE.md` for what it will own.
#![forbid(unsafe_code)]
