//! The boundary between a VM pod and the program that runs its VM: which
//! hypervisor ([`Hypervisor`]), and what the pod needs of a running VM
//! ([`Vm`]): its process, its console, a connection to its agent, and a
//! wait for it to end. [`super::qemu::QemuVm`] and
//! [`super::husk_vmm::HuskVmmVm`] implement it; nothing else in the pod
//! path knows which one is underneath.

use super::agent::AgentClient;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::{Duration, Instant};

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
    #[error(transparent)]
    Identity(#[from] super::identity::IdentityError),
    #[error("opening {path} for the hypervisor: {source}")]
    Open {
        path: PathBuf,
        source: std::io::Error,
    },
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

/// What both hypervisors own: the process and the VM's run directory.
/// Dropping it kills the one and removes the other.
pub(crate) struct VmProcess {
    child: Option<Child>,
    dir: PathBuf,
}

impl VmProcess {
    /// Checks the kernel and initrd, then creates `run_dir` (which must not
    /// exist); from then on the directory is this owner's, so a start that
    /// fails later removes it.
    pub(crate) fn prepare(
        kernel: &Path,
        initrd: &Path,
        run_dir: &Path,
    ) -> Result<Self, HypervisorError> {
        for (what, path) in [("kernel", kernel), ("initrd", initrd)] {
            if !path.is_file() {
                return Err(HypervisorError::Missing {
                    what,
                    path: path.to_owned(),
                });
            }
        }
        std::fs::create_dir(run_dir).map_err(|e| HypervisorError::RunDir(run_dir.to_owned(), e))?;
        Ok(VmProcess {
            child: None,
            dir: run_dir.to_owned(),
        })
    }

    pub(crate) fn dir(&self) -> &Path {
        &self.dir
    }

    /// An error about the run directory.
    pub(crate) fn dir_err(&self, e: std::io::Error) -> HypervisorError {
        HypervisorError::RunDir(self.dir.clone(), e)
    }

    /// Spawns the hypervisor; it dies with the thread that spawned it.
    pub(crate) fn spawn(
        &mut self,
        mut cmd: Command,
        program: String,
        hint: &'static str,
    ) -> Result<(), HypervisorError> {
        super::qemu::die_with_parent(&mut cmd);
        self.child = Some(cmd.spawn().map_err(|source| HypervisorError::Spawn {
            program,
            hint,
            source,
        })?);
        Ok(())
    }

    /// A file of the run directory, or nothing.
    pub(crate) fn read(&self, name: &str) -> String {
        std::fs::read_to_string(self.dir.join(name)).unwrap_or_default()
    }

    pub(crate) fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    pub(crate) fn running(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }

    /// After the agent's connection failed: whether the process ends
    /// within two seconds (a VM that died drops the connection just before
    /// its process ends), so the error can say what happened.
    pub(crate) fn ended_soon(&mut self) -> bool {
        let t0 = Instant::now();
        while self.running() && t0.elapsed() < Duration::from_secs(2) {
            std::thread::sleep(Duration::from_millis(10));
        }
        !self.running()
    }

    /// Waits up to `timeout` for the process to exit by itself; true when
    /// it did with status 0 (the child is reaped then).
    pub(crate) fn wait(&mut self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        while let Some(c) = self.child.as_mut() {
            match c.try_wait() {
                Ok(Some(status)) => {
                    self.child = None;
                    return status.success();
                }
                Ok(None) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(10))
                }
                _ => return false,
            }
        }
        false
    }
}

impl Drop for VmProcess {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
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
