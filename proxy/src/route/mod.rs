//! Request routing: which pool a request goes to and, later, which engine inside it.
//!
//! `route/` holds request routing. Today that is pool choice by grid ([`grid`]: NVIDIA Dynamo's
//! GlobalRouter config read unchanged, mapping prompt length and latency targets to a pool);
//! engine choice inside the chosen pool (KV-aware, load-aware) will live here next, beside it.

pub mod grid;
