//! `husk rm [-f] POD…`: removes finished pods (with -f, stops running ones
//! first), releasing anything a crashed monitor left behind.

use super::stop::stop_pod;
use super::{fail, PodView, EXIT_FAILURE};
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
    let mut code = 0;
    for key in &a.pods {
        let rec = match roots.find_pod(key) {
            Ok(r) => r,
            Err(e) => {
                code = fail(EXIT_FAILURE, e);
                continue;
            }
        };
        let v = PodView::load(roots, rec);
        if v.monitor_alive() && !v.finished() {
            if !a.force {
                code = fail(
                    EXIT_FAILURE,
                    format!(
                        "pod {} is running; stop it first (husk stop {0}) or use rm -f",
                        v.record.plan.name
                    ),
                );
                continue;
            }
            if let Err(e) = stop_pod(roots, &v, Some(0)) {
                code = fail(EXIT_FAILURE, e);
                continue;
            }
        }
        match remove_pod(roots, &v.record.id) {
            Ok(()) => println!("{}", v.record.plan.name),
            Err(e) => code = fail(EXIT_FAILURE, e),
        }
    }
    code
}
