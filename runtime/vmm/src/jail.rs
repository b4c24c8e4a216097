//! The jail husk-vmm enters before its guest runs, as Firecracker's jailer
//! confines Firecracker: its own mount namespace, pivoted into an empty,
//! read-only tmpfs that holds only what the VM still reaches by path (the
//! vsock socket's directory at [`VSOCK_DIR`]; with virtio-fs shares, this
//! process's own /proc/self/fd, through which the passthrough file system
//! reaches the shares' detached trees), with the old root detached; no supplementary groups;
//! an unprivileged uid and gid of the caller's choice; no capabilities
//! (a VM with shares keeps only the file capabilities of [`SHARE_CAPS`],
//! see below); and `no_new_privs`. Everything else (the kernel, the
//! initramfs, the disks, /dev/kvm, the tap, the console) is opened before
//! and comes in as a descriptor. The seccomp filters ([`crate::seccomp`])
//! come after this, per thread.
//!
//! A VM with virtio-fs shares acts on host files on behalf of the guest's
//! users: the passthrough file system switches its thread's effective
//! uid and gid to the guest's for each request and back to 0, as virtiofsd
//! does, so that files keep the owners the guest gives them. That needs
//! uid 0 with CAP_SETUID and CAP_SETGID, and CAP_CHOWN, CAP_DAC_OVERRIDE
//! and CAP_FOWNER for a guest root acting on its own files; such a VM
//! keeps uid 0 and only those five (never CAP_MKNOD, CAP_SETFCAP,
//! CAP_FSETID or CAP_SYS_ADMIN; the bounding set holds nothing else and
//! SECBIT_NOROOT is locked), and reaches nothing of the host's but the
//! shares, which are nosuid, nodev and get no set-id bits or device nodes
//! ([`crate::fs::NoSetId`]). This module owns no host resource: the
//! namespace, its tmpfs and its mounts go with the process.

use std::os::fd::{AsRawFd, BorrowedFd};

static ENTERED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Whether this process is in its jail: paths from the configuration
/// name host files no longer; the jail's own ones do.
pub fn entered() -> bool {
    ENTERED.load(std::sync::atomic::Ordering::SeqCst)
}

/// Where the vsock socket's directory is inside the jail.
pub const VSOCK_DIR: &str = "/vsock";

/// The capabilities a VM with virtio-fs shares keeps.
pub const SHARE_CAPS: [caps::Capability; 5] = [
    caps::Capability::CAP_CHOWN,
    caps::Capability::CAP_DAC_OVERRIDE,
    caps::Capability::CAP_FOWNER,
    caps::Capability::CAP_SETGID,
    caps::Capability::CAP_SETUID,
];

/// The uid and gid husk-vmm runs as once jailed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JailConfig {
    pub uid: u32,
    pub gid: u32,
}

/// Without a [`JailConfig`], husk-vmm takes this uid and gid: 0x7000_0000
/// plus its pid, which no other live husk-vmm has (a monitor that runs
/// several VMs chooses and claims its own, as husk does from 0x6000_0000).
pub fn default_ids() -> JailConfig {
    let id = 0x7000_0000 + std::process::id();
    JailConfig { uid: id, gid: id }
}

/// Only root can build the jail (a mount namespace, pivot_root, another
/// uid); an unprivileged husk-vmm has nothing to give up but still gets
/// `no_new_privs` and its seccomp filters.
pub fn can_jail() -> bool {
    nix::unistd::geteuid().is_root()
}

#[derive(Debug, thiserror::Error)]
pub enum JailError {
    #[error("jail: {what}: {source}")]
    Sys {
        what: &'static str,
        source: std::io::Error,
    },
}

fn sys(what: &'static str) -> impl FnOnce(nix::errno::Errno) -> JailError {
    move |e| JailError::Sys {
        what,
        source: e.into(),
    }
}

fn io(what: &'static str) -> impl FnOnce(std::io::Error) -> JailError {
    move |source| JailError::Sys { what, source }
}

/// What goes into the jail: detached mount trees (open_tree clones made
/// before) attached at [`VSOCK_DIR`] and at /proc/self/fd.
pub struct Jail<'a> {
    pub ids: JailConfig,
    pub vsock_dir: Option<BorrowedFd<'a>>,
    /// A clone of /proc/self/fd (this process's own fd directory).
    pub proc_fd: Option<BorrowedFd<'a>>,
    /// The VM serves virtio-fs shares: keep uid 0 and [`SHARE_CAPS`].
    pub shares: bool,
}

const MOVE_MOUNT_F_EMPTY_PATH: libc::c_uint = 0x4;

/// Attaches the detached tree `tree` at `target`.
fn attach(tree: BorrowedFd<'_>, target: &std::ffi::CStr) -> Result<(), JailError> {
    // SAFETY: both strings are valid C strings; "" with
    // MOVE_MOUNT_F_EMPTY_PATH names the tree descriptor itself.
    let r = unsafe {
        libc::syscall(
            libc::SYS_move_mount,
            tree.as_raw_fd(),
            c"".as_ptr(),
            libc::AT_FDCWD,
            target.as_ptr(),
            MOVE_MOUNT_F_EMPTY_PATH,
        )
    };
    if r < 0 {
        return Err(io("move_mount")(std::io::Error::last_os_error()));
    }
    Ok(())
}

/// Enters the jail; call it in the only thread (capabilities and
/// no_new_privs are per thread, and threads made later inherit them).
pub fn enter(jail: &Jail<'_>) -> Result<(), JailError> {
    use nix::mount::{mount, umount2, MntFlags, MsFlags};
    use nix::sys::stat::Mode;
    nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNS).map_err(sys("unshare"))?;
    mount(
        None::<&str>,
        "/",
        None::<&str>,
        MsFlags::MS_REC | MsFlags::MS_PRIVATE,
        None::<&str>,
    )
    .map_err(sys("making / private"))?;
    // The new root is mounted on /dev, which exists wherever /dev/kvm
    // does; it covers nothing that matters, since everything from the
    // old root is open already and the old root is detached below.
    let jail_flags = MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC;
    mount(
        Some("tmpfs"),
        "/dev",
        Some("tmpfs"),
        jail_flags,
        Some("mode=0711,size=16k,nr_inodes=64"),
    )
    .map_err(sys("tmpfs for the new root"))?;
    let mkdir = |name: &str| -> Result<std::ffi::CString, JailError> {
        let p = format!("/dev{name}");
        nix::unistd::mkdir(p.as_str(), Mode::from_bits_truncate(0o711))
            .map_err(sys("mkdir in the new root"))?;
        std::ffi::CString::new(p).map_err(|e| io("mount point")(std::io::Error::other(e)))
    };
    if let Some(tree) = jail.vsock_dir {
        attach(tree, &mkdir(VSOCK_DIR)?)?;
    }
    if let Some(tree) = jail.proc_fd {
        mkdir("/proc")?;
        mkdir("/proc/self")?;
        attach(tree, &mkdir("/proc/self/fd")?)?;
    }
    nix::unistd::chdir("/dev").map_err(sys("chdir to the new root"))?;
    // pivot_root(".", "."): the old root ends up stacked on the new one,
    // and is detached from there.
    nix::unistd::pivot_root(".", ".").map_err(sys("pivot_root"))?;
    umount2(".", MntFlags::MNT_DETACH).map_err(sys("detaching the old root"))?;
    ENTERED.store(true, std::sync::atomic::Ordering::SeqCst);
    nix::unistd::chdir("/").map_err(sys("chdir to /"))?;
    mount(
        None::<&str>,
        "/",
        None::<&str>,
        MsFlags::MS_REMOUNT | MsFlags::MS_BIND | MsFlags::MS_RDONLY | jail_flags,
        None::<&str>,
    )
    .map_err(sys("making the new root read-only"))?;
    drop_privileges(jail.ids, jail.shares)
}

/// Gives up groups, uid and capabilities: to `ids` with none at all, or,
/// with shares, to uid 0 with [`SHARE_CAPS`] only.
fn drop_privileges(ids: JailConfig, shares: bool) -> Result<(), JailError> {
    use caps::{CapSet, CapsHashSet};
    let keep: CapsHashSet = if shares {
        SHARE_CAPS.into_iter().collect()
    } else {
        CapsHashSet::new()
    };
    // Root gains nothing from exec (which seccomp refuses anyway).
    const SECBIT_NOROOT: libc::c_ulong = 1;
    const SECBIT_NOROOT_LOCKED: libc::c_ulong = 2;
    // SAFETY: PR_SET_SECUREBITS takes an integer; nothing is written.
    if unsafe {
        libc::prctl(
            libc::PR_SET_SECUREBITS,
            SECBIT_NOROOT | SECBIT_NOROOT_LOCKED,
        )
    } < 0
    {
        return Err(io("securebits")(std::io::Error::last_os_error()));
    }
    let caps_err = |what| move |e: caps::errors::CapsError| io(what)(std::io::Error::other(e));
    for cap in caps::runtime::thread_all_supported() {
        if !keep.contains(&cap) {
            caps::drop(None, CapSet::Bounding, cap).map_err(caps_err("bounding set"))?;
        }
    }
    caps::clear(None, CapSet::Ambient).map_err(caps_err("ambient set"))?;
    caps::clear(None, CapSet::Inheritable).map_err(caps_err("inheritable set"))?;
    nix::unistd::setgroups(&[]).map_err(sys("setgroups"))?;
    if !shares {
        let (u, g) = (
            nix::unistd::Uid::from_raw(ids.uid),
            nix::unistd::Gid::from_raw(ids.gid),
        );
        nix::unistd::setresgid(g, g, g).map_err(sys("setresgid"))?;
        // All three uids leave 0: the kernel clears the permitted and
        // effective sets; cleared again below to be sure.
        nix::unistd::setresuid(u, u, u).map_err(sys("setresuid"))?;
    }
    // Effective first: it must stay inside the permitted set.
    caps::set(None, CapSet::Effective, &keep).map_err(caps_err("effective set"))?;
    caps::set(None, CapSet::Permitted, &keep).map_err(caps_err("permitted set"))?;
    no_new_privs()
}

/// `PR_SET_NO_NEW_PRIVS`: nothing this thread (and the threads it makes)
/// executes gains privileges; seccomp filters need it.
pub fn no_new_privs() -> Result<(), JailError> {
    // SAFETY: PR_SET_NO_NEW_PRIVS takes integers; nothing is written.
    if unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) } < 0 {
        return Err(io("no_new_privs")(std::io::Error::last_os_error()));
    }
    Ok(())
}
