//! Containers that a CRI client (huskd) creates, starts, stops and removes
//! one at a time in a VM pod sandbox, after its VM booted.
//!
//! A VM pod run from a manifest gets its image layers as block devices at
//! boot; containers that CRI names later cannot (the microvm machine has
//! no hot-plug). So a CRI VM sandbox boots with one more virtio-fs share,
//! [`CriShare`]: a directory of the pod's run directory that the host fills
//! while the VM runs. Each layer a container needs is bind-mounted into it
//! read-only (once per pod), each host directory the client mounts is
//! bind-mounted under the container's id, and the agent stacks the layers
//! into the container's overlay root. The share directory is a shared
//! mount, so mounts made after virtiofsd started propagate into its mount
//! namespace; read-only binds are made read-only before they enter it,
//! because a remount's flags do not propagate.
//!
//! The containers never restart (under CRI the kubelet decides that),
//! their log goes where the client said, in the CRI format, and their
//! records live in the pod's status.

use super::sandbox::VmSandbox;
use crate::attach::AttachHub;
use crate::cri_log;
use crate::pod::{ContainerPlan, VolumePlan, VolumeSource};
use crate::state::{CriContainer, CriMeta, CriState};
use nix::mount::{mount, umount2, MntFlags, MsFlags};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// The guest volume (and virtio-fs tag) of the share.
pub const CRI_VOLUME: &str = "husk-cri";
pub const CRI_TAG: &str = "cri";

/// How long a killed container may take to be reported gone.
const KILL_WAIT: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum ShareError {
    #[error("{0}: {1}")]
    Io(PathBuf, std::io::Error),
    #[error("bind mount {0} -> {1}: {2}")]
    Mount(PathBuf, PathBuf, nix::Error),
}

/// The directory shared into a CRI VM sandbox, and every mount in it.
/// Drop unmounts them all and removes the directory.
pub struct CriShare {
    root: PathBuf,
    /// Where read-only binds are made before they move into `root`.
    stage: PathBuf,
    /// Layer snapshot directory -> its name in the share.
    layers: HashMap<PathBuf, String>,
    /// Mounts in the share, in the order made, with the container they
    /// belong to (None: a layer).
    mounts: Vec<(Option<String>, PathBuf)>,
    root_mounted: bool,
}

impl CriShare {
    /// Makes `root` (which must not exist) a shared mount of its own.
    pub fn new(root: PathBuf) -> Result<Self, ShareError> {
        let stage = root.with_extension("stage");
        let mut me = CriShare {
            root,
            stage,
            layers: HashMap::new(),
            mounts: Vec::new(),
            root_mounted: false,
        };
        let io = |p: &Path| {
            let p = p.to_owned();
            move |e| ShareError::Io(p, e)
        };
        std::fs::create_dir_all(&me.root).map_err(io(&me.root))?;
        std::fs::create_dir_all(&me.stage).map_err(io(&me.stage))?;
        bind(&me.root, &me.root, false)?;
        me.root_mounted = true;
        mount(
            None::<&str>,
            &me.root,
            None::<&str>,
            MsFlags::MS_SHARED,
            None::<&str>,
        )
        .map_err(|e| ShareError::Mount(me.root.clone(), me.root.clone(), e))?;
        Ok(me)
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The share's name for a layer directory, bound in read-only on
    /// first use.
    pub fn layer(&mut self, dir: &Path) -> Result<String, ShareError> {
        if let Some(n) = self.layers.get(dir) {
            return Ok(n.clone());
        }
        let name = format!("l{}", self.layers.len());
        let at = self.root.join(&name);
        self.put(dir, &at, true, None)?;
        self.layers.insert(dir.to_owned(), name.clone());
        Ok(name)
    }

    /// Binds a host directory or file in for container `id`; returns its
    /// path in the share.
    pub fn bind_for(
        &mut self,
        id: &str,
        name: &str,
        host: &Path,
        read_only: bool,
    ) -> Result<String, ShareError> {
        let rel = format!("c/{id}/{name}");
        self.put(host, &self.root.join(&rel), read_only, Some(id))?;
        Ok(rel)
    }

    fn put(
        &mut self,
        src: &Path,
        at: &Path,
        read_only: bool,
        owner: Option<&str>,
    ) -> Result<(), ShareError> {
        // A file (the kubelet's /etc/hosts, a termination log) is bound
        // onto an empty file of the share, a directory onto a directory.
        let file = std::fs::metadata(src)
            .map_err(|e| ShareError::Io(src.to_owned(), e))?
            .is_file();
        let place = |p: &Path| -> std::io::Result<()> {
            if file {
                if let Some(dir) = p.parent() {
                    std::fs::create_dir_all(dir)?;
                }
                std::fs::OpenOptions::new()
                    .write(true)
                    .create(true)
                    .truncate(false)
                    .open(p)
                    .map(drop)
            } else {
                std::fs::create_dir_all(p)
            }
        };
        let unplace = |p: &Path| {
            let _ = if file {
                std::fs::remove_file(p)
            } else {
                std::fs::remove_dir(p)
            };
        };
        place(at).map_err(|e| ShareError::Io(at.to_owned(), e))?;
        if !read_only {
            if let Err(e) = bind(src, at, true) {
                unplace(at);
                return Err(e);
            }
        } else {
            // Read-only first, outside the shared tree: the copy that
            // propagates into virtiofsd's namespace is made from it.
            let stage = self.stage.join(if file { "f" } else { "x" });
            place(&stage).map_err(|e| ShareError::Io(stage.clone(), e))?;
            let r = bind(src, &stage, false)
                .and_then(|()| {
                    mount(
                        None::<&str>,
                        &stage,
                        None::<&str>,
                        MsFlags::MS_BIND | MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY,
                        None::<&str>,
                    )
                    .map_err(|e| ShareError::Mount(src.to_owned(), stage.clone(), e))
                })
                .and_then(|()| bind(&stage, at, false));
            let _ = umount2(&stage, MntFlags::MNT_DETACH);
            unplace(&stage);
            if let Err(e) = r {
                let _ = umount2(at, MntFlags::MNT_DETACH);
                unplace(at);
                return Err(e);
            }
        }
        self.mounts.push((owner.map(str::to_owned), at.to_owned()));
        Ok(())
    }

    /// Unmounts what was bound in for container `id`.
    pub fn forget(&mut self, id: &str) {
        let mut keep = Vec::new();
        for (owner, at) in std::mem::take(&mut self.mounts) {
            if owner.as_deref() == Some(id) {
                if umount2(&at, MntFlags::MNT_DETACH).is_ok()
                    && std::fs::symlink_metadata(&at).is_ok_and(|m| m.is_file())
                {
                    let _ = std::fs::remove_file(&at);
                }
            } else {
                keep.push((owner, at));
            }
        }
        self.mounts = keep;
        // Only empty directories go: never a recursive removal, which
        // could reach into a host directory whose unmount failed.
        remove_empty_tree(&self.root.join("c").join(id));
    }
}

impl Drop for CriShare {
    fn drop(&mut self) {
        for (_, at) in self.mounts.drain(..).rev() {
            if let Err(e) = umount2(&at, MntFlags::MNT_DETACH) {
                tracing::warn!("umount {}: {e}", at.display());
            } else if std::fs::symlink_metadata(&at).is_ok_and(|m| m.is_file()) {
                // The empty file a file mount was bound onto.
                let _ = std::fs::remove_file(&at);
            }
        }
        if self.root_mounted {
            let _ = umount2(&self.root, MntFlags::MNT_DETACH);
        }
        // Only empty directories are left: never remove through a mount.
        remove_empty_tree(&self.root);
        remove_empty_tree(&self.stage);
    }
}

/// Removes a tree of empty directories, bottom up (what is not empty, a
/// file or a mount that is still there, stays).
fn remove_empty_tree(dir: &Path) {
    if let Ok(rd) = std::fs::read_dir(dir) {
        for e in rd.flatten() {
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                remove_empty_tree(&e.path());
            }
        }
    }
    let _ = std::fs::remove_dir(dir);
}

fn bind(src: &Path, at: &Path, recursive: bool) -> Result<(), ShareError> {
    let rec = if recursive {
        MsFlags::MS_REC
    } else {
        MsFlags::empty()
    };
    mount(
        Some(src),
        at,
        None::<&str>,
        MsFlags::MS_BIND | rec,
        None::<&str>,
    )
    .map_err(|e| ShareError::Mount(src.to_owned(), at.to_owned(), e))
}

/// A CRI container of a VM sandbox, as the monitor holds it.
pub(crate) struct VmCriEntry {
    pub(crate) hub: Arc<AttachHub>,
    /// Its plan, mounts rewritten to the share.
    pub(crate) plan: Arc<ContainerPlan>,
    /// Its layers, as directories of the share, lowest first.
    pub(crate) layer_dirs: Vec<String>,
    pub(crate) log: Option<Arc<Mutex<cri_log::LogFile>>>,
}

impl VmSandbox {
    fn cri_open(&self) -> Result<(), crate::Failure> {
        if !self.plan.cri {
            return Err(crate::Failure::new(
                crate::Code::FailedPrecondition,
                format!(
                    "pod {} was run from a manifest; its containers cannot be changed one by one",
                    self.plan.name
                ),
            ));
        }
        if self.stop.requested.load(Ordering::SeqCst) || self.agent.is_closed() {
            return Err(crate::Failure::new(
                crate::Code::FailedPrecondition,
                format!("pod sandbox {} is stopped", self.paths.id),
            ));
        }
        Ok(())
    }

    pub(crate) fn cri_create(
        &self,
        mut c: ContainerPlan,
        volumes: Vec<VolumePlan>,
        meta: CriMeta,
    ) -> Result<String, crate::Failure> {
        self.cri_open()?;
        self.status.get().cri_name_free(&meta)?;
        if c.layers.is_empty() {
            return Err(format!(
                "container {:?}: image {} has no Linux layers",
                meta.name, meta.image
            )
            .into());
        }
        let id = format!(
            "{}{}",
            self.paths.id,
            hex::encode(rand::random::<[u8; 4]>())
        );
        let mut layer_dirs = Vec::new();
        {
            let mut res = self.resources.lock().unwrap_or_else(|p| p.into_inner());
            let share = res
                .cri_share
                .as_mut()
                .ok_or_else(|| "internal: the sandbox has no CRI share".to_owned())?;
            for dir in &c.layers {
                layer_dirs.push(share.layer(dir).map_err(|e| e.to_string())?);
            }
            for m in &mut c.mounts {
                let host = volumes.iter().find_map(|v| match &v.source {
                    VolumeSource::HostPath { path, .. } if v.name == m.volume => Some(path),
                    _ => None,
                });
                let Some(host) = host else {
                    share.forget(&id);
                    return Err(format!(
                        "container {:?}: mount {} names no host directory",
                        meta.name, m.mount_path
                    )
                    .into());
                };
                match share.bind_for(&id, &m.volume, host, m.read_only) {
                    Ok(rel) => {
                        m.volume = CRI_VOLUME.to_owned();
                        m.sub_path = Some(rel);
                    }
                    Err(e) => {
                        share.forget(&id);
                        return Err(e.to_string().into());
                    }
                }
            }
        }
        self.cri.lock().unwrap_or_else(|p| p.into_inner()).insert(
            id.clone(),
            VmCriEntry {
                plan: Arc::new(c),
                layer_dirs,
                log: None,
                hub: Arc::new(AttachHub::default()),
            },
        );
        let rec = CriContainer::created(id.clone(), meta);
        self.status.update(|st| st.cri_containers.push(rec));
        Ok(id)
    }

    pub(crate) fn cri_start(self: &Arc<Self>, id: &str) -> Result<(), crate::Failure> {
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
        self.cri_open()?;
        let log = if rec.meta.log_path.as_os_str().is_empty() {
            cri_log::LogFile::discard()?
        } else {
            cri_log::LogFile::open(&rec.meta.log_path, None)?
        };
        let log = Arc::new(Mutex::new(log));
        let (plan, layer_dirs, hub) = {
            let mut map = self.cri.lock().unwrap_or_else(|p| p.into_inner());
            let e = map
                .get_mut(id)
                .ok_or_else(|| format!("no container {id:?} in this pod"))?;
            e.log = Some(log.clone());
            (e.plan.clone(), e.layer_dirs.clone(), e.hub.clone())
        };
        let mut req = self.start_request(
            &plan,
            id.to_owned(),
            husk_protocol::Rootfs {
                layer_dirs: Some(husk_protocol::LayerDirs {
                    volume: CRI_VOLUME.to_owned(),
                    dirs: layer_dirs,
                }),
                hostname: Some(self.plan.hostname().to_owned()),
                pod_pid: plan.security.share_pid,
                ..Default::default()
            },
        );
        req.stdin = rec.meta.stdin;
        req.tty = rec
            .meta
            .tty
            .then_some(husk_protocol::TtySize { rows: 24, cols: 80 });
        self.status.with_cri(id, |c| {
            c.state = CriState::Running;
            c.started_at = Some(chrono::Utc::now());
        });
        let (tx, rx) = std::sync::mpsc::sync_channel(1);
        let me = self.clone();
        let id2 = id.to_owned();
        std::thread::spawn(move || {
            let result = me.run_process(req, log, Some(tx), Some(hub));
            let (code, reason, message) = match result {
                Ok((code, signal, oom)) => match (code, signal) {
                    _ if oom => (
                        code.unwrap_or(128 + signal.unwrap_or(libc::SIGKILL)),
                        "OOMKilled",
                        String::new(),
                    ),
                    (Some(0), _) => (0, "Completed", String::new()),
                    (Some(n), _) => (n, "Error", String::new()),
                    (None, Some(s)) => (128 + s, "Error", format!("killed by signal {s}")),
                    (None, None) => (1, "Error", String::new()),
                },
                Err(_) if me.agent.is_closed() => (137, "Error", me.vm_ended_message()),
                Err(msg) => (128, "StartError", msg),
            };
            me.status.with_cri(&id2, |c| {
                c.state = CriState::Exited;
                c.finished_at = Some(chrono::Utc::now());
                c.exit_code = code;
                c.reason = reason.to_owned();
                c.message = message;
            });
        });
        match rx.recv() {
            Ok(Ok(user)) => {
                self.status.with_cri(id, |c| {
                    c.user = user.map(|u| crate::state::CriUser {
                        uid: u.uid,
                        gid: u.gid,
                        groups: u.groups,
                    })
                });
                Ok(())
            }
            Ok(Err(msg)) => Err(format!("container {id}: {msg}").into()),
            Err(_) => Err(format!("container {id}: its supervisor ended").into()),
        }
    }

    /// Waits until the container is no longer running, up to `limit`.
    fn cri_wait(&self, id: &str, limit: Duration) -> bool {
        let until = Instant::now() + limit;
        loop {
            let running = self.status.cri_running(id).is_ok();
            if !running {
                return true;
            }
            if Instant::now() >= until {
                return false;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub(crate) fn cri_stop(&self, id: &str, timeout: Duration) -> Result<(), crate::Failure> {
        let rec = self.status.cri(id)?;
        if rec.state != CriState::Running {
            // As containerd: stopping a container that does not run is done.
            return Ok(());
        }
        let signaller = self
            .stop
            .running
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(id)
            .cloned();
        if let Some(s) = &signaller {
            if !timeout.is_zero() {
                let _ = s.signal(libc::SIGTERM);
                if self.cri_wait(id, timeout) {
                    return Ok(());
                }
            }
            let _ = s.signal(libc::SIGKILL);
        }
        if self.cri_wait(id, KILL_WAIT) {
            Ok(())
        } else {
            Err(format!("container {id} did not end after it was killed").into())
        }
    }

    pub(crate) fn cri_remove(&self, id: &str) -> Result<(), crate::Failure> {
        self.status.cri(id)?;
        self.cri_stop(id, Duration::ZERO)?;
        self.cri
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(id);
        if let Some(share) = self
            .resources
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .cri_share
            .as_mut()
        {
            share.forget(id);
        }
        self.status
            .update(|st| st.cri_containers.retain(|c| c.id != id));
        Ok(())
    }

    pub(crate) fn cri_reopen_log(&self, id: &str) -> Result<(), crate::Failure> {
        let rec = self.status.cri_running(id)?;
        let log = (self.cri.lock().unwrap_or_else(|p| p.into_inner()))
            .get(id)
            .and_then(|e| e.log.clone());
        Ok(cri_log::reopen(id, log, &rec.meta.log_path)?)
    }

    pub(crate) fn cri_attach(&self, id: &str) -> Result<crate::ExecSession, crate::Failure> {
        let rec = self.status.cri_running(id)?;
        let hub = self
            .cri
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(id)
            .map(|e| e.hub.clone())
            .ok_or_else(|| format!("no container {id:?} in this pod"))?;
        Ok(hub.attach(id, rec.meta.stdin, rec.meta.stdin_once))
    }

    /// A CRI container's plan, by id.
    pub(crate) fn cri_plan(&self, id: &str) -> Option<Arc<ContainerPlan>> {
        self.cri
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(id)
            .map(|e| e.plan.clone())
    }

    /// A CRI sandbox's life: up until it is stopped or its VM ends; then
    /// its running containers are stopped (the stop request has signalled
    /// them; the grace period's deadline kills them).
    pub(crate) fn cri_run(&self) {
        while !self.stop.requested.load(Ordering::SeqCst) && !self.agent.is_closed() {
            std::thread::sleep(Duration::from_millis(50));
        }
        if self.agent.is_closed() && !self.stop.requested.load(Ordering::SeqCst) {
            let message = self.vm_ended_message();
            self.status.update(|st| {
                st.reason = Some("VMExited".into());
                st.message = Some(message);
            });
        }
        let grace = self
            .stop
            .deadline
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .map(|d| d.saturating_duration_since(Instant::now()))
            .unwrap_or_default();
        let until = Instant::now() + grace + KILL_WAIT;
        while Instant::now() < until
            && self
                .status
                .get()
                .cri_containers
                .iter()
                .any(|c| c.state == CriState::Running)
        {
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What virtiofsd sees: a mount namespace made (as a slave) before the
    /// layer and the directory were bound in. Both must appear there, the
    /// layer read-only and the directory writable, and vanish on drop.
    #[test]
    fn binds_reach_a_namespace_made_earlier_with_their_read_only_flag() {
        if !nix::unistd::Uid::effective().is_root() {
            eprintln!("SKIPPED: needs root (mounts)");
            return;
        }
        let tmp = tempfile::tempdir().unwrap();
        let layer = tmp.path().join("layer");
        std::fs::create_dir(&layer).unwrap();
        std::fs::write(layer.join("f"), "layer file").unwrap();
        let vol = tmp.path().join("vol");
        std::fs::create_dir(&vol).unwrap();
        let mut share = CriShare::new(tmp.path().join("share")).unwrap();
        let root = share.root().to_owned();
        let script = format!(
            "sleep 1; cat {r}/l0/f; echo; touch {r}/l0/x 2>/dev/null && echo layer-writable; echo hi > {r}/c/c1/m0/y && echo vol-written",
            r = root.display()
        );
        let child = std::process::Command::new("unshare")
            .args(["-m", "--propagation", "slave", "sh", "-c", &script])
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        std::thread::sleep(Duration::from_millis(200));
        assert_eq!(share.layer(&layer).unwrap(), "l0");
        assert_eq!(share.layer(&layer).unwrap(), "l0", "a layer is bound once");
        assert_eq!(share.bind_for("c1", "m0", &vol, false).unwrap(), "c/c1/m0");
        let out = child.wait_with_output().unwrap();
        let out = String::from_utf8_lossy(&out.stdout);
        assert_eq!(out.trim(), "layer file\nvol-written", "{out}");
        assert!(!layer.join("x").exists());
        assert_eq!(std::fs::read_to_string(vol.join("y")).unwrap(), "hi\n");
        share.forget("c1");
        assert!(!root.join("c/c1").exists());
        drop(share);
        assert!(!root.exists(), "the share directory is left");
        let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
        assert!(!mounts.contains(&*root.to_string_lossy()), "{mounts}");
        assert_eq!(
            std::fs::read_to_string(layer.join("f")).unwrap(),
            "layer file"
        );
    }
}
