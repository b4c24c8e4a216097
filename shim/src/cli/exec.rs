//! `husk exec [-c CONTAINER] [--timeout SECONDS] POD -- COMMAND [ARG…]`:
//! runs a command in a running container through the pod's monitor and
//! exits with its exit code (`kubectl exec` without `-it`). VM pods run it
//! in the container's root, volumes, namespaces and cgroup inside the
//! guest; wasm pods have no processes to start beside a guest and say so.

use super::{fail, PodView, EXIT_FAILURE, EXIT_USAGE};
use crate::control::{self, Request};
use husk_sandbox::state::Roots;
use std::io::Write;
use std::time::Duration;

#[derive(clap::Args)]
pub struct ExecArgs {
    /// Container (default: the pod's first container).
    #[arg(short, long)]
    container: Option<String>,
    /// Kill the command after this many seconds.
    #[arg(long, default_value_t = 300)]
    timeout: u64,
    pod: String,
    /// The command and its arguments (after `--`).
    #[arg(required = true, last = true)]
    command: Vec<String>,
}

pub fn run(roots: &Roots, a: ExecArgs) -> i32 {
    let rec = match roots.find_pod(&a.pod) {
        Ok(r) => r,
        Err(e) => return fail(EXIT_FAILURE, e),
    };
    let v = PodView::load(roots, rec);
    let plan = &v.record.plan;
    if let Some(c) = &a.container {
        if !plan.all_containers().any(|x| &x.name == c) {
            let names: Vec<&str> = plan.all_containers().map(|c| c.name.as_str()).collect();
            return fail(
                EXIT_USAGE,
                format!(
                    "pod {} has no container {c:?}; it has: {}",
                    plan.name,
                    names.join(", ")
                ),
            );
        }
    }
    if v.is_terminal() {
        return fail(
            EXIT_FAILURE,
            format!(
                "pod {} is not running; exec needs a running container",
                plan.name
            ),
        );
    }
    let reply = control::call_waiting(
        &roots.pod(&v.record.id).socket(),
        &Request::Exec {
            container: a.container.clone(),
            argv: a.command,
            timeout_secs: a.timeout,
        },
        Duration::from_secs(a.timeout + 30),
    );
    match reply {
        Ok(r) => match (r.ok, r.exec) {
            (true, Some(out)) => {
                let _ = std::io::stdout().write_all(&out.stdout);
                let _ = std::io::stderr().write_all(&out.stderr);
                let _ = std::io::stdout().flush();
                out.exit_code
            }
            _ => fail(
                EXIT_FAILURE,
                format!(
                    "pod {}: {}",
                    plan.name,
                    r.error.unwrap_or_else(|| "exec failed".into())
                ),
            ),
        },
        Err(e) => fail(
            EXIT_FAILURE,
            format!("pod {}: cannot reach its monitor: {e}", plan.name),
        ),
    }
}
