//! Harness for end-to-end tests: real Envoy, real upstreams, real HTTP.
