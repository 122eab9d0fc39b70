//! The proxy-wasm ABI 0.2.1 host calls, as the Rust SDK 0.2 calls them and
//! as Envoy answers them. Every call acts on the *effective* context: the
//! context whose callback is running, or the one the module made
//! effective with `proxy_set_effective_context` (a root tick acting on a
//! stream).
//!
//! Status codes matter: the SDK panics (traps the VM) on any status it does
//! not expect from a call, so each call answers only with the statuses
//! Envoy gives and the SDK handles.

use std::collections::BTreeMap;

use wasmtime::{Caller, Extern, Linker, Memory, Module, Val};

use crate::{CallOut, Headers, MetricKind, State};

pub const OK: i32 = 0;
pub const NOT_FOUND: i32 = 1;
pub const BAD_ARGUMENT: i32 = 2;
pub const CAS_MISMATCH: i32 = 8;
pub const UNIMPLEMENTED: i32 = 12;

const REQUEST_HEADERS: i32 = 0;
const REQUEST_TRAILERS: i32 = 1;
const RESPONSE_HEADERS: i32 = 2;
const RESPONSE_TRAILERS: i32 = 3;
const CALL_RESPONSE_HEADERS: i32 = 6;

const REQUEST_BODY: i32 = 0;
const RESPONSE_BODY: i32 = 1;
const CALL_RESPONSE_BODY: i32 = 4;
const VM_CONFIGURATION: i32 = 6;
const PLUGIN_CONFIGURATION: i32 = 7;

type Cx<'a> = Caller<'a, State>;
type Res<T> = wasmtime::Result<T>;

fn memory(cx: &mut Cx<'_>) -> Res<Memory> {
    match cx.get_export("memory") {
        Some(Extern::Memory(m)) => Ok(m),
        _ => Err(wasmtime::Error::msg("the module exports no memory")),
    }
}

/// Bytes at `ptr..ptr+len` of the module's memory (a bad range traps, as
/// it does in Envoy).
fn read(cx: &mut Cx<'_>, ptr: i32, len: i32) -> Res<Vec<u8>> {
    let mem = memory(cx)?;
    let (ptr, len) = (ptr as u32 as usize, len as u32 as usize);
    let data = mem.data(&cx);
    data.get(ptr..ptr.saturating_add(len))
        .map(<[u8]>::to_vec)
        .ok_or_else(|| wasmtime::Error::msg(format!("out-of-bounds read {ptr}+{len}")))
}

fn write(cx: &mut Cx<'_>, ptr: i32, bytes: &[u8]) -> Res<()> {
    let mem = memory(cx)?;
    mem.write(cx, ptr as u32 as usize, bytes)
        .map_err(|e| wasmtime::Error::msg(format!("out-of-bounds write at {ptr}: {e}")))
}

fn write_u32(cx: &mut Cx<'_>, ptr: i32, v: u32) -> Res<()> {
    write(cx, ptr, &v.to_le_bytes())
}

/// Copies `bytes` into memory the module allocates
/// (`proxy_on_memory_allocate`) and stores the pointer and size where the
/// module asked; an empty value is a null pointer, as Envoy passes it.
fn give(cx: &mut Cx<'_>, bytes: &[u8], ptr_ptr: i32, size_ptr: i32) -> Res<()> {
    let ptr = if bytes.is_empty() {
        0
    } else {
        let alloc = cx
            .get_export("proxy_on_memory_allocate")
            .and_then(Extern::into_func)
            .ok_or_else(|| wasmtime::Error::msg("no proxy_on_memory_allocate"))?;
        let alloc = alloc.typed::<i32, i32>(&cx)?;
        let p = alloc.call(&mut *cx, bytes.len() as i32)?;
        write(cx, p, bytes)?;
        p
    };
    write_u32(cx, ptr_ptr, ptr as u32)?;
    write_u32(cx, size_ptr, bytes.len() as u32)
}

/// The SDK's header map encoding: count, (key len, value len)*, then each
/// key and value NUL-terminated.
pub fn encode_map(map: &[(String, Vec<u8>)]) -> Vec<u8> {
    let mut out = Vec::new();
    out.extend_from_slice(&(map.len() as u32).to_le_bytes());
    for (k, v) in map {
        out.extend_from_slice(&(k.len() as u32).to_le_bytes());
        out.extend_from_slice(&(v.len() as u32).to_le_bytes());
    }
    for (k, v) in map {
        out.extend_from_slice(k.as_bytes());
        out.push(0);
        out.extend_from_slice(v);
        out.push(0);
    }
    out
}

/// Decodes a map the module sent; `None` if malformed (Envoy answers
/// BadArgument or drops it).
pub fn decode_map(bytes: &[u8]) -> Option<Headers> {
    if bytes.is_empty() {
        return Some(Vec::new());
    }
    let word = |at: usize| -> Option<usize> {
        let b: [u8; 4] = bytes.get(at..at + 4)?.try_into().ok()?;
        Some(u32::from_le_bytes(b) as usize)
    };
    let n = word(0)?;
    let mut p = 4usize.checked_add(n.checked_mul(8)?)?;
    let mut out = Vec::with_capacity(n.min(1024));
    for i in 0..n {
        let (kl, vl) = (word(4 + i * 8)?, word(8 + i * 8)?);
        let k = bytes.get(p..p.checked_add(kl)?)?;
        p = p.checked_add(kl + 1)?;
        let v = bytes.get(p..p.checked_add(vl)?)?;
        p = p.checked_add(vl + 1)?;
        out.push((String::from_utf8_lossy(k).into_owned(), v.to_vec()));
    }
    Some(out)
}

/// Every import of `module` in `linker`: the calls the SDK makes, and for
/// the rest (gRPC, shared queues, ...) a function answering Unimplemented,
/// so a call the host does not model shows up as a failed call in the
/// module, not as an instantiation error.
pub fn link(linker: &mut Linker<State>, module: &Module) -> Res<()> {
    defined(linker)?;
    let mut scratch = wasmtime::Store::new(module.engine(), State::default());
    for import in module.imports() {
        if linker.get_by_import(&mut scratch, &import).is_some() {
            continue;
        }
        let Some(ty) = import.ty().func().cloned() else {
            continue;
        };
        let name = format!("{}::{}", import.module(), import.name());
        linker.func_new(
            import.module(),
            import.name(),
            ty,
            move |mut cx, _args, results| {
                cx.data_mut().unmodelled.push(name.clone());
                for r in results.iter_mut() {
                    *r = Val::I32(UNIMPLEMENTED);
                }
                Ok(())
            },
        )?;
    }
    Ok(())
}

fn defined(l: &mut Linker<State>) -> Res<()> {
    l.func_wrap(
        "env",
        "proxy_log",
        |mut cx: Cx<'_>, level: i32, ptr: i32, len: i32| -> Res<i32> {
            let msg = read(&mut cx, ptr, len)?;
            cx.data_mut()
                .logs
                .push((level, String::from_utf8_lossy(&msg).into_owned()));
            Ok(OK)
        },
    )?;
    l.func_wrap(
        "env",
        "proxy_get_current_time_nanoseconds",
        |mut cx: Cx<'_>, out: i32| -> Res<i32> {
            let now = cx.data().now_ns;
            write(&mut cx, out, &now.to_le_bytes())?;
            Ok(OK)
        },
    )?;
    l.func_wrap(
        "env",
        "proxy_set_tick_period_milliseconds",
        |mut cx: Cx<'_>, ms: i32| -> Res<i32> {
            let st = cx.data_mut();
            st.tick_ms = ms as u32 as u64;
            st.next_tick_ns = st.now_ns + st.tick_ms * 1_000_000;
            Ok(OK)
        },
    )?;
    l.func_wrap(
        "env",
        "proxy_get_buffer_bytes",
        |mut cx: Cx<'_>,
         kind: i32,
         start: i32,
         max: i32,
         ptr_ptr: i32,
         size_ptr: i32|
         -> Res<i32> {
            let st = cx.data();
            let whole: Option<Vec<u8>> = match kind {
                PLUGIN_CONFIGURATION => Some(st.plugin_config.clone()),
                VM_CONFIGURATION => Some(Vec::new()),
                CALL_RESPONSE_BODY => st.call_response.as_ref().map(|r| r.1.clone()),
                REQUEST_BODY => st.stream().map(|s| s.req_buffer.clone()),
                RESPONSE_BODY => st.stream().map(|s| s.resp_buffer.clone()),
                _ => None,
            };
            let Some(whole) = whole else {
                return Ok(NOT_FOUND);
            };
            let start = (start as u32 as usize).min(whole.len());
            let end = start.saturating_add(max as u32 as usize).min(whole.len());
            let slice = whole.get(start..end).unwrap_or_default().to_vec();
            give(&mut cx, &slice, ptr_ptr, size_ptr)?;
            Ok(OK)
        },
    )?;
    l.func_wrap(
        "env",
        "proxy_set_buffer_bytes",
        |mut cx: Cx<'_>, kind: i32, start: i32, len: i32, ptr: i32, size: i32| -> Res<i32> {
            let data = read(&mut cx, ptr, size)?;
            let Some(s) = cx.data_mut().stream_mut() else {
                return Ok(NOT_FOUND);
            };
            let buf = match kind {
                REQUEST_BODY => &mut s.req_buffer,
                RESPONSE_BODY => &mut s.resp_buffer,
                _ => return Ok(NOT_FOUND),
            };
            let start = (start as u32 as usize).min(buf.len());
            let end = start.saturating_add(len as u32 as usize).min(buf.len());
            buf.splice(start..end, data);
            Ok(OK)
        },
    )?;
    l.func_wrap(
        "env",
        "proxy_get_header_map_pairs",
        |mut cx: Cx<'_>, kind: i32, ptr_ptr: i32, size_ptr: i32| -> Res<i32> {
            // A map that is not available now reads as empty (Envoy answers
            // Ok with no pairs; the SDK traps on anything else).
            let map = cx.data().map(kind).cloned().unwrap_or_default();
            let bytes = if map.is_empty() {
                Vec::new()
            } else {
                encode_map(&map)
            };
            give(&mut cx, &bytes, ptr_ptr, size_ptr)?;
            Ok(OK)
        },
    )?;
    l.func_wrap(
        "env",
        "proxy_set_header_map_pairs",
        |mut cx: Cx<'_>, kind: i32, ptr: i32, len: i32| -> Res<i32> {
            let bytes = read(&mut cx, ptr, len)?;
            let Some(map) = decode_map(&bytes) else {
                return Ok(BAD_ARGUMENT);
            };
            if let Some(m) = cx.data_mut().map_mut(kind) {
                *m = map;
            }
            Ok(OK)
        },
    )?;
    l.func_wrap(
        "env",
        "proxy_get_header_map_value",
        |mut cx: Cx<'_>, kind: i32, kp: i32, kl: i32, ptr_ptr: i32, size_ptr: i32| -> Res<i32> {
            let key = read(&mut cx, kp, kl)?;
            let value = cx.data().map(kind).and_then(|m| {
                m.iter()
                    .find(|(k, _)| k.as_bytes().eq_ignore_ascii_case(&key))
                    .map(|(_, v)| v.clone())
            });
            match value {
                Some(v) => {
                    give(&mut cx, &v, ptr_ptr, size_ptr)?;
                    Ok(OK)
                }
                None => Ok(NOT_FOUND),
            }
        },
    )?;
    l.func_wrap(
        "env",
        "proxy_replace_header_map_value",
        |mut cx: Cx<'_>, kind: i32, kp: i32, kl: i32, vp: i32, vl: i32| -> Res<i32> {
            let key = lower(read(&mut cx, kp, kl)?);
            let value = read(&mut cx, vp, vl)?;
            if let Some(m) = cx.data_mut().map_mut(kind) {
                // Envoy's setCopy: the first entry takes the value, later
                // duplicates go.
                let mut seen = false;
                m.retain_mut(|(k, v)| {
                    if *k != key {
                        return true;
                    }
                    if seen {
                        return false;
                    }
                    seen = true;
                    *v = value.clone();
                    true
                });
                if !seen {
                    m.push((key, value));
                }
            }
            Ok(OK)
        },
    )?;
    l.func_wrap(
        "env",
        "proxy_add_header_map_value",
        |mut cx: Cx<'_>, kind: i32, kp: i32, kl: i32, vp: i32, vl: i32| -> Res<i32> {
            let key = lower(read(&mut cx, kp, kl)?);
            let value = read(&mut cx, vp, vl)?;
            if let Some(m) = cx.data_mut().map_mut(kind) {
                m.push((key, value));
            }
            Ok(OK)
        },
    )?;
    l.func_wrap(
        "env",
        "proxy_remove_header_map_value",
        |mut cx: Cx<'_>, kind: i32, kp: i32, kl: i32| -> Res<i32> {
            let key = lower(read(&mut cx, kp, kl)?);
            if let Some(m) = cx.data_mut().map_mut(kind) {
                m.retain(|(k, _)| *k != key);
            }
            Ok(OK)
        },
    )?;
    l.func_wrap(
        "env",
        "proxy_get_property",
        |mut cx: Cx<'_>, pp: i32, pl: i32, ptr_ptr: i32, size_ptr: i32| -> Res<i32> {
            let path = read(&mut cx, pp, pl)?;
            let path = String::from_utf8_lossy(&path).replace('\0', ".");
            let value = cx
                .data()
                .stream()
                .and_then(|s| s.properties.get(&path).cloned());
            match value {
                Some(v) => {
                    give(&mut cx, &v, ptr_ptr, size_ptr)?;
                    Ok(OK)
                }
                None => Ok(NOT_FOUND),
            }
        },
    )?;
    l.func_wrap(
        "env",
        "proxy_set_property",
        |mut cx: Cx<'_>, pp: i32, pl: i32, vp: i32, vl: i32| -> Res<i32> {
            let path = String::from_utf8_lossy(&read(&mut cx, pp, pl)?).replace('\0', ".");
            let value = read(&mut cx, vp, vl)?;
            if let Some(s) = cx.data_mut().stream_mut() {
                s.properties.insert(path, value);
            }
            Ok(OK)
        },
    )?;
    l.func_wrap(
        "env",
        "proxy_get_shared_data",
        |mut cx: Cx<'_>, kp: i32, kl: i32, ptr_ptr: i32, size_ptr: i32, cas_ptr: i32| -> Res<i32> {
            let key = read(&mut cx, kp, kl)?;
            let found = cx.data().shared.borrow().data.get(&key).cloned();
            match found {
                Some((value, cas)) => {
                    give(&mut cx, &value, ptr_ptr, size_ptr)?;
                    write_u32(&mut cx, cas_ptr, cas)?;
                    Ok(OK)
                }
                None => Ok(NOT_FOUND),
            }
        },
    )?;
    l.func_wrap(
        "env",
        "proxy_set_shared_data",
        |mut cx: Cx<'_>, kp: i32, kl: i32, vp: i32, vl: i32, cas: i32| -> Res<i32> {
            let key = read(&mut cx, kp, kl)?;
            let value = read(&mut cx, vp, vl)?;
            let st = cx.data_mut();
            let mut shared = st.shared.borrow_mut();
            // Envoy: a non-zero CAS must match the entry's; each write
            // bumps it (and a new entry starts at a fresh value).
            let current = shared.data.get(&key).map(|(_, c)| *c);
            if cas != 0 && current.is_some_and(|c| c != cas as u32) {
                shared.cas_mismatches += 1;
                return Ok(CAS_MISMATCH);
            }
            shared.next_cas = shared.next_cas.wrapping_add(1).max(1);
            let next = shared.next_cas;
            shared.data.insert(key, (value, next));
            Ok(OK)
        },
    )?;
    l.func_wrap(
        "env",
        "proxy_define_metric",
        |mut cx: Cx<'_>, kind: i32, np: i32, nl: i32, id_ptr: i32| -> Res<i32> {
            let name = String::from_utf8_lossy(&read(&mut cx, np, nl)?).into_owned();
            let kind = match kind {
                0 => MetricKind::Counter,
                1 => MetricKind::Gauge,
                _ => MetricKind::Histogram,
            };
            let id = {
                let st = cx.data_mut();
                let mut shared = st.shared.borrow_mut();
                shared.metrics.entry(name.clone()).or_insert((kind, 0));
                match st.metric_ids.iter().position(|n| *n == name) {
                    Some(i) => i as u32 + 1,
                    None => {
                        st.metric_ids.push(name);
                        st.metric_ids.len() as u32
                    }
                }
            };
            write_u32(&mut cx, id_ptr, id)?;
            Ok(OK)
        },
    )?;
    l.func_wrap(
        "env",
        "proxy_increment_metric",
        |mut cx: Cx<'_>, id: i32, by: i64| -> Res<i32> {
            Ok(cx.data_mut().metric(id, |v| v.saturating_add(by)))
        },
    )?;
    l.func_wrap(
        "env",
        "proxy_record_metric",
        |mut cx: Cx<'_>, id: i32, value: i64| -> Res<i32> {
            Ok(cx.data_mut().metric(id, |_| value))
        },
    )?;
    l.func_wrap(
        "env",
        "proxy_set_effective_context",
        |mut cx: Cx<'_>, id: i32| -> Res<i32> {
            let st = cx.data_mut();
            let id = id as u32;
            if id == st.root_id || st.streams.contains_key(&id) {
                st.effective = id;
                Ok(OK)
            } else {
                Ok(BAD_ARGUMENT)
            }
        },
    )?;
    l.func_wrap(
        "env",
        "proxy_continue_stream",
        |mut cx: Cx<'_>, which: i32| -> Res<i32> {
            let st = cx.data_mut();
            let Some(s) = st.stream_mut() else {
                return Ok(NOT_FOUND);
            };
            match which {
                0 => s.resume_request = true,
                1 => s.resume_response = true,
                _ => return Ok(UNIMPLEMENTED),
            }
            Ok(OK)
        },
    )?;
    l.func_wrap(
        "env",
        "proxy_close_stream",
        |mut cx: Cx<'_>, _which: i32| -> Res<i32> {
            if let Some(s) = cx.data_mut().stream_mut() {
                s.reset = true;
            }
            Ok(OK)
        },
    )?;
    l.func_wrap(
        "env",
        "proxy_send_local_response",
        |mut cx: Cx<'_>,
         status: i32,
         _dp: i32,
         _dl: i32,
         bp: i32,
         bl: i32,
         hp: i32,
         hl: i32,
         _grpc: i32|
         -> Res<i32> {
            let body = read(&mut cx, bp, bl)?;
            let headers = read(&mut cx, hp, hl)?;
            let Some(headers) = decode_map(&headers) else {
                return Ok(BAD_ARGUMENT);
            };
            let Some(s) = cx.data_mut().stream_mut() else {
                return Ok(NOT_FOUND);
            };
            // Envoy runs the reply after the callback returns (the SDK
            // holds its stream table while a callback runs, so a reply
            // re-entering the module's response callbacks would trap it):
            // the driver takes it from here.
            s.local_replies.push(crate::LocalReply {
                status: status as u32 as u16,
                headers,
                body,
            });
            Ok(OK)
        },
    )?;
    l.func_wrap(
        "env",
        "proxy_http_call",
        |mut cx: Cx<'_>,
         up: i32,
         upl: i32,
         hp: i32,
         hl: i32,
         bp: i32,
         bl: i32,
         _tp: i32,
         _tl: i32,
         timeout: i32,
         token_ptr: i32|
         -> Res<i32> {
            let cluster = String::from_utf8_lossy(&read(&mut cx, up, upl)?).into_owned();
            let headers = read(&mut cx, hp, hl)?;
            let body = read(&mut cx, bp, bl)?;
            let Some(headers) = decode_map(&headers) else {
                return Ok(BAD_ARGUMENT);
            };
            // Envoy refuses a call without :method, :path and :authority,
            // and one to a cluster it does not know.
            let has = |n: &str| headers.iter().any(|(k, _)| k == n);
            if !(has(":method") && has(":path") && has(":authority")) {
                return Ok(BAD_ARGUMENT);
            }
            let st = cx.data_mut();
            if st.clusters.as_ref().is_some_and(|c| !c.contains(&cluster)) {
                return Ok(BAD_ARGUMENT);
            }
            st.next_token = st.next_token.wrapping_add(1).max(1);
            let token = st.next_token;
            st.new_calls.push(CallOut {
                token,
                context: st.effective,
                cluster,
                headers,
                body,
                timeout_ms: timeout as u32 as u64,
            });
            write_u32(&mut cx, token_ptr, token)?;
            Ok(OK)
        },
    )?;
    l.func_wrap(
        "env",
        "proxy_call_foreign_function",
        |mut cx: Cx<'_>, np: i32, nl: i32, _ap: i32, _al: i32, _rp: i32, _rl: i32| -> Res<i32> {
            let name = read(&mut cx, np, nl)?;
            if name != b"clear_route_cache" {
                return Ok(NOT_FOUND);
            }
            // Envoy's clear_route_cache: the route is picked again, on the
            // headers as they are when the request goes upstream.
            if let Some(s) = cx.data_mut().stream_mut() {
                s.route_cleared += 1;
            }
            Ok(OK)
        },
    )?;
    l.func_wrap("env", "proxy_done", |_cx: Cx<'_>| -> Res<i32> { Ok(OK) })?;
    // WASI: what Rust's std asks of it in a reactor. random_get fills with
    // a fixed sequence (the host is deterministic); the rest is empty.
    l.func_wrap(
        "wasi_snapshot_preview1",
        "random_get",
        |mut cx: Cx<'_>, ptr: i32, len: i32| -> Res<i32> {
            let mut bytes = vec![0u8; len as u32 as usize];
            let mut s = cx.data().random;
            for b in bytes.iter_mut() {
                s = s
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                *b = (s >> 56) as u8;
            }
            cx.data_mut().random = s;
            write(&mut cx, ptr, &bytes)?;
            Ok(0)
        },
    )?;
    l.func_wrap(
        "wasi_snapshot_preview1",
        "environ_sizes_get",
        |mut cx: Cx<'_>, count: i32, size: i32| -> Res<i32> {
            write_u32(&mut cx, count, 0)?;
            write_u32(&mut cx, size, 0)?;
            Ok(0)
        },
    )?;
    l.func_wrap(
        "wasi_snapshot_preview1",
        "environ_get",
        |_cx: Cx<'_>, _a: i32, _b: i32| -> Res<i32> { Ok(0) },
    )?;
    l.func_wrap(
        "wasi_snapshot_preview1",
        "fd_write",
        |mut cx: Cx<'_>, _fd: i32, iovs: i32, n: i32, written: i32| -> Res<i32> {
            let mut total = 0u32;
            let mut text = Vec::new();
            for i in 0..n {
                let iov = read(&mut cx, iovs + i * 8, 8)?;
                let p = i32::from_le_bytes([iov[0], iov[1], iov[2], iov[3]]);
                let l = i32::from_le_bytes([iov[4], iov[5], iov[6], iov[7]]);
                text.extend(read(&mut cx, p, l)?);
                total += l as u32;
            }
            cx.data_mut()
                .logs
                .push((5, String::from_utf8_lossy(&text).into_owned()));
            write_u32(&mut cx, written, total)?;
            Ok(0)
        },
    )?;
    l.func_wrap(
        "wasi_snapshot_preview1",
        "proc_exit",
        |_cx: Cx<'_>, code: i32| -> Res<()> {
            Err(wasmtime::Error::msg(format!("proc_exit({code})")))
        },
    )?;
    Ok(())
}

fn lower(key: Vec<u8>) -> String {
    String::from_utf8_lossy(&key).to_ascii_lowercase()
}

impl State {
    /// The map of the effective context, if it can be read now.
    fn map(&self, kind: i32) -> Option<&Headers> {
        if kind == CALL_RESPONSE_HEADERS {
            return self.call_response.as_ref().map(|r| &r.0);
        }
        let s = self.stream()?;
        match kind {
            // Envoy hands a filter the request headers while the request
            // is still in the filter's hands (its headers callback, or
            // held); after they went upstream the map is gone for the
            // filter (request.rs keeps its own copy for that reason).
            REQUEST_HEADERS if !s.req_headers_sent => Some(&s.req_headers),
            REQUEST_TRAILERS => s.req_trailers.as_ref(),
            RESPONSE_HEADERS if s.resp_headers_open => Some(&s.resp_headers),
            RESPONSE_TRAILERS => None,
            _ => None,
        }
    }

    fn map_mut(&mut self, kind: i32) -> Option<&mut Headers> {
        let s = self.stream_mut()?;
        match kind {
            REQUEST_HEADERS if !s.req_headers_sent => Some(&mut s.req_headers),
            REQUEST_TRAILERS => s.req_trailers.as_mut(),
            RESPONSE_HEADERS if s.resp_headers_open => Some(&mut s.resp_headers),
            _ => None,
        }
    }

    fn metric(&mut self, id: i32, f: impl FnOnce(i64) -> i64) -> i32 {
        let Some(name) = (id as u32 as usize)
            .checked_sub(1)
            .and_then(|i| self.metric_ids.get(i))
        else {
            return NOT_FOUND;
        };
        let mut shared = self.shared.borrow_mut();
        match shared.metrics.get_mut(name) {
            Some((_, v)) => {
                *v = f(*v);
                OK
            }
            None => NOT_FOUND,
        }
    }
}

/// Sums metrics named `name` whose tags include every `(tag, value)`.
pub fn metric_sum(
    metrics: &BTreeMap<String, (MetricKind, i64)>,
    name: &str,
    tags: &[(&str, &str)],
) -> i64 {
    metrics
        .iter()
        .filter(|(full, _)| {
            let (base, rest) = full.split_once('.').unwrap_or((full.as_str(), ""));
            base == name
                && tags
                    .iter()
                    .all(|(t, v)| rest.contains(&format!("{t}=.={v};.;")))
        })
        .map(|(_, (_, v))| *v)
        .sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn maps_round_trip_and_malformed_ones_are_refused() {
        let map: Headers = vec![
            (":path".into(), b"/a".to_vec()),
            ("x-bin".into(), vec![0xff, 0x00, 0x80]),
            ("empty".into(), Vec::new()),
        ];
        let bytes = encode_map(&map);
        assert_eq!(decode_map(&bytes), Some(map));
        assert_eq!(decode_map(&[]), Some(Vec::new()));
        // A count larger than the data, a truncated length table, a
        // value running past the end.
        assert_eq!(decode_map(&[9, 0, 0, 0]), None);
        assert_eq!(decode_map(&bytes[..6]), None);
        assert_eq!(decode_map(&bytes[..bytes.len() - 2]), None);
        assert_eq!(decode_map(&[0xff, 0xff, 0xff, 0xff]), None);
    }

    #[test]
    fn metrics_sum_by_tag() {
        let mut m = BTreeMap::new();
        m.insert(
            "a_total.cloud=.=aws;.;outcome=.=ok;.;".to_owned(),
            (MetricKind::Counter, 2),
        );
        m.insert(
            "a_total.cloud=.=gcp;.;outcome=.=ok;.;".to_owned(),
            (MetricKind::Counter, 3),
        );
        m.insert("a_total_other".to_owned(), (MetricKind::Counter, 100));
        assert_eq!(metric_sum(&m, "a_total", &[]), 5);
        assert_eq!(metric_sum(&m, "a_total", &[("cloud", "gcp")]), 3);
        assert_eq!(metric_sum(&m, "a_total", &[("cloud", "azure")]), 0);
    }
}
