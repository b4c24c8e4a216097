//! `husk inspect POD|IMAGE…`: a pod's (redacted) spec and live status, or an
//! image's record, manifest and config, as JSON.

use super::{fail, PodView, EXIT_FAILURE};
use husk_sandbox::state::Roots;

#[derive(clap::Args)]
pub struct InspectArgs {
    /// Pod name, namespace/name or id.
    #[arg(required = true)]
    pods: Vec<String>,
}

pub fn run(roots: &Roots, a: InspectArgs) -> i32 {
    let mut out = Vec::new();
    for key in &a.pods {
        let rec = match roots.find_pod(key) {
            Ok(r) => r,
            Err(e) => match super::images::inspect_image(roots, key) {
                // Not a pod: an image of that name, as `docker inspect` does.
                Some(v) => {
                    out.push(v);
                    continue;
                }
                None => return fail(EXIT_FAILURE, format!("{e} (and no image of that name)")),
            },
        };
        let v = PodView::load(roots, rec);
        let p = &v.record.plan;
        out.push(serde_json::json!({
            "id": v.record.id,
            "createdAt": v.record.created_at,
            "metadata": {
                "name": p.name,
                "namespace": p.namespace,
                "uid": p.uid,
                "labels": p.labels,
                "annotations": p.annotations,
            },
            "spec": p,
            "state": v.phase_str(),
            "status": v.status,
        }));
    }
    let doc = if out.len() == 1 {
        out.remove(0)
    } else {
        serde_json::Value::Array(out)
    };
    println!("{}", serde_json::to_string_pretty(&doc).expect("json"));
    0
}
