//! `husk rm [-f] POD…`: removes finished pods (with -f, stops running ones
//! first), releasing anything a crashed monitor left behind.

use super::for_each_pod;
use super::stop::stop_pod;
use husk_sandbox::state::Roots;

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

pub fn run(roots: &Roots, a: RmArgs) -> i32 {
    for_each_pod(roots, &a.pods, |v| {
        if v.monitor_alive() && !v.finished() {
            if !a.force {
                return Err(format!(
                    "pod {} is running; stop it first (husk stop {0}) or use rm -f",
                    v.record.plan.name
                ));
            }
            stop_pod(roots, &v, Some(0))?;
        }
        remove_pod(roots, &v.record.id)?;
        println!("{}", v.record.plan.name);
        Ok(())
    })
}
