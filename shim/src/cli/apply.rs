//! `husk apply -f FILE`: updates ConfigMaps and Secrets. Every running pod
//! with a volume of an object in FILE gets that volume's files replaced at
//! once (the kubelet's atomic writer: a container sees the old set or the
//! new one, never a mix), in VM pods inside the guest, in wasm pods on the
//! host. As with the kubelet, environment variables taken from the object
//! and subPath mounts of it keep what they had when the container started.

use super::{fail, PodView, EXIT_FAILURE, EXIT_USAGE};
use crate::control::{self, Request};
use husk_sandbox::pod::manifest::{parse_objects, reproject};
use husk_sandbox::state::Roots;

#[derive(clap::Args)]
pub struct ApplyArgs {
    /// A YAML file of kind: ConfigMap and kind: Secret documents.
    #[arg(short, long)]
    file: std::path::PathBuf,
}

pub fn run(roots: &Roots, a: ApplyArgs) -> i32 {
    let display = a.file.display().to_string();
    let text = match std::fs::read_to_string(&a.file) {
        Ok(t) => t,
        Err(e) => return fail(EXIT_USAGE, format!("{display}: {e}")),
    };
    let docs = match parse_objects(&text, &display) {
        Ok(d) => d,
        Err(e) => return fail(EXIT_USAGE, e),
    };
    let mut code = 0;
    let mut updated = 0;
    for rec in roots.list_pods() {
        let v = PodView::load(roots, rec);
        if v.finished() || !v.monitor_alive() {
            continue;
        }
        let plan = &v.record.plan;
        for vol in &plan.volumes {
            let files = match reproject(vol, &docs) {
                None => continue,
                Some(Ok(f)) => f,
                Some(Err(e)) => {
                    code = fail(EXIT_FAILURE, format!("pod {}: {e}", plan.name));
                    continue;
                }
            };
            let reply = control::call(
                &roots.pod(&v.record.id).socket(),
                &Request::UpdateVolume {
                    volume: vol.name.clone(),
                    files,
                },
            );
            match reply {
                Ok(r) if r.ok => {
                    updated += 1;
                    println!("pod {}: volume {} updated", plan.name, vol.name);
                }
                Ok(r) => {
                    let e = r.error.unwrap_or_else(|| "update failed".into());
                    code = fail(EXIT_FAILURE, format!("pod {}: {e}", plan.name));
                }
                Err(e) => {
                    code = fail(
                        EXIT_FAILURE,
                        format!("pod {}: cannot reach its monitor: {e}", plan.name),
                    );
                }
            }
        }
    }
    if updated == 0 && code == 0 {
        println!("no running pod uses these objects; nothing to update");
    }
    code
}
