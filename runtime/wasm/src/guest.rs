//! Running one guest: builds its WASI context from a [`GuestSpec`] (only the
//! capabilities listed there), instantiates it in a fresh store with a memory
//! cap, and drives it to an exit, an out-of-memory stop or a kill. It must not
//! decide restarts or touch pod state: that is the sandbox's job.

use crate::p1sock::{P1Sockets, SockHost};
use crate::{CompiledGuest, WasmEngine, WasmError};
use std::fs::File;
use std::path::PathBuf;
use tokio::sync::watch;
use wasmtime::component::ResourceTable;
use wasmtime::{ResourceLimiter, Store};
use wasmtime_wasi::cli::{AsyncStdinStream, OutputFile};
use wasmtime_wasi::p1::WasiP1Ctx;
use wasmtime_wasi::{FsPerms, I32Exit, WasiCtx, WasiCtxBuilder, WasiCtxView, WasiView};

/// A host directory made visible to the guest under `guest` path.
#[derive(Debug, Clone)]
pub struct Preopen {
    pub host: PathBuf,
    pub guest: String,
    pub read_only: bool,
}

/// Everything a guest is given. Nothing outside it is reachable.
#[derive(Debug)]
pub struct GuestSpec {
    /// argv, argv[0] included.
    pub args: Vec<String>,
    pub env: Vec<(String, String)>,
    pub preopens: Vec<Preopen>,
    /// Initial working directory reported to the guest (`wasi:cli`
    /// initial-cwd). Relative paths resolve against a preopen named `.`.
    pub cwd: Option<String>,
    /// Read end of the guest's stdin; end of file is the stop request.
    pub stdin: Option<std::os::fd::OwnedFd>,
    pub stdout: File,
    pub stderr: File,
    /// Cap on each linear memory, in bytes.
    pub memory_limit: Option<u64>,
    /// Whether the guest may use TCP/UDP sockets (in the process's netns).
    pub network: bool,
    /// TCP ports a p1 module gets as preopened listening sockets, at fd 3,
    /// 4, … in this order (`wasmtime run --tcplisten`); `LISTEN_FDS` tells
    /// the guest how many. Components bind their own sockets and ignore it.
    pub listen_ports: Vec<u16>,
    /// Most handles (open files, sockets, streams, …) the guest may hold at
    /// once: each is a host resource of the process that runs it, so a guest
    /// must run out well before that process does. One more traps the
    /// guest.
    pub max_handles: usize,
}

/// How a guest ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GuestExit {
    /// The guest returned or called exit.
    Exited(i32),
    /// The guest tried to grow a memory past its limit and was stopped.
    OutOfMemory,
    /// The kill switch fired.
    Killed,
    /// The guest trapped (unreachable, out-of-bounds access …).
    Trap(String),
}

impl GuestExit {
    /// The exit code a container runtime reports: 137 for OOM and kill (as
    /// for SIGKILL), 134 for a trap (as `wasmtime run` does).
    pub fn code(&self) -> i32 {
        match self {
            GuestExit::Exited(c) => *c,
            GuestExit::OutOfMemory | GuestExit::Killed => 137,
            GuestExit::Trap(_) => 134,
        }
    }
}

/// Stops a running guest at once, even inside a busy loop or a blocking
/// WASI call (the guest's future is dropped).
#[derive(Clone, Debug)]
pub struct KillSwitch {
    tx: std::sync::Arc<watch::Sender<bool>>,
}

impl Default for KillSwitch {
    fn default() -> Self {
        Self::new()
    }
}

impl KillSwitch {
    pub fn new() -> Self {
        let (tx, _) = watch::channel(false);
        Self {
            tx: std::sync::Arc::new(tx),
        }
    }

    pub fn kill(&self) {
        self.tx.send_replace(true);
    }

    pub fn is_killed(&self) -> bool {
        *self.tx.borrow()
    }

    async fn fired(&self) {
        let mut rx = self.tx.subscribe();
        let _ = rx.wait_for(|k| *k).await;
    }
}

#[derive(Default)]
struct MemoryCap {
    limit: Option<usize>,
    exceeded: bool,
}

impl ResourceLimiter for MemoryCap {
    fn memory_growing(
        &mut self,
        _current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        match self.limit {
            Some(limit) if desired > limit => {
                self.exceeded = true;
                wasmtime::bail!("memory limit of {limit} bytes exceeded (wanted {desired})")
            }
            _ => Ok(true),
        }
    }

    fn table_growing(
        &mut self,
        _current: usize,
        _desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        Ok(true)
    }
}

struct P1State {
    wasi: WasiP1Ctx,
    cap: MemoryCap,
    socks: P1Sockets,
}

impl SockHost for P1State {
    fn socks(&mut self) -> &mut P1Sockets {
        &mut self.socks
    }
}

struct P2State {
    wasi: WasiCtx,
    table: ResourceTable,
    cap: MemoryCap,
}

impl WasiView for P2State {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView {
            ctx: &mut self.wasi,
            table: &mut self.table,
        }
    }
}

fn setup_err(what: &str, e: impl std::fmt::Display) -> WasmError {
    WasmError::Setup {
        what: what.to_owned(),
        reason: e.to_string(),
    }
}

/// The WASI context for `spec`. `placeholders` empty read-only preopens of
/// `placeholder_dir` come first: they back the p1 socket fds.
fn build_ctx(
    spec: GuestSpec,
    placeholders: usize,
    placeholder_dir: &std::path::Path,
) -> Result<(WasiCtxBuilder, MemoryCap), WasmError> {
    let mut b = WasiCtxBuilder::new();
    b.args(&spec.args);
    b.envs(&spec.env);
    if placeholders > 0 {
        b.env("LISTEN_FDS", placeholders.to_string());
    }
    for _ in 0..placeholders {
        b.preopened_dir(
            placeholder_dir,
            crate::p1sock::PLACEHOLDER_GUEST_PATH,
            FsPerms::ReadOnly,
        )
        .map_err(|e| setup_err("socket placeholder", format!("{e:#}")))?;
    }
    for p in &spec.preopens {
        let perms = if p.read_only {
            FsPerms::ReadOnly
        } else {
            FsPerms::ReadWrite
        };
        b.preopened_dir(&p.host, &p.guest, perms).map_err(|e| {
            setup_err(
                &format!("preopen {} as {}", p.host.display(), p.guest),
                format!("{e:#}"),
            )
        })?;
    }
    if let Some(cwd) = &spec.cwd {
        b.initial_cwd(cwd);
    }
    if let Some(fd) = spec.stdin {
        let rx = tokio::net::unix::pipe::Receiver::from_owned_fd(fd)
            .map_err(|e| setup_err("stdin pipe", e))?;
        b.stdin(AsyncStdinStream::new(rx));
    }
    b.stdout(OutputFile::new(spec.stdout));
    b.stderr(OutputFile::new(spec.stderr));
    if spec.network {
        b.inherit_network();
        b.allow_tcp(true);
        b.allow_udp(true);
        b.allow_ip_name_lookup(true);
    } else {
        b.allow_tcp(false);
        b.allow_udp(false);
    }
    let cap = MemoryCap {
        limit: spec
            .memory_limit
            .map(|l| usize::try_from(l).unwrap_or(usize::MAX)),
        exceeded: false,
    };
    Ok((b, cap))
}

fn classify(err: wasmtime::Error, oom: bool) -> GuestExit {
    if let Some(exit) = err.downcast_ref::<I32Exit>() {
        return GuestExit::Exited(exit.0);
    }
    if oom {
        return GuestExit::OutOfMemory;
    }
    GuestExit::Trap(format!("{err:#}"))
}

impl WasmEngine {
    /// Runs `guest` with `spec` until it ends or `kill` fires.
    pub async fn run(
        &self,
        guest: &CompiledGuest,
        spec: GuestSpec,
        kill: &KillSwitch,
    ) -> Result<GuestExit, WasmError> {
        if kill.is_killed() {
            return Ok(GuestExit::Killed);
        }
        let socks = match guest {
            CompiledGuest::Module(_) if !spec.listen_ports.is_empty() => {
                P1Sockets::listen(&spec.listen_ports).map_err(|e| setup_err("ports", e))?
            }
            _ => P1Sockets::default(),
        };
        let placeholders = socks.len();
        let spec_max_handles = spec.max_handles;
        let (mut builder, cap) = build_ctx(spec, placeholders, &self.placeholder_dir)?;
        let work = async {
            match guest {
                CompiledGuest::Module(module) => {
                    let mut store = Store::new(
                        &self.engine,
                        P1State {
                            wasi: {
                                let mut w = builder.build_p1();
                                w.ctx().table.set_max_capacity(spec_max_handles);
                                w
                            },
                            cap,
                            socks,
                        },
                    );
                    store.limiter(|s| &mut s.cap);
                    store.set_epoch_deadline(1);
                    store.epoch_deadline_async_yield_and_update(1);
                    let mut linker = wasmtime::Linker::<P1State>::new(&self.engine);
                    wasmtime_wasi::p1::add_to_linker_async(&mut linker, |s| &mut s.wasi)
                        .map_err(|e| setup_err("WASI p1 linker", e))?;
                    let result = async {
                        if placeholders > 0 {
                            crate::p1sock::install(self, &mut linker, &mut store).await?;
                        }
                        let instance = linker.instantiate_async(&mut store, module).await?;
                        if placeholders > 0 {
                            crate::p1sock::attach_memory(self, &mut linker, &mut store, &instance)
                                .await?;
                        }
                        let start = instance
                            .get_typed_func::<(), ()>(&mut store, "_start")
                            .map_err(|_| {
                                wasmtime::format_err!("the module exports no `_start` function (is it a WASI command?)")
                            })?;
                        start.call_async(&mut store, ()).await
                    }
                    .await;
                    Ok(match result {
                        Ok(()) => GuestExit::Exited(0),
                        Err(e) => classify(e, store.data().cap.exceeded),
                    })
                }
                CompiledGuest::Component(component) => {
                    let mut store = Store::new(
                        &self.engine,
                        P2State {
                            wasi: builder.build(),
                            table: {
                                let mut t = ResourceTable::new();
                                t.set_max_capacity(spec_max_handles);
                                t
                            },
                            cap,
                        },
                    );
                    store.limiter(|s| &mut s.cap);
                    store.set_epoch_deadline(1);
                    store.epoch_deadline_async_yield_and_update(1);
                    let mut linker = wasmtime::component::Linker::<P2State>::new(&self.engine);
                    wasmtime_wasi::p2::add_to_linker_async(&mut linker)
                        .map_err(|e| setup_err("WASI p2 linker", e))?;
                    let result = async {
                        let command = wasmtime_wasi::p2::bindings::Command::instantiate_async(
                            &mut store, component, &linker,
                        )
                        .await?;
                        command.wasi_cli_run().call_run(&mut store).await
                    }
                    .await;
                    Ok(match result {
                        Ok(Ok(())) => GuestExit::Exited(0),
                        Ok(Err(())) => GuestExit::Exited(1),
                        Err(e) => classify(e, store.data().cap.exceeded),
                    })
                }
            }
        };
        tokio::select! {
            r = work => r,
            _ = kill.fired() => Ok(GuestExit::Killed),
        }
    }
}
