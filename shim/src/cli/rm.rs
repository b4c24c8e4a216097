//! `husk rm [-f] POD…`: removes finished pods (with -f, stops running ones
//! first), releasing anything a crashed monitor left behind.

use super::for_each_pod;
use super::{wait_finished, PodView};
use crate::control::{self, Request};
use husk_sandbox::state::{pid_alive, Roots};
use std::time::Duration;

#[derive(clap::Args)]
pub struct RmArgs {
    /// Stop running pods at once (grace period 0) and remove them.
    #[arg(short, long)]
    force: bool,
    #[arg(required = true)]
    pods: Vec<String>,
}

/// Removes one pod's state; it must not be running.
pub fn remove_pod(roots: &Roots, id: &str) -> Result<(), String> {
    let paths = roots.pod(id);
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

/// `rm -f` of a running pod: asks its monitor to stop at once; a monitor
/// that does not answer (stopped, out of descriptors, hung) or does not
/// end is killed by its recorded pid, and what it held is then released
/// as for one that crashed.
fn force_stop(roots: &Roots, v: &PodView) -> Result<(), String> {
    let id = &v.record.id;
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
    let Some(pid) = v.status.as_ref().and_then(|s| s.monitor_pid) else {
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
        "husk: pod {}: its monitor (pid {pid}) does not answer{}; killing it",
        v.record.plan.name,
        match &asked {
            Err(e) => format!(" ({e})"),
            Ok(_) => " in time".to_owned(),
        }
    );
    // SAFETY: kill(2) of the pid just checked to be this pod's monitor.
    unsafe { libc::kill(pid as i32, libc::SIGKILL) };
    let t0 = std::time::Instant::now();
    while pid_alive(pid) {
        if t0.elapsed() > Duration::from_secs(10) {
            return Err(format!(
                "pod {}: its monitor (pid {pid}) did not end after SIGKILL",
                v.record.plan.name
            ));
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    Ok(())
}

pub fn run(roots: &Roots, a: RmArgs) -> i32 {
    for_each_pod(roots, &a.pods, |v| {
        if v.monitor_alive() && !v.finished() {
            if !a.force {
                return Err(format!(
                    "pod {} is running; stop it first (husk stop {0}) or use rm -f",
                    v.record.plan.name
                ));
            }
            force_stop(roots, &v)?;
        }
        remove_pod(roots, &v.record.id)?;
        println!("{}", v.record.plan.name);
        Ok(())
    })
}
