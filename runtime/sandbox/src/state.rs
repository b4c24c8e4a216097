//! Where husk keeps things and the persisted pod records. Runtime state
//! (sockets, netns files, in-memory volumes) lives under the run root
//! (`/run/husk`); persistent state (pod records, logs, disk emptyDirs, the
//! compile cache, IPAM data) under the lib root (`/var/lib/husk`). `--root DIR`
//! moves both under DIR. Writes of records are atomic (temp file + rename).

use crate::pod::PodPlan;
use serde::{Deserialize, Serialize};
use std::io::Write;
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: corrupt record: {source}")]
    Corrupt {
        path: PathBuf,
        source: serde_json::Error,
    },
    #[error("no pod named {0:?}; see `husk ps`")]
    NoSuchPod(String),
    #[error("{0:?} matches several pods ({1}); use the pod id")]
    Ambiguous(String, String),
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> StateError + '_ {
    move |source| StateError::Io {
        path: path.to_owned(),
        source,
    }
}

/// The two state roots.
#[derive(Debug, Clone)]
pub struct Roots {
    pub run: PathBuf,
    pub lib: PathBuf,
    /// Set when `--root` moved both (config and CNI files then live there too).
    pub custom: Option<PathBuf>,
}

impl Roots {
    pub fn new(root: Option<&Path>) -> Self {
        match root {
            Some(r) => Roots {
                run: r.join("run"),
                lib: r.join("lib"),
                custom: Some(r.to_owned()),
            },
            None => Roots {
                run: PathBuf::from("/run/husk"),
                lib: PathBuf::from("/var/lib/husk"),
                custom: None,
            },
        }
    }

    /// Creates both roots if missing and makes them 0700 (root's only):
    /// pod records, logs, volumes, images and sockets sit below them, and
    /// no other local user may read or reach any of it. Called by every
    /// binary before it touches state; an existing, laxer root (made by
    /// an older husk) is tightened.
    pub fn secure(&self) -> std::io::Result<()> {
        use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
        for dir in [&self.run, &self.lib] {
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(dir)
                .map_err(|e| std::io::Error::new(e.kind(), format!("{}: {e}", dir.display())))?;
            std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
                .map_err(|e| std::io::Error::new(e.kind(), format!("{}: {e}", dir.display())))?;
        }
        Ok(())
    }

    pub fn config_file(&self) -> PathBuf {
        match &self.custom {
            Some(r) => r.join("config.toml"),
            None => PathBuf::from("/etc/husk/config.toml"),
        }
    }

    pub fn pod(&self, id: &str) -> PodPaths {
        PodPaths {
            id: id.to_owned(),
            run: self.run.join("pods").join(id),
            lib: self.lib.join("pods").join(id),
            netns: self.run.join("netns").join(id),
            vm_ids: PathBuf::from(crate::vm::identity::HOST_CLAIMS),
        }
    }

    pub fn wasm_cache(&self) -> PathBuf {
        self.lib.join("cache").join("wasm")
    }

    pub fn cni_dir(&self) -> PathBuf {
        self.lib.join("cni")
    }

    /// Removes what processes killed half-way left in the pod dirs:
    /// staging dirs of pods never created ([`PodRecord::create`]) and the
    /// temp files of atomic writes ([`write_atomic`]), of processes that
    /// are gone. Cheap; run by the CLI verbs that list or make pods and by
    /// huskd at its start.
    pub fn collect_stale(&self) {
        let gone = |pid: &str| {
            pid.parse::<u32>()
                .is_ok_and(|p| !Path::new(&format!("/proc/{p}")).exists())
        };
        let pods = self.lib.join("pods");
        for e in std::fs::read_dir(&pods).into_iter().flatten().flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if let Some(rest) = name.strip_prefix(".new-") {
                if rest.split('-').next().is_some_and(gone) {
                    let _ = std::fs::remove_dir_all(e.path());
                }
                continue;
            }
            for f in std::fs::read_dir(e.path()).into_iter().flatten().flatten() {
                let fname = f.file_name().to_string_lossy().into_owned();
                if let Some((_, pid)) = fname.strip_prefix('.').and_then(|n| n.rsplit_once(".tmp"))
                {
                    if gone(pid) {
                        let _ = std::fs::remove_file(f.path());
                    }
                }
            }
        }
    }

    /// All pod records, oldest first.
    pub fn list_pods(&self) -> Vec<PodRecord> {
        let mut out = Vec::new();
        let Ok(rd) = std::fs::read_dir(self.lib.join("pods")) else {
            return out;
        };
        for e in rd.flatten() {
            let id = e.file_name().to_string_lossy().into_owned();
            if let Ok(rec) = PodRecord::load(&self.pod(&id)) {
                out.push(rec);
            }
        }
        out.sort_by_key(|a| a.created_at);
        out
    }

    /// Finds a pod by name, `namespace/name` or id prefix.
    pub fn find_pod(&self, key: &str) -> Result<PodRecord, StateError> {
        let pods = self.list_pods();
        let by_name: Vec<_> = pods
            .iter()
            .filter(|p| {
                p.plan.name == key || format!("{}/{}", p.plan.namespace, p.plan.name) == key
            })
            .collect();
        if by_name.len() == 1 {
            return Ok(by_name[0].clone());
        }
        if by_name.len() > 1 {
            let ids: Vec<_> = by_name.iter().map(|p| p.id.clone()).collect();
            return Err(StateError::Ambiguous(key.into(), ids.join(", ")));
        }
        let by_id: Vec<_> = pods
            .iter()
            .filter(|p| key.len() >= 4 && p.id.starts_with(key))
            .collect();
        match by_id.len() {
            1 => Ok(by_id[0].clone()),
            0 => Err(StateError::NoSuchPod(key.into())),
            _ => Err(StateError::Ambiguous(
                key.into(),
                by_id
                    .iter()
                    .map(|p| p.id.clone())
                    .collect::<Vec<_>>()
                    .join(", "),
            )),
        }
    }
}

/// Paths of one pod.
#[derive(Debug, Clone)]
pub struct PodPaths {
    pub id: String,
    pub run: PathBuf,
    pub lib: PathBuf,
    pub netns: PathBuf,
    /// Where VM pods claim their hypervisor's host uid (host-wide, shared
    /// by all pods of all roots; see [`crate::vm::identity`]).
    pub vm_ids: PathBuf,
}

impl PodPaths {
    pub fn record(&self) -> PathBuf {
        self.lib.join("pod.json")
    }
    pub fn status(&self) -> PathBuf {
        self.lib.join("status.json")
    }
    pub fn monitor_log(&self) -> PathBuf {
        self.lib.join("monitor.log")
    }
    pub fn monitor_lock(&self) -> PathBuf {
        self.lib.join("monitor.lock")
    }
    pub fn socket(&self) -> PathBuf {
        self.run.join("monitor.sock")
    }
    pub fn network_record(&self) -> PathBuf {
        self.run.join("network.json")
    }
    pub fn logs_dir(&self) -> PathBuf {
        self.lib.join("logs")
    }
    /// CRI log file of one container instance (`<name>/<restart>.log`).
    pub fn log_file(&self, container: &str, restart: u32) -> PathBuf {
        self.logs_dir()
            .join(container)
            .join(format!("{restart}.log"))
    }
    pub fn volumes_run(&self) -> PathBuf {
        self.run.join("volumes")
    }
    pub fn volumes_lib(&self) -> PathBuf {
        self.lib.join("volumes")
    }
}

/// The persisted, redacted description of a pod, written once at creation.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PodRecord {
    pub id: String,
    pub created_at: chrono::DateTime<chrono::Utc>,
    /// Remove the pod when it ends (`run --rm`).
    #[serde(default)]
    pub auto_remove: bool,
    pub plan: PodPlan,
}

impl PodRecord {
    pub fn load(paths: &PodPaths) -> Result<Self, StateError> {
        read_json(&paths.record())
    }

    pub fn save(&self, paths: &PodPaths) -> Result<(), StateError> {
        write_json_atomic(&paths.record(), self)
    }

    /// Creates the pod's lib dir with its record and `extra` files in it,
    /// whole or not at all: they are written into a staging dir
    /// (`.new-<pid>-<id>`, never listed) that is renamed into place. A
    /// process killed half-way leaves only the staging dir, which
    /// [`Roots::collect_stale`] removes; never a pod dir without a record,
    /// which no command could name.
    pub fn create(&self, roots: &Roots, extra: &[(&str, Vec<u8>)]) -> Result<(), StateError> {
        let pods = roots.lib.join("pods");
        let stage = pods.join(format!(".new-{}-{}", std::process::id(), self.id));
        let dest = roots.pod(&self.id).lib;
        let made = (|| {
            std::fs::create_dir_all(&stage).map_err(io(&stage))?;
            write_json_atomic(&stage.join("pod.json"), self)?;
            for (name, bytes) in extra {
                write_atomic(&stage.join(name), bytes)?;
            }
            std::fs::rename(&stage, &dest).map_err(io(&dest))
        })();
        if made.is_err() {
            let _ = std::fs::remove_dir_all(&stage);
        }
        made
    }
}

/// A container's current state, as the kubelet reports it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase", rename_all_fields = "camelCase")]
pub enum ContainerState {
    Waiting {
        reason: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        message: Option<String>,
    },
    Running {
        started_at: chrono::DateTime<chrono::Utc>,
    },
    Terminated {
        exit_code: i32,
        reason: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        message: Option<String>,
        started_at: chrono::DateTime<chrono::Utc>,
        finished_at: chrono::DateTime<chrono::Utc>,
    },
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ContainerStatus {
    pub name: String,
    pub image: String,
    pub guest_kind: String,
    pub state: ContainerState,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_state: Option<ContainerState>,
    pub restart_count: u32,
    pub ready: bool,
    /// `hit` when compiled code came from the cache, `compiled` otherwise.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub compile_cache: Option<String>,
    pub log_path: PathBuf,
}

impl ContainerStatus {
    pub fn is_terminated(&self) -> bool {
        matches!(self.state, ContainerState::Terminated { .. })
    }
    pub fn exit_code(&self) -> Option<i32> {
        match self.state {
            ContainerState::Terminated { exit_code, .. } => Some(exit_code),
            _ => None,
        }
    }
}

/// Pod phase, as Kubernetes names them.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
pub enum PodPhase {
    Pending,
    Running,
    Succeeded,
    Failed,
}

/// The live status of a pod, rewritten by its monitor on every change.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PodStatus {
    pub phase: PodPhase,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    /// Spelled as in Kubernetes' PodStatus.
    #[serde(
        default,
        rename = "podIP",
        alias = "podIp",
        skip_serializing_if = "Option::is_none"
    )]
    pub pod_ip: Option<String>,
    /// Every address of the pod, `pod_ip` first (two on a dual-stack
    /// network), spelled as in Kubernetes' PodStatus.
    #[serde(default, rename = "podIPs", skip_serializing_if = "Vec::is_empty")]
    pub pod_ips: Vec<PodIp>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub monitor_pid: Option<u32>,
    /// True once the monitor has released every host resource and exited.
    #[serde(default)]
    pub finished: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub started_at: Option<chrono::DateTime<chrono::Utc>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub finished_at: Option<chrono::DateTime<chrono::Utc>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cgroup: Option<String>,
    pub init_container_statuses: Vec<ContainerStatus>,
    pub container_statuses: Vec<ContainerStatus>,
    /// Containers created one by one through CRI (huskd), in creation
    /// order; empty for pods run from a manifest.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub cri_containers: Vec<CriContainer>,
    /// Set once the pod was asked to stop (its sandbox is no longer ready).
    #[serde(default)]
    pub stopping: bool,
}

/// One of a pod's addresses (Kubernetes' `PodIP`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PodIp {
    pub ip: String,
}

/// What a CRI client said about a container when it created it.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct CriMeta {
    pub name: String,
    pub attempt: u32,
    /// The image as the client named it, and the store's id for it.
    pub image: String,
    pub image_ref: String,
    pub labels: std::collections::BTreeMap<String, String>,
    pub annotations: std::collections::BTreeMap<String, String>,
    /// Where the container's CRI log goes (the kubelet's log_directory
    /// joined with its log_path); empty: no log.
    pub log_path: PathBuf,
    /// The mounts as the client gave them: host path, container path,
    /// read-only.
    #[serde(default)]
    pub mounts: Vec<(PathBuf, String, bool)>,
    /// Keep the container's stdin open (for attach); close it when the
    /// first attach ends (`stdin_once`); give it a terminal.
    #[serde(default)]
    pub stdin: bool,
    #[serde(default)]
    pub stdin_once: bool,
    #[serde(default)]
    pub tty: bool,
}

/// A CRI container's lifecycle state.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
pub enum CriState {
    Created,
    Running,
    Exited,
}

/// A container created through CRI, and what became of it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct CriContainer {
    /// The pod id followed by 8 hex digits.
    pub id: String,
    pub meta: CriMeta,
    pub state: CriState,
    pub created_at: chrono::DateTime<chrono::Utc>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub started_at: Option<chrono::DateTime<chrono::Utc>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub finished_at: Option<chrono::DateTime<chrono::Utc>>,
    #[serde(default)]
    pub exit_code: i32,
    #[serde(default)]
    pub reason: String,
    #[serde(default)]
    pub message: String,
    /// Who its process runs as (VM containers), for ContainerStatus.user.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<CriUser>,
}

/// A running container's identity: uid, gid and the supplementary groups
/// (the primary one included, sorted).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CriUser {
    pub uid: u32,
    pub gid: u32,
    pub groups: Vec<u32>,
}

impl CriContainer {
    /// A container just created, as CRI has it.
    pub fn created(id: String, meta: CriMeta) -> Self {
        CriContainer {
            id,
            meta,
            state: CriState::Created,
            created_at: chrono::Utc::now(),
            started_at: None,
            finished_at: None,
            exit_code: 0,
            reason: String::new(),
            message: String::new(),
            user: None,
        }
    }
}

impl PodStatus {
    /// Err when a CRI container of the pod already has `meta`'s name and
    /// attempt.
    pub fn cri_name_free(&self, meta: &CriMeta) -> Result<(), crate::Failure> {
        match self
            .cri_containers
            .iter()
            .find(|x| x.meta.name == meta.name && x.meta.attempt == meta.attempt)
        {
            Some(x) => Err(crate::Failure::new(
                crate::Code::AlreadyExists,
                format!(
                    "already exists: container {:?} attempt {} is {} in this pod",
                    meta.name, meta.attempt, x.id
                ),
            )),
            None => Ok(()),
        }
    }

    pub fn load(paths: &PodPaths) -> Result<Self, StateError> {
        read_json(&paths.status())
    }

    /// Init containers first, then the app containers.
    pub fn all_containers(&self) -> impl Iterator<Item = &ContainerStatus> {
        self.init_container_statuses
            .iter()
            .chain(self.container_statuses.iter())
    }
    pub fn save(&self, paths: &PodPaths) -> Result<(), StateError> {
        write_json_atomic(&paths.status(), self)
    }
}

pub fn read_json<T: serde::de::DeserializeOwned>(path: &Path) -> Result<T, StateError> {
    let bytes = std::fs::read(path).map_err(io(path))?;
    serde_json::from_slice(&bytes).map_err(|source| StateError::Corrupt {
        path: path.to_owned(),
        source,
    })
}

pub fn write_json_atomic<T: Serialize>(path: &Path, value: &T) -> Result<(), StateError> {
    let bytes = serde_json::to_vec_pretty(value).expect("state types serialize");
    write_atomic(path, &bytes)
}

/// Writes `bytes` to `path` atomically: temp file in the same dir, fsync,
/// rename.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), StateError> {
    let dir = path.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir).map_err(io(dir))?;
    let tmp = dir.join(format!(
        ".{}.tmp{}",
        path.file_name().unwrap_or_default().to_string_lossy(),
        std::process::id()
    ));
    let mut f = std::fs::File::create(&tmp).map_err(io(&tmp))?;
    f.write_all(bytes).map_err(io(&tmp))?;
    f.sync_all().map_err(io(&tmp))?;
    std::fs::rename(&tmp, path).map_err(io(path))
}

/// The lock on a pod: a POSIX record lock on `monitor.lock` in its lib
/// dir. Its monitor holds it for its whole life, from before it makes
/// anything until it ends, however it ends (the kernel drops it; a
/// monitor's children do not inherit it), so that whether a pod has a live
/// monitor, and its pid, is known at every instant of its start without
/// trusting a recorded pid that may have been reused. `husk rm` takes it
/// while it releases and removes a pod: a monitor that starts then finds
/// it taken, or the pod's record gone, and makes nothing.
#[derive(Debug)]
pub struct PodLock(#[allow(dead_code)] std::fs::File);

/// Who holds a pod's lock when it could not be taken.
#[derive(Debug, thiserror::Error)]
pub enum PodLockError {
    #[error("its lock is held by pid {0} (its monitor, or a `husk rm` of it)")]
    Held(u32),
    #[error("{0}")]
    State(#[from] StateError),
}

fn lock_request(kind: libc::c_int) -> libc::flock {
    // SAFETY: flock is plain old data; all-zero is a valid value.
    let mut fl: libc::flock = unsafe { std::mem::zeroed() };
    fl.l_type = kind as libc::c_short;
    fl.l_whence = libc::SEEK_SET as libc::c_short;
    fl
}

impl PodLock {
    /// Takes the lock of the pod at `paths` (its lib dir must exist).
    pub fn take(paths: &PodPaths) -> Result<Self, PodLockError> {
        use std::os::fd::AsRawFd;
        use std::os::unix::fs::OpenOptionsExt;
        let path = paths.monitor_lock();
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .custom_flags(libc::O_CLOEXEC)
            .open(&path)
            .map_err(io(&path))?;
        let fl = lock_request(libc::F_WRLCK);
        // SAFETY: fcntl(F_SETLK) on an fd this function owns, with a valid
        // flock.
        if unsafe { libc::fcntl(f.as_raw_fd(), libc::F_SETLK, &fl) } == 0 {
            return Ok(PodLock(f));
        }
        let err = std::io::Error::last_os_error();
        match lock_holder(&path) {
            Some(pid) => Err(PodLockError::Held(pid)),
            None => Err(io(&path)(err).into()),
        }
    }
}

/// The pid of the process holding the lock at `path` (another process:
/// one's own locks never show).
fn lock_holder(path: &Path) -> Option<u32> {
    use std::os::fd::AsRawFd;
    let f = std::fs::File::open(path).ok()?;
    let mut fl = lock_request(libc::F_WRLCK);
    // SAFETY: fcntl(F_GETLK) on an fd owned here, with a valid flock it
    // fills in.
    if unsafe { libc::fcntl(f.as_raw_fd(), libc::F_GETLK, &mut fl) } != 0 {
        return None;
    }
    (fl.l_type != libc::F_UNLCK as libc::c_short && fl.l_pid > 0).then_some(fl.l_pid as u32)
}

/// The pid of the live monitor of the pod at `paths`: who holds its lock.
/// (Pods started by a husk without the lock: their recorded pid, if alive.)
pub fn live_monitor(paths: &PodPaths) -> Option<u32> {
    if paths.monitor_lock().exists() {
        return lock_holder(&paths.monitor_lock());
    }
    PodStatus::load(paths)
        .ok()
        .and_then(|s| s.monitor_pid)
        .filter(|p| pid_alive(*p))
}

/// A fresh pod id: 16 hex digits.
pub fn new_pod_id() -> String {
    let b: [u8; 8] = rand::random();
    hex::encode(b)
}

/// Whether a process with this pid is alive (and not a zombie).
pub fn pid_alive(pid: u32) -> bool {
    let stat = match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(s) => s,
        Err(_) => return false,
    };
    // The state letter follows the ")" that closes the command name.
    stat.rsplit_once(')')
        .and_then(|(_, rest)| rest.trim_start().chars().next())
        .map(|c| c != 'Z' && c != 'X')
        .unwrap_or(false)
}
