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
    set_id_filter: std::sync::Arc<seccompiler::BpfProgram>,
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
            set_id_filter: std::sync::Arc::new(set_id_filter()),
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

    /// A bind of `source` for a hypervisor to serve, never the source
    /// itself: nosuid and nodev on every mount of the tree, read-only when
    /// asked, so a device node or set-id file that is there (a hostPath of
    /// /dev) does nothing through the share. Owned (unmounted on drop)
    /// with the shares. (husk-vmm makes its own detached copy instead.)
    fn restricted_tree(
        &mut self,
        tag: &str,
        source: &Path,
        read_only: bool,
    ) -> Result<PathBuf, ShareError> {
        let io = |p: &Path| {
            let p = p.to_owned();
            move |e| ShareError::Io(p, e)
        };
        std::fs::create_dir_all(&self.dir).map_err(io(&self.dir))?;
        let served = self.dir.join(format!("tree-{tag}"));
        std::fs::create_dir(&served).map_err(io(&served))?;
        use nix::mount::{mount, MsFlags};
        if let Err(e) = mount(
            Some(source),
            &served,
            None::<&str>,
            MsFlags::MS_BIND | MsFlags::MS_REC,
            None::<&str>,
        ) {
            let _ = std::fs::remove_dir(&served);
            return Err(ShareError::Io(served, e.into()));
        }
        self.binds.push(served.clone());
        restrict_tree(&served, read_only).map_err(io(&served))?;
        Ok(served)
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
        let served = self.restricted_tree(tag, source, read_only)?;
        let socket = self.dir.join(format!("{tag}.sock"));
        let log_path = self.dir.join(format!("{tag}.log"));
        let log = std::fs::File::create(&log_path).map_err(io(&log_path))?;
        let mut cmd = Command::new(virtiofsd);
        cmd.arg(format!("--socket-path={}", socket.display()))
            .arg("-o")
            .arg(format!("source={}", served.display()))
            .args(["-o", "cache=auto", "-o", "sandbox=namespace"])
            // No device nodes, no file capabilities from the guest.
            .args(["-o", "modcaps=-mknod:-setfcap"])
            .args(if xattr { &["-o", "xattr"][..] } else { &[] })
            .stdin(Stdio::null())
            .stdout(log.try_clone().map_err(io(&log_path))?)
            .stderr(log);
        no_set_id_bits(&mut cmd, &self.set_id_filter);
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

/// Makes every mount of the tree at `path` nosuid and nodev (and read-only
/// when asked), submounts included (`mount_setattr`, AT_RECURSIVE).
fn restrict_tree(path: &Path, read_only: bool) -> std::io::Result<()> {
    #[repr(C)]
    struct MountAttr {
        attr_set: u64,
        attr_clr: u64,
        propagation: u64,
        userns_fd: u64,
    }
    const MOUNT_ATTR_RDONLY: u64 = 0x1;
    const MOUNT_ATTR_NOSUID: u64 = 0x2;
    const MOUNT_ATTR_NODEV: u64 = 0x4;
    let attr = MountAttr {
        attr_set: MOUNT_ATTR_NOSUID
            | MOUNT_ATTR_NODEV
            | if read_only { MOUNT_ATTR_RDONLY } else { 0 },
        attr_clr: 0,
        propagation: 0,
        userns_fd: 0,
    };
    let c = std::ffi::CString::new(path.as_os_str().as_encoded_bytes())
        .map_err(|_| std::io::Error::from_raw_os_error(libc::EINVAL))?;
    // SAFETY: `c` is a NUL-terminated path and `attr` a mount_attr of the
    // size passed; the kernel only reads both.
    let r = unsafe {
        libc::syscall(
            libc::SYS_mount_setattr,
            libc::AT_FDCWD,
            c.as_ptr(),
            libc::AT_RECURSIVE | libc::AT_SYMLINK_NOFOLLOW,
            &attr as *const MountAttr,
            std::mem::size_of::<MountAttr>(),
        )
    };
    if r != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// A seccomp filter for virtiofsd, stacked on its own: every call that
/// sets a file's mode fails with EPERM when the mode has S_ISUID or
/// S_ISGID, so a guest cannot leave a set-id file on the host (root in
/// the guest is root to virtiofsd, which would otherwise make a
/// setuid-root binary any host user could run). openat2, whose mode sits
/// in a struct the filter cannot read, is refused (EPERM) whatever it
/// asks: neither virtiofsd nor glibc uses it. Everything else is allowed: virtiofsd's own filter
/// does the allow-listing.
fn set_id_filter() -> seccompiler::BpfProgram {
    use seccompiler::{
        SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
        SeccompRule, TargetArch,
    };
    // (syscall, index of its mode argument)
    let calls: [(i64, u8); 10] = [
        (libc::SYS_chmod, 1),
        (libc::SYS_fchmod, 1),
        (libc::SYS_fchmodat, 2),
        (452, 2), // fchmodat2 (Linux 6.6)
        (libc::SYS_open, 2),
        (libc::SYS_openat, 3),
        (libc::SYS_creat, 1),
        (libc::SYS_mkdir, 1),
        (libc::SYS_mkdirat, 2),
        (libc::SYS_mknodat, 2),
    ];
    let bit = |arg: u8, b: u64| {
        SeccompRule::new(vec![SeccompCondition::new(
            arg,
            SeccompCmpArgLen::Dword,
            SeccompCmpOp::MaskedEq(b),
            b,
        )
        .expect("a valid condition")])
        .expect("a valid rule")
    };
    let mut rules: std::collections::BTreeMap<i64, Vec<SeccompRule>> = calls
        .iter()
        .map(|&(nr, arg)| (nr, vec![bit(arg, 0o4000), bit(arg, 0o2000)]))
        .collect();
    rules.insert(libc::SYS_mknod, vec![bit(1, 0o4000), bit(1, 0o2000)]);
    rules.insert(libc::SYS_openat2, vec![]);
    SeccompFilter::new(
        rules,
        SeccompAction::Allow,
        SeccompAction::Errno(libc::EPERM as u32),
        TargetArch::x86_64,
    )
    .and_then(TryInto::try_into)
    .expect("a valid filter")
}

/// Installs the set-id filter in the child before it runs virtiofsd.
fn no_set_id_bits(cmd: &mut Command, filter: &std::sync::Arc<seccompiler::BpfProgram>) {
    use std::os::unix::process::CommandExt;
    let filter = filter.clone();
    // SAFETY: apply_filter makes two prctl calls and allocates nothing.
    unsafe {
        cmd.pre_exec(move || {
            seccompiler::apply_filter(&filter).map_err(std::io::Error::other)?;
            Ok(())
        });
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
