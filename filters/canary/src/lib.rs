//! infermesh canary filter (proxy-wasm shim).
