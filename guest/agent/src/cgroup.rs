//! One cgroup (v2) per container under `/sys/fs/cgroup/husk/<id>`, with the
//! container's memory and CPU limits. The container's first process joins
//! it between fork and exec; when that process ends, everything left in
//! the cgroup is killed (`cgroup.kill`, which also reaches processes that
//! left the process group), the OOM killer's verdict is read from
//! `memory.events`, and the cgroup is removed.

use husk_protocol::Limits;
use std::fs::File;
use std::os::fd::{AsRawFd, RawFd};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

pub const ROOT: &str = "/sys/fs/cgroup";
const CONTROLLERS: &str = "+memory +cpu +pids";
/// The CFS period for cpu.max, as the kubelet uses.
const CPU_PERIOD_US: u64 = 100_000;

pub struct Cgroup {
    dir: PathBuf,
    procs: File,
}

fn write(path: &Path, value: &str) -> std::io::Result<()> {
    std::fs::write(path, value)
        .map_err(|e| std::io::Error::new(e.kind(), format!("{} = {value:?}: {e}", path.display())))
}

impl Cgroup {
    /// Creates the container's cgroup with its limits, under `root`.
    pub fn create(root: &Path, id: &str, limits: &Limits) -> std::io::Result<Cgroup> {
        let husk = root.join("husk");
        if !husk.is_dir() {
            write(&root.join("cgroup.subtree_control"), CONTROLLERS)?;
            std::fs::create_dir_all(&husk)?;
            write(&husk.join("cgroup.subtree_control"), CONTROLLERS)?;
        }
        let dir = husk.join(id);
        // A cgroup left by an earlier run under this id goes first.
        let _ = std::fs::remove_dir(&dir);
        std::fs::create_dir(&dir)?;
        let set = || -> std::io::Result<File> {
            if let Some(bytes) = limits.memory_max {
                write(&dir.join("memory.max"), &bytes.to_string())?;
                // No swap to escape to: a limit is a limit.
                let _ = write(&dir.join("memory.swap.max"), "0");
                // An OOM kill ends the whole container, as the kubelet sets
                // it up (memory.oom.group) on cgroup v2.
                write(&dir.join("memory.oom.group"), "1")?;
            }
            if let Some(millis) = limits.cpu_max_millis {
                let quota = (millis * CPU_PERIOD_US / 1000).max(1000);
                write(&dir.join("cpu.max"), &format!("{quota} {CPU_PERIOD_US}"))?;
            }
            std::fs::OpenOptions::new()
                .write(true)
                .open(dir.join("cgroup.procs"))
        };
        match set() {
            Ok(procs) => Ok(Cgroup { dir, procs }),
            Err(e) => {
                let _ = std::fs::remove_dir(&dir);
                Err(e)
            }
        }
    }

    /// `cgroup.procs`, open for the child to write `0` into (joins it).
    pub fn procs_fd(&self) -> RawFd {
        self.procs.as_raw_fd()
    }

    /// Kills every process still in the cgroup and waits (briefly) until
    /// it is empty.
    pub fn kill_all(&self) {
        let _ = write(&self.dir.join("cgroup.kill"), "1");
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            let events =
                std::fs::read_to_string(self.dir.join("cgroup.events")).unwrap_or_default();
            if !events.lines().any(|l| l == "populated 1") {
                return;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// Whether the kernel's OOM killer killed a process of the container.
    pub fn oom_killed(&self) -> bool {
        std::fs::read_to_string(self.dir.join("memory.events"))
            .unwrap_or_default()
            .lines()
            .filter_map(|l| l.strip_prefix("oom_kill "))
            .any(|n| n.trim().parse::<u64>().is_ok_and(|n| n > 0))
    }
}

impl Drop for Cgroup {
    fn drop(&mut self) {
        self.kill_all();
        let _ = std::fs::remove_dir(&self.dir);
    }
}
