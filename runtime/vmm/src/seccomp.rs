//! The seccomp filters husk-vmm's threads run under, built with
//! seccompiler as Firecracker builds its own: one allowlist per thread
//! kind ([`ThreadKind`]), with argument checks where a call is powerful
//! (ioctl only KVM_RUN on a vCPU; tgkill only this process's threads and
//! the kick signal; no executable mappings), and anything else kills the
//! whole process with SIGSYS. The lists are what the threads were seen to
//! call with every test guest (run first under a logging filter, whose
//! audit records name the thread and the call, then under this one), plus
//! the passthrough file system's calls for the FUSE requests a Linux guest
//! sends that the test guest does not.
//!
//! Filters are per thread and inherited by threads made later, so each
//! thread installs its own as the first thing it does, and the main
//! thread installs its one only after it has started the others
//! ([`install`]). `no_new_privs` comes first ([`crate::jail`]).

use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
    SeccompRule,
};
use std::collections::BTreeMap;

/// The kinds of thread, each with its own filter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ThreadKind {
    /// Runs one vCPU: KVM_RUN and the exits it emulates (serial, i8042,
    /// virtio-mmio registers).
    Vcpu,
    /// The device loop: virtqueues and their backends (files, the tap,
    /// unix sockets, the shared directories).
    Device,
    /// The main thread (joins the others, reports, tears down) and the
    /// watcher (stop requests, kicks).
    Main,
}

#[derive(Debug, thiserror::Error)]
pub enum SeccompError {
    #[error("seccomp filter for the {kind:?} thread: {source}")]
    Build {
        kind: ThreadKind,
        source: seccompiler::BackendError,
    },
    #[error("installing the seccomp filter of the {kind:?} thread: {source}")]
    Install {
        kind: ThreadKind,
        source: seccompiler::Error,
    },
}

fn cond(arg: u8, op: SeccompCmpOp, value: u64) -> SeccompCondition {
    // Only argument indexes 0 to 5 with fixed operators are used below,
    // which SeccompCondition::new accepts.
    SeccompCondition::new(arg, SeccompCmpArgLen::Qword, op, value)
        .unwrap_or_else(|e| unreachable!("seccomp condition: {e}"))
}

fn rule(conds: Vec<SeccompCondition>) -> SeccompRule {
    SeccompRule::new(conds).unwrap_or_else(|e| unreachable!("seccomp rule: {e}"))
}

/// `syscall` allowed only when argument `arg` masked by `mask` is 0.
fn masked_zero(arg: u8, mask: u64) -> Vec<SeccompRule> {
    vec![rule(vec![cond(arg, SeccompCmpOp::MaskedEq(mask), 0)])]
}

/// Calls every thread makes: memory (never executable), locks, signals
/// returning, its own end, and writes of events and eventfds.
const COMMON: &[i64] = &[
    libc::SYS_read,
    libc::SYS_write,
    libc::SYS_close,
    libc::SYS_futex,
    libc::SYS_brk,
    libc::SYS_munmap,
    libc::SYS_madvise,
    libc::SYS_mremap,
    libc::SYS_sigaltstack,
    libc::SYS_rt_sigprocmask,
    libc::SYS_rt_sigreturn,
    libc::SYS_sched_yield,
    libc::SYS_getrandom,
    libc::SYS_clock_gettime,
    libc::SYS_clock_nanosleep,
    libc::SYS_nanosleep,
    libc::SYS_getpid,
    libc::SYS_gettid,
    libc::SYS_exit,
    libc::SYS_exit_group,
];

/// The device loop's own: epoll, virtio-blk's file I/O, the tap, vsock's
/// unix sockets, and what the passthrough file system does for FUSE
/// requests (it switches its thread's effective ids per request).
const DEVICE: &[i64] = &[
    libc::SYS_epoll_create1,
    libc::SYS_epoll_ctl,
    libc::SYS_epoll_wait,
    libc::SYS_epoll_pwait,
    libc::SYS_readv,
    libc::SYS_writev,
    libc::SYS_pread64,
    libc::SYS_pwrite64,
    libc::SYS_preadv,
    libc::SYS_pwritev,
    libc::SYS_preadv2,
    libc::SYS_pwritev2,
    libc::SYS_lseek,
    libc::SYS_fsync,
    libc::SYS_fdatasync,
    libc::SYS_fallocate,
    libc::SYS_ftruncate,
    libc::SYS_fcntl,
    libc::SYS_dup,
    libc::SYS_accept4,
    libc::SYS_connect,
    libc::SYS_recvfrom,
    libc::SYS_sendto,
    libc::SYS_recvmsg,
    libc::SYS_sendmsg,
    libc::SYS_shutdown,
    libc::SYS_getsockopt,
    libc::SYS_setsockopt,
    libc::SYS_openat,
    libc::SYS_newfstatat,
    libc::SYS_fstat,
    libc::SYS_statx,
    libc::SYS_fstatfs,
    libc::SYS_statfs,
    libc::SYS_getdents64,
    libc::SYS_readlinkat,
    libc::SYS_mkdirat,
    libc::SYS_mknodat,
    libc::SYS_symlinkat,
    libc::SYS_linkat,
    libc::SYS_unlinkat,
    libc::SYS_renameat2,
    libc::SYS_fchmod,
    libc::SYS_fchmodat,
    libc::SYS_fchown,
    libc::SYS_fchownat,
    libc::SYS_utimensat,
    libc::SYS_setxattr,
    libc::SYS_getxattr,
    libc::SYS_listxattr,
    libc::SYS_removexattr,
    libc::SYS_fsetxattr,
    libc::SYS_fgetxattr,
    libc::SYS_flistxattr,
    libc::SYS_fremovexattr,
    libc::SYS_umask,
    libc::SYS_getuid,
    libc::SYS_getgid,
    libc::SYS_setresuid,
    libc::SYS_setresgid,
    libc::SYS_capget,
    libc::SYS_capset,
    libc::SYS_flock,
    libc::SYS_copy_file_range,
];

/// The main thread's and the watcher's own: tearing down (the vsock
/// socket's removal) and kicking vCPUs.
const MAIN: &[i64] = &[libc::SYS_unlink, libc::SYS_unlinkat];

/// `_IO(KVMIO, 0x80)`.
const KVM_RUN: u64 = 0xae80;

/// The filter for `kind`; `kick` is the signal that interrupts KVM_RUN.
pub fn filter(kind: ThreadKind, kick: i32) -> Result<BpfProgram, SeccompError> {
    let mut rules: BTreeMap<i64, Vec<SeccompRule>> = BTreeMap::new();
    let mut allow = |calls: &[i64]| {
        for &c in calls {
            rules.insert(c, vec![]);
        }
    };
    allow(COMMON);
    match kind {
        ThreadKind::Vcpu => {}
        ThreadKind::Device => allow(DEVICE),
        ThreadKind::Main => allow(MAIN),
    }
    let prot_exec = libc::PROT_EXEC as u64;
    rules.insert(libc::SYS_mmap, masked_zero(2, prot_exec));
    rules.insert(libc::SYS_mprotect, masked_zero(2, prot_exec));
    match kind {
        ThreadKind::Vcpu => {
            rules.insert(
                libc::SYS_ioctl,
                vec![rule(vec![cond(1, SeccompCmpOp::Eq, KVM_RUN)])],
            );
        }
        ThreadKind::Main => {
            rules.insert(
                libc::SYS_tgkill,
                vec![rule(vec![
                    cond(0, SeccompCmpOp::Eq, u64::from(std::process::id())),
                    cond(2, SeccompCmpOp::Eq, kick as u64),
                ])],
            );
        }
        ThreadKind::Device => {
            // Sockets go non-blocking with FIONBIO; vsock's guest
            // connections are unix stream sockets.
            rules.insert(
                libc::SYS_ioctl,
                vec![rule(vec![cond(1, SeccompCmpOp::Eq, libc::FIONBIO)])],
            );
            rules.insert(
                libc::SYS_socket,
                vec![rule(vec![cond(0, SeccompCmpOp::Eq, libc::AF_UNIX as u64)])],
            );
        }
    }
    let f = SeccompFilter::new(
        rules,
        SeccompAction::KillProcess,
        SeccompAction::Allow,
        std::env::consts::ARCH
            .try_into()
            .map_err(|source| SeccompError::Build { kind, source })?,
    )
    .map_err(|source| SeccompError::Build { kind, source })?;
    f.try_into()
        .map_err(|source| SeccompError::Build { kind, source })
}

/// Builds and installs `kind`'s filter on the calling thread.
pub fn install(kind: ThreadKind, kick: i32) -> Result<(), SeccompError> {
    let prog = filter(kind, kick)?;
    seccompiler::apply_filter(&prog).map_err(|source| SeccompError::Install { kind, source })
}
