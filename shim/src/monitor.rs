//! The per-pod monitor (`husk monitor --id ID`, started by the CLI, never by
//! users). One process per pod that outlives its caller: it reads the full
//! pod plan on stdin (secrets never touch the disk), creates the sandbox,
//! reports `{"ok":true}` or `{"error":…}` as one line on stdout, then serves
//! the control socket until the pod ends, releases every host resource and
//! exits.

use crate::control::{Reply, Request};
use husk_sandbox::config::HuskConfig;
use husk_sandbox::pod::PodPlan;
use husk_sandbox::state::{PodRecord, PodStatus, Roots};
use husk_sandbox::{Failure, Sandbox, SandboxError, VmSandbox, WasmSandbox};
use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt};

fn report(out: &mut std::fs::File, v: serde_json::Value) {
    let mut line = v.to_string();
    line.push('\n');
    let _ = out.write_all(line.as_bytes());
    let _ = out.flush();
}

/// The descriptor limit's soft value up to its hard one (as Go programs
/// such as containerd do at start): wasm guests get a share of it, the
/// rest keeps the monitor answering.
fn raise_nofile_limit() {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit on a local struct.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 && lim.rlim_cur < lim.rlim_max {
            lim.rlim_cur = lim.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
        }
    }
}

/// Runs the monitor; returns the process exit code.
pub fn main(roots: &Roots, id: &str) -> i32 {
    raise_nofile_limit();
    // The ready line goes to the original stdout; everything else to the log.
    // SAFETY: dup of our own stdout fd; the result is owned by the File.
    let ready_fd = unsafe { libc::dup(1) };
    if ready_fd < 0 {
        return 1;
    }
    // SAFETY: `ready_fd` is a fresh fd we own.
    let mut ready = unsafe { <std::fs::File as std::os::fd::FromRawFd>::from_raw_fd(ready_fd) };
    let paths = roots.pod(id);
    if let Ok(log) = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o600)
        .open(paths.monitor_log())
    {
        // SAFETY: dup2 onto stdout/stderr of this process; `log` stays valid
        // for the call.
        unsafe {
            libc::dup2(log.as_raw_fd(), 1);
            libc::dup2(log.as_raw_fd(), 2);
        }
    }
    crate::diag::init_tracing();
    // The pod's lock, held until this process ends: from here on the pod
    // has a live monitor for everyone who looks. A pod that `husk rm`
    // holds, or removed already, is not started.
    let _lock = match husk_sandbox::state::PodLock::take(&paths) {
        Ok(l) => l,
        Err(e) => {
            report(
                &mut ready,
                serde_json::json!({ "error": format!("pod {id}: {e}") }),
            );
            return 1;
        }
    };
    if !paths.record().exists() {
        report(
            &mut ready,
            serde_json::json!({ "error": format!("pod {id} was removed before its monitor started") }),
        );
        return 1;
    }

    let mut input = String::new();
    if let Err(e) = std::io::stdin().read_to_string(&mut input) {
        report(
            &mut ready,
            serde_json::json!({ "error": format!("cannot read the pod plan: {e}") }),
        );
        return 1;
    }
    let plan: PodPlan = match serde_json::from_str(&input) {
        Ok(p) => p,
        Err(e) => {
            report(
                &mut ready,
                serde_json::json!({ "error": format!("bad pod plan: {e}") }),
            );
            return 1;
        }
    };
    drop(input);
    let config = match HuskConfig::load(&roots.config_file()) {
        Ok(c) => c,
        Err(e) => {
            report(&mut ready, serde_json::json!({ "error": e.to_string() }));
            return 1;
        }
    };
    let record = PodRecord::load(&paths).ok();
    let sandbox = match PodSandbox::create(plan, paths.clone(), config, roots) {
        Ok(s) => s,
        Err(e) => {
            tracing::error!("sandbox creation failed: {e}");
            report(
                &mut ready,
                serde_json::json!({ "error": e.to_string(), "bad_input": e.is_bad_input() }),
            );
            return 1;
        }
    };
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .thread_name("husk-pod")
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            sandbox.teardown();
            report(
                &mut ready,
                serde_json::json!({ "error": format!("runtime: {e}") }),
            );
            return 1;
        }
    };
    let socket = paths.socket();
    let _ = std::fs::remove_file(&socket);
    let listener = {
        let _guard = rt.enter();
        tokio::net::UnixListener::bind(&socket)
    };
    let listener = match listener {
        Ok(l) => l,
        Err(e) => {
            sandbox.teardown();
            report(
                &mut ready,
                serde_json::json!({ "error": format!("{}: {e}", socket.display()) }),
            );
            return 1;
        }
    };
    report(
        &mut ready,
        serde_json::json!({ "ok": true, "podIP": sandbox.status().pod_ip, "pid": std::process::id() }),
    );
    drop(ready);

    let sb = sandbox.clone();
    let record_paths = paths.clone();
    rt.block_on(async move {
        let server = tokio::spawn(serve(listener, sb.as_dyn(), record_paths));
        let signals = tokio::spawn(on_signals(sb.as_dyn()));
        let phase = sb.run().await;
        tracing::info!(?phase, "pod finished");
        server.abort();
        signals.abort();
    });
    rt.shutdown_timeout(Duration::from_secs(2));
    let _ = std::fs::remove_file(&socket);
    sandbox.teardown();
    // A network whose release failed (a CNI DEL that errs) keeps its
    // record in the run dir, and the pod is kept, so that `husk rm`
    // retries the release instead of losing what is left to release.
    let network_left = paths.network_record().exists();
    if network_left {
        tracing::error!(
            "pod {}: its network was not released (see above); `husk rm` retries it",
            paths.id
        );
    } else {
        let _ = std::fs::remove_dir_all(&paths.run);
    }
    // Marking the pod finished is the monitor's last act: `husk rm` (and
    // anyone waiting for the pod) may remove its state from then on, and
    // must not race the monitor's own cleanup.
    if !network_left && record.is_some_and(|r| r.auto_remove) {
        let _ = std::fs::remove_dir_all(&paths.lib);
    } else {
        let mut st: PodStatus = sandbox.status();
        st.finished = true;
        st.monitor_pid = None;
        let _ = st.save(&paths);
    }
    0
}

/// The pod's sandbox, of the kind its runtime class names.
#[derive(Clone)]
enum PodSandbox {
    Wasm(Arc<WasmSandbox>),
    Vm(Arc<VmSandbox>),
}

impl PodSandbox {
    fn create(
        plan: PodPlan,
        paths: husk_sandbox::state::PodPaths,
        config: HuskConfig,
        roots: &Roots,
    ) -> Result<Self, SandboxError> {
        if plan.runtime_class == husk_sandbox::pod::manifest::RUNTIME_VM {
            VmSandbox::create(plan, paths, config, &roots.cni_dir()).map(PodSandbox::Vm)
        } else {
            WasmSandbox::create(plan, paths, config, &roots.wasm_cache(), &roots.cni_dir())
                .map(PodSandbox::Wasm)
        }
    }

    fn as_dyn(&self) -> Arc<dyn Sandbox> {
        match self {
            PodSandbox::Wasm(s) => s.clone(),
            PodSandbox::Vm(s) => s.clone(),
        }
    }

    fn status(&self) -> PodStatus {
        self.as_dyn().status()
    }

    async fn run(&self) -> husk_sandbox::state::PodPhase {
        match self {
            PodSandbox::Wasm(s) => s.run().await,
            PodSandbox::Vm(s) => s.run().await,
        }
    }

    fn teardown(&self) {
        match self {
            PodSandbox::Wasm(s) => s.teardown(),
            PodSandbox::Vm(s) => s.teardown(),
        }
    }
}

async fn on_signals(sb: Arc<dyn Sandbox>) {
    use tokio::signal::unix::{signal, SignalKind};
    let Ok(mut term) = signal(SignalKind::terminate()) else {
        return;
    };
    let Ok(mut int) = signal(SignalKind::interrupt()) else {
        return;
    };
    loop {
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
        sb.request_stop(Duration::from_secs(sb.plan().grace_period_secs));
    }
}

/// Carries an interactive exec over a control connection: stdin lines in,
/// output lines out, until the command's exit (or the caller leaves, which
/// ends the command).
async fn exec_stream(
    session: husk_sandbox::ExecSession,
    mut lines: tokio::io::Lines<tokio::io::BufReader<tokio::net::unix::OwnedReadHalf>>,
    mut w: tokio::net::unix::OwnedWriteHalf,
) {
    use husk_sandbox::ExecMsg;
    let husk_sandbox::ExecSession {
        output: rx,
        stdin,
        resize,
        kill,
    } = session;
    let (otx, mut orx) = tokio::sync::mpsc::unbounded_channel::<ExecMsg>();
    std::thread::spawn(move || {
        while let Ok(m) = rx.recv() {
            if otx.send(m).is_err() {
                break;
            }
        }
    });
    let stdin = Arc::new(stdin);
    let input = tokio::spawn(async move {
        while let Ok(Some(line)) = lines.next_line().await {
            match serde_json::from_str::<ExecMsg>(&line) {
                Ok(ExecMsg::Stdin { data, eof }) => {
                    let s = stdin.clone();
                    let _ = tokio::task::spawn_blocking(move || s(&data, eof)).await;
                }
                Ok(ExecMsg::Resize { rows, cols }) => {
                    let _ = resize(husk_sandbox::TtySize { rows, cols });
                }
                _ => {}
            }
        }
        // The caller is gone: so is the command.
        tracing::info!("an exec's caller left; ending its command");
        kill();
    });
    while let Some(m) = orx.recv().await {
        let last = matches!(m, ExecMsg::Exit { .. } | ExecMsg::Error { .. });
        let mut out = serde_json::to_vec(&m).expect("json");
        out.push(b'\n');
        if w.write_all(&out).await.is_err() || last {
            break;
        }
    }
    input.abort();
}

/// Runs a blocking sandbox call off the runtime's threads.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, Failure> + Send + 'static,
) -> Result<T, Failure> {
    tokio::task::spawn_blocking(f)
        .await
        .unwrap_or_else(|e| Err(format!("monitor task: {e}").into()))
}

fn reply_of(r: Result<(), Failure>) -> Reply {
    match r {
        Ok(()) => Reply::ok(),
        Err(e) => Reply::failed(e),
    }
}

async fn serve(
    listener: tokio::net::UnixListener,
    sb: Arc<dyn Sandbox>,
    paths: husk_sandbox::state::PodPaths,
) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let (sb, paths) = (sb.clone(), paths.clone());
        tokio::spawn(async move {
            let (r, mut w) = stream.into_split();
            let mut lines = tokio::io::BufReader::new(r).lines();
            let Ok(Some(line)) = lines.next_line().await else {
                return;
            };
            let reply = match serde_json::from_str::<Request>(&line) {
                Ok(Request::Stop { grace_secs }) => {
                    let grace = grace_secs.unwrap_or(sb.plan().grace_period_secs);
                    sb.request_stop(Duration::from_secs(grace));
                    Reply::ok()
                }
                Ok(Request::Status) => Reply {
                    status: serde_json::to_value(sb.status()).ok(),
                    ..Reply::ok()
                },
                Ok(Request::Exec {
                    container,
                    argv,
                    timeout_secs,
                }) => {
                    let sb = sb.clone();
                    let timeout = Duration::from_secs(timeout_secs.max(1));
                    match blocking(move || sb.exec(container.as_deref(), argv, timeout)).await {
                        Ok(out) => Reply {
                            exec: Some(out),
                            ..Reply::ok()
                        },
                        Err(e) => Reply::failed(e),
                    }
                }
                Ok(r @ (Request::ExecStream { .. } | Request::AttachStream { .. })) => {
                    let sb = sb.clone();
                    let open = move || match r {
                        Request::ExecStream { container, spec } => {
                            sb.exec_interactive(container.as_deref(), spec)
                        }
                        Request::AttachStream { id } => sb.attach(&id),
                        _ => Err("internal: not a stream".into()),
                    };
                    match blocking(open).await {
                        Ok(session) => {
                            let mut out = serde_json::to_vec(&Reply::ok()).expect("json");
                            out.push(b'\n');
                            if w.write_all(&out).await.is_ok() {
                                exec_stream(session, lines, w).await;
                            } else {
                                (session.kill)();
                            }
                            return;
                        }
                        Err(e) => Reply::failed(e),
                    }
                }
                Ok(Request::Update {
                    container,
                    memory_bytes,
                    cpu_millis,
                }) => {
                    let sb = sb.clone();
                    match blocking(move || {
                        sb.update(container.as_deref(), memory_bytes, cpu_millis)
                    })
                    .await
                    {
                        Ok(()) => Reply::ok(),
                        Err(e) => Reply::failed(e),
                    }
                }
                Ok(Request::UpdateVolume { volume, files }) => {
                    let (sb, paths) = (sb.clone(), paths.clone());
                    // The pod's record follows (secret bytes left out), so
                    // that `husk inspect` shows what the pod now has.
                    let update = move || {
                        sb.update_volume(&volume, &files)?;
                        let mut rec = PodRecord::load(&paths).map_err(|e| e.to_string())?;
                        rec.plan.set_volume_files(&volume, files);
                        rec.save(&paths).map_err(|e| e.to_string())?;
                        Ok(())
                    };
                    match blocking(update).await {
                        Ok(()) => Reply::ok(),
                        Err(e) => Reply::failed(e),
                    }
                }
                Ok(Request::CreateContainer {
                    container,
                    volumes,
                    meta,
                }) => {
                    let sb = sb.clone();
                    match blocking(move || sb.create_container(*container, volumes, meta)).await {
                        Ok(id) => Reply {
                            id: Some(id),
                            ..Reply::ok()
                        },
                        Err(e) => Reply::failed(e),
                    }
                }
                Ok(Request::StartContainer { id }) => {
                    let sb = sb.clone();
                    reply_of(blocking(move || sb.start_container(&id)).await)
                }
                Ok(Request::StopContainer { id, timeout_secs }) => {
                    let sb = sb.clone();
                    let t = Duration::from_secs(timeout_secs);
                    reply_of(blocking(move || sb.stop_container(&id, t)).await)
                }
                Ok(Request::RemoveContainer { id }) => {
                    let sb = sb.clone();
                    reply_of(blocking(move || sb.remove_container(&id)).await)
                }
                Ok(Request::ReopenLog { id }) => {
                    let sb = sb.clone();
                    reply_of(blocking(move || sb.reopen_log(&id)).await)
                }
                Ok(Request::Stats) => {
                    let sb = sb.clone();
                    match blocking(move || sb.stats()).await {
                        Ok(st) => Reply {
                            stats: Some(st),
                            ..Reply::ok()
                        },
                        Err(e) => Reply::failed(e),
                    }
                }
                Err(e) => Reply::err(format!("bad request: {e}")),
            };
            let mut out = serde_json::to_vec(&reply).expect("json");
            out.push(b'\n');
            let _ = w.write_all(&out).await;
        });
    }
}
