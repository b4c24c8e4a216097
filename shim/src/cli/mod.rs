//! The CLI verbs, one file each. Exit codes: 0 success, 1 runtime failure,
//! 2 usage or validation error (nothing was created).

pub mod apply;
pub mod attach;
pub mod cp;
pub mod exec;
pub mod images;
pub mod info;
pub mod inspect;
pub mod logs;
pub mod port_forward;
pub mod ps;
pub mod rm;
pub mod run;
pub mod stats;
pub mod stop;
pub mod update;

use husk_sandbox::state::{live_monitor, ContainerState, PodRecord, PodStatus, Roots};

pub const EXIT_FAILURE: i32 = 1;
pub const EXIT_USAGE: i32 = 2;

pub fn fail(code: i32, msg: impl std::fmt::Display) -> i32 {
    eprintln!("husk: {msg}");
    code
}

/// What the CLI knows of a pod: its record, its status file and whether its
/// monitor still runs.
pub struct PodView {
    pub record: PodRecord,
    pub status: Option<PodStatus>,
    /// The pid of its live monitor (the holder of the pod's lock).
    pub monitor: Option<u32>,
}

impl PodView {
    pub fn load(roots: &Roots, record: PodRecord) -> Self {
        let paths = roots.pod(&record.id);
        let mut status = PodStatus::load(&paths).ok();
        let monitor = live_monitor(&paths);
        // A monitor that died (kill -9, a crash) took its containers'
        // fate with it: what its status last said is not known to be
        // true, so a running container is shown as the kubelet shows one
        // it lost (ContainerStatusUnknown), not as Running.
        if let Some(s) = status.as_mut() {
            if !s.finished && monitor.is_none() {
                for c in s
                    .init_container_statuses
                    .iter_mut()
                    .chain(s.container_statuses.iter_mut())
                {
                    if matches!(c.state, ContainerState::Running { .. }) {
                        c.state = ContainerState::Waiting {
                            reason: "ContainerStatusUnknown".into(),
                            message: Some(
                                "the pod's monitor is gone (killed or crashed); `husk rm` releases what it left".into(),
                            ),
                        };
                        c.ready = false;
                    }
                }
            }
        }
        PodView {
            record,
            status,
            monitor,
        }
    }

    pub fn monitor_alive(&self) -> bool {
        self.monitor.is_some()
    }

    pub fn finished(&self) -> bool {
        self.status.as_ref().is_some_and(|s| s.finished)
    }

    /// Phase as shown to users; `Unknown` when the monitor vanished.
    pub fn phase_str(&self) -> String {
        match &self.status {
            None => "Created".into(),
            Some(s) if !s.finished && !self.monitor_alive() => "Unknown".into(),
            Some(s) => format!("{:?}", s.phase),
        }
    }

    pub fn is_terminal(&self) -> bool {
        self.status
            .as_ref()
            .is_some_and(|s| s.finished || !self.monitor_alive())
    }
}

/// The running pod `key` for a command that acts on one of its containers
/// (`exec`, `update`): an unknown container is a usage error (2), a pod
/// that is not running a failure (1). Err holds the exit code, the
/// message printed.
pub fn running_pod(roots: &Roots, key: &str, container: Option<&str>) -> Result<PodView, i32> {
    let rec = roots.find_pod(key).map_err(|e| fail(EXIT_FAILURE, e))?;
    let v = PodView::load(roots, rec);
    let plan = &v.record.plan;
    if let Some(c) = container {
        if !plan.all_containers().any(|x| x.name == c) {
            let names: Vec<&str> = plan.all_containers().map(|c| c.name.as_str()).collect();
            return Err(fail(
                EXIT_USAGE,
                format!(
                    "pod {} has no container {c:?}; it has: {}",
                    plan.name,
                    names.join(", ")
                ),
            ));
        }
    }
    if v.is_terminal() {
        return Err(fail(
            EXIT_FAILURE,
            format!("pod {} is not running", plan.name),
        ));
    }
    Ok(v)
}

/// True once the pod at `id` is over (or has no status to wait for).
pub fn pod_over(roots: &Roots, id: &str) -> bool {
    let paths = roots.pod(id);
    PodStatus::load(&paths)
        .ok()
        .is_none_or(|s| s.finished || live_monitor(&paths).is_none())
}

/// Applies `act` to each pod named in `keys`; prints errors and returns the
/// exit code (1 if any pod failed).
pub fn for_each_pod(
    roots: &Roots,
    keys: &[String],
    mut act: impl FnMut(PodView) -> Result<(), String>,
) -> i32 {
    let mut code = 0;
    for key in keys {
        let result = roots
            .find_pod(key)
            .map_err(|e| e.to_string())
            .and_then(|rec| act(PodView::load(roots, rec)));
        if let Err(e) = result {
            code = fail(EXIT_FAILURE, e);
        }
    }
    code
}

/// Waits until the pod's monitor has finished (or vanished).
pub fn wait_finished(roots: &Roots, id: &str, timeout: std::time::Duration) -> bool {
    let t0 = std::time::Instant::now();
    loop {
        if pod_over(roots, id) {
            return true;
        }
        if t0.elapsed() > timeout {
            return false;
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}
