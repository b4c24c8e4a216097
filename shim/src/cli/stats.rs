//! `husk stats [--format json] POD…`: one reading of each running
//! container's CPU, memory and processes (`docker stats --no-stream`),
//! from two samples half a second apart, through the pod's monitor.

use super::{fail, EXIT_FAILURE};
use crate::control::{self, Request};
use husk_sandbox::state::Roots;
use husk_sandbox::PodStats;
use std::time::{Duration, Instant};

#[derive(clap::Args)]
pub struct StatsArgs {
    /// `table` (default) or `json`.
    #[arg(long, default_value = "table")]
    format: String,
    #[arg(required = true)]
    pods: Vec<String>,
}

fn sample(roots: &Roots, id: &str, pod: &str) -> Result<(PodStats, Instant), String> {
    let r = control::call(&roots.pod(id).socket(), &Request::Stats)
        .map_err(|e| format!("pod {pod}: cannot reach its monitor: {e}"))?;
    match (r.ok, r.stats) {
        (true, Some(s)) => Ok((s, Instant::now())),
        _ => Err(format!(
            "pod {pod}: {}",
            r.error.unwrap_or_else(|| "no stats".into())
        )),
    }
}

fn mib(b: u64) -> String {
    format!("{:.1}MiB", b as f64 / (1 << 20) as f64)
}

pub fn run(roots: &Roots, a: StatsArgs) -> i32 {
    if a.format != "table" && a.format != "json" {
        return fail(
            super::EXIT_USAGE,
            format!("--format {:?}: use table or json", a.format),
        );
    }
    let mut rows = Vec::new();
    let mut json = Vec::new();
    for key in &a.pods {
        let got = roots
            .find_pod(key)
            .map_err(|e| e.to_string())
            .and_then(|rec| {
                let name = rec.plan.name.clone();
                let (first, t0) = sample(roots, &rec.id, &name)?;
                std::thread::sleep(Duration::from_millis(500));
                let (second, t1) = sample(roots, &rec.id, &name)?;
                Ok((name, first, second, t1 - t0))
            });
        let (pod, first, second, dt) = match got {
            Ok(g) => g,
            Err(e) => return fail(EXIT_FAILURE, e),
        };
        for c in &second.containers {
            let before = first
                .containers
                .iter()
                .find(|x| x.name == c.name)
                .map_or(0, |x| x.cpu_usage_usec);
            let cpu =
                c.cpu_usage_usec.saturating_sub(before) as f64 / dt.as_micros() as f64 * 100.0;
            rows.push(format!(
                "{:<16} {:<16} {:>7.2}% {:>22} {:>5}",
                pod,
                c.name,
                cpu,
                format!(
                    "{} / {}",
                    mib(c.memory_bytes),
                    c.memory_limit_bytes.map_or("-".into(), mib)
                ),
                c.pids
            ));
            json.push(serde_json::json!({
                "pod": pod, "container": c.name, "cpuPercent": cpu,
                "memoryBytes": c.memory_bytes, "memoryLimitBytes": c.memory_limit_bytes,
                "pids": c.pids,
            }));
        }
        if let Some(vm) = &second.vm {
            let before = first.vm.as_ref().map_or(0, |v| v.cpu_usage_usec);
            let cpu =
                vm.cpu_usage_usec.saturating_sub(before) as f64 / dt.as_micros() as f64 * 100.0;
            let used = vm
                .memory_total_bytes
                .saturating_sub(vm.memory_available_bytes);
            rows.push(format!(
                "{:<16} {:<16} {:>7.2}% {:>22} {:>5}",
                pod,
                "(vm)",
                cpu,
                format!("{} / {}", mib(used), mib(vm.memory_total_bytes)),
                "-"
            ));
            json.push(serde_json::json!({
                "pod": pod, "container": null, "cpuPercent": cpu,
                "memoryBytes": used, "memoryLimitBytes": vm.memory_total_bytes,
            }));
        }
    }
    if a.format == "json" {
        println!("{}", serde_json::Value::Array(json));
    } else {
        println!(
            "{:<16} {:<16} {:>8} {:>22} {:>5}",
            "POD", "CONTAINER", "CPU %", "MEM USAGE / LIMIT", "PIDS"
        );
        for r in rows {
            println!("{r}");
        }
    }
    0
}
