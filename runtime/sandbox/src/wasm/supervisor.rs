//! Container supervision inside a wasm pod: init containers in order, then
//! every container concurrently, each restarted by the pod's restartPolicy
//! with the kubelet's back-off (initial delay doubling to a cap, reset after
//! ten minutes of good running). It writes the pod status on every change.
//! It must not touch host resources: the sandbox owns those.

use super::WasmSandbox;
use crate::cri_log::{self, Stream};
use crate::lifecycle::{crash_loop_back_off, should_restart, BACKOFF_RESET};
use crate::pod::ContainerPlan;
use crate::state::{ContainerState, PodPhase};
use husk_wasm::{GuestExit, GuestSpec, KillSwitch};
use std::os::fd::OwnedFd;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::watch;

/// The pod-wide stop request: once set, nothing restarts; stdin of every
/// guest is closed, and after the grace period every guest is killed.
#[derive(Clone)]
pub struct StopRequest {
    tx: Arc<watch::Sender<Option<Duration>>>,
    kill: KillSwitch,
    stdins: Arc<Mutex<Vec<(String, StdinSlot)>>>,
}

/// The write end of a guest's stdin, shared by the stop request (which
/// closes it: the guest's SIGTERM) and attached clients (who write to it).
pub(crate) type StdinSlot = Arc<Mutex<Option<OwnedFd>>>;

impl StopRequest {
    pub fn new() -> Self {
        Self {
            tx: Arc::new(watch::channel(None).0),
            kill: KillSwitch::new(),
            stdins: Arc::new(Mutex::new(Vec::new())),
        }
    }

    pub fn request(&self, grace: Duration) {
        let first = self.tx.borrow().is_none();
        if first {
            self.tx.send_replace(Some(grace));
        }
        // Closing stdin is the wasm guest's SIGTERM.
        for (_, slot) in self
            .stdins
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .drain(..)
        {
            slot.lock().unwrap_or_else(|p| p.into_inner()).take();
        }
        if grace.is_zero() {
            self.kill.kill();
        }
    }

    pub fn is_requested(&self) -> bool {
        self.tx.borrow().is_some()
    }

    async fn requested(&self) -> Duration {
        let mut rx = self.tx.subscribe();
        let got = rx
            .wait_for(|g| g.is_some())
            .await
            .map(|g| g.unwrap_or_default());
        match got {
            Ok(g) => g,
            Err(_) => std::future::pending().await,
        }
    }

    fn register_stdin(&self, container: &str, fd: OwnedFd) -> StdinSlot {
        let mut s = self.stdins.lock().unwrap_or_else(|p| p.into_inner());
        s.retain(|(c, _)| c != container);
        let slot: StdinSlot = Arc::new(Mutex::new(None));
        if !self.is_requested() {
            *slot.lock().unwrap_or_else(|p| p.into_inner()) = Some(fd);
            s.push((container.to_owned(), slot.clone()));
        }
        slot
    }
}

impl Default for StopRequest {
    fn default() -> Self {
        Self::new()
    }
}

fn pipe() -> std::io::Result<(OwnedFd, OwnedFd)> {
    nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).map_err(std::io::Error::from)
}

impl WasmSandbox {
    /// Runs the pod to its end: all containers finished for good, or a stop
    /// request honoured. Returns the final phase.
    pub async fn run(self: &Arc<Self>) -> PodPhase {
        if self.plan.cri {
            // A CRI sandbox stays up, containers coming and going, until
            // it is stopped.
            let grace = self.stop.requested().await;
            self.cri_stop_all(grace).await;
            return self.status.finish();
        }
        // The grace-period timer: once stop is requested, kill survivors
        // when the grace period runs out.
        let me = self.clone();
        tokio::spawn(async move {
            let grace = me.stop.requested().await;
            tokio::time::sleep(grace).await;
            me.stop.kill.kill();
        });

        for (i, _) in self.plan.init_containers.iter().enumerate() {
            let ok = self.supervise(true, i).await;
            if !ok {
                // The pod failed (restartPolicy Never) or is stopping: the
                // app containers never start.
                self.status.init_failed(self.stop.is_requested());
                return self.status.finish();
            }
        }
        let mut tasks = Vec::new();
        for (i, _) in self.plan.containers.iter().enumerate() {
            let me = self.clone();
            tasks.push(tokio::spawn(async move { me.supervise(false, i).await }));
        }
        for t in tasks {
            let _ = t.await;
        }
        self.status.finish()
    }

    /// Runs one container until it is done for good. For an init container,
    /// returns whether it completed successfully.
    async fn supervise(self: &Arc<Self>, init: bool, idx: usize) -> bool {
        let plan = self.plan.clone();
        let c = if init {
            &plan.init_containers[idx]
        } else {
            &plan.containers[idx]
        };
        let policy = plan.restart_policy;
        let initial = Duration::from_millis(self.config.restart.backoff_initial_ms);
        let cap = Duration::from_millis(self.config.restart.backoff_max_ms);
        let mut backoff = initial;
        let mut restarts: u32 = 0;
        loop {
            if self.stop.is_requested() {
                return false;
            }
            let started = chrono::Utc::now();
            let t0 = Instant::now();
            let log_path = self.paths.log_file(&c.name, restarts);
            self.status.with_container(init, idx, |s| {
                s.state = ContainerState::Running {
                    started_at: started,
                };
                s.ready = true;
                s.log_path = log_path.clone();
            });
            let exit = self.run_instance(c, restarts).await;
            let finished = chrono::Utc::now();
            let code = exit.code();
            self.hubs.get(&c.name).close(crate::ExecMsg::Exit { code });
            let (reason, message) = match &exit {
                GuestExit::Exited(0) => ("Completed", None),
                GuestExit::Exited(_) => ("Error", None),
                GuestExit::OutOfMemory => (
                    "OOMKilled",
                    Some(format!(
                        "linear memory grew past the limit of {} bytes",
                        c.memory_limit.unwrap_or(0)
                    )),
                ),
                GuestExit::Killed => ("Error", Some("killed".to_owned())),
                GuestExit::Trap(t) => ("Error", Some(format!("trap: {t}"))),
            };
            let terminated = ContainerState::Terminated {
                exit_code: code,
                reason: reason.into(),
                message,
                started_at: started,
                finished_at: finished,
            };
            self.status.with_container(init, idx, |s| {
                s.state = terminated.clone();
                s.ready = false;
            });
            let restart = !self.stop.is_requested() && should_restart(init, policy, code);
            if !restart {
                return code == 0;
            }
            if t0.elapsed() >= BACKOFF_RESET {
                backoff = initial;
            }
            let delay = backoff;
            self.status.with_container(init, idx, |s| {
                s.last_state = Some(terminated.clone());
                s.state = crash_loop_back_off(delay, code, &c.name);
            });
            tokio::select! {
                _ = tokio::time::sleep(delay) => {}
                _ = self.stop.requested() => return false,
            }
            backoff = (backoff * 2).min(cap);
            restarts += 1;
            self.status
                .with_container(init, idx, |s| s.restart_count = restarts);
        }
    }

    /// One run of a container: log pumps, stdin, preopens, the guest.
    async fn run_instance(self: &Arc<Self>, c: &ContainerPlan, restart: u32) -> GuestExit {
        match self.try_run_instance(c, restart).await {
            Ok(exit) => exit,
            Err(msg) => {
                tracing::warn!(container = %c.name, "{msg}");
                // Record the failure in the container's own log as well.
                let path = self.paths.log_file(&c.name, restart);
                let line = format!("{} stderr F husk: {msg}\n", cri_log::timestamp());
                if let Ok(mut f) = cri_log::open_log(&path) {
                    let _ = std::io::Write::write_all(&mut f, line.as_bytes());
                }
                GuestExit::Trap(msg)
            }
        }
    }

    async fn try_run_instance(
        self: &Arc<Self>,
        c: &ContainerPlan,
        restart: u32,
    ) -> Result<GuestExit, String> {
        let guest = self
            .guests
            .iter()
            .find(|(n, _)| n == &c.name)
            .map(|(_, g)| g.clone())
            .ok_or_else(|| format!("no compiled guest for {}", c.name))?;
        let log_path = self.paths.log_file(&c.name, restart);
        let log = cri_log::LogFile::open(&log_path, self.config.logs.rotation())?;
        let log = Arc::new(Mutex::new(log));
        let (out_r, out_w) = pipe().map_err(|e| format!("stdout pipe: {e}"))?;
        let (err_r, err_w) = pipe().map_err(|e| format!("stderr pipe: {e}"))?;
        let (in_r, in_w) = pipe().map_err(|e| format!("stdin pipe: {e}"))?;
        // Output goes to the log and to whoever is attached.
        let hub = self.hubs.get(&c.name);
        let pumps = [(out_r, Stream::Stdout), (err_r, Stream::Stderr)].map(|(fd, s)| {
            let log = log.clone();
            let src = crate::attach::Tee {
                inner: std::fs::File::from(fd),
                hub: hub.clone(),
                stderr: matches!(s, Stream::Stderr),
            };
            std::thread::spawn(move || cri_log::pump(src, s, log))
        });
        let slot = self.stop.register_stdin(&c.name, in_w);
        hub.connect(crate::attach::pipe_writer(slot), None);
        let preopens = {
            let mut res = self.resources.lock().unwrap_or_else(|p| p.into_inner());
            res.volumes.preopens_for(c).map_err(|e| e.to_string())?
        };
        let spec = self.guest_spec(c, preopens, in_r, out_w, err_w);
        let kill = self.stop.kill.clone();
        let result = self.engine.run(&guest, spec, &kill).await;
        // The guest's pipe ends are closed with its store; wait until the
        // pumps have written everything.
        let _ = tokio::task::spawn_blocking(move || {
            for p in pumps {
                let _ = p.join();
            }
        })
        .await;
        if let Ok(GuestExit::Trap(t)) = &result {
            // Said where the container's output goes (its log, and a
            // foreground `husk run`'s stderr), not only in its status.
            let ts = cri_log::timestamp();
            let mut text = String::new();
            for (i, l) in t.lines().enumerate() {
                let head = if i == 0 {
                    "husk: the guest trapped: "
                } else {
                    "  "
                };
                text.push_str(&format!("{ts} stderr F {head}{l}\n"));
            }
            let _ = log
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .append(text.as_bytes());
        }
        result.map_err(|e| e.to_string())
    }

    /// What a container's guest is given: its argv, env (HOSTNAME and PWD
    /// first, as the kubelet sets them), preopens, stdio and limits.
    pub(super) fn guest_spec(
        &self,
        c: &ContainerPlan,
        preopens: Vec<husk_wasm::Preopen>,
        stdin: OwnedFd,
        stdout: OwnedFd,
        stderr: OwnedFd,
    ) -> GuestSpec {
        let mut env: Vec<(String, String)> =
            vec![("HOSTNAME".into(), self.plan.hostname().to_owned())];
        if let Some(wd) = &c.working_dir {
            env.push(("PWD".into(), wd.clone()));
        }
        env.extend(c.env.iter().map(|e| (e.name.clone(), e.value.clone())));
        GuestSpec {
            args: c.argv.clone(),
            env,
            preopens,
            cwd: c.working_dir.clone(),
            stdin: Some(stdin),
            stdout: std::fs::File::from(stdout),
            stderr: std::fs::File::from(stderr),
            memory_limit: c.memory_limit,
            network: true,
            listen_ports: c
                .ports
                .iter()
                .filter(|p| p.protocol.eq_ignore_ascii_case("TCP"))
                .map(|p| p.container_port)
                .collect(),
            max_handles: guest_handles(if self.plan.cri {
                8
            } else {
                self.plan.all_containers().count()
            }),
        }
    }
}

/// Handles one of `containers` guests may hold: a share of the monitor's
/// descriptor limit (1024 kept for the monitor itself: its control socket,
/// logs, pipes), at most 4096 each. A guest that opens files until it
/// fails is stopped there, and the monitor still answers (#22 item 2).
pub(crate) fn guest_handles(containers: usize) -> usize {
    let mut lim = libc::rlimit {
        rlim_cur: 1024,
        rlim_max: 1024,
    };
    // SAFETY: getrlimit fills the struct it is given.
    unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) };
    let limit = lim.rlim_cur;
    let share = (limit.saturating_sub(1024) / containers.max(4) as u64) as usize;
    share.clamp(64, 4096)
}
