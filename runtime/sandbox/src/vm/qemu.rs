//! QEMU as a VM pod's hypervisor, for hosts where husk-vmm cannot run a
//! Linux guest: `-accel tcg` where KVM is missing or is PVM (a non-PVM
//! kernel's user space cannot make system calls there), `-accel kvm`
//! elsewhere. One QemuVm owns one QEMU process and its run directory (the
//! agent's socket, the console log); dropping it kills the process and
//! removes the directory. Debian's qemu-system-x86, `-M microvm`: virtio on
//! MMIO, no firmware, no PCI.
//!
//! QEMU is confined as libvirt confines it, and more: it opens no path of
//! husk's. The kernel and initrd, the disks (`-add-fd`, `/dev/fdset`), the
//! virtiofsd connections, the agent's listening socket and the tap come in
//! as descriptors, so under TCG it is started as the pod's own unprivileged
//! uid (no capabilities, `no_new_privs`) and never is root at all; under
//! KVM it must open /dev/kvm first and drops to that uid with `-runas`.
//! Either way `-sandbox` (QEMU's seccomp filter) denies obsolete calls,
//! set*id, exec and resource changes.

use super::agent::AgentClient;
use super::hypervisor::{HypervisorError, Vm, VmProcess};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Accel {
    Kvm,
    Tcg,
}

#[derive(Debug, Clone)]
pub struct QemuConfig {
    /// A bzImage (kernel B: its drivers built in; kernel A: with its
    /// modules in the initrd).
    pub kernel: PathBuf,
    /// The initramfs, with husk-agent as /init.
    pub initrd: PathBuf,
    /// Added to the command line husk sets (console, reboot, panic).
    pub cmdline: String,
    pub mem_mib: u32,
    pub vcpus: u32,
    pub accel: Accel,
    /// Describe the devices with ACPI tables (kernel A: Debian builds its
    /// virtio_mmio without command-line devices) instead of on the kernel
    /// command line and an MP table (kernel B, which has no ACPI).
    pub acpi: bool,
    /// Block devices, in order (vda, vdb, …), and whether read-only.
    pub disks: Vec<(PathBuf, bool)>,
    /// virtio-fs shares served by virtiofsd (see [`super::share`]).
    pub shares: Vec<super::share::Share>,
    /// Appended to QEMU's arguments (debugging; tests that provoke what a
    /// real host may do, like a guest RTC far off).
    pub extra_args: Vec<String>,
    /// The unprivileged uid and gid QEMU runs as (see [`super::identity`]);
    /// `None` leaves it root (still under `-sandbox`).
    pub run_as: Option<(u32, u32)>,
}

/// The host's TSC frequency in kHz (from /proc/cpuinfo). Under TCG the
/// guest's TSC is the host's; on a loaded host the guest kernel's timed
/// calibration against the PIT fails, and a kernel with no other clock
/// (microvm has no HPET or PM timer) then stalls early in boot. Telling it
/// the frequency (`tsc_early_khz=`) skips the calibration.
pub fn host_tsc_khz() -> Option<u64> {
    let info = std::fs::read_to_string("/proc/cpuinfo").ok()?;
    let mhz: f64 = info
        .lines()
        .find(|l| l.starts_with("cpu MHz"))?
        .split(':')
        .nth(1)?
        .trim()
        .parse()
        .ok()?;
    Some((mhz * 1000.0).round() as u64)
}

/// The child gets SIGKILL when the thread that spawned it ends: a monitor
/// killed with -9 takes its hypervisor and virtiofsd with it, instead of
/// leaving them running with no owner. VM pods are created on the
/// monitor's main thread, which lives as long as the monitor.
pub(crate) fn die_with_parent(cmd: &mut Command) {
    use std::os::unix::process::CommandExt;
    // SAFETY: prctl is async-signal-safe and takes plain integers.
    unsafe {
        cmd.pre_exec(|| {
            if libc::prctl(
                libc::PR_SET_PDEATHSIG,
                libc::SIGKILL as libc::c_ulong,
                0,
                0,
                0,
            ) != 0
            {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

pub struct QemuVm {
    process: VmProcess,
}

/// Descriptors a child inherits at fixed numbers (3, 4, …), in the order
/// they were added; the parent's copies close when this is dropped.
#[derive(Default)]
pub(crate) struct Handed {
    fds: Vec<std::os::fd::OwnedFd>,
}

impl Handed {
    /// Adds a descriptor; returns the number the child will see it as.
    pub(crate) fn add(&mut self, fd: std::os::fd::OwnedFd) -> i32 {
        self.fds.push(fd);
        2 + self.fds.len() as i32
    }

    /// Has the child get them: each is first moved above every number it
    /// could collide with, then put in its place without close-on-exec.
    pub(crate) fn pass(&self, cmd: &mut Command) {
        use std::os::fd::AsRawFd;
        use std::os::unix::process::CommandExt;
        let fds: Vec<i32> = self.fds.iter().map(|f| f.as_raw_fd()).collect();
        let above = 3 + fds.len() as i32;
        // SAFETY: fcntl, dup2 and close are async-signal-safe; the
        // descriptors stay open in the parent until the spawn returns, and
        // the closure allocates nothing (the vector is moved in).
        unsafe {
            cmd.pre_exec(move || {
                let mut high = [0i32; 64];
                if fds.len() > high.len() {
                    return Err(std::io::Error::from_raw_os_error(libc::EMFILE));
                }
                for (h, &fd) in high.iter_mut().zip(&fds) {
                    *h = libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, above);
                    if *h < 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                }
                for (i, &h) in high.iter().take(fds.len()).enumerate() {
                    if libc::dup2(h, 3 + i as i32) < 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    libc::close(h);
                }
                Ok(())
            });
        }
    }
}

/// Connects to a virtiofsd's socket. virtiofsd binds it a moment before
/// it listens: a refused connection is tried again, for up to 5 s. (It
/// serves one connection only, so readiness cannot be probed by one.)
fn connect_share(socket: &Path) -> std::io::Result<std::os::unix::net::UnixStream> {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        match std::os::unix::net::UnixStream::connect(socket) {
            Err(e)
                if e.kind() == std::io::ErrorKind::ConnectionRefused
                    && Instant::now() < deadline =>
            {
                std::thread::sleep(Duration::from_millis(2))
            }
            r => return r,
        }
    }
}

/// The child gives up root before it runs: no supplementary groups, the
/// given gid and uid (real, effective and saved), which leaves it no
/// capabilities at exec, and `no_new_privs`.
pub(crate) fn drop_privileges(cmd: &mut Command, uid: u32, gid: u32) {
    use std::os::unix::process::CommandExt;
    // SAFETY: setgroups, setresgid, setresuid and prctl are
    // async-signal-safe and take plain integers.
    unsafe {
        cmd.pre_exec(move || {
            if libc::setgroups(0, std::ptr::null()) != 0
                || libc::setresgid(gid, gid, gid) != 0
                || libc::setresuid(uid, uid, uid) != 0
                || libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0
            {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

const AGENT_SOCKET: &str = "agent.sock";
const CONSOLE: &str = "console.log";

/// The kernel command line husk gives a guest: console, reboot through
/// the i8042 (which QEMU's -no-reboot turns into an exit), no hang on a
/// panic, the TSC frequency under TCG, then the caller's words.
fn cmdline(cfg: &QemuConfig) -> String {
    let mut c = String::from("console=ttyS0 reboot=k panic=-1 quiet");
    if cfg.accel == Accel::Tcg {
        if let Some(khz) = host_tsc_khz() {
            c.push_str(&format!(" tsc_early_khz={khz}"));
        }
    }
    if !cfg.cmdline.is_empty() {
        c.push(' ');
        c.push_str(&cfg.cmdline);
    }
    c
}

impl QemuVm {
    /// Starts the VM; `run_dir` must not exist: the VM creates and owns it.
    pub fn start(cfg: &QemuConfig, run_dir: &Path) -> Result<Self, HypervisorError> {
        Self::start_with_nic(cfg, run_dir, None)
    }

    /// Starts the VM with a NIC on the pod network's tap (see [`super::nic`]);
    /// QEMU gets the tap as an inherited descriptor.
    pub fn start_with_nic(
        cfg: &QemuConfig,
        run_dir: &Path,
        nic: Option<&super::nic::VmNic>,
    ) -> Result<Self, HypervisorError> {
        for (d, _) in &cfg.disks {
            if !d.exists() {
                return Err(HypervisorError::Missing {
                    what: "disk",
                    path: d.clone(),
                });
            }
        }
        let mut process = VmProcess::prepare(&cfg.kernel, &cfg.initrd, run_dir)?;
        let console =
            std::fs::File::create(run_dir.join(CONSOLE)).map_err(|e| process.dir_err(e))?;
        let mut cmd = Command::new("qemu-system-x86_64");
        // Descriptors QEMU inherits, at fixed numbers from 3 on; the open
        // files stay alive here until the spawn returns.
        let mut handed = Handed::default();
        let opened = |p: &Path, write: bool| {
            std::fs::OpenOptions::new()
                .read(true)
                .write(write)
                .open(p)
                .map_err(|source| HypervisorError::Open {
                    path: p.to_owned(),
                    source,
                })
        };
        let machine = if cfg.acpi {
            "microvm"
        } else {
            "microvm,acpi=off"
        };
        let (accel, cpu) = match cfg.accel {
            Accel::Tcg => ("tcg", "max"),
            Accel::Kvm => ("kvm", "host,-arch-capabilities"),
        };
        // Named after its run directory: `ps` tells whose VM it is (QEMU
        // sees no path of husk's otherwise). Commas are doubled for
        // QEMU's option parser.
        let name = format!("husk:{}", run_dir.display()).replace(',', ",,");
        cmd.args(["-name", &name])
            .args(["-M", machine, "-accel", accel, "-cpu", cpu])
            .args([
                "-m",
                &cfg.mem_mib.to_string(),
                "-smp",
                &cfg.vcpus.to_string(),
            ])
            .args([
                "-nodefaults",
                "-no-user-config",
                "-display",
                "none",
                "-no-reboot",
            ])
            .args(["-serial", "stdio", "-device", "i8042"])
            // Virtio 1.x on MMIO: vhost-user (virtiofsd) refuses legacy.
            .args(["-global", "virtio-mmio.force-legacy=false"]);
        let kernel = handed.add(opened(&cfg.kernel, false)?.into());
        let initrd = handed.add(opened(&cfg.initrd, false)?.into());
        cmd.args(["-kernel", &format!("/proc/self/fd/{kernel}")])
            .args(["-initrd", &format!("/proc/self/fd/{initrd}")])
            .arg("-append")
            .arg(cmdline(cfg));
        for (i, (path, ro)) in cfg.disks.iter().enumerate() {
            // QEMU reopens a disk read-only to probe it, then with the
            // mode it needs: the set holds one descriptor of each.
            let set = i + 1;
            let r = handed.add(opened(path, false)?.into());
            cmd.args(["-add-fd", &format!("fd={r},set={set}")]);
            if !*ro {
                let w = handed.add(opened(path, true)?.into());
                cmd.args(["-add-fd", &format!("fd={w},set={set}")]);
            }
            cmd.arg("-drive").arg(format!(
                "id=d{i},file=/dev/fdset/{set},format=raw,if=none,readonly={}",
                if *ro { "on" } else { "off" }
            ));
            cmd.args(["-device", &format!("virtio-blk-device,drive=d{i}")]);
        }
        if !cfg.shares.is_empty() {
            // vhost-user backends map guest memory: it must be shareable.
            cmd.args([
                "-object",
                &format!("memory-backend-memfd,id=mem,size={}M,share=on", cfg.mem_mib),
                "-numa",
                "node,memdev=mem",
            ]);
        }
        for (i, s) in cfg.shares.iter().enumerate() {
            let conn = connect_share(&s.socket).map_err(|source| HypervisorError::Open {
                path: s.socket.clone(),
                source,
            })?;
            let fd = handed.add(conn.into());
            cmd.arg("-chardev")
                .arg(format!("socket,id=fs{i},fd={fd}"))
                .args([
                    "-device",
                    &format!("vhost-user-fs-device,chardev=fs{i},tag={}", s.tag),
                ]);
        }
        let agent = std::os::unix::net::UnixListener::bind(run_dir.join(AGENT_SOCKET))
            .map_err(|e| process.dir_err(e))?;
        let agent = handed.add(agent.into());
        cmd.args([
            "-device",
            "virtio-rng-device",
            "-device",
            "virtio-serial-device",
        ])
        .arg("-chardev")
        .arg(format!("socket,id=agent,fd={agent},server=on,wait=off"))
        .args([
            "-device",
            &format!(
                "virtserialport,chardev=agent,name={}",
                husk_protocol::PORT_NAME
            ),
        ]);
        if let Some(nic) = nic {
            let tap = handed.add(nic.tap.try_clone().map_err(|e| process.dir_err(e))?.into());
            cmd.args(["-netdev", &format!("tap,id=n0,fd={tap}")]).args([
                "-device",
                &format!("virtio-net-device,netdev=n0,mac={}", nic.mac),
            ]);
        }
        let sandbox = "on,obsolete=deny,spawn=deny,resourcecontrol=deny";
        match (cfg.run_as, cfg.accel) {
            (Some((uid, gid)), Accel::Tcg) => {
                cmd.args(["-sandbox", &format!("{sandbox},elevateprivileges=deny")]);
                drop_privileges(&mut cmd, uid, gid);
            }
            // /dev/kvm is root's: QEMU opens it, then drops (its set*id
            // calls must stay allowed for that; with no capabilities
            // left they cannot raise anything).
            (Some((uid, gid)), Accel::Kvm) => {
                cmd.args(["-sandbox", sandbox])
                    .args(["-runas", &format!("{uid}:{gid}")]);
            }
            (None, _) => {
                cmd.args(["-sandbox", &format!("{sandbox},elevateprivileges=deny")]);
            }
        }
        handed.pass(&mut cmd);
        cmd.args(&cfg.extra_args);
        cmd.stdin(Stdio::null())
            .stdout(console.try_clone().map_err(|e| process.dir_err(e))?)
            .stderr(console);
        process.spawn(
            cmd,
            "qemu-system-x86_64".into(),
            "install Debian's qemu-system-x86",
        )?;
        Ok(QemuVm { process })
    }
}

impl Vm for QemuVm {
    fn pid(&self) -> Option<u32> {
        self.process.pid()
    }

    /// Kernel messages, the agent's log, and QEMU's own errors.
    fn console(&self) -> String {
        self.process.read(CONSOLE)
    }

    fn agent(&mut self, timeout: Duration) -> Result<AgentClient, HypervisorError> {
        let deadline = Instant::now() + timeout;
        let path = self.process.dir().join(AGENT_SOCKET);
        let stream = loop {
            match std::os::unix::net::UnixStream::connect(&path) {
                Ok(s) => break s,
                Err(_) if Instant::now() < deadline && self.process.running() => {
                    std::thread::sleep(Duration::from_millis(10))
                }
                Err(e) if self.process.running() => {
                    return Err(husk_protocol::ProtocolError::Io(e).into())
                }
                Err(_) => return Err(HypervisorError::Ended(self.console())),
            }
        };
        AgentClient::connect(stream, deadline).map_err(|e| {
            if self.process.ended_soon() {
                HypervisorError::Ended(self.console())
            } else {
                e.into()
            }
        })
    }

    fn wait(&mut self, timeout: Duration) -> bool {
        self.process.wait(timeout)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tcg_guests_are_told_the_tsc_frequency() {
        let mut cfg = QemuConfig {
            kernel: "k".into(),
            initrd: "i".into(),
            cmdline: "extra=1".into(),
            mem_mib: 256,
            vcpus: 1,
            accel: Accel::Tcg,
            acpi: false,
            disks: vec![],
            shares: vec![],
            extra_args: vec![],
            run_as: None,
        };
        let khz = host_tsc_khz().expect("cpu MHz in /proc/cpuinfo");
        assert!(khz > 100_000, "{khz}");
        assert_eq!(
            cmdline(&cfg),
            format!("console=ttyS0 reboot=k panic=-1 quiet tsc_early_khz={khz} extra=1")
        );
        cfg.accel = Accel::Kvm;
        cfg.cmdline.clear();
        assert_eq!(cmdline(&cfg), "console=ttyS0 reboot=k panic=-1 quiet");
    }
}
