//! `husk rm [-f] POD…`: removes finished pods (with -f, stops running ones
//! first), releasing anything a crashed monitor left behind.

use super::for_each_pod;
use super::wait_finished;
use crate::control::{self, Request};
use husk_sandbox::state::{pid_alive, PodLock, PodLockError, Roots};
use std::time::Duration;

#[derive(clap::Args)]
pub struct RmArgs {
    /// Stop running pods at once (grace period 0) and remove them.
    #[arg(short, long)]
    force: bool,
    #[arg(required = true)]
    pods: Vec<String>,
}

/// Takes the lock of pod `id` (see [`PodLock`]), waiting up to `wait`
/// for a monitor on its way out (one that marked its pod finished ends a
/// moment later) to let go of it.
pub fn lock_pod(roots: &Roots, id: &str, wait: Duration) -> Result<PodLock, String> {
    let paths = roots.pod(id);
    let t0 = std::time::Instant::now();
    loop {
        match PodLock::take(&paths) {
            Ok(lock) => return Ok(lock),
            Err(PodLockError::Held(_)) if t0.elapsed() < wait => {
                std::thread::sleep(Duration::from_millis(10));
            }
            Err(e) => return Err(format!("pod {id}: {e}")),
        }
    }
}

/// Removes one pod's state; it must not be running (its monitor, if it
/// had one, ended or is ending). Under the pod's lock, so that a monitor
/// starting at the same moment makes nothing.
pub fn remove_pod(roots: &Roots, id: &str) -> Result<(), String> {
    let paths = roots.pod(id);
    let _lock = lock_pod(roots, id, Duration::from_secs(10))?;
    let problems = husk_sandbox::recovery::release_leftovers(&paths);
    if !problems.is_empty() {
        return Err(format!("pod {id}: {}", problems.join("; ")));
    }
    for d in [&paths.run, &paths.lib] {
        if let Err(e) = std::fs::remove_dir_all(d) {
            if e.kind() != std::io::ErrorKind::NotFound {
                return Err(format!("{}: {e}", d.display()));
            }
        }
    }
    Ok(())
}

/// Stops pod `id` (named `name`) at once, for `rm -f` and for huskd's
/// StopPodSandbox and RemovePodSandbox: asks its monitor (`monitor`, the
/// pid holding the pod's lock) to stop with grace 0; a monitor that does
/// not answer (stopped, out of descriptors, hung) or does not end is
/// killed, and what it held is then released as for one that crashed
/// (by [`remove_pod`], or at once with `release`).
pub fn stop_now(
    roots: &Roots,
    id: &str,
    name: &str,
    monitor: Option<u32>,
    release: bool,
) -> Result<(), String> {
    let paths = roots.pod(id);
    let asked = control::call_waiting(
        &paths.socket(),
        &Request::Stop {
            grace_secs: Some(0),
        },
        Duration::from_secs(3),
    );
    if asked.is_ok() && wait_finished(roots, id, Duration::from_secs(15)) {
        return Ok(());
    }
    kill_monitor(id, name, monitor, &asked)?;
    if release {
        release_pod(roots, id, name)?;
    }
    Ok(())
}

/// Releases what the dead monitor of pod `id` left on the host (its
/// network, mounts, cgroup, VM uid claim), under the pod's lock; the
/// pod's state stays.
pub fn release_pod(roots: &Roots, id: &str, name: &str) -> Result<(), String> {
    let _lock = lock_pod(roots, id, Duration::from_secs(10))?;
    let problems = husk_sandbox::recovery::release_leftovers(&roots.pod(id));
    if !problems.is_empty() {
        return Err(format!("pod {name}: {}", problems.join("; ")));
    }
    Ok(())
}

/// Kills the monitor `monitor` of pod `id` that did not answer or end.
fn kill_monitor(
    id: &str,
    name: &str,
    monitor: Option<u32>,
    asked: &std::io::Result<control::Reply>,
) -> Result<(), String> {
    let Some(pid) = monitor else {
        return Ok(());
    };
    // Only our monitor of this pod: the pid could have been reused.
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
    let args: Vec<&[u8]> = cmdline.split(|b| *b == 0).collect();
    let ours = args.contains(&&b"monitor"[..]) && args.contains(&id.as_bytes());
    if !ours || !pid_alive(pid) {
        return Ok(());
    }
    eprintln!(
        "husk: pod {name}: its monitor (pid {pid}) does not answer{}; killing it",
        match asked {
            Err(e) => format!(" ({e})"),
            Ok(_) => " in time".to_owned(),
        }
    );
    // Its whole process group when it leads one (it does: setsid), so
    // that no CNI plugin or helper it started goes on changing the host
    // while what it held is released.
    let target = if process_group(pid) == Some(pid) {
        -(pid as i32)
    } else {
        pid as i32
    };
    // SAFETY: kill(2) of the pid just checked to be this pod's monitor, or
    // of the process group it leads.
    unsafe { libc::kill(target, libc::SIGKILL) };
    let t0 = std::time::Instant::now();
    while pid_alive(pid) {
        if t0.elapsed() > Duration::from_secs(10) {
            return Err(format!(
                "pod {name}: its monitor (pid {pid}) did not end after SIGKILL"
            ));
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    Ok(())
}

/// The process group of `pid`, from /proc.
fn process_group(pid: u32) -> Option<u32> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // After the ")" that closes the command name: state, ppid, pgrp.
    let (_, rest) = stat.rsplit_once(')')?;
    rest.split_whitespace().nth(2)?.parse().ok()
}

pub fn run(roots: &Roots, a: RmArgs) -> i32 {
    roots.collect_stale();
    for_each_pod(roots, &a.pods, |v| {
        if v.monitor_alive() && !v.finished() {
            if !a.force {
                return Err(format!(
                    "pod {} is running; stop it first (husk stop {0}) or use rm -f",
                    v.record.plan.name
                ));
            }
            stop_now(roots, &v.record.id, &v.record.plan.name, v.monitor, false)?;
        }
        remove_pod(roots, &v.record.id)?;
        println!("{}", v.record.plan.name);
        Ok(())
    })
}
