//! The boundary between a VM pod and the program that runs its VM: which
//! hypervisor ([`Hypervisor`]), and what the pod needs of a running VM
//! ([`Vm`]): its process, its console, a connection to its agent, and a
//! wait for it to end. [`super::qemu::QemuVm`] and
//! [`super::husk_vmm::HuskVmmVm`] implement it; nothing else in the pod
//! path knows which one is underneath.

use super::agent::AgentClient;
use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

/// What runs a VM pod's VM.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Hypervisor {
    /// QEMU's microvm machine with software emulation.
    QemuTcg,
    /// QEMU's microvm machine on KVM.
    QemuKvm,
    /// husk's own VMM on KVM: virtio-fs inside it, the agent over vsock.
    HuskVmm,
}

impl Hypervisor {
    /// The name `[vm] hypervisor`, the pod annotation and `husk info` use.
    pub fn name(self) -> &'static str {
        match self {
            Hypervisor::QemuTcg => "qemu-tcg",
            Hypervisor::QemuKvm => "qemu-kvm",
            Hypervisor::HuskVmm => "husk-vmm",
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum HypervisorError {
    #[error("VM run directory {0}: {1}")]
    RunDir(PathBuf, std::io::Error),
    #[error("cannot start {program} ({source}); {hint}")]
    Spawn {
        program: String,
        hint: &'static str,
        source: std::io::Error,
    },
    #[error("{what} {path}: not found")]
    Missing { what: &'static str, path: PathBuf },
    #[error("the VM ended before its agent answered; console:\n{0}")]
    Ended(String),
    #[error("the guest agent did not answer within {secs} s under {hypervisor}; {hint}console ends with:\n{console}")]
    NoAgent {
        secs: u64,
        hypervisor: &'static str,
        hint: String,
        console: String,
    },
    #[error("{0}")]
    Unsupported(String),
    #[error("the guest agent: {0}")]
    Agent(#[from] husk_protocol::ProtocolError),
}

/// A running VM, owned: dropping it ends the hypervisor process and
/// removes its run directory.
pub trait Vm: Send {
    fn pid(&self) -> Option<u32>;
    /// The guest's console so far (and the hypervisor's own errors).
    fn console(&self) -> String;
    /// Connects to the agent, waiting up to `timeout` for the guest to boot.
    fn agent(&mut self, timeout: Duration) -> Result<AgentClient, HypervisorError>;
    /// Waits for the VM to end by itself (after the agent's shutdown); true
    /// when it did within `timeout` with status 0.
    fn wait(&mut self, timeout: Duration) -> bool;
}

/// The last `n` lines of a console, for an error message.
pub fn console_tail(console: &str, n: usize) -> String {
    let lines: Vec<&str> = console.lines().rev().take(n).collect();
    lines.into_iter().rev().collect::<Vec<_>>().join("\n")
}

/// Makes `fd` (open in this process until the spawn returns) descriptor
/// `target` of the child, inherited across exec.
pub(crate) fn pass_fd(cmd: &mut Command, fd: i32, target: i32) {
    use std::os::unix::process::CommandExt;
    // SAFETY: dup2 and fcntl are async-signal-safe; `fd` stays open in the
    // parent until the spawn returns.
    unsafe {
        cmd.pre_exec(move || {
            if fd == target {
                let flags = libc::fcntl(fd, libc::F_GETFD);
                libc::fcntl(fd, libc::F_SETFD, flags & !libc::FD_CLOEXEC);
            } else if libc::dup2(fd, target) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}
