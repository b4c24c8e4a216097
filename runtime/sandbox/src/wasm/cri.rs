//! Containers that a CRI client (huskd) creates, starts, stops and removes
//! one at a time in a wasm pod sandbox. They never restart (under CRI the
//! kubelet decides that), their log goes where the client said, in the CRI
//! format, and their records live in the pod's status beside the
//! manifest's containers. The host resources stay the sandbox's.

use super::WasmSandbox;
use crate::attach::{AttachHub, Tee};
use crate::cri_log::{self, Stream};
use crate::pod::{ContainerPlan, VolumePlan, VolumeSource};
use crate::state::{CriContainer, CriMeta, CriState};
use husk_wasm::{CompiledGuest, GuestExit, KillSwitch};
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::watch;

/// How long a killed guest may take to go (its future is dropped at once;
/// this only bounds the log pumps).
const KILL_WAIT: Duration = Duration::from_secs(10);

pub(crate) struct CriEntry {
    plan: Arc<ContainerPlan>,
    guest: CompiledGuest,
    kill: KillSwitch,
    /// The write end of the guest's stdin: dropping it is the guest's
    /// SIGTERM. Attached clients write through it.
    stdin: Arc<Mutex<Option<OwnedFd>>>,
    hub: Arc<AttachHub>,
    log: Option<Arc<Mutex<cri_log::LogFile>>>,
    exited: Arc<watch::Sender<bool>>,
}

fn pipe() -> Result<(OwnedFd, OwnedFd), String> {
    nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).map_err(|e| format!("pipe: {e}"))
}

/// Waits until `exited` says so, or `limit` passes; true when it did.
async fn wait_exit(mut rx: watch::Receiver<bool>, limit: Duration) -> bool {
    tokio::time::timeout(limit, rx.wait_for(|e| *e))
        .await
        .is_ok_and(|r| r.is_ok())
}

impl WasmSandbox {
    pub(super) fn cri_create(
        &self,
        mut c: ContainerPlan,
        volumes: Vec<VolumePlan>,
        meta: CriMeta,
    ) -> Result<String, crate::Failure> {
        if !self.plan.cri {
            return Err(crate::Failure::new(
                crate::Code::FailedPrecondition,
                format!(
                    "pod {} was run from a manifest; its containers cannot be changed one by one",
                    self.plan.name
                ),
            ));
        }
        if self.cri_closed.load(Ordering::SeqCst) || self.stop.is_requested() {
            return Err(crate::Failure::new(
                crate::Code::FailedPrecondition,
                format!("pod sandbox {} is stopped", self.paths.id),
            ));
        }
        self.status.get().cri_name_free(&meta)?;
        let id = format!(
            "{}{}",
            self.paths.id,
            hex::encode(rand::random::<[u8; 4]>())
        );
        let (guest, _) = self
            .engine
            .load(&c.image)
            .map_err(|e| format!("container {:?}: {e}", meta.name))?;
        {
            let mut res = self.resources.lock().unwrap_or_else(|p| p.into_inner());
            let r = self.cri_volumes(&id, &mut c, &volumes, &mut res.volumes);
            if let Err(e) = r {
                res.volumes.forget_prefixed(&format!("{id}/"));
                return Err(e);
            }
        }
        let (tx, _) = watch::channel(false);
        self.cri.lock().unwrap_or_else(|p| p.into_inner()).insert(
            id.clone(),
            CriEntry {
                plan: Arc::new(c),
                guest,
                kill: KillSwitch::new(),
                stdin: Arc::new(Mutex::new(None)),
                hub: Arc::new(AttachHub::default()),
                log: None,
                exited: Arc::new(tx),
            },
        );
        let rec = CriContainer::created(id.clone(), meta);
        self.status.update(|st| st.cri_containers.push(rec));
        Ok(id)
    }

    /// Sets up container `id`'s host volumes (a CRI client's directories
    /// and files) under names of its own, and points its mounts at them.
    /// Files are grouped by the directory they go into, each group a
    /// directory volume of its own (see
    /// [`PodVolumes::add_host_files`](crate::volume::PodVolumes::add_host_files)).
    fn cri_volumes(
        &self,
        id: &str,
        c: &mut ContainerPlan,
        volumes: &[VolumePlan],
        pod_volumes: &mut crate::volume::PodVolumes,
    ) -> Result<(), crate::Failure> {
        let invalid = |msg: String| crate::Failure::new(crate::Code::InvalidArgument, msg);
        let mut files = std::collections::BTreeMap::new();
        for v in volumes {
            let VolumeSource::HostPath { path, .. } = &v.source else {
                continue;
            };
            if path.is_file() {
                files.insert(v.name.clone(), path.clone());
            } else {
                pod_volumes
                    .add_host_dir(&format!("{id}/{}", v.name), path)
                    .map_err(|e| e.to_string())?;
            }
        }
        // directory in the guest → (file name, host file, read-only)
        let mut groups: std::collections::BTreeMap<String, Vec<(String, PathBuf, bool)>> =
            Default::default();
        let mut dir_mounts = Vec::new();
        for m in std::mem::take(&mut c.mounts) {
            let Some(host) = files.get(&m.volume) else {
                dir_mounts.push(crate::pod::MountPlan {
                    volume: format!("{id}/{}", m.volume),
                    ..m
                });
                continue;
            };
            let path = Path::new(&m.mount_path);
            let (Some(parent), Some(name)) = (path.parent(), path.file_name()) else {
                return Err(invalid(format!(
                    "mount of file {} at {:?}: not a file path",
                    host.display(),
                    m.mount_path
                )));
            };
            groups
                .entry(parent.to_string_lossy().into_owned())
                .or_default()
                .push((
                    name.to_string_lossy().into_owned(),
                    host.clone(),
                    m.read_only,
                ));
        }
        for (k, (dir, group)) in groups.into_iter().enumerate() {
            if let Some(m) = dir_mounts
                .iter()
                .find(|m| m.mount_path.trim_end_matches('/') == dir)
            {
                return Err(invalid(format!(
                    "a wasm container cannot mount files into {dir}, where it mounts a directory ({}): its files are a directory of their own",
                    m.mount_path
                )));
            }
            let name = format!("{id}/f{k}");
            let at = self.paths.run.join("files").join(format!("{id}-f{k}"));
            let read_only = group.iter().all(|(_, _, ro)| *ro);
            pod_volumes
                .add_host_files(&name, &at, &group)
                .map_err(|e| e.to_string())?;
            dir_mounts.push(crate::pod::MountPlan {
                volume: name,
                mount_path: dir,
                read_only,
                sub_path: None,
            });
        }
        c.mounts = dir_mounts;
        Ok(())
    }

    pub(super) fn cri_start(&self, id: &str) -> Result<(), crate::Failure> {
        let rec = self.status.cri(id)?;
        if rec.state != CriState::Created {
            return Err(crate::Failure::new(
                crate::Code::FailedPrecondition,
                format!(
                    "container {id} is {:?}; only a created container can start",
                    rec.state
                ),
            ));
        }
        if self.cri_closed.load(Ordering::SeqCst) || self.stop.is_requested() {
            return Err(crate::Failure::new(
                crate::Code::FailedPrecondition,
                format!("pod sandbox {} is stopped", self.paths.id),
            ));
        }
        let rt = tokio::runtime::Handle::try_current()
            .map_err(|_| "internal: no async runtime to run the container on".to_owned())?;
        let log = if rec.meta.log_path.as_os_str().is_empty() {
            None
        } else {
            Some(Arc::new(Mutex::new(cri_log::LogFile::open(
                &rec.meta.log_path,
                None,
            )?)))
        };
        let (out_r, out_w) = pipe()?;
        let (err_r, err_w) = pipe()?;
        let (in_r, in_w) = pipe()?;
        let (plan, guest, kill, exited, hub) = {
            let mut map = self.cri.lock().unwrap_or_else(|p| p.into_inner());
            let e = map
                .get_mut(id)
                .ok_or_else(|| format!("no container {id:?} in this pod"))?;
            *e.stdin.lock().unwrap_or_else(|p| p.into_inner()) = Some(in_w);
            e.log = log.clone();
            (
                e.plan.clone(),
                e.guest.clone(),
                e.kill.clone(),
                e.exited.clone(),
                e.hub.clone(),
            )
        };
        hub.connect(crate::attach::pipe_writer(self.cri_stdin(id)), None);
        let preopens = {
            let mut res = self.resources.lock().unwrap_or_else(|p| p.into_inner());
            res.volumes.preopens_for(&plan).map_err(|e| e.to_string())?
        };
        // Output goes to the log and to whoever is attached.
        let pumps = [(out_r, Stream::Stdout), (err_r, Stream::Stderr)].map(|(fd, s)| {
            let log = log.clone();
            let mut src = Tee {
                inner: std::fs::File::from(fd),
                hub: hub.clone(),
                stderr: matches!(s, Stream::Stderr),
            };
            std::thread::spawn(move || match log {
                Some(log) => {
                    let _ = cri_log::pump(src, s, log);
                }
                None => {
                    let _ = std::io::copy(&mut src, &mut std::io::sink());
                }
            })
        });
        let spec = self.guest_spec(&plan, preopens, in_r, out_w, err_w);
        self.status.with_cri(id, |c| {
            c.state = CriState::Running;
            c.started_at = Some(chrono::Utc::now());
        });
        let engine = self.engine.clone();
        let status = self.status.clone();
        let id = id.to_owned();
        let memory_limit = plan.memory_limit;
        rt.spawn(async move {
            let result = engine.run(&guest, spec, &kill).await;
            let _ = tokio::task::spawn_blocking(move || {
                for p in pumps {
                    let _ = p.join();
                }
            })
            .await;
            let (code, reason, message) = match result {
                Ok(GuestExit::Exited(0)) => (0, "Completed", String::new()),
                Ok(GuestExit::Exited(c)) => (c, "Error", String::new()),
                Ok(GuestExit::OutOfMemory) => (
                    137,
                    "OOMKilled",
                    format!(
                        "linear memory grew past the limit of {} bytes",
                        memory_limit.unwrap_or(0)
                    ),
                ),
                Ok(GuestExit::Killed) => (137, "Error", "killed".to_owned()),
                Ok(GuestExit::Trap(t)) => (134, "Error", format!("trap: {t}")),
                Err(e) => (128, "StartError", e.to_string()),
            };
            hub.close(crate::ExecMsg::Exit { code });
            status.update(|st| {
                if let Some(c) = st.cri_containers.iter_mut().find(|c| c.id == id) {
                    c.state = CriState::Exited;
                    c.finished_at = Some(chrono::Utc::now());
                    c.exit_code = code;
                    c.reason = reason.to_owned();
                    c.message = message;
                }
            });
            exited.send_replace(true);
        });
        Ok(())
    }

    pub(super) fn cri_stop(&self, id: &str, timeout: Duration) -> Result<(), crate::Failure> {
        let rec = self.status.cri(id)?;
        if rec.state != CriState::Running {
            // As containerd: stopping a container that does not run is done.
            return Ok(());
        }
        let (kill, rx) = {
            let mut map = self.cri.lock().unwrap_or_else(|p| p.into_inner());
            let e = map
                .get_mut(id)
                .ok_or_else(|| format!("no container {id:?} in this pod"))?;
            // Closing stdin is the wasm guest's SIGTERM.
            e.stdin.lock().unwrap_or_else(|p| p.into_inner()).take();
            (e.kill.clone(), e.exited.subscribe())
        };
        let rt = tokio::runtime::Handle::try_current()
            .map_err(|_| "internal: no async runtime".to_owned())?;
        rt.block_on(async move {
            if timeout.is_zero() || !wait_exit(rx.clone(), timeout).await {
                kill.kill();
                if !wait_exit(rx, KILL_WAIT).await {
                    return Err(format!("container {id} did not end after it was killed").into());
                }
            }
            Ok(())
        })
    }

    pub(super) fn cri_remove(&self, id: &str) -> Result<(), crate::Failure> {
        self.status.cri(id)?;
        self.cri_stop(id, Duration::ZERO)?;
        self.cri
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(id);
        self.resources
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .volumes
            .forget_prefixed(&format!("{id}/"));
        self.status
            .update(|st| st.cri_containers.retain(|c| c.id != id));
        Ok(())
    }

    /// The shared write end of a CRI container's stdin.
    fn cri_stdin(&self, id: &str) -> Arc<Mutex<Option<OwnedFd>>> {
        (self.cri.lock().unwrap_or_else(|p| p.into_inner()))
            .get(id)
            .map(|e| e.stdin.clone())
            .unwrap_or_default()
    }

    /// CRI: attaches to a running container's guest: its output from now
    /// on, and its stdin when it was created with one (a wasm guest has no
    /// terminal to resize).
    pub(super) fn cri_attach(&self, id: &str) -> Result<crate::ExecSession, crate::Failure> {
        let rec = self.status.cri_running(id)?;
        let hub = (self.cri.lock().unwrap_or_else(|p| p.into_inner()))
            .get(id)
            .map(|e| e.hub.clone())
            .ok_or_else(|| format!("no container {id:?} in this pod"))?;
        Ok(hub.attach(id, rec.meta.stdin, rec.meta.stdin_once))
    }

    pub(super) fn cri_reopen_log(&self, id: &str) -> Result<(), crate::Failure> {
        let rec = self.status.cri_running(id)?;
        let log = (self.cri.lock().unwrap_or_else(|p| p.into_inner()))
            .get(id)
            .and_then(|e| e.log.clone());
        Ok(cri_log::reopen(id, log, &rec.meta.log_path)?)
    }

    /// Stops every running CRI container when the pod stops: stdin closes,
    /// and after `grace` the survivors are killed.
    pub(super) async fn cri_stop_all(&self, grace: Duration) {
        self.cri_closed.store(true, Ordering::SeqCst);
        let running_ids: Vec<String> = self
            .status
            .get()
            .cri_containers
            .into_iter()
            .filter(|c| c.state == CriState::Running)
            .map(|c| c.id)
            .collect();
        let running: Vec<(KillSwitch, watch::Receiver<bool>)> = {
            let mut map = self.cri.lock().unwrap_or_else(|p| p.into_inner());
            let mut out = Vec::new();
            for id in &running_ids {
                if let Some(e) = map.get_mut(id) {
                    e.stdin.lock().unwrap_or_else(|p| p.into_inner()).take();
                    out.push((e.kill.clone(), e.exited.subscribe()));
                }
            }
            out
        };
        let all = |limit: Duration| {
            let rxs: Vec<_> = running.iter().map(|(_, rx)| rx.clone()).collect();
            async move {
                for rx in rxs {
                    wait_exit(rx, limit).await;
                }
            }
        };
        if !running.is_empty() {
            let _ = tokio::time::timeout(grace, all(grace)).await;
            for (k, _) in &running {
                k.kill();
            }
            all(KILL_WAIT).await;
        }
    }
}
