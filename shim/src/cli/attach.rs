//! `husk attach [-c CONTAINER] [-i] POD`: as `kubectl attach` (and `docker
//! attach`): joins a running container's own process, or a wasm
//! container's guest. Its output from now on comes to husk's stdout and
//! stderr; with `-i`, husk's stdin goes to it (the container must have
//! `stdin: true`; with `stdinOnce: true` its stdin closes when this attach
//! leaves). Leaving (Ctrl-C) does not end the container; its exit ends the
//! attach, with its exit code.

use super::exec::stream_request;
use super::{fail, running_pod, EXIT_FAILURE, EXIT_USAGE};
use crate::control::Request;
use husk_sandbox::state::Roots;

#[derive(clap::Args)]
pub struct AttachArgs {
    /// Container (default: the pod's first container).
    #[arg(short, long)]
    container: Option<String>,
    /// Pass stdin to the container (which must have `stdin: true`).
    #[arg(short = 'i', long)]
    stdin: bool,
    pod: String,
}

pub fn run(roots: &Roots, a: AttachArgs) -> i32 {
    let v = match running_pod(roots, &a.pod, a.container.as_deref()) {
        Ok(v) => v,
        Err(code) => return code,
    };
    let plan = &v.record.plan;
    let Some(c) = (match &a.container {
        Some(name) => plan.all_containers().find(|c| &c.name == name),
        None => plan.containers.first(),
    }) else {
        return fail(EXIT_USAGE, format!("pod {} has no containers", plan.name));
    };
    if a.stdin && !c.stdin {
        return fail(
            EXIT_USAGE,
            format!(
                "container {} of pod {} has no stdin to attach to (its spec needs stdin: true); attach without -i",
                c.name, plan.name
            ),
        );
    }
    let req = Request::AttachStream { id: c.name.clone() };
    let (mut out, mut err) = (std::io::stdout(), std::io::stderr());
    let input = a
        .stdin
        .then(|| Box::new(std::io::stdin()) as Box<dyn std::io::Read + Send>);
    match stream_request(
        &roots.pod(&v.record.id).socket(),
        &req,
        input,
        &mut out,
        &mut err,
        false,
    ) {
        Ok(code) => code,
        Err(e) => fail(EXIT_FAILURE, format!("pod {}: {e}", plan.name)),
    }
}
