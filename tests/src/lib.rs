//! End-to-end tests: the built filters in a real Envoy on V8 with real
//! upstreams and real HTTP. The harness is the `mesh` crate (shared with
//! `infermesh up`); this crate re-exports it so tests read `e2e::…`.

pub use mesh::*;
