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

/// Sets `limits` on the cgroup at `dir`: memory.max (and no swap,
/// memory.oom.group) and cpu.max; a limit that is None is lifted.
fn set_limits(dir: &Path, limits: &Limits) -> std::io::Result<()> {
    match limits.memory_max {
        Some(bytes) => {
            write(&dir.join("memory.max"), &bytes.to_string())?;
            // No swap to escape to: a limit is a limit.
            let _ = write(&dir.join("memory.swap.max"), "0");
            // An OOM kill ends the whole container, as the kubelet sets it
            // up (memory.oom.group) on cgroup v2.
            write(&dir.join("memory.oom.group"), "1")?;
        }
        // No limit asked for: nothing to lift where the controller is
        // missing (a host whose memory controller is on cgroup v1).
        None if dir.join("memory.max").exists() => write(&dir.join("memory.max"), "max")?,
        None => {}
    }
    match limits.cpu_max_millis {
        Some(millis) => {
            let quota = (millis * CPU_PERIOD_US / 1000).max(1000);
            write(&dir.join("cpu.max"), &format!("{quota} {CPU_PERIOD_US}"))?;
        }
        None if dir.join("cpu.max").exists() => {
            write(&dir.join("cpu.max"), &format!("max {CPU_PERIOD_US}"))?
        }
        None => {}
    }
    Ok(())
}

/// Changes the limits of the running container `id` (its cgroup under
/// `root`/husk).
pub fn update(root: &Path, id: &str, limits: &Limits) -> std::io::Result<()> {
    if id.is_empty() || id.contains('/') || id.starts_with('.') {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            format!("{id:?} is not a container id"),
        ));
    }
    let dir = root.join("husk").join(id);
    if !dir.is_dir() {
        return Err(std::io::Error::new(
            std::io::ErrorKind::NotFound,
            format!("no running container {id:?}"),
        ));
    }
    set_limits(&dir, limits)
}

impl Cgroup {
    /// Creates the container's cgroup with its limits, under `root`.
    pub fn create(root: &Path, id: &str, limits: &Limits) -> std::io::Result<Cgroup> {
        let husk = root.join("husk");
        if !husk.is_dir() {
            // The controllers this kernel has on cgroup v2 (a guest has
            // them all; a hybrid host may have none).
            let have = std::fs::read_to_string(root.join("cgroup.controllers")).unwrap_or_default();
            let enable: Vec<&str> = CONTROLLERS
                .split(' ')
                .filter(|c| have.split_whitespace().any(|h| h == &c[1..]))
                .collect();
            if !enable.is_empty() {
                write(&root.join("cgroup.subtree_control"), &enable.join(" "))?;
            }
            std::fs::create_dir_all(&husk)?;
            if !enable.is_empty() {
                write(&husk.join("cgroup.subtree_control"), &enable.join(" "))?;
            }
        }
        let dir = husk.join(id);
        // A cgroup left by an earlier run under this id goes first.
        let _ = std::fs::remove_dir(&dir);
        std::fs::create_dir(&dir)?;
        let set = || -> std::io::Result<File> {
            set_limits(&dir, limits)?;
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

/// Usage of every container cgroup under `root`/husk, and of the guest
/// (from `proc`: /proc/stat and /proc/meminfo).
pub fn stats(root: &Path, proc: &Path) -> husk_protocol::GuestStats {
    let read = |p: PathBuf| std::fs::read_to_string(p).unwrap_or_default();
    let field = |text: &str, key: &str| -> u64 {
        text.lines()
            .find_map(|l| l.strip_prefix(key))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    let mut containers = Vec::new();
    let mut dirs: Vec<_> = std::fs::read_dir(root.join("husk"))
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| e.path().is_dir())
        .collect();
    dirs.sort_by_key(|e| e.file_name());
    for e in dirs {
        let dir = e.path();
        let limit = read(dir.join("memory.max"));
        containers.push(husk_protocol::ContainerStats {
            id: e.file_name().to_string_lossy().into_owned(),
            cpu_usage_usec: field(&read(dir.join("cpu.stat")), "usage_usec "),
            memory_bytes: read(dir.join("memory.current")).trim().parse().unwrap_or(0),
            memory_limit_bytes: limit.trim().parse().ok(),
            pids: read(dir.join("pids.current")).trim().parse().unwrap_or(0),
        });
    }
    // /proc/stat's first line: user nice system idle iowait irq softirq
    // steal, in clock ticks (USER_HZ, 100 on Linux).
    let stat = read(proc.join("stat"));
    let busy: u64 = stat
        .lines()
        .next()
        .unwrap_or_default()
        .split_whitespace()
        .skip(1)
        .take(8)
        .enumerate()
        .filter(|(i, _)| *i != 3 && *i != 4)
        .filter_map(|(_, v)| v.parse::<u64>().ok())
        .sum();
    let meminfo = read(proc.join("meminfo"));
    husk_protocol::GuestStats {
        containers,
        cpu_usage_usec: busy * 10_000,
        memory_total_bytes: field(&meminfo, "MemTotal:") * 1024,
        memory_available_bytes: field(&meminfo, "MemAvailable:") * 1024,
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn stats_come_from_the_cgroups_and_proc() {
        let t = tempfile::tempdir().unwrap();
        let c = t.path().join("cg/husk/web.0");
        std::fs::create_dir_all(&c).unwrap();
        std::fs::write(c.join("cpu.stat"), "usage_usec 1500\nuser_usec 1000\n").unwrap();
        std::fs::write(c.join("memory.current"), "4096\n").unwrap();
        std::fs::write(c.join("memory.max"), "max\n").unwrap();
        std::fs::write(c.join("pids.current"), "3\n").unwrap();
        let p = t.path().join("proc");
        std::fs::create_dir(&p).unwrap();
        std::fs::write(p.join("stat"), "cpu  10 1 5 1000 7 2 3 0 0 0\ncpu0 1 2\n").unwrap();
        std::fs::write(
            p.join("meminfo"),
            "MemTotal: 1000 kB\nMemFree: 10 kB\nMemAvailable: 500 kB\n",
        )
        .unwrap();
        let s = super::stats(&t.path().join("cg"), &p);
        assert_eq!(s.containers.len(), 1);
        let w = &s.containers[0];
        assert_eq!(
            (
                w.id.as_str(),
                w.cpu_usage_usec,
                w.memory_bytes,
                w.memory_limit_bytes,
                w.pids
            ),
            ("web.0", 1500, 4096, None, 3)
        );
        // user + nice + system + irq + softirq + steal = 21 ticks.
        assert_eq!(s.cpu_usage_usec, 210_000);
        assert_eq!(
            (s.memory_total_bytes, s.memory_available_bytes),
            (1_024_000, 512_000)
        );
    }
}
