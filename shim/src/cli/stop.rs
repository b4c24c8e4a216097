//! `husk stop [-t SECONDS] POD…`: graceful stop through the monitor.

use super::{for_each_pod, wait_finished, PodView};
use crate::control::{self, Request};
use husk_sandbox::state::Roots;
use std::time::Duration;

#[derive(clap::Args)]
pub struct StopArgs {
    /// Grace period in seconds (default: the pod's terminationGracePeriodSeconds).
    #[arg(short = 't', long = "time")]
    time: Option<u64>,
    #[arg(required = true)]
    pods: Vec<String>,
}

/// Asks a pod's monitor to stop and waits until it is gone.
pub fn stop_pod(roots: &Roots, v: &PodView, grace: Option<u64>) -> Result<(), String> {
    if v.is_terminal() {
        return Ok(());
    }
    let paths = roots.pod(&v.record.id);
    let grace_secs = grace.unwrap_or(v.record.plan.grace_period_secs);
    if let Err(e) = control::call(
        &paths.socket(),
        &Request::Stop {
            grace_secs: Some(grace_secs),
        },
    ) {
        // A monitor that is ending on its own removes its socket first:
        // that pod is stopping already. Only a live monitor that cannot be
        // reached is an error.
        let t0 = std::time::Instant::now();
        while t0.elapsed() < Duration::from_secs(10) {
            let now = PodView::load(roots, v.record.clone());
            if now.is_terminal() || !now.monitor_alive() {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        return Err(format!(
            "pod {}: cannot reach its monitor: {e}",
            v.record.plan.name
        ));
    }
    if !wait_finished(roots, &v.record.id, Duration::from_secs(grace_secs + 30)) {
        return Err(format!("pod {}: did not stop in time", v.record.plan.name));
    }
    Ok(())
}

pub fn run(roots: &Roots, a: StopArgs) -> i32 {
    for_each_pod(roots, &a.pods, |v| {
        // A monitor that died (kill -9, a crash) stopped nothing: its
        // containers' fate is unknown and what it held is still held.
        if v.status.is_some() && !v.finished() && !v.monitor_alive() {
            return Err(format!(
                "pod {}: its monitor is gone (killed or crashed), so nothing stopped it and its state is Unknown; `husk rm {}` releases what it left",
                v.record.plan.name, v.record.plan.name
            ));
        }
        stop_pod(roots, &v, a.time)?;
        println!("{}", v.record.plan.name);
        Ok(())
    })
}
