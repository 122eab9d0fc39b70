//! A proxy-wasm host on wasmtime, for tests: it loads the shipped
//! `dist/infermesh.wasm` exactly as `wasm-build.sh` built it, answers the
//! ABI calls the module makes (see [`abi`]), and drives HTTP streams
//! through the callbacks in the order Envoy uses, on a virtual clock.
//!
//! What it is for:
//! - **scenarios** without an Envoy: the same configs and requests as the
//!   e2e tests, the same decisions and headers, in milliseconds;
//! - **fuzzing**: arbitrary configs, headers, body chunking, callout
//!   answers and timer orders, with a memory limit, checking that the VM
//!   never traps and every stream ends;
//! - **exact cost**: wasmtime fuel (about one unit per wasm instruction)
//!   per request; the same module and input give the same count on any
//!   machine (the clock is virtual, random_get is a fixed sequence).
//!
//! Where Envoy's behaviour is subtle, the driver mirrors what the e2e
//! tests (tests/tests/*.rs) show Envoy doing; each such place says so.

pub mod abi;
pub mod cost;

use std::cell::RefCell;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::sync::Mutex;

use wasmtime::{
    Config, Engine, Instance, Linker, Module, Store, StoreLimits, StoreLimitsBuilder, TypedFunc,
};

pub use wasmtime::Result;

/// A header list as the ABI carries it (names lower-case).
pub type Headers = Vec<(String, Vec<u8>)>;

/// The first value of `name` in `h`.
pub fn header<'a>(h: &'a Headers, name: &str) -> Option<&'a [u8]> {
    h.iter().find(|(n, _)| n == name).map(|(_, v)| v.as_slice())
}

/// `header` as text (lossy).
pub fn header_str(h: &Headers, name: &str) -> Option<String> {
    header(h, name).map(|v| String::from_utf8_lossy(v).into_owned())
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MetricKind {
    Counter,
    Gauge,
    Histogram,
}

/// What every VM of one "Envoy" shares: shared data (with CAS) and the
/// stats store. Envoy keeps both per process, across worker VMs.
#[derive(Debug, Default)]
pub struct Shared {
    pub data: HashMap<Vec<u8>, (Vec<u8>, u32)>,
    pub next_cas: u32,
    pub cas_mismatches: u64,
    pub metrics: BTreeMap<String, (MetricKind, i64)>,
}

/// A reply the module sent with `proxy_send_local_response`.
#[derive(Debug, Clone)]
pub struct LocalReply {
    pub status: u16,
    pub headers: Headers,
    pub body: Vec<u8>,
}

/// A `dispatch_http_call` the module made.
#[derive(Debug, Clone)]
pub struct CallOut {
    pub token: u32,
    /// The context effective when it was made (Envoy delivers the answer
    /// there, and cancels it when that stream ends).
    pub context: u32,
    pub cluster: String,
    pub headers: Headers,
    pub body: Vec<u8>,
    pub timeout_ms: u64,
}

/// One stream's host-side state.
#[derive(Debug, Default)]
pub struct StreamState {
    pub req_headers: Headers,
    pub req_headers_sent: bool,
    pub req_trailers: Option<Headers>,
    /// The request body the filter sees (what it buffered so far).
    pub req_buffer: Vec<u8>,
    pub resp_headers: Headers,
    /// Response headers are readable and writable (callback or held).
    pub resp_headers_open: bool,
    pub resp_buffer: Vec<u8>,
    pub properties: HashMap<String, Vec<u8>>,
    pub local_replies: Vec<LocalReply>,
    pub resume_request: bool,
    pub resume_response: bool,
    pub reset: bool,
    pub route_cleared: u32,
}

/// The store's data: everything the host calls read and write.
pub struct State {
    pub now_ns: u64,
    pub root_id: u32,
    pub effective: u32,
    pub plugin_config: Vec<u8>,
    pub tick_ms: u64,
    pub next_tick_ns: u64,
    pub logs: Vec<(i32, String)>,
    pub shared: Rc<RefCell<Shared>>,
    /// Metric id - 1 -> name, per VM (Envoy's ids are per VM too).
    pub metric_ids: Vec<String>,
    pub streams: HashMap<u32, StreamState>,
    pub next_token: u32,
    pub new_calls: Vec<CallOut>,
    /// The answer being delivered: headers and body.
    pub call_response: Option<(Headers, Vec<u8>)>,
    /// Clusters Envoy knows (`None`: any).
    pub clusters: Option<HashSet<String>>,
    /// Imports the host does not model that the module called.
    pub unmodelled: Vec<String>,
    pub random: u64,
    pub limits: StoreLimits,
}

impl Default for State {
    fn default() -> Self {
        State {
            now_ns: 0,
            root_id: 0,
            effective: 0,
            plugin_config: Vec::new(),
            tick_ms: 0,
            next_tick_ns: 0,
            logs: Vec::new(),
            shared: Rc::default(),
            metric_ids: Vec::new(),
            streams: HashMap::new(),
            next_token: 0,
            new_calls: Vec::new(),
            call_response: None,
            clusters: None,
            unmodelled: Vec::new(),
            random: 0x2545_f491_4f6c_dd1d,
            limits: StoreLimits::default(),
        }
    }
}

impl State {
    pub fn stream(&self) -> Option<&StreamState> {
        self.streams.get(&self.effective)
    }

    pub fn stream_mut(&mut self) -> Option<&mut StreamState> {
        self.streams.get_mut(&self.effective)
    }
}

/// A module compiled in this process: its path, bytes, engine and code.
type Compiled = (PathBuf, Vec<u8>, Engine, Module);

/// The compiled module, loaded once and instantiated per VM.
#[derive(Clone)]
pub struct Plugin {
    engine: Engine,
    module: Module,
    linker: Rc<Linker<State>>,
    pub path: PathBuf,
}

impl std::fmt::Debug for Plugin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Plugin").field("path", &self.path).finish()
    }
}

/// Where the shipped module is: `$INFERMESH_WASM_DIR/infermesh.wasm`, else
/// `dist/infermesh.wasm` at the workspace root.
pub fn shipped_path() -> PathBuf {
    let dir = std::env::var_os("INFERMESH_WASM_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../../dist"));
    dir.join("infermesh.wasm")
}

impl Plugin {
    /// The module `wasm-build.sh` ships; a missing file is an error naming
    /// the command that builds it.
    pub fn shipped() -> Result<Plugin> {
        let path = shipped_path();
        if !path.exists() {
            return Err(wasmtime::Error::msg(format!(
                "{} not found: run ./wasm-build.sh (or set INFERMESH_WASM_DIR)",
                path.display()
            )));
        }
        Plugin::load(&path)
    }

    /// Loads and compiles the module at `path`; a file compiled before in
    /// this process (same path and bytes) is not compiled again.
    pub fn load(path: &Path) -> Result<Plugin> {
        static COMPILED: Mutex<Vec<Compiled>> = Mutex::new(Vec::new());
        let bytes = std::fs::read(path)
            .map_err(|e| wasmtime::Error::msg(format!("{}: {e}", path.display())))?;
        let mut compiled = COMPILED.lock().unwrap_or_else(|p| p.into_inner());
        let found = compiled
            .iter()
            .find(|(p, b, _, _)| p == path && *b == bytes)
            .map(|(_, _, e, m)| (e.clone(), m.clone()));
        let (engine, module) = match found {
            Some(em) => em,
            None => {
                let mut config = Config::new();
                config.consume_fuel(true);
                let engine = Engine::new(&config)?;
                let module = Module::new(&engine, &bytes)?;
                compiled.push((path.to_owned(), bytes, engine.clone(), module.clone()));
                (engine, module)
            }
        };
        drop(compiled);
        let mut linker = Linker::new(&engine);
        abi::link(&mut linker, &module)?;
        Ok(Plugin {
            engine,
            module,
            linker: Rc::new(linker),
            path: path.to_owned(),
        })
    }

    /// Starts a VM as Envoy does: `_initialize`, the root context,
    /// `proxy_on_vm_start`, `proxy_on_configure` with `config`.
    pub fn start(&self, config: &[u8], opts: Options) -> Result<Vm> {
        Vm::start(self, config, opts)
    }
}

/// How a VM and its Envoy behave.
#[derive(Debug, Clone)]
pub struct Options {
    /// The Wasm filter's `allow_on_headers_stop_iteration`: with it, a
    /// headers callback's StopIteration is honoured and body callbacks
    /// come while the headers are held; without it (what a WasmPlugin
    /// deploys, Envoy >= 1.35) it acts as StopAllIterationAndBuffer: no
    /// body callback until the filter resumes.
    pub allow_stop: bool,
    /// Linear memory cap (bytes); growing past it fails, so an allocation
    /// that needs more traps the VM.
    pub memory_limit: usize,
    /// Virtual wall clock at start (Unix ms).
    pub start_ms: u64,
    /// Shared with other VMs of the same "Envoy" (workers).
    pub shared: Option<Rc<RefCell<Shared>>>,
    /// Clusters Envoy knows; a callout to another one is refused.
    pub clusters: Option<Vec<String>>,
    /// Envoy's route timeout (ms): an upstream that never answers gets a
    /// local 504 after this long.
    pub route_timeout_ms: u64,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            allow_stop: false,
            memory_limit: 64 << 20,
            start_ms: 1_800_000_000_000,
            shared: None,
            clusters: None,
            route_timeout_ms: 15_000,
        }
    }
}

/// How an upstream (the routed cluster or a callout's) answers.
#[derive(Debug, Clone)]
pub enum Reply {
    Respond {
        status: u16,
        headers: Headers,
        body: Vec<u8>,
        latency_ms: u64,
    },
    /// Connection refused or reset before any response.
    Reset { latency_ms: u64 },
    /// Never answers.
    Hang,
}

impl Reply {
    pub fn ok(body: &str) -> Reply {
        Reply::status(200, body)
    }

    pub fn status(status: u16, body: &str) -> Reply {
        Reply::Respond {
            status,
            headers: vec![("content-type".into(), b"text/plain".to_vec())],
            body: body.as_bytes().to_vec(),
            latency_ms: 1,
        }
    }

    /// The same reply, answered after `ms`.
    pub fn after(self, ms: u64) -> Reply {
        match self {
            Reply::Respond {
                status,
                headers,
                body,
                ..
            } => Reply::Respond {
                status,
                headers,
                body,
                latency_ms: ms,
            },
            Reply::Reset { .. } => Reply::Reset { latency_ms: ms },
            Reply::Hang => Reply::Hang,
        }
    }
}

/// What reached an upstream: the routed request or a callout.
#[derive(Debug, Clone)]
pub struct Sent {
    /// `None` for the routed request (its cluster is the route's), the
    /// callout's cluster otherwise.
    pub cluster: Option<String>,
    /// The headers the route was picked on: the request as it arrived,
    /// unless the module cleared the route cache (then as it went out).
    pub route: Headers,
    pub headers: Headers,
    pub body: Vec<u8>,
    pub context: u32,
}

impl Sent {
    pub fn header(&self, name: &str) -> Option<String> {
        header_str(&self.headers, name)
    }

    pub fn path(&self) -> String {
        self.header(":path").unwrap_or_default()
    }
}

/// The upstreams of an exchange: answers the routed request and callouts.
pub trait Upstreams {
    fn answer(&mut self, sent: &Sent) -> Reply;
}

impl<F: FnMut(&Sent) -> Reply> Upstreams for F {
    fn answer(&mut self, sent: &Sent) -> Reply {
        self(sent)
    }
}

/// A downstream request.
#[derive(Debug, Clone, Default)]
pub struct Request {
    pub headers: Headers,
    /// The body as it arrives, chunk by chunk.
    pub chunks: Vec<Vec<u8>>,
    pub trailers: Option<Headers>,
    /// Virtual ms that pass between arriving chunks (ticks run).
    pub chunk_gap_ms: u64,
}

impl Request {
    pub fn new(method: &str, path: &str) -> Request {
        Request {
            headers: vec![
                (":method".into(), method.as_bytes().to_vec()),
                (":path".into(), path.as_bytes().to_vec()),
                (":authority".into(), b"infer.local".to_vec()),
                (":scheme".into(), b"http".to_vec()),
            ],
            ..Request::default()
        }
    }

    pub fn get(path: &str) -> Request {
        Request::new("GET", path)
    }

    pub fn post(path: &str, body: impl Into<Vec<u8>>) -> Request {
        let body = body.into();
        let mut r = Request::new("POST", path).header("content-length", body.len().to_string());
        if !body.is_empty() {
            r.chunks.push(body);
        }
        r
    }

    pub fn header(mut self, name: &str, value: impl AsRef<[u8]>) -> Request {
        self.headers
            .push((name.to_ascii_lowercase(), value.as_ref().to_vec()));
        self
    }

    pub fn body(&self) -> Vec<u8> {
        self.chunks.concat()
    }
}

/// What a downstream client observed, and what the host saw happen.
#[derive(Debug, Clone, Default)]
pub struct Exchange {
    pub status: u16,
    pub headers: Headers,
    pub body: Vec<u8>,
    /// What the routed upstream received (`None`: never forwarded).
    pub upstream: Option<Sent>,
    /// Callouts this stream made (replays, hedges).
    pub callouts: Vec<Sent>,
    /// The module answered itself (a local reply).
    pub local_reply: bool,
    /// Local replies the module sent (more than one is a defect).
    pub local_replies: usize,
    /// The stream did not end within the host's deadline.
    pub stalled: bool,
    /// Fuel the module used on this stream (its callbacks, and root ticks
    /// and callout answers while it was open).
    pub fuel: u64,
    /// Virtual ms from request to end.
    pub elapsed_ms: u64,
    /// Times the module cleared the route cache.
    pub route_cleared: u32,
}

impl Exchange {
    pub fn header(&self, name: &str) -> Option<String> {
        header_str(&self.headers, name)
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

/// A trap, or the VM refused its configuration.
#[derive(Debug)]
pub enum Failure {
    /// The module trapped (panic, OOM, bad memory access): Envoy would
    /// mark the VM failed and fail the requests.
    Trap(String),
    /// `proxy_on_configure` returned false.
    Refused { logs: Vec<String> },
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Failure::Trap(t) => write!(f, "the VM trapped: {t}"),
            Failure::Refused { logs } => write!(f, "configuration refused: {}", logs.join(" | ")),
        }
    }
}

impl std::error::Error for Failure {}

struct Exports {
    context_create: TypedFunc<(i32, i32), ()>,
    vm_start: TypedFunc<(i32, i32), i32>,
    configure: TypedFunc<(i32, i32), i32>,
    tick: TypedFunc<i32, ()>,
    request_headers: TypedFunc<(i32, i32, i32), i32>,
    request_body: TypedFunc<(i32, i32, i32), i32>,
    request_trailers: TypedFunc<(i32, i32), i32>,
    response_headers: TypedFunc<(i32, i32, i32), i32>,
    response_body: TypedFunc<(i32, i32, i32), i32>,
    call_response: TypedFunc<(i32, i32, i32, i32, i32), ()>,
    done: TypedFunc<i32, i32>,
    log: TypedFunc<i32, ()>,
    delete: TypedFunc<i32, ()>,
}

/// A pending callout answer.
struct Pending {
    call: CallOut,
    due_ns: u64,
    reply: Option<(Headers, Vec<u8>)>,
}

const FUEL: u64 = u64::MAX / 4;
/// How long (virtual) a stream may take before it counts as stalled.
const STALL_MS: u64 = 120_000;

/// One VM (one Envoy worker's instance of the plugin).
pub struct Vm {
    store: Store<State>,
    ex: Exports,
    allow_stop: bool,
    route_timeout_ms: u64,
    next_context: u32,
    pending: Vec<Pending>,
    /// Fuel used since the VM started, per the last call.
    fuel_total: u64,
    trapped: Option<String>,
    /// Every callout the VM made (probes included), in order.
    pub callouts: Vec<Sent>,
}

impl std::fmt::Debug for Vm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Vm")
            .field("trapped", &self.trapped)
            .finish()
    }
}

fn action_is_continue(a: i32) -> bool {
    a == 0
}

impl Vm {
    fn start(plugin: &Plugin, config: &[u8], opts: Options) -> Result<Vm> {
        let state = State {
            now_ns: opts.start_ms * 1_000_000,
            root_id: 1,
            effective: 1,
            plugin_config: config.to_vec(),
            shared: opts.shared.clone().unwrap_or_default(),
            clusters: opts.clusters.map(|c| c.into_iter().collect()),
            limits: StoreLimitsBuilder::new()
                .memory_size(opts.memory_limit)
                .instances(1)
                .build(),
            ..State::default()
        };
        let mut store = Store::new(&plugin.engine, state);
        store.limiter(|s| &mut s.limits);
        store.set_fuel(FUEL)?;
        let instance: Instance = plugin.linker.instantiate(&mut store, &plugin.module)?;
        let f = |store: &mut Store<State>, name: &str| {
            instance
                .get_func(&mut *store, name)
                .ok_or_else(|| wasmtime::Error::msg(format!("the module does not export {name}")))
        };
        macro_rules! typed {
            ($name:literal) => {
                f(&mut store, $name)?.typed(&store)?
            };
        }
        let ex = Exports {
            context_create: typed!("proxy_on_context_create"),
            vm_start: typed!("proxy_on_vm_start"),
            configure: typed!("proxy_on_configure"),
            tick: typed!("proxy_on_tick"),
            request_headers: typed!("proxy_on_request_headers"),
            request_body: typed!("proxy_on_request_body"),
            request_trailers: typed!("proxy_on_request_trailers"),
            response_headers: typed!("proxy_on_response_headers"),
            response_body: typed!("proxy_on_response_body"),
            call_response: typed!("proxy_on_http_call_response"),
            done: typed!("proxy_on_done"),
            log: typed!("proxy_on_log"),
            delete: typed!("proxy_on_delete"),
        };
        let init: TypedFunc<(), ()> = f(&mut store, "_initialize")?.typed(&store)?;
        let mut vm = Vm {
            store,
            ex,
            allow_stop: opts.allow_stop,
            route_timeout_ms: opts.route_timeout_ms,
            next_context: 2,
            pending: Vec::new(),
            fuel_total: 0,
            trapped: None,
            callouts: Vec::new(),
        };
        vm.call(|s, _| init.call(s, ()))?;
        let (cc, start, conf) = (
            vm.ex.context_create.clone(),
            vm.ex.vm_start.clone(),
            vm.ex.configure.clone(),
        );
        vm.call(|s, _| cc.call(s, (1, 0)))?;
        vm.call(|s, _| start.call(s, (1, 0)))?;
        let len = config.len() as i32;
        let ok = vm.call(|s, _| conf.call(s, (1, len)))?;
        if ok == 0 {
            return Err(wasmtime::Error::new(Failure::Refused {
                logs: vm.logs().into_iter().map(|(_, m)| m).collect(),
            }));
        }
        Ok(vm)
    }

    /// Runs one call into the module with `effective` as the current
    /// context, counting its fuel; a trap is kept and returned.
    fn call_in<R>(
        &mut self,
        effective: u32,
        f: impl FnOnce(&mut Store<State>, &Exports) -> wasmtime::Result<R>,
    ) -> Result<R> {
        if let Some(t) = &self.trapped {
            return Err(wasmtime::Error::new(Failure::Trap(t.clone())));
        }
        self.store.data_mut().effective = effective;
        let before = self.store.get_fuel()?;
        let out = f(&mut self.store, &self.ex);
        let after = self.store.get_fuel()?;
        self.fuel_total += before - after;
        let root = self.store.data().root_id;
        self.store.data_mut().effective = root;
        match out {
            Ok(r) => Ok(r),
            Err(e) => {
                // The SDK's panic hook logs the panic message (critical)
                // before the abort: keep it with the trap.
                let said: Vec<String> = self
                    .store
                    .data()
                    .logs
                    .iter()
                    .rev()
                    .filter(|(level, _)| *level >= 4)
                    .take(2)
                    .map(|(_, m)| m.clone())
                    .collect();
                let msg = format!("{e:?}\nmodule log: {}", said.join(" | "));
                self.trapped = Some(msg.clone());
                Err(wasmtime::Error::new(Failure::Trap(msg)))
            }
        }
    }

    fn call<R>(
        &mut self,
        f: impl FnOnce(&mut Store<State>, &Exports) -> wasmtime::Result<R>,
    ) -> Result<R> {
        let root = self.store.data().root_id;
        self.call_in(root, f)
    }

    /// Fuel used by the VM so far.
    pub fn fuel(&self) -> u64 {
        self.fuel_total
    }

    pub fn trapped(&self) -> Option<&str> {
        self.trapped.as_deref()
    }

    pub fn logs(&self) -> Vec<(i32, String)> {
        self.store.data().logs.clone()
    }

    pub fn now_ms(&self) -> u64 {
        self.store.data().now_ns / 1_000_000
    }

    pub fn shared(&self) -> Rc<RefCell<Shared>> {
        self.store.data().shared.clone()
    }

    /// Sum of the metrics `name` with all of `tags` (see
    /// `filter_core::stats`), as a scrape sees them once the module has
    /// published its counters: the module adds them up in the VM and sends
    /// them on its root tick (`COUNTER_FLUSH_MS`), so one root tick runs
    /// first, at the current time (as the test harness's `Envoy::stats`
    /// waits out the flush period).
    pub fn metric(&mut self, name: &str, tags: &[(&str, &str)]) -> i64 {
        if self.store.data().tick_ms > 0 {
            let tick = self.ex.tick.clone();
            // A trap here shows up in the next call that drives the VM.
            let _ = self.call(|s, _| tick.call(s, 1));
        }
        abi::metric_sum(&self.shared().borrow().metrics, name, tags)
    }

    /// Lets `ms` of virtual time pass: root ticks and callout answers due
    /// in that time run (probes, say).
    pub fn advance(&mut self, ms: u64, up: &mut dyn Upstreams) -> Result<()> {
        let until = self.store.data().now_ns + ms * 1_000_000;
        while self.step(until, up)? {}
        self.store.data_mut().now_ns = until;
        Ok(())
    }

    /// Runs the next event (tick or callout answer) due by `until`;
    /// false if there is none.
    fn step(&mut self, until: u64, up: &mut dyn Upstreams) -> Result<bool> {
        self.take_calls(up);
        let st = self.store.data();
        let tick = (st.tick_ms > 0).then_some(st.next_tick_ns);
        let call = self
            .pending
            .iter()
            .enumerate()
            .min_by_key(|(_, p)| (p.due_ns, p.call.token))
            .map(|(i, p)| (i, p.due_ns));
        let next = match (tick, call) {
            (Some(t), Some((_, c))) => t.min(c),
            (Some(t), None) => t,
            (None, Some((_, c))) => c,
            (None, None) => return Ok(false),
        };
        if next > until {
            return Ok(false);
        }
        let now = self.store.data().now_ns.max(next);
        self.store.data_mut().now_ns = now;
        match call {
            // A callout answer due no later than the tick goes first.
            Some((i, due)) if due == next => {
                let p = self.pending.remove(i);
                self.answer_call(p)?;
            }
            _ => {
                let st = self.store.data_mut();
                st.next_tick_ns = now + st.tick_ms * 1_000_000;
                let tick = self.ex.tick.clone();
                self.call(|s, _| tick.call(s, 1))?;
            }
        }
        self.take_calls(up);
        Ok(true)
    }

    /// Asks the upstreams for the answers to callouts just made.
    fn take_calls(&mut self, up: &mut dyn Upstreams) {
        let calls = std::mem::take(&mut self.store.data_mut().new_calls);
        let now = self.store.data().now_ns;
        for call in calls {
            let sent = Sent {
                cluster: Some(call.cluster.clone()),
                route: call.headers.clone(),
                headers: call.headers.clone(),
                body: call.body.clone(),
                context: call.context,
            };
            let reply = up.answer(&sent);
            self.callouts.push(sent);
            // Envoy answers a callout that failed (refused, reset, timed
            // out) with no headers and no body.
            let timeout_ns = call.timeout_ms.max(1) * 1_000_000;
            let (due_ns, reply) = match reply {
                Reply::Respond {
                    status,
                    mut headers,
                    body,
                    latency_ms,
                } if latency_ms * 1_000_000 < timeout_ns => {
                    headers.insert(0, (":status".into(), status.to_string().into_bytes()));
                    (now + latency_ms * 1_000_000, Some((headers, body)))
                }
                Reply::Reset { latency_ms } if latency_ms * 1_000_000 < timeout_ns => {
                    (now + latency_ms * 1_000_000, None)
                }
                _ => (now + timeout_ns, None),
            };
            self.pending.push(Pending {
                call,
                due_ns,
                reply,
            });
        }
    }

    fn answer_call(&mut self, p: Pending) -> Result<()> {
        let (nh, nb) = p
            .reply
            .as_ref()
            .map_or((0, 0), |(h, b)| (h.len() as i32, b.len() as i32));
        self.store.data_mut().call_response = p.reply;
        let f = self.ex.call_response.clone();
        let (ctx, token) = (p.call.context, p.call.token);
        // Envoy calls back the context that made the call (the SDK routes
        // the answer by token to the context that was active then).
        let target = if self.store.data().streams.contains_key(&ctx) {
            ctx
        } else {
            self.store.data().root_id
        };
        let out = self.call_in(target, |s, _| {
            f.call(s, (ctx as i32, token as i32, nh, nb, 0))
        });
        self.store.data_mut().call_response = None;
        out
    }

    fn stream_mut(&mut self, ctx: u32) -> &mut StreamState {
        self.store.data_mut().streams.entry(ctx).or_default()
    }

    /// Sends one request through the filter the way Envoy does, with `up`
    /// answering the routed request and any callouts, and returns what the
    /// client saw. `Err` only on a trap.
    pub fn exchange(&mut self, req: &Request, up: &mut dyn Upstreams) -> Result<Exchange> {
        let fuel0 = self.fuel_total;
        let t0 = self.store.data().now_ns;
        let ctx = self.next_context;
        self.next_context += 1;
        let mut d = Drive::new(ctx, req);
        self.stream_mut(ctx).req_headers = req.headers.clone();
        let cc = self.ex.context_create.clone();
        self.call(|s, _| cc.call(s, (ctx as i32, 1)))?;
        let out = self.run(&mut d, req, up);
        // End of stream: Envoy calls on_done, on_log, then on_delete, and
        // cancels the stream's callouts that are still out.
        let (done, log, delete) = (
            self.ex.done.clone(),
            self.ex.log.clone(),
            self.ex.delete.clone(),
        );
        let end = out.and_then(|()| {
            self.call_in(ctx, |s, _| done.call(s, ctx as i32))?;
            self.call_in(ctx, |s, _| log.call(s, ctx as i32))?;
            self.call(|s, _| delete.call(s, ctx as i32))
        });
        self.pending.retain(|p| p.call.context != ctx);
        let st = self
            .store
            .data_mut()
            .streams
            .remove(&ctx)
            .unwrap_or_default();
        end?;
        let mut ex = d.ex;
        ex.fuel = self.fuel_total - fuel0;
        ex.elapsed_ms = (self.store.data().now_ns - t0) / 1_000_000;
        ex.route_cleared = st.route_cleared;
        ex.callouts = self
            .callouts
            .iter()
            .filter(|c| c.context == ctx)
            .cloned()
            .collect();
        Ok(ex)
    }

    fn run(&mut self, d: &mut Drive, req: &Request, up: &mut dyn Upstreams) -> Result<()> {
        let ctx = d.ctx;
        let eos = req.chunks.is_empty() && req.trailers.is_none();
        let n = req.headers.len() as i32;
        let f = self.ex.request_headers.clone();
        let a = self.call_in(ctx, |s, _| f.call(s, (ctx as i32, n, eos as i32)))?;
        if action_is_continue(a) {
            self.request_continues(d);
        } else {
            d.req_stopped = true;
            d.stop_all = !self.allow_stop;
        }
        let deadline = self.store.data().now_ns + STALL_MS * 1_000_000;
        loop {
            if self.local_reply(d)? {
                return Ok(());
            }
            if d.finished {
                return Ok(());
            }
            self.pump_request(d, up)?;
            if self.local_reply(d)? || d.finished {
                return Ok(());
            }
            self.pump_response(d)?;
            if self.local_reply(d)? || d.finished {
                return Ok(());
            }
            // Nothing to do now: let time pass to the next event.
            let now = self.store.data().now_ns;
            if now >= deadline {
                d.ex.stalled = true;
                return Ok(());
            }
            let next = self.next_event(d).min(deadline);
            if !self.step(next, up)? {
                self.store.data_mut().now_ns = next.max(now);
            }
            self.resumes(d)?;
            if d.chunk_due_ns
                .is_some_and(|t| t <= self.store.data().now_ns)
            {
                d.chunk_due_ns = None;
            }
        }
    }

    /// The earliest time something happens for this stream.
    fn next_event(&self, d: &Drive) -> u64 {
        let st = self.store.data();
        let mut t = st.now_ns + STALL_MS * 1_000_000;
        if st.tick_ms > 0 {
            t = t.min(st.next_tick_ns);
        }
        if let Some(p) = self.pending.iter().map(|p| p.due_ns).min() {
            t = t.min(p);
        }
        if let Some(r) = d.response_due_ns {
            t = t.min(r);
        }
        if let Some(c) = d.chunk_due_ns {
            t = t.min(c);
        }
        t
    }

    /// The filter let the request headers go (Continue, or a resume).
    fn request_continues(&mut self, d: &mut Drive) {
        d.req_stopped = false;
        d.stop_all = false;
        let s = self.stream_mut(d.ctx);
        if !s.req_headers_sent {
            s.req_headers_sent = true;
            d.sent_headers = s.req_headers.clone();
            // The route was computed on the arriving headers (a filter
            // ahead, CORS or fault in Istio's chain, asked for it); it is
            // re-picked only if the module cleared the route cache: the
            // e2e canary test `a_header_set_without_clearing_the_route_
            // cache_does_not_route` shows Envoy keeping the old route.
            d.route = if s.route_cleared > 0 {
                s.req_headers.clone()
            } else {
                d.arrived.clone()
            };
        }
        let buffered = std::mem::take(&mut s.req_buffer);
        d.forwarded.extend(buffered);
    }

    /// Resumes the module asked for (from a tick or a callout answer).
    fn resumes(&mut self, d: &mut Drive) -> Result<()> {
        let s = self.stream_mut(d.ctx);
        let (rq, rs) = (
            std::mem::take(&mut s.resume_request),
            std::mem::take(&mut s.resume_response),
        );
        if rq && d.req_stopped {
            if d.stop_all {
                // StopAllIterationAndBuffer: on resume Envoy hands the
                // filter what it buffered meanwhile in one body callback.
                let merged: Vec<u8> = d.chunks.drain(..).flatten().collect();
                if !merged.is_empty() {
                    d.chunks.push_back(merged);
                }
            }
            self.request_continues(d);
        }
        if rs {
            if d.resp_held {
                d.resp_held = false;
                self.commit_response(d);
            }
            d.resp_body_held = false;
        }
        Ok(())
    }

    /// Delivers request body chunks and trailers as far as the filter
    /// lets them, and sends the request upstream when it is complete.
    fn pump_request(&mut self, d: &mut Drive, up: &mut dyn Upstreams) -> Result<()> {
        let ctx = d.ctx;
        loop {
            if d.stop_all || d.upstream_sent || self.has_local_reply(ctx) {
                return Ok(());
            }
            if d.chunk_due_ns.is_some() {
                return Ok(());
            }
            if let Some(chunk) = d.chunks.pop_front() {
                let eos = d.chunks.is_empty() && d.trailers.is_none();
                let s = self.stream_mut(ctx);
                s.req_buffer.extend(chunk);
                let size = s.req_buffer.len() as i32;
                let f = self.ex.request_body.clone();
                let a = self.call_in(ctx, |s, _| f.call(s, (ctx as i32, size, eos as i32)))?;
                if action_is_continue(a) {
                    self.request_continues(d);
                } else {
                    d.req_stopped = true;
                }
                if !d.chunks.is_empty() && d.gap_ms > 0 {
                    d.chunk_due_ns = Some(self.store.data().now_ns + d.gap_ms * 1_000_000);
                }
                continue;
            }
            if let Some(t) = d.trailers.take() {
                let n = t.len() as i32;
                self.stream_mut(ctx).req_trailers = Some(t);
                let f = self.ex.request_trailers.clone();
                let a = self.call_in(ctx, |s, _| f.call(s, (ctx as i32, n)))?;
                if action_is_continue(a) {
                    self.request_continues(d);
                } else {
                    d.req_stopped = true;
                }
                continue;
            }
            if d.req_stopped {
                return Ok(());
            }
            // The whole request went through the filter: upstream.
            let sent = Sent {
                cluster: None,
                route: d.route.clone(),
                headers: d.sent_headers.clone(),
                body: std::mem::take(&mut d.forwarded),
                context: ctx,
            };
            let reply = up.answer(&sent);
            d.ex.upstream = Some(sent);
            d.upstream_sent = true;
            let now = self.store.data().now_ns;
            let timeout = self.route_timeout_ms;
            let (due, resp) = match reply {
                Reply::Respond {
                    status,
                    mut headers,
                    body,
                    latency_ms,
                } if latency_ms < timeout => {
                    headers.insert(0, (":status".into(), status.to_string().into_bytes()));
                    (latency_ms, (headers, body, "via_upstream"))
                }
                // Envoy's own answer to a refused connection: a local 503
                // that goes through the encoder filters like any response.
                Reply::Reset { latency_ms } if latency_ms < timeout => (
                    latency_ms,
                    envoy_reply(
                        503,
                        "upstream connect error or disconnect/reset before headers. reset reason: connection failure",
                        "upstream_reset_before_response_started{connection_failure}",
                    ),
                ),
                _ => (
                    timeout,
                    envoy_reply(504, "upstream request timeout", "response_timeout"),
                ),
            };
            d.response = Some((resp.0, resp.1, resp.2.to_owned()));
            d.response_due_ns = Some(now + due * 1_000_000);
            return Ok(());
        }
    }

    /// Delivers the upstream's response when it is due.
    fn pump_response(&mut self, d: &mut Drive) -> Result<()> {
        let now = self.store.data().now_ns;
        if d.response_due_ns.is_none_or(|t| t > now) {
            return Ok(());
        }
        d.response_due_ns = None;
        let Some((headers, body, details)) = d.response.take() else {
            return Ok(());
        };
        self.response_through_filter(d, headers, body, Some(details))
    }

    /// Runs a response (upstream's, Envoy's or the module's local reply)
    /// through the filter's response callbacks.
    fn response_through_filter(
        &mut self,
        d: &mut Drive,
        headers: Headers,
        body: Vec<u8>,
        details: Option<String>,
    ) -> Result<()> {
        let ctx = d.ctx;
        let n = headers.len() as i32;
        let eos = body.is_empty();
        {
            let s = self.stream_mut(ctx);
            s.resp_headers = headers;
            s.resp_headers_open = true;
            if let Some(det) = details {
                s.properties
                    .insert("response.code_details".into(), det.into_bytes());
            }
        }
        d.resp_body = body;
        let f = self.ex.response_headers.clone();
        let a = self.call_in(ctx, |s, _| f.call(s, (ctx as i32, n, eos as i32)))?;
        if action_is_continue(a) {
            self.commit_response(d);
        } else {
            d.resp_held = true;
            if self.allow_stop {
                // With allow_on_headers_stop_iteration the body comes while
                // the headers are held.
                self.response_body(d)?;
            }
        }
        Ok(())
    }

    fn response_body(&mut self, d: &mut Drive) -> Result<()> {
        if d.resp_body_delivered {
            return Ok(());
        }
        d.resp_body_delivered = true;
        let ctx = d.ctx;
        let body = d.resp_body.clone();
        self.stream_mut(ctx).resp_buffer = body.clone();
        if body.is_empty() {
            return Ok(());
        }
        let size = body.len() as i32;
        let f = self.ex.response_body.clone();
        let a = self.call_in(ctx, |s, _| f.call(s, (ctx as i32, size, 1)))?;
        if !action_is_continue(a) {
            d.resp_body_held = true;
        }
        Ok(())
    }

    /// The response headers go downstream; the body follows.
    fn commit_response(&mut self, d: &mut Drive) {
        let s = self.stream_mut(d.ctx);
        s.resp_headers_open = false;
        let headers = s.resp_headers.clone();
        d.ex.status = header_str(&headers, ":status")
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        d.ex.headers = headers;
        d.committed = true;
    }

    fn has_local_reply(&mut self, ctx: u32) -> bool {
        !self.stream_mut(ctx).local_replies.is_empty()
    }

    /// A committed response's body goes downstream, unless the body
    /// callback holds it (then only a resume lets it out). True when the
    /// stream is over.
    fn finish(&mut self, d: &mut Drive) -> Result<bool> {
        if !d.committed || d.finished {
            return Ok(d.finished);
        }
        if !d.resp_body_delivered {
            self.response_body(d)?;
        }
        if d.resp_body_held {
            return Ok(false);
        }
        d.ex.body = self.stream_mut(d.ctx).resp_buffer.clone();
        d.finished = true;
        Ok(true)
    }

    /// Carries out a local reply the module sent (after the callback that
    /// sent it returned, as Envoy does). True when the stream is over.
    fn local_reply(&mut self, d: &mut Drive) -> Result<bool> {
        let replies = std::mem::take(&mut self.stream_mut(d.ctx).local_replies);
        let Some(first) = replies.first().cloned() else {
            return self.finish(d);
        };
        d.ex.local_replies += replies.len();
        if d.committed {
            // Too late for a reply: Envoy resets the stream.
            d.ex.status = 0;
            d.finished = true;
            return Ok(true);
        }
        d.ex.local_reply = true;
        d.response = None;
        d.response_due_ns = None;
        d.upstream_sent = true;
        d.chunks.clear();
        d.trailers = None;
        d.resp_held = false;
        d.resp_body_delivered = false;
        d.resp_body_held = false;
        let mut headers = first.headers.clone();
        headers.insert(0, (":status".into(), first.status.to_string().into_bytes()));
        headers.push((
            "content-length".into(),
            first.body.len().to_string().into_bytes(),
        ));
        // The local reply passes the encoder filters, this one included.
        self.response_through_filter(d, headers, first.body, None)?;
        if d.resp_held {
            // The module held its own reply: nothing will resume it.
            d.ex.stalled = true;
            d.finished = true;
            return Ok(true);
        }
        self.local_reply(d)
    }
}

/// A reply Envoy makes itself, with its `response.code_details`.
fn envoy_reply(status: u16, body: &str, details: &'static str) -> (Headers, Vec<u8>, &'static str) {
    (
        vec![
            (":status".into(), status.to_string().into_bytes()),
            ("content-type".into(), b"text/plain".to_vec()),
        ],
        body.as_bytes().to_vec(),
        details,
    )
}

/// The driver's view of one stream.
struct Drive {
    ctx: u32,
    ex: Exchange,
    arrived: Headers,
    route: Headers,
    sent_headers: Headers,
    chunks: std::collections::VecDeque<Vec<u8>>,
    trailers: Option<Headers>,
    gap_ms: u64,
    chunk_due_ns: Option<u64>,
    forwarded: Vec<u8>,
    req_stopped: bool,
    stop_all: bool,
    upstream_sent: bool,
    response: Option<(Headers, Vec<u8>, String)>,
    response_due_ns: Option<u64>,
    resp_body: Vec<u8>,
    resp_held: bool,
    resp_body_delivered: bool,
    resp_body_held: bool,
    committed: bool,
    finished: bool,
}

impl Drive {
    fn new(ctx: u32, req: &Request) -> Drive {
        Drive {
            ctx,
            ex: Exchange::default(),
            arrived: req.headers.clone(),
            route: req.headers.clone(),
            sent_headers: req.headers.clone(),
            chunks: req.chunks.iter().cloned().collect(),
            trailers: req.trailers.clone(),
            gap_ms: req.chunk_gap_ms,
            chunk_due_ns: None,
            forwarded: Vec::new(),
            req_stopped: false,
            stop_all: false,
            upstream_sent: false,
            response: None,
            response_due_ns: None,
            resp_body: Vec::new(),
            resp_held: false,
            resp_body_delivered: false,
            resp_body_held: false,
            committed: false,
            finished: false,
        }
    }
}
