//! Host directories shared into a VM pod over virtio-fs (emptyDir on disk,
//! hostPath): one virtiofsd per share, QEMU's (`/usr/lib/qemu/virtiofsd`,
//! from Debian's qemu-system-common), in its own mount, PID and network
//! namespaces, serving one directory on a vhost-user socket in the pod's
//! run directory. A share that every container mounts read-only is served
//! from a read-only bind mount, so a hostile guest cannot write to it
//! either. [`FsShares`] owns the processes, sockets, logs and bind mounts
//! and removes them on drop, also when a start fails half-way.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub const DEFAULT_VIRTIOFSD: &str = "/usr/lib/qemu/virtiofsd";

#[derive(Debug, thiserror::Error)]
pub enum ShareError {
    #[error("{0}: {1}")]
    Io(PathBuf, std::io::Error),
    #[error("cannot start {0} ({1}); install Debian's qemu-system-common or set [vm] virtiofsd in husk's config")]
    Spawn(PathBuf, std::io::Error),
    #[error("virtiofsd for {0} did not come up: {1}")]
    NotReady(PathBuf, String),
}

/// One share as QEMU needs it: the guest's tag and the vhost-user socket.
#[derive(Debug, Clone)]
pub struct Share {
    pub tag: String,
    pub socket: PathBuf,
}

pub struct FsShares {
    dir: PathBuf,
    procs: Vec<Child>,
    binds: Vec<PathBuf>,
    shares: Vec<Share>,
}

impl FsShares {
    /// Shares will keep their sockets and logs in `dir` (created on the
    /// first share, removed on drop).
    pub fn new(dir: PathBuf) -> Self {
        FsShares {
            dir,
            procs: Vec::new(),
            binds: Vec::new(),
            shares: Vec::new(),
        }
    }

    pub fn shares(&self) -> &[Share] {
        &self.shares
    }

    /// Serves `source` under `tag`, read-only when asked; returns once the
    /// socket is there for QEMU to connect to.
    pub fn add(
        &mut self,
        virtiofsd: &Path,
        tag: &str,
        source: &Path,
        read_only: bool,
    ) -> Result<(), ShareError> {
        self.add_opts(virtiofsd, tag, source, read_only, false)
    }

    /// Serves `source` (writable) with its extended attributes: image
    /// layers keep overlayfs' opaque-directory marks in `trusted.*`.
    pub fn add_with_xattrs(
        &mut self,
        virtiofsd: &Path,
        tag: &str,
        source: &Path,
    ) -> Result<(), ShareError> {
        self.add_opts(virtiofsd, tag, source, false, true)
    }

    fn add_opts(
        &mut self,
        virtiofsd: &Path,
        tag: &str,
        source: &Path,
        read_only: bool,
        xattr: bool,
    ) -> Result<(), ShareError> {
        let io = |p: &Path| {
            let p = p.to_owned();
            move |e| ShareError::Io(p, e)
        };
        std::fs::create_dir_all(&self.dir).map_err(io(&self.dir))?;
        let served = if read_only {
            let bind = self.dir.join(format!("ro-{tag}"));
            std::fs::create_dir(&bind).map_err(io(&bind))?;
            use nix::mount::{mount, MsFlags};
            mount(
                Some(source),
                &bind,
                None::<&str>,
                MsFlags::MS_BIND | MsFlags::MS_REC,
                None::<&str>,
            )
            .map_err(|e| ShareError::Io(bind.clone(), e.into()))?;
            self.binds.push(bind.clone());
            mount(
                None::<&str>,
                &bind,
                None::<&str>,
                MsFlags::MS_BIND | MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY,
                None::<&str>,
            )
            .map_err(|e| ShareError::Io(bind.clone(), e.into()))?;
            bind
        } else {
            source.to_owned()
        };
        let socket = self.dir.join(format!("{tag}.sock"));
        let log_path = self.dir.join(format!("{tag}.log"));
        let log = std::fs::File::create(&log_path).map_err(io(&log_path))?;
        let mut cmd = Command::new(virtiofsd);
        cmd.arg(format!("--socket-path={}", socket.display()))
            .arg("-o")
            .arg(format!("source={}", served.display()))
            .args(["-o", "cache=auto", "-o", "sandbox=namespace"])
            .args(if xattr { &["-o", "xattr"][..] } else { &[] })
            .stdin(Stdio::null())
            .stdout(log.try_clone().map_err(io(&log_path))?)
            .stderr(log);
        super::qemu::die_with_parent(&mut cmd);
        let child = cmd
            .spawn()
            .map_err(|e| ShareError::Spawn(virtiofsd.to_owned(), e))?;
        self.procs.push(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        while !socket.exists() {
            let ended = self
                .procs
                .last_mut()
                .is_some_and(|c| !matches!(c.try_wait(), Ok(None)));
            if ended || Instant::now() > deadline {
                let log = std::fs::read_to_string(&log_path).unwrap_or_default();
                return Err(ShareError::NotReady(
                    source.to_owned(),
                    if ended {
                        format!("it exited: {}", log.trim())
                    } else {
                        format!("no socket after 10 s: {}", log.trim())
                    },
                ));
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        self.shares.push(Share {
            tag: tag.to_owned(),
            socket,
        });
        Ok(())
    }
}

impl Drop for FsShares {
    fn drop(&mut self) {
        for c in &mut self.procs {
            let _ = c.kill();
            let _ = c.wait();
        }
        // Only what husk made is removed, file by file: never a recursive
        // removal, which could reach into a hostPath through a bind mount.
        for s in &self.shares {
            let _ = std::fs::remove_file(&s.socket);
            let _ = std::fs::remove_file(pid_file(&s.socket));
        }
        for b in self.binds.iter().rev() {
            let _ = nix::mount::umount2(b, nix::mount::MntFlags::MNT_DETACH);
            let _ = std::fs::remove_dir(b);
        }
        for e in std::fs::read_dir(&self.dir).into_iter().flatten().flatten() {
            if e.file_name().to_string_lossy().ends_with(".log") {
                let _ = std::fs::remove_file(e.path());
            }
        }
        let _ = std::fs::remove_dir(&self.dir);
    }
}

/// Removes the pid files virtiofsd left for sockets under `dir` (after a
/// monitor was killed and could not drop its [`FsShares`]).
pub fn remove_pid_files_under(dir: &Path) {
    let prefix = dir.to_string_lossy().replace('/', ".");
    for e in std::fs::read_dir("/run/virtiofsd")
        .into_iter()
        .flatten()
        .flatten()
    {
        if e.file_name().to_string_lossy().starts_with(&prefix) {
            let _ = std::fs::remove_file(e.path());
        }
    }
}

/// Where virtiofsd keeps its pid file for a socket (it leaves it behind).
fn pid_file(socket: &Path) -> PathBuf {
    let name = socket.to_string_lossy().replace('/', ".");
    Path::new("/run/virtiofsd").join(format!("{name}.pid"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_missing_virtiofsd_is_named_and_leaves_nothing() {
        let t = tempfile::tempdir().unwrap();
        let dir = t.path().join("fs");
        let src = t.path().join("src");
        std::fs::create_dir(&src).unwrap();
        let mut s = FsShares::new(dir.clone());
        let err = s
            .add(Path::new("/nonexistent/virtiofsd"), "v0", &src, false)
            .unwrap_err();
        assert!(err.to_string().contains("qemu-system-common"), "{err}");
        drop(s);
        assert!(!dir.exists());
    }
}
