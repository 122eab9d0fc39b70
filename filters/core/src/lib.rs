//! Host-free core of the infermesh filters: validated config, routing and
//! canary decisions, and the small parsers they need.
//!
//! Nothing here touches proxy-wasm, a clock or a random source: the filter
//! shims pass host facts (headers as bytes, `now_ms`, a random word) in as
//! arguments, so every decision is a pure function that is tested natively
//! and behaves identically in every Envoy worker.

// This code runs inside Envoy, where a panic traps the Wasm VM.
#![cfg_attr(
    not(test),
    deny(
        clippy::unwrap_used,
        clippy::expect_used,
        clippy::indexing_slicing,
        clippy::panic
    )
)]

pub mod canary;
pub mod config;
pub mod cookie;
pub mod failover;
pub mod guard;
pub mod hash;
pub mod headers;
pub mod jsonscan;
mod le;
pub mod oip;
pub mod router;
pub mod schedule;
pub mod shadow;
pub mod stats;
pub mod weights;

pub use config::ConfigError;
