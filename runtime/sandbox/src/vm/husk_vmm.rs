//! husk-vmm as a VM pod's hypervisor: one husk-vmm process per pod, given
//! its whole configuration as a JSON file in the VM's run directory (paths
//! with commas need no quoting), the pod's tap as descriptor 3, virtio-fs
//! shares served inside husk-vmm (no virtiofsd), and the agent reached
//! over vsock through husk-vmm's hybrid unix socket (`CONNECT <port>\n`,
//! answered `OK <port>\n` once the agent accepts). One HuskVmmVm owns the
//! process and the run directory (through [`VmProcess`]) and its jail uid
//! ([`VmIdentity`]); dropping it kills the process, removes the directory
//! and gives the uid back.
//!
//! husk-vmm jails itself before the guest runs (husk-vmm's README: its own
//! mount namespace, an unprivileged uid and gid, no capabilities, seccomp).
//! The uid and gid are this VM's alone, claimed host-wide as QEMU's are
//! (see [`super::identity`]). The vsock socket sits in its own directory
//! owned by that uid, which husk-vmm binds into its jail.

use super::agent::AgentClient;
use super::hypervisor::{console_tail, pass_fd, HypervisorError, Vm, VmProcess};
use super::identity::{self, VmIdentity};
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// The guest's vsock CID (the only guest of its husk-vmm).
const GUEST_CID: u64 = 3;
const TAP_FD: i32 = 3;
const CONFIG: &str = "vm.json";
const CONSOLE: &str = "console.log";
/// husk-vmm's own stderr: its events and errors.
const VMM_LOG: &str = "husk-vmm.log";
/// The vsock socket, in a directory of its own that the jail uid owns.
const VSOCK: &str = "vsock/vsock.sock";

/// One virtio-fs share served by husk-vmm.
#[derive(Debug, Clone)]
pub struct FsShare {
    pub tag: String,
    pub path: PathBuf,
    pub read_only: bool,
    /// Extended attributes passed through (the layer share: overlayfs in
    /// the guest keeps its own in them).
    pub xattr: bool,
}

#[derive(Debug, Clone)]
pub struct HuskVmmConfig {
    /// The husk-vmm binary.
    pub binary: PathBuf,
    /// A bzImage whose virtio-mmio devices come from the command line
    /// (kernel B).
    pub kernel: PathBuf,
    /// The initramfs, with husk-agent as /init.
    pub initrd: PathBuf,
    /// Added to the command line husk sets.
    pub cmdline: String,
    pub mem_mib: u32,
    pub vcpus: u32,
    /// Block devices, in order (vda, vdb, …), and whether read-only.
    pub disks: Vec<(PathBuf, bool)>,
    pub shares: Vec<FsShare>,
}

/// husk-vmm next to the running binary, else from PATH.
pub fn default_binary() -> PathBuf {
    std::env::current_exe()
        .ok()
        .map(|e| e.with_file_name("husk-vmm"))
        .filter(|p| p.is_file())
        .unwrap_or_else(|| "husk-vmm".into())
}

/// husk-vmm's JSON configuration for `cfg` (see husk_vmm::VmConfig).
fn vm_json(cfg: &HuskVmmConfig, run_dir: &Path, mac: Option<&str>, jail: u32) -> serde_json::Value {
    let mut cmdline = format!(
        "console=ttyS0 reboot=k panic=-1 quiet {}=vsock:{}",
        husk_protocol::CMDLINE_KEY,
        husk_protocol::VSOCK_PORT
    );
    if !cfg.cmdline.is_empty() {
        cmdline.push(' ');
        cmdline.push_str(&cfg.cmdline);
    }
    // husk-vmm refuses more vCPUs than the host has cores.
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get() as u32);
    let mut v = serde_json::json!({
        "kernel": cfg.kernel,
        "initrd": cfg.initrd,
        "cmdline": cmdline,
        "mem_mib": cfg.mem_mib,
        "vcpus": cfg.vcpus.clamp(1, cores),
        "serial": run_dir.join(CONSOLE),
        "disks": cfg.disks.iter().map(|(p, ro)| serde_json::json!({"path": p, "read_only": ro})).collect::<Vec<_>>(),
        "vsock": {"cid": GUEST_CID, "uds": run_dir.join(VSOCK)},
        "fs": cfg.shares.iter().map(|s| serde_json::json!({
            "tag": s.tag, "path": s.path, "read_only": s.read_only, "xattr": s.xattr,
        })).collect::<Vec<_>>(),
        "jail": {"uid": jail, "gid": jail},
    });
    if let Some(mac) = mac {
        v["net"] = serde_json::json!({"fd": TAP_FD, "mac": mac});
    }
    v
}

pub struct HuskVmmVm {
    // Dropped in this order: the process (and its run directory), then
    // the uid it ran as.
    process: VmProcess,
    jail: VmIdentity,
}

impl HuskVmmVm {
    /// Starts the VM; `run_dir` must not exist: the VM creates and owns it.
    /// With a NIC, husk-vmm gets its tap (made with IFF_VNET_HDR) as fd 3.
    pub fn start(
        cfg: &HuskVmmConfig,
        run_dir: &Path,
        nic: Option<&super::nic::VmNic>,
    ) -> Result<Self, HypervisorError> {
        let mut process = VmProcess::prepare(&cfg.kernel, &cfg.initrd, run_dir)?;
        let jail = VmIdentity::claim(Path::new(identity::HOST_CLAIMS), run_dir)?;
        // The vsock socket's directory: the jailed husk-vmm's own.
        let vsock_dir = run_dir.join(VSOCK);
        let vsock_dir = vsock_dir.parent().unwrap_or(run_dir);
        std::fs::create_dir(vsock_dir).map_err(|e| process.dir_err(e))?;
        std::os::unix::fs::chown(vsock_dir, Some(jail.uid), Some(jail.uid))
            .map_err(|e| process.dir_err(e))?;
        let json = vm_json(cfg, run_dir, nic.map(|n| n.mac.as_str()), jail.uid);
        std::fs::write(run_dir.join(CONFIG), json.to_string()).map_err(|e| process.dir_err(e))?;
        let log = std::fs::File::create(run_dir.join(VMM_LOG)).map_err(|e| process.dir_err(e))?;
        let mut cmd = Command::new(&cfg.binary);
        cmd.arg("--config").arg(run_dir.join(CONFIG));
        if let Some(nic) = nic {
            use std::os::fd::AsRawFd;
            pass_fd(&mut cmd, nic.tap.as_raw_fd(), TAP_FD);
        }
        cmd.stdin(Stdio::null())
            .stdout(log.try_clone().map_err(|e| process.dir_err(e))?)
            .stderr(log);
        process.spawn(
            cmd,
            cfg.binary.display().to_string(),
            "build it (cargo build --release -p husk-vmm) next to husk, or set [vm] husk_vmm in husk's config",
        )?;
        Ok(HuskVmmVm { process, jail })
    }

    /// One attempt at a stream to the agent's vsock port: None when the
    /// guest refused (nothing listens yet) or husk-vmm is not up yet.
    fn connect(&self, deadline: Instant) -> std::io::Result<Option<UnixStream>> {
        let Ok(mut s) = UnixStream::connect(self.process.dir().join(VSOCK)) else {
            return Ok(None);
        };
        s.write_all(format!("CONNECT {}\n", husk_protocol::VSOCK_PORT).as_bytes())?;
        let left = deadline.saturating_duration_since(Instant::now());
        s.set_read_timeout(Some(left.max(Duration::from_millis(1))))?;
        // The answer is one short line; read it byte by byte so nothing
        // of the agent's stream is consumed.
        let mut line = Vec::new();
        let mut b = [0u8; 1];
        while line.len() < 32 {
            match s.read(&mut b) {
                Ok(0) => return Ok(None),
                Ok(_) if b[0] == b'\n' => break,
                Ok(_) => line.push(b[0]),
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) =>
                {
                    return Ok(None)
                }
                Err(e) => return Err(e),
            }
        }
        if !line.starts_with(b"OK ") {
            return Err(std::io::Error::other(format!(
                "husk-vmm answered {:?} to CONNECT",
                String::from_utf8_lossy(&line)
            )));
        }
        s.set_read_timeout(None)?;
        Ok(Some(s))
    }
}

impl HuskVmmVm {
    /// The uid and gid husk-vmm runs as in its jail.
    pub fn jail_id(&self) -> u32 {
        self.jail.uid
    }
}

impl Vm for HuskVmmVm {
    fn pid(&self) -> Option<u32> {
        self.process.pid()
    }

    /// The guest's serial console, then husk-vmm's own lines.
    fn console(&self) -> String {
        self.process.read(CONSOLE) + &self.process.read(VMM_LOG)
    }

    fn agent(&mut self, timeout: Duration) -> Result<AgentClient, HypervisorError> {
        let deadline = Instant::now() + timeout;
        loop {
            if !self.process.running() {
                return Err(HypervisorError::Ended(self.console()));
            }
            if let Some(stream) = self
                .connect(deadline)
                .map_err(husk_protocol::ProtocolError::Io)?
            {
                return AgentClient::connect(stream, deadline).map_err(|e| {
                    if self.process.ended_soon() {
                        HypervisorError::Ended(self.console())
                    } else {
                        e.into()
                    }
                });
            }
            if Instant::now() >= deadline {
                let kvm_pvm = Path::new("/sys/module/kvm_pvm").exists();
                return Err(HypervisorError::NoAgent {
                    secs: timeout.as_secs(),
                    hypervisor: "husk-vmm",
                    hint: if kvm_pvm {
                        "this host's KVM is kvm-pvm, where a Linux guest without PVM support cannot run its user space: use husk.io/hypervisor: qemu-tcg (or auto); ".into()
                    } else {
                        String::new()
                    },
                    console: console_tail(&self.console(), 5),
                });
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn wait(&mut self, timeout: Duration) -> bool {
        self.process.wait(timeout)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_configuration_names_every_device_and_the_agents_port() {
        let cfg = HuskVmmConfig {
            binary: "husk-vmm".into(),
            kernel: "/k,1".into(),
            initrd: "/i".into(),
            cmdline: "extra=1".into(),
            mem_mib: 300,
            vcpus: 64,
            disks: vec![("/layer0.ext4".into(), true)],
            shares: vec![FsShare {
                tag: "v0".into(),
                path: "/data,with,commas".into(),
                read_only: true,
                xattr: false,
            }],
        };
        let v = vm_json(
            &cfg,
            Path::new("/run/x"),
            Some("02:00:00:00:00:09"),
            0x6000_0007,
        );
        assert_eq!(v["kernel"], "/k,1");
        assert_eq!(
            v["cmdline"],
            "console=ttyS0 reboot=k panic=-1 quiet husk.agent=vsock:1024 extra=1"
        );
        let cores = std::thread::available_parallelism().unwrap().get();
        assert_eq!(v["vcpus"], cores.min(64));
        assert_eq!(v["serial"], "/run/x/console.log");
        assert_eq!(v["vsock"]["uds"], "/run/x/vsock/vsock.sock");
        assert_eq!(v["jail"]["uid"], 0x6000_0007);
        assert_eq!(v["jail"]["gid"], 0x6000_0007);
        assert_eq!(v["vsock"]["cid"], 3);
        assert_eq!(v["net"]["fd"], 3);
        assert_eq!(v["net"]["mac"], "02:00:00:00:00:09");
        assert_eq!(v["disks"][0]["read_only"], true);
        assert_eq!(v["fs"][0]["path"], "/data,with,commas");
        assert_eq!(v["fs"][0]["read_only"], true);
        assert!(vm_json(&cfg, Path::new("/r"), None, 1).get("net").is_none());
    }
}
