//! Request routing: which pool ([`grid`], Dynamo's global-router grid, read from its JSON config
//! unchanged) and which engine in it (the `kv` policy: [`prompt`] tokenizes and hashes the
//! prompt, [`index`] holds each pool's prefix index, [`kv`] turns overlap and load into one cost
//! per engine).

pub mod grid;
pub mod index;
pub mod kv;
pub mod prompt;
