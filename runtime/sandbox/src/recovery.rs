//! Cleaning up after a monitor that died without releasing its pod's host
//! resources (kill -9, crash): CNI DEL and netns from the persisted network
//! record, mounts found in /proc/self/mountinfo under the pod's dirs, and
//! the pod cgroup. Used by `husk rm` before the pod's dirs are deleted.

use crate::network::{NetworkRecord, PodNetwork};
use crate::state::{read_json, PodPaths};
use std::path::{Path, PathBuf};

/// Mount points at or below `prefix`, deepest first.
pub fn mounts_under(prefix: &Path) -> Vec<PathBuf> {
    let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let mut out: Vec<PathBuf> = info
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .map(|m| PathBuf::from(m.replace("\\040", " ")))
        .filter(|m| m.starts_with(prefix))
        .collect();
    out.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
    out.dedup();
    out
}

/// Releases whatever a dead monitor left. Idempotent; returns the problems
/// it could not fix.
pub fn release_leftovers(paths: &PodPaths) -> Vec<String> {
    let mut problems = Vec::new();
    if let Ok(record) = read_json::<NetworkRecord>(&paths.network_record()) {
        let mut net = PodNetwork::recorded(record, paths.network_record());
        if let Err(e) = net.teardown() {
            problems.push(e.to_string());
        }
    }
    crate::vm::share::remove_pid_files_under(&paths.run);
    crate::vm::identity::release_claims_under(&paths.vm_ids, &paths.run);
    if let Err(e) = crate::network::delete_netns(&paths.netns) {
        problems.push(e.to_string());
    }
    for base in [&paths.run, &paths.lib] {
        for m in mounts_under(base) {
            if let Err(e) = nix::mount::umount2(&m, nix::mount::MntFlags::MNT_DETACH) {
                problems.push(format!("umount {}: {e}", m.display()));
            }
        }
    }
    for hierarchy in ["/sys/fs/cgroup/husk", "/sys/fs/cgroup/cpu/husk"] {
        let cg = Path::new(hierarchy).join(&paths.id);
        if cg.exists() {
            if let Err(e) = std::fs::remove_dir(&cg) {
                problems.push(format!("cgroup {}: {e}", cg.display()));
            }
        }
    }
    problems
}
