//! What huskd knows, read from husk's state directories on every call: the
//! pod records and status files its monitors keep. huskd holds no state of
//! its own beyond a lock that keeps two RunPodSandbox calls from taking the
//! same name, so a restarted huskd finds everything again.

use husk_sandbox::state::{live_monitor, CriContainer, PodRecord, PodStatus, Roots};
use husk_shim::control::{self, Reply, Request};
use serde::{Deserialize, Serialize};
use std::path::PathBuf;
use std::time::Duration;
use tonic::Status;

/// What CRI says about a sandbox that a husk pod record does not hold.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CriSandbox {
    pub attempt: u32,
    pub log_directory: String,
    pub runtime_handler: String,
}

impl CriSandbox {
    pub fn path(roots: &Roots, id: &str) -> PathBuf {
        roots.pod(id).lib.join("cri.json")
    }
}

/// One pod sandbox as huskd sees it.
pub struct SandboxView {
    pub record: PodRecord,
    pub status: Option<PodStatus>,
    pub cri: CriSandbox,
    /// The pid of its live monitor (the holder of the pod's lock).
    pub monitor: Option<u32>,
}

impl SandboxView {
    pub fn id(&self) -> &str {
        &self.record.id
    }

    pub fn monitor_alive(&self) -> bool {
        self.monitor.is_some()
    }

    /// Ready: its monitor runs and it was not asked to stop.
    pub fn ready(&self) -> bool {
        self.monitor_alive()
            && self
                .status
                .as_ref()
                .is_some_and(|s| !s.finished && !s.stopping)
    }

    /// The monitor ended without finishing the pod (it crashed or was
    /// killed): the pod is reported, not forgotten.
    pub fn monitor_lost(&self) -> bool {
        self.status
            .as_ref()
            .is_some_and(|s| !s.finished && !self.monitor_alive())
    }

    pub fn containers(&self) -> &[CriContainer] {
        self.status
            .as_ref()
            .map(|s| s.cri_containers.as_slice())
            .unwrap_or_default()
    }
}

pub struct Huskd {
    pub roots: Roots,
    /// The husk binary that runs monitors.
    pub husk: PathBuf,
    pub default_handler: String,
    /// Held while a sandbox name is checked and taken.
    pub names: tokio::sync::Mutex<()>,
    /// Where Exec and PortForward URLs point.
    pub streaming: std::sync::Arc<crate::stream::Streaming>,
    /// GetContainerEvents' subscribers.
    pub events: crate::events::Events,
}

pub fn internal(e: impl std::fmt::Display) -> Status {
    Status::internal(e.to_string())
}

impl Huskd {
    pub fn new(
        roots: Roots,
        husk: PathBuf,
        default_handler: String,
        streaming: std::sync::Arc<crate::stream::Streaming>,
    ) -> Self {
        Huskd {
            streaming,
            roots,
            husk,
            default_handler,
            names: tokio::sync::Mutex::new(()),
            events: Default::default(),
        }
    }

    /// Logs what a (re)started huskd finds.
    pub fn recover(&self) {
        let all = self.sandboxes();
        let ready = all.iter().filter(|s| s.ready()).count();
        let lost: Vec<&str> = all
            .iter()
            .filter(|s| s.monitor_lost())
            .map(|s| s.id())
            .collect();
        tracing::info!(
            sandboxes = all.len(),
            ready,
            "found the pod sandboxes of earlier runs"
        );
        if !lost.is_empty() {
            tracing::warn!(
                "pod sandboxes whose monitor died (reported NOTREADY, containers UNKNOWN): {}",
                lost.join(", ")
            );
        }
    }

    fn view(&self, record: PodRecord) -> Option<SandboxView> {
        if !record.plan.cri {
            return None;
        }
        let paths = self.roots.pod(&record.id);
        let cri = husk_sandbox::state::read_json(&CriSandbox::path(&self.roots, &record.id))
            .unwrap_or_default();
        let status = PodStatus::load(&paths).ok();
        let monitor = live_monitor(&paths);
        Some(SandboxView {
            record,
            status,
            cri,
            monitor,
        })
    }

    /// Every CRI pod sandbox, oldest first. Pods run from manifests by the
    /// CLI are not shown: a kubelet would take them for its own leftovers.
    pub fn sandboxes(&self) -> Vec<SandboxView> {
        self.roots
            .list_pods()
            .into_iter()
            .filter_map(|r| self.view(r))
            .collect()
    }

    pub fn sandbox(&self, id: &str) -> Result<SandboxView, Status> {
        if id.is_empty() {
            return Err(Status::invalid_argument("pod_sandbox_id is empty"));
        }
        let bad = || Status::not_found(format!("pod sandbox {id:?} not found"));
        if !id.chars().all(|c| c.is_ascii_hexdigit()) {
            return Err(bad());
        }
        let rec = PodRecord::load(&self.roots.pod(id)).map_err(|_| bad())?;
        self.view(rec).ok_or_else(bad)
    }

    /// A container and its sandbox (a container id starts with its pod's).
    pub fn container(&self, id: &str) -> Result<(SandboxView, CriContainer), Status> {
        if id.is_empty() {
            return Err(Status::invalid_argument("container_id is empty"));
        }
        let bad = || Status::not_found(format!("container {id:?} not found"));
        if id.len() <= 16 || !id.chars().all(|c| c.is_ascii_hexdigit()) {
            return Err(bad());
        }
        let sb = self.sandbox(&id[..16]).map_err(|_| bad())?;
        let c = sb
            .containers()
            .iter()
            .find(|c| c.id == id)
            .cloned()
            .ok_or_else(bad)?;
        Ok((sb, c))
    }

    /// Sends `req` to a sandbox's monitor, off the async threads.
    pub async fn call(&self, id: &str, req: Request, timeout: Duration) -> Result<Reply, Status> {
        let socket = self.roots.pod(id).socket();
        let id = id.to_owned();
        let reply =
            tokio::task::spawn_blocking(move || control::call_waiting(&socket, &req, timeout))
                .await
                .map_err(internal)?
                .map_err(|e| Status::unavailable(format!("pod sandbox {id}: its monitor: {e}")))?;
        Ok(reply)
    }

    /// As `call`, an error reply becoming `code`.
    pub async fn call_ok(
        &self,
        id: &str,
        req: Request,
        timeout: Duration,
    ) -> Result<Reply, Status> {
        let reply = self.call(id, req, timeout).await?;
        if reply.ok {
            return Ok(reply);
        }
        let msg = reply.error.unwrap_or_else(|| "failed".into());
        Err(status_of(reply.code, msg))
    }
}

/// The gRPC status for a monitor's failure, from the code the sandbox
/// gave it (none: unknown).
pub fn status_of(code: Option<husk_sandbox::Code>, msg: String) -> Status {
    use husk_sandbox::Code;
    match code {
        Some(Code::NotFound) => Status::not_found(msg),
        Some(Code::AlreadyExists) => Status::already_exists(msg),
        Some(Code::FailedPrecondition) => Status::failed_precondition(msg),
        // A probe's exec that ran out of time (the kubelet reads this code).
        Some(Code::DeadlineExceeded) => Status::deadline_exceeded(msg),
        Some(Code::Unimplemented) => Status::unimplemented(msg),
        Some(Code::InvalidArgument) => Status::invalid_argument(msg),
        None => Status::unknown(msg),
    }
}
