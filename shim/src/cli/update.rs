//! `husk update [--memory Q] [--cpus N] [-c CONTAINER] POD`: changes a
//! running container's limits (`docker update`); the container keeps them
//! across restarts. VM pods apply them to the container's cgroup in the
//! guest; the guest's memory was sized at start and cannot grow.

use super::{fail, running_pod, EXIT_FAILURE, EXIT_USAGE};
use crate::control::{self, Request};
use husk_sandbox::pod::quantity;
use husk_sandbox::state::Roots;

#[derive(clap::Args)]
pub struct UpdateArgs {
    /// Memory limit, e.g. 64Mi.
    #[arg(long)]
    memory: Option<String>,
    /// CPU limit in cores, e.g. 0.5 or 500m.
    #[arg(long)]
    cpus: Option<String>,
    /// Container (default: the pod's first container).
    #[arg(short, long)]
    container: Option<String>,
    pod: String,
}

pub fn run(roots: &Roots, a: UpdateArgs) -> i32 {
    if a.memory.is_none() && a.cpus.is_none() {
        return fail(EXIT_USAGE, "nothing to update: give --memory and/or --cpus");
    }
    let memory = match a.memory.as_deref().map(quantity::parse_bytes).transpose() {
        Ok(m) => m,
        Err(e) => return fail(EXIT_USAGE, format!("--memory: {e}")),
    };
    let cpus = match a
        .cpus
        .as_deref()
        .map(quantity::parse_millicores)
        .transpose()
    {
        Ok(c) => c,
        Err(e) => return fail(EXIT_USAGE, format!("--cpus: {e}")),
    };
    if memory == Some(0) || cpus == Some(0) {
        return fail(EXIT_USAGE, "limits must be above zero");
    }
    let v = match running_pod(roots, &a.pod, a.container.as_deref()) {
        Ok(v) => v,
        Err(code) => return code,
    };
    let plan = &v.record.plan;
    match control::call(
        &roots.pod(&v.record.id).socket(),
        &Request::Update {
            container: a.container.clone(),
            memory_bytes: memory,
            cpu_millis: cpus,
        },
    ) {
        Ok(r) if r.ok => {
            println!("{}", plan.name);
            0
        }
        Ok(r) => fail(
            EXIT_FAILURE,
            format!(
                "pod {}: {}",
                plan.name,
                r.error.unwrap_or_else(|| "update failed".into())
            ),
        ),
        Err(e) => fail(
            EXIT_FAILURE,
            format!("pod {}: cannot reach its monitor: {e}", plan.name),
        ),
    }
}
