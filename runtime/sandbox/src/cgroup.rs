//! The pod cgroup: a CPU quota for the whole pod (resources.limits.cpu summed
//! over its containers). Supports cgroup v2 (unified, `cpu.max`) and v1 (the
//! `cpu` controller, `cpu.cfs_quota_us`), including hybrid hosts where v2 has
//! no controllers. [`PodCgroup`] owns the directory and removes it.

use std::path::{Path, PathBuf};

pub const CFS_PERIOD_US: u64 = 100_000;

#[derive(Debug, thiserror::Error)]
#[error("cgroup {path}: {msg}")]
pub struct CgroupError {
    pub path: PathBuf,
    pub msg: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CgroupVersion {
    V1,
    V2,
}

/// A cgroup created for one pod.
#[derive(Debug)]
pub struct PodCgroup {
    pub path: PathBuf,
    pub version: CgroupVersion,
    /// Where the members came from, to move them back before removal.
    parent_procs: PathBuf,
}

fn cerr(path: &Path, msg: impl std::fmt::Display) -> CgroupError {
    CgroupError {
        path: path.to_owned(),
        msg: msg.to_string(),
    }
}

/// Finds the hierarchy that offers the cpu controller.
pub fn detect(mount: &Path) -> Option<(CgroupVersion, PathBuf)> {
    let v2 = std::fs::read_to_string(mount.join("cgroup.controllers")).unwrap_or_default();
    if v2.split_whitespace().any(|c| c == "cpu") {
        return Some((CgroupVersion::V2, mount.to_owned()));
    }
    let v1 = mount.join("cpu");
    if v1.join("cpu.cfs_quota_us").exists() {
        return Some((CgroupVersion::V1, v1));
    }
    None
}

impl PodCgroup {
    /// Creates `<hierarchy>/husk/<pod_id>` with a quota of `millicores`.
    pub fn create(pod_id: &str, millicores: u64) -> Result<Self, CgroupError> {
        let mount = Path::new("/sys/fs/cgroup");
        let (version, base) = detect(mount).ok_or_else(|| {
            cerr(
                mount,
                "no cpu controller found (neither cgroup v2 cpu nor v1 cpu)",
            )
        })?;
        let parent = base.join("husk");
        std::fs::create_dir_all(&parent).map_err(|e| cerr(&parent, e))?;
        if version == CgroupVersion::V2 {
            // Let the children use the cpu controller.
            let _ = std::fs::write(base.join("cgroup.subtree_control"), "+cpu");
            let _ = std::fs::write(parent.join("cgroup.subtree_control"), "+cpu");
        }
        let path = parent.join(pod_id);
        std::fs::create_dir(&path).map_err(|e| cerr(&path, e))?;
        let me = PodCgroup {
            path: path.clone(),
            version,
            parent_procs: base.join("cgroup.procs"),
        };
        let quota = (millicores * CFS_PERIOD_US / 1000).max(1000);
        let res = match version {
            CgroupVersion::V2 => {
                std::fs::write(path.join("cpu.max"), format!("{quota} {CFS_PERIOD_US}"))
            }
            CgroupVersion::V1 => {
                std::fs::write(path.join("cpu.cfs_period_us"), CFS_PERIOD_US.to_string())
                    .and_then(|_| std::fs::write(path.join("cpu.cfs_quota_us"), quota.to_string()))
            }
        };
        if let Err(e) = res {
            let _ = me.remove();
            return Err(cerr(&path, format!("cannot set the CPU quota: {e}")));
        }
        Ok(me)
    }

    /// Moves a whole process (all its threads) into the cgroup.
    pub fn add_process(&self, pid: u32) -> Result<(), CgroupError> {
        std::fs::write(self.path.join("cgroup.procs"), pid.to_string())
            .map_err(|e| cerr(&self.path, format!("cannot move pid {pid} in: {e}")))
    }

    /// Moves every member back to the hierarchy root and removes the cgroup.
    pub fn remove(&self) -> Result<(), CgroupError> {
        if !self.path.exists() {
            return Ok(());
        }
        if let Ok(procs) = std::fs::read_to_string(self.path.join("cgroup.procs")) {
            for pid in procs.split_whitespace() {
                let _ = std::fs::write(&self.parent_procs, pid);
            }
        }
        std::fs::remove_dir(&self.path).map_err(|e| cerr(&self.path, e))
    }
}
