//! What both sandbox kinds share about a pod's life, so that wasm and VM
//! pods report and restart alike: the first status, the status cell that
//! is saved (with its phase recomputed) on every change, and the kubelet's
//! restart rules and back-off. It knows nothing of how containers run.

use crate::pod::{ContainerPlan, PodPlan, RestartPolicy};
use crate::state::{ContainerState, ContainerStatus, PodPaths, PodPhase, PodStatus};
use std::sync::Mutex;
use std::time::Duration;

/// Backoff is reset after a container ran this long (kubelet: 2 × cap).
pub const BACKOFF_RESET: Duration = Duration::from_secs(600);

/// A container about to be created.
pub fn creating(
    c: &ContainerPlan,
    paths: &PodPaths,
    compile_cache: Option<String>,
) -> ContainerStatus {
    ContainerStatus {
        name: c.name.clone(),
        image: c.image_ref.clone(),
        guest_kind: c.guest_kind.clone(),
        state: ContainerState::Waiting {
            reason: "ContainerCreating".into(),
            message: None,
        },
        last_state: None,
        restart_count: 0,
        ready: false,
        compile_cache,
        log_path: paths.log_file(&c.name, 0),
    }
}

/// A pod's first status, Pending; `statuses` are in `all_containers` order.
pub fn pending(
    plan: &PodPlan,
    mut statuses: Vec<ContainerStatus>,
    pod_ips: Vec<String>,
    cgroup: Option<String>,
) -> PodStatus {
    let containers = statuses.split_off(plan.init_containers.len());
    PodStatus {
        phase: PodPhase::Pending,
        reason: None,
        message: None,
        pod_ip: pod_ips.first().cloned(),
        pod_ips: pod_ips
            .into_iter()
            .map(|ip| crate::state::PodIp { ip })
            .collect(),
        monitor_pid: Some(std::process::id()),
        finished: false,
        started_at: Some(chrono::Utc::now()),
        finished_at: None,
        cgroup,
        init_container_statuses: statuses,
        container_statuses: containers,
        cri_containers: Vec::new(),
        stopping: false,
    }
}

/// The pod's live status: every change recomputes the phase and is saved.
pub struct StatusCell {
    status: Mutex<PodStatus>,
    paths: PodPaths,
    n_init: usize,
}

impl StatusCell {
    pub fn new(status: PodStatus, paths: PodPaths, n_init: usize) -> Self {
        StatusCell {
            status: Mutex::new(status),
            paths,
            n_init,
        }
    }

    pub fn get(&self) -> PodStatus {
        self.status
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    pub fn update(&self, f: impl FnOnce(&mut PodStatus)) {
        let mut st = self.status.lock().unwrap_or_else(|p| p.into_inner());
        f(&mut st);
        st.phase = phase_of(&st, self.n_init);
        if let Err(e) = st.save(&self.paths) {
            tracing::warn!("cannot save pod status: {e}");
        }
    }

    /// A CRI container's record.
    pub fn cri(&self, id: &str) -> Result<crate::state::CriContainer, crate::Failure> {
        let st = self.status.lock().unwrap_or_else(|p| p.into_inner());
        st.cri_containers
            .iter()
            .find(|c| c.id == id)
            .cloned()
            .ok_or_else(|| crate::Failure::no_container(id))
    }

    /// A CRI container's record, if it is running.
    pub fn cri_running(&self, id: &str) -> Result<crate::state::CriContainer, crate::Failure> {
        let rec = self.cri(id)?;
        if rec.state != crate::state::CriState::Running {
            return Err(crate::Failure::new(
                crate::Code::FailedPrecondition,
                format!("container {id} is not running"),
            ));
        }
        Ok(rec)
    }

    /// Changes a CRI container's record (if it is there) and saves.
    pub fn with_cri(&self, id: &str, f: impl FnOnce(&mut crate::state::CriContainer)) {
        self.update(|st| {
            if let Some(c) = st.cri_containers.iter_mut().find(|c| c.id == id) {
                f(c);
            }
        });
    }

    pub fn with_container(&self, init: bool, idx: usize, f: impl FnOnce(&mut ContainerStatus)) {
        self.update(|st| {
            let list = if init {
                &mut st.init_container_statuses
            } else {
                &mut st.container_statuses
            };
            f(&mut list[idx]);
        })
    }

    /// Marks the app containers as never started (an init container failed
    /// or the pod was stopped first).
    pub fn init_failed(&self, stopped: bool) {
        let msg = if stopped {
            "pod stopped"
        } else {
            "an init container failed"
        };
        self.update(|st| {
            for c in st.container_statuses.iter_mut() {
                c.state = ContainerState::Waiting {
                    reason: "PodInitializing".into(),
                    message: Some(msg.into()),
                };
            }
            st.reason = Some("InitFailed".into());
        });
    }

    /// Records the end of the pod's run and returns its final phase.
    pub fn finish(&self) -> PodPhase {
        self.update(|st| st.finished_at = Some(chrono::Utc::now()));
        match self.get().phase {
            PodPhase::Succeeded => PodPhase::Succeeded,
            _ => PodPhase::Failed,
        }
    }
}

/// Whether a container that ended with `code` runs again (kubelet rules:
/// init containers only ever restart after a failure).
pub fn should_restart(init: bool, policy: RestartPolicy, code: i32) -> bool {
    match (init, policy) {
        (_, RestartPolicy::Never) => false,
        (true, _) => code != 0,
        (false, RestartPolicy::Always) => true,
        (false, RestartPolicy::OnFailure) => code != 0,
    }
}

/// The state of a container waiting `delay` to be restarted.
pub fn crash_loop_back_off(delay: Duration, code: i32, name: &str) -> ContainerState {
    ContainerState::Waiting {
        reason: "CrashLoopBackOff".into(),
        message: Some(format!(
            "back-off {}ms restarting {} container {name}",
            delay.as_millis(),
            if code == 0 { "completed" } else { "failed" },
        )),
    }
}

/// The pod phase implied by its container statuses.
pub fn phase_of(st: &PodStatus, n_init: usize) -> PodPhase {
    if st.init_container_statuses.is_empty() && st.container_statuses.is_empty() {
        // A CRI pod sandbox: up until it ends.
        return if st.finished_at.is_some() {
            PodPhase::Succeeded
        } else {
            PodPhase::Running
        };
    }
    let init_done = st
        .init_container_statuses
        .iter()
        .all(|c| c.exit_code() == Some(0));
    if st.reason.as_deref() == Some("InitFailed") {
        return PodPhase::Failed;
    }
    if n_init > 0 && !init_done {
        return PodPhase::Pending;
    }
    if st.container_statuses.iter().any(|c| !c.is_terminated()) {
        return PodPhase::Running;
    }
    if st
        .container_statuses
        .iter()
        .all(|c| c.exit_code() == Some(0))
    {
        PodPhase::Succeeded
    } else {
        PodPhase::Failed
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn restart_rules_follow_the_kubelet() {
        use RestartPolicy::*;
        assert!(!should_restart(false, Never, 1));
        assert!(should_restart(false, Always, 0));
        assert!(!should_restart(false, OnFailure, 0));
        assert!(should_restart(false, OnFailure, 2));
        assert!(should_restart(true, Always, 1));
        assert!(!should_restart(true, Always, 0));
    }
}
