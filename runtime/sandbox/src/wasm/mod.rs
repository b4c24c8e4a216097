//! The wasm sandbox: a pod whose containers are WebAssembly guests run by
//! one wasmtime engine inside the pod's monitor process. It owns the pod's
//! host resources (netns + CNI attachment, cgroup, volumes) and releases them
//! in [`WasmSandbox::teardown`], also when creation fails half-way.
//!
//! Networking works by placement: after CNI has wired the netns, the
//! monitor's main thread enters it *before* any other thread exists, so every
//! thread wasmtime-wasi later creates sockets from lives in the pod's netns.

mod cri;
pub(crate) mod supervisor;

use crate::cgroup::PodCgroup;
use crate::config::HuskConfig;
use crate::network::{self, PodNetwork};
use crate::pod::PodPlan;
use crate::state::{PodPaths, PodStatus};
use crate::volume::PodVolumes;
use husk_wasm::{CacheOutcome, CompiledGuest, WasmEngine};
use std::os::fd::OwnedFd;
use std::path::Path;
use std::sync::{Arc, Mutex};

pub use supervisor::StopRequest;

#[derive(Debug, thiserror::Error)]
pub enum SandboxError {
    #[error("pod network: {0}")]
    Network(#[from] network::NetworkError),
    #[error("pod cgroup: {0}")]
    Cgroup(#[from] crate::cgroup::CgroupError),
    #[error("pod volumes: {0}")]
    Volume(#[from] crate::volume::VolumeError),
    #[error("container {container:?}: {source}")]
    Guest {
        container: String,
        source: husk_wasm::WasmError,
    },
    #[error("wasm engine: {0}")]
    Engine(husk_wasm::WasmError),
    #[error("pod state: {0}")]
    State(#[from] crate::state::StateError),
    #[error(transparent)]
    Vm(crate::vm::sandbox::VmPodError),
}

use crate::failure::{Code, Failure};

impl SandboxError {
    /// The pod's own input is at fault, not the host: a guest file that
    /// is not (valid) WebAssembly.
    pub fn is_bad_input(&self) -> bool {
        matches!(
            self,
            SandboxError::Guest {
                source: husk_wasm::WasmError::Invalid { .. } | husk_wasm::WasmError::NotWasm { .. },
                ..
            }
        )
    }
}

/// The pod boundary shared by husk's sandbox kinds: front ends and the
/// monitor only ever see this.
pub trait Sandbox: Send + Sync {
    /// The runtime class this sandbox implements.
    fn runtime_class(&self) -> &'static str;
    /// The pod it runs.
    fn plan(&self) -> &PodPlan;
    /// A snapshot of the pod's status.
    fn status(&self) -> PodStatus;
    /// Asks every container to end: stdin closes, and after `grace` the
    /// survivors are killed. Restarts stop.
    fn request_stop(&self, grace: std::time::Duration);
    /// Changes a container's limits (`docker update`): the given ones
    /// change, for the running instance and its restarts.
    fn update(
        &self,
        container: Option<&str>,
        memory_bytes: Option<u64>,
        cpu_millis: Option<u64>,
    ) -> Result<(), Failure> {
        let _ = (container, memory_bytes, cpu_millis);
        Err(Failure::new(
            Code::Unimplemented,
            format!(
                "updating limits is not supported in {} pods yet",
                self.runtime_class()
            ),
        ))
    }
    /// Starts a command in a running container with its stdin open
    /// (`kubectl exec -i`, with `-t` a terminal; `husk cp`'s copies): its
    /// output and exit arrive on the session's receiver, stdin goes
    /// through its writer, and its killer ends it.
    fn exec_interactive(
        &self,
        container: Option<&str>,
        spec: ExecSpec,
    ) -> Result<ExecSession, Failure> {
        let _ = (container, spec);
        Err(Failure::new(
            Code::Unimplemented,
            format!(
                "exec is not supported in {} pods (a wasm container has no shell or processes to start beside it)",
                self.runtime_class()
            ),
        ))
    }
    /// Replaces the files of a configMap or secret volume while the pod
    /// runs (`husk apply`), as the kubelet does when the object changes.
    fn update_volume(&self, volume: &str, files: &[crate::pod::VolumeFile]) -> Result<(), String>;
    /// Resource usage of the pod's running containers.
    fn stats(&self) -> Result<PodStats, Failure> {
        Err(Failure::new(
            Code::Unimplemented,
            format!(
                "stats are not supported in {} pods yet",
                self.runtime_class()
            ),
        ))
    }
    /// Runs `argv` in a running container (`kubectl exec` without a TTY;
    /// the pod's first container when `container` is None) and returns
    /// its output and exit code. Blocking.
    fn exec(
        &self,
        container: Option<&str>,
        argv: Vec<String>,
        timeout: std::time::Duration,
    ) -> Result<ExecOutput, Failure> {
        let _ = (container, argv, timeout);
        Err(Failure::new(
            Code::Unimplemented,
            format!(
                "exec is not supported in {} pods (a wasm container has no shell or processes to start beside it)",
                self.runtime_class()
            ),
        ))
    }

    /// CRI: creates a container (not started) in a CRI pod sandbox; its
    /// mounts name `volumes` (host directories). Returns its id.
    fn create_container(
        &self,
        container: crate::pod::ContainerPlan,
        volumes: Vec<crate::pod::VolumePlan>,
        meta: crate::state::CriMeta,
    ) -> Result<String, Failure> {
        let _ = (container, volumes, meta);
        Err(Failure::new(
            Code::Unimplemented,
            format!(
                "{} pods do not take containers one by one (CRI) yet",
                self.runtime_class()
            ),
        ))
    }
    /// CRI: starts a created container.
    fn start_container(&self, id: &str) -> Result<(), Failure> {
        Err(Failure::no_container(id))
    }
    /// CRI: asks a container to end and kills it after `timeout`; returns
    /// once it has exited. Stopping an exited container is not an error.
    fn stop_container(&self, id: &str, timeout: std::time::Duration) -> Result<(), Failure> {
        let _ = timeout;
        Err(Failure::no_container(id))
    }
    /// CRI: removes a container, stopping it first when it runs.
    fn remove_container(&self, id: &str) -> Result<(), Failure> {
        Err(Failure::no_container(id))
    }
    /// CRI: reopens a container's log file (after the kubelet rotated it).
    fn reopen_log(&self, id: &str) -> Result<(), Failure> {
        Err(Failure::no_container(id))
    }
    /// CRI: attaches to a running container's process: its output from
    /// now on, its stdin (when it was created with one) and its terminal.
    /// Leaving does not end it.
    fn attach(&self, id: &str) -> Result<ExecSession, Failure> {
        Err(Failure::new(
            Code::Unimplemented,
            format!(
                "attach is not supported in {} pods (container {id})",
                self.runtime_class()
            ),
        ))
    }
}

/// A pod's resource usage at one moment.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PodStats {
    pub containers: Vec<ContainerUsage>,
    /// The whole VM (VM pods).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vm: Option<VmUsage>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ContainerUsage {
    pub name: String,
    /// CPU time used, in microseconds.
    pub cpu_usage_usec: u64,
    pub memory_bytes: u64,
    pub memory_limit_bytes: Option<u64>,
    pub pids: u64,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct VmUsage {
    pub cpu_usage_usec: u64,
    pub memory_total_bytes: u64,
    pub memory_available_bytes: u64,
}

/// What an interactive exec runs.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ExecSpec {
    /// The command (empty with `copy`).
    #[serde(default)]
    pub argv: Vec<String>,
    /// A terminal of this size for stdin, stdout and stderr.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tty: Option<husk_protocol::TtySize>,
    /// A copy out of or into the container instead of a command: a tar on
    /// stdout, or one read from stdin ([`husk_protocol::copy`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub copy: Option<husk_protocol::Tool>,
}

/// A running interactive exec.
pub struct ExecSession {
    pub output: std::sync::mpsc::Receiver<ExecMsg>,
    pub stdin: StdinWriter,
    pub resize: Resizer,
    pub kill: Killer,
}

/// Changes an interactive exec's terminal size.
pub type Resizer = Box<dyn Fn(husk_protocol::TtySize) -> Result<(), String> + Send + Sync>;
/// Writes an interactive exec's stdin: bytes, and whether it ends there.
pub type StdinWriter = Box<dyn Fn(&[u8], bool) -> Result<(), String> + Send + Sync>;
/// Ends an interactive exec (its caller went away).
pub type Killer = Box<dyn Fn() + Send + Sync>;

/// One message of an interactive exec, both ways (JSON lines on the
/// monitor's socket).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(tag = "type", rename_all = "camelCase")]
pub enum ExecMsg {
    Stdin {
        #[serde(with = "b64")]
        data: Vec<u8>,
        #[serde(default)]
        eof: bool,
    },
    Stdout {
        #[serde(with = "b64")]
        data: Vec<u8>,
    },
    Stderr {
        #[serde(with = "b64")]
        data: Vec<u8>,
    },
    /// The caller's terminal changed its size (with a TTY).
    Resize { rows: u16, cols: u16 },
    /// The command ended; the last message.
    Exit { code: i32 },
    /// The exec failed; the last message.
    Error { message: String },
}

/// What an exec produced.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ExecOutput {
    pub exit_code: i32,
    #[serde(with = "b64")]
    pub stdout: Vec<u8>,
    #[serde(with = "b64")]
    pub stderr: Vec<u8>,
}

mod b64 {
    use base64::Engine;
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(v: &[u8], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&base64::engine::general_purpose::STANDARD.encode(v))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        base64::engine::general_purpose::STANDARD
            .decode(String::deserialize(d)?)
            .map_err(serde::de::Error::custom)
    }
}

/// Host resources of a pod, each with exactly one owner.
struct HostResources {
    network: Option<PodNetwork>,
    host_netns: Option<OwnedFd>,
    cgroup: Option<PodCgroup>,
    volumes: PodVolumes,
}

pub struct WasmSandbox {
    pub(crate) plan: Arc<PodPlan>,
    pub(crate) paths: PodPaths,
    pub(crate) engine: Arc<WasmEngine>,
    pub(crate) guests: Vec<(String, CompiledGuest)>,
    pub(crate) status: Arc<crate::lifecycle::StatusCell>,
    pub(crate) config: HuskConfig,
    pub(crate) stop: StopRequest,
    resources: Mutex<HostResources>,
    /// Containers created through CRI, by id.
    cri: Mutex<std::collections::HashMap<String, cri::CriEntry>>,
    /// Set (for good) by `run` once the pod stops: no new CRI containers.
    pub(crate) cri_closed: std::sync::atomic::AtomicBool,
    /// Who is attached to the manifest's containers, by name (kept across
    /// restarts).
    pub(crate) hubs: crate::attach::Hubs,
}

impl WasmSandbox {
    /// Creates the pod's sandbox: netns + CNI (from the host netns), then
    /// moves the calling thread into the pod netns, creates the cgroup (and
    /// moves this process in), the volumes, the engine, and compiles every
    /// guest (through the cache). Must be called before the process starts
    /// other threads. On error everything created is removed again.
    pub fn create(
        plan: PodPlan,
        paths: PodPaths,
        config: HuskConfig,
        cache_dir: &Path,
        cni_dir: &Path,
    ) -> Result<Arc<Self>, SandboxError> {
        let mut res = HostResources {
            network: None,
            host_netns: None,
            cgroup: None,
            volumes: PodVolumes::default(),
        };
        match Self::create_inner(&plan, &paths, &config, cache_dir, cni_dir, &mut res) {
            Ok((engine, guests, status)) => Ok(Arc::new(WasmSandbox {
                status: Arc::new(crate::lifecycle::StatusCell::new(
                    status,
                    paths.clone(),
                    plan.init_containers.len(),
                )),
                plan: Arc::new(plan),
                paths,
                engine: Arc::new(engine),
                guests,
                config,
                stop: StopRequest::new(),
                resources: Mutex::new(res),
                cri: Mutex::new(Default::default()),
                cri_closed: Default::default(),
                hubs: Default::default(),
            })),
            Err(e) => {
                release(&mut res);
                Err(e)
            }
        }
    }

    #[allow(clippy::type_complexity)]
    fn create_inner(
        plan: &PodPlan,
        paths: &PodPaths,
        config: &HuskConfig,
        cache_dir: &Path,
        cni_dir: &Path,
        res: &mut HostResources,
    ) -> Result<(WasmEngine, Vec<(String, CompiledGuest)>, PodStatus), SandboxError> {
        std::fs::create_dir_all(&paths.run).map_err(|e| crate::state::StateError::Io {
            path: paths.run.clone(),
            source: e,
        })?;
        // Network, from the host's namespace.
        let net = PodNetwork::for_pod(plan, paths, &config.network, cni_dir)?;
        let pod_ips = net.record.pod_ips();
        res.network = Some(net);
        res.host_netns =
            Some(
                network::current_netns().map_err(|e| network::NetworkError::Netns {
                    path: "/proc/thread-self/ns/net".into(),
                    msg: e.to_string(),
                })?,
            );
        network::enter_netns(&paths.netns)?;
        network::loopback_up().map_err(|e| network::NetworkError::Netns {
            path: paths.netns.clone(),
            msg: format!("cannot bring lo up: {e}"),
        })?;

        // CPU quota for the whole pod.
        let mut cgroup_path = None;
        if let Some(millis) = plan.cpu_limit_millis {
            let cg = PodCgroup::create(&paths.id, millis)?;
            cg.add_process(std::process::id())?;
            cgroup_path = Some(cg.path.display().to_string());
            res.cgroup = Some(cg);
        }

        res.volumes = PodVolumes::setup(plan, paths)?;

        let engine = WasmEngine::new(cache_dir).map_err(SandboxError::Engine)?;
        let mut guests = Vec::new();
        let mut statuses = Vec::new();
        for c in plan.all_containers() {
            let (guest, outcome) = engine
                .load(&c.image)
                .map_err(|source| SandboxError::Guest {
                    container: c.name.clone(),
                    source,
                })?;
            guests.push((c.name.clone(), guest));
            statuses.push(crate::lifecycle::creating(
                c,
                paths,
                Some(
                    match outcome {
                        CacheOutcome::Hit => "hit",
                        CacheOutcome::Compiled => "compiled",
                    }
                    .into(),
                ),
            ));
        }
        let status = crate::lifecycle::pending(plan, statuses, pod_ips, cgroup_path);
        status.save(paths)?;
        Ok((engine, guests, status))
    }

    pub fn plan(&self) -> &PodPlan {
        &self.plan
    }

    pub fn paths(&self) -> &PodPaths {
        &self.paths
    }

    /// Releases every host resource: volumes, cgroup, CNI DEL and the
    /// netns (from the host netns). Idempotent.
    pub fn teardown(&self) {
        let mut res = self.resources.lock().unwrap_or_else(|p| p.into_inner());
        release(&mut res);
    }
}

fn release(res: &mut HostResources) {
    res.volumes.teardown();
    if let Some(cg) = res.cgroup.take() {
        if let Err(e) = cg.remove() {
            tracing::warn!("{e}");
        }
    }
    if let Some(fd) = res.host_netns.take() {
        // CNI plugins must run from the host's namespace.
        if let Err(e) = network::enter_netns_fd(&fd) {
            tracing::warn!("cannot return to the host netns: {e}");
        }
    }
    if let Some(mut net) = res.network.take() {
        if let Err(e) = net.teardown() {
            tracing::warn!("{e}");
        }
    }
}

impl Sandbox for WasmSandbox {
    fn runtime_class(&self) -> &'static str {
        crate::pod::manifest::RUNTIME_WASM
    }

    fn update_volume(&self, volume: &str, files: &[crate::pod::VolumeFile]) -> Result<(), String> {
        let res = self.resources.lock().unwrap_or_else(|p| p.into_inner());
        res.volumes
            .update_files(volume, files)
            .map_err(|e| e.to_string())
    }

    fn plan(&self) -> &PodPlan {
        &self.plan
    }

    fn status(&self) -> PodStatus {
        self.status.get()
    }

    fn request_stop(&self, grace: std::time::Duration) {
        self.stop.request(grace);
        if !self.status.get().stopping {
            self.status.update(|st| st.stopping = true);
        }
    }

    fn create_container(
        &self,
        container: crate::pod::ContainerPlan,
        volumes: Vec<crate::pod::VolumePlan>,
        meta: crate::state::CriMeta,
    ) -> Result<String, Failure> {
        self.cri_create(container, volumes, meta)
    }

    fn start_container(&self, id: &str) -> Result<(), Failure> {
        self.cri_start(id)
    }

    fn stop_container(&self, id: &str, timeout: std::time::Duration) -> Result<(), Failure> {
        self.cri_stop(id, timeout)
    }

    fn remove_container(&self, id: &str) -> Result<(), Failure> {
        self.cri_remove(id)
    }

    fn reopen_log(&self, id: &str) -> Result<(), Failure> {
        self.cri_reopen_log(id)
    }

    fn attach(&self, id: &str) -> Result<crate::ExecSession, Failure> {
        if self.plan.cri {
            return self.cri_attach(id);
        }
        let c = crate::attach::running_container(&self.plan, &self.status.get(), id)?;
        Ok(self.hubs.get(id).attach(id, c.stdin, c.stdin_once))
    }
}
