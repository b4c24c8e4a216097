//! `husk ps`: pods and their containers (name, runtime, state, restarts,
//! IP, age), as a table or `--format json`.

use super::PodView;
use husk_sandbox::state::{
    ContainerState, ContainerStatus, CriContainer, CriState, PodStatus, Roots,
};

#[derive(clap::Args)]
pub struct PsArgs {
    /// Output format: table or json.
    #[arg(long, default_value = "table", value_parser = ["table", "json"])]
    format: String,
}

pub fn state_str(c: &ContainerStatus) -> String {
    match &c.state {
        ContainerState::Waiting { reason, .. } => reason.clone(),
        ContainerState::Running { .. } => "Running".into(),
        ContainerState::Terminated {
            exit_code, reason, ..
        } => format!("{reason} ({exit_code})"),
    }
}

pub fn cri_state_str(c: &CriContainer) -> String {
    match c.state {
        CriState::Created => "Created".into(),
        CriState::Running => "Running".into(),
        CriState::Exited => format!("{} ({})", c.reason, c.exit_code),
    }
}

pub fn age(t: chrono::DateTime<chrono::Utc>) -> String {
    let s = (chrono::Utc::now() - t).num_seconds().max(0);
    match s {
        0..=119 => format!("{s}s"),
        120..=7199 => format!("{}m", s / 60),
        7200..=172_799 => format!("{}h", s / 3600),
        _ => format!("{}d", s / 86400),
    }
}

pub fn run(roots: &Roots, a: PsArgs) -> i32 {
    roots.collect_stale();
    let pods: Vec<PodView> = roots
        .list_pods()
        .into_iter()
        .map(|r| PodView::load(roots, r))
        .collect();
    if a.format == "json" {
        let v: Vec<_> = pods
            .iter()
            .map(|p| {
                let containers: Vec<_> = p
                    .status
                    .iter()
                    .flat_map(PodStatus::all_containers)
                    .map(|c| {
                        serde_json::json!({
                            "name": c.name,
                            "state": state_str(c),
                            "restartCount": c.restart_count,
                            "exitCode": c.exit_code(),
                        })
                    })
                    .chain(
                        p.status
                            .iter()
                            .flat_map(|s| s.cri_containers.iter())
                            .map(|c| {
                                serde_json::json!({
                                    "name": c.meta.name,
                                    "id": c.id,
                                    "state": cri_state_str(c),
                                    "restartCount": c.meta.attempt,
                                    "exitCode": (c.state == CriState::Exited).then_some(c.exit_code),
                                })
                            }),
                    )
                    .collect();
                serde_json::json!({
                    "id": p.record.id,
                    "name": p.record.plan.name,
                    "namespace": p.record.plan.namespace,
                    "runtime": p.record.plan.runtime_class,
                    "state": p.phase_str(),
                    "ip": p.status.as_ref().and_then(|s| s.pod_ip.clone()),
                    "ips": p.status.iter().flat_map(|s| s.pod_ips.iter().map(|i| i.ip.clone())).collect::<Vec<_>>(),
                    "createdAt": p.record.created_at,
                    "containers": containers,
                })
            })
            .collect();
        println!("{}", serde_json::to_string_pretty(&v).expect("json"));
        return 0;
    }
    println!(
        "{:<16} {:<24} {:<16} {:<10} {:<10} {:<18} {:<8} {:<15} AGE",
        "POD ID", "NAME", "CONTAINER", "RUNTIME", "POD", "STATE", "RESTARTS", "IP"
    );
    for p in &pods {
        let ip = p
            .status
            .as_ref()
            .and_then(|s| s.pod_ip.clone())
            .unwrap_or_else(|| "-".into());
        let containers: Vec<&ContainerStatus> = p
            .status
            .iter()
            .flat_map(PodStatus::all_containers)
            .collect();
        let mut rows: Vec<(String, String, String)> = containers
            .iter()
            .map(|c| (c.name.clone(), state_str(c), c.restart_count.to_string()))
            .collect();
        // Containers a CRI client (huskd) created; their attempt is the
        // kubelet's restart count.
        rows.extend(
            p.status
                .iter()
                .flat_map(|s| s.cri_containers.iter())
                .map(|c| {
                    (
                        c.meta.name.clone(),
                        cri_state_str(c),
                        c.meta.attempt.to_string(),
                    )
                }),
        );
        if rows.is_empty() {
            rows.push(("-".into(), "-".into(), "-".into()));
        }
        for (i, (cname, st, restarts)) in rows.iter().enumerate() {
            let (id, name, rt, phase, ipc, agec) = if i == 0 {
                (
                    p.record.id.clone(),
                    p.record.plan.name.clone(),
                    p.record.plan.runtime_class.clone(),
                    p.phase_str(),
                    ip.clone(),
                    age(p.record.created_at),
                )
            } else {
                Default::default()
            };
            println!(
                "{:<16} {:<24} {:<16} {:<10} {:<10} {:<18} {:<8} {:<15} {}",
                id, name, cname, rt, phase, st, restarts, ipc, agec
            );
        }
    }
    0
}
