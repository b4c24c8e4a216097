//! husk-vmm: a KVM microVM monitor built on the rust-vmm crates.
//!
//! This first cut boots an ELF kernel through its PVH entry or a bzImage
//! through the 32-bit Linux boot protocol (see [`boot`]), with an
//! initramfs and a command line, with
//! guest memory from vm-memory, CPUID from KVM_GET_SUPPORTED_CPUID
//! (filtered), the in-kernel irqchip (PIT optional), an 8250 serial console on
//! COM1 from vm-superio (to a file or stdout, interrupts through an
//! irqfd), and the i8042 reset line. One thread per vCPU. virtio-mmio
//! devices: rng, blk, net, vsock ([`vsock`]) and fs ([`fs`]).
//!
//! How a run ends is a [`VmExit`] the caller can tell apart: the guest reset
//! the machine (the test guests' normal end), it triple-faulted, KVM could
//! not emulate an instruction, or the VMM failed.

use kvm_bindings::{kvm_pit_config, kvm_regs, kvm_segment, kvm_userspace_memory_region};
use kvm_ioctls::{IoEventAddress, Kvm, VcpuExit, VcpuFd};
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use vm_memory::{Address, GuestAddress, GuestMemory, GuestMemoryMmap, GuestMemoryRegion};
use vmm_sys_util::eventfd::EventFd;

pub mod boot;
pub mod fs;
pub mod i8042;
pub mod jail;
pub mod mptable;
pub mod seccomp;
pub mod tap;
pub mod virtio;
pub mod vsock;

use boot::CMDLINE_MAX;
use i8042::I8042;

const COM1: u16 = 0x3f8;
const COM1_IRQ: u32 = 4;

#[derive(Debug, Clone, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmConfig {
    pub kernel: PathBuf,
    /// initramfs (cpio, plain or compressed).
    #[serde(default)]
    pub initrd: Option<PathBuf>,
    #[serde(default)]
    pub cmdline: String,
    #[serde(default = "default_mem")]
    pub mem_mib: u64,
    #[serde(default = "default_vcpus")]
    pub vcpus: u8,
    /// Serial console: a file path; stdout when absent.
    #[serde(default)]
    pub serial: Option<PathBuf>,
    /// Emulate the i8254 PIT in the kernel. Off by default: a kernel with
    /// kvm-clock and the LAPIC timer does not need it, and its kernel
    /// thread costs ~5 ms per VM to create and tear down.
    #[serde(default)]
    pub pit: bool,
    /// A virtio-rng device, so a guest never starves for entropy.
    #[serde(default = "default_true")]
    pub rng: bool,
    /// virtio-blk disks backed by files.
    #[serde(default)]
    pub disks: Vec<DiskConfig>,
    /// virtio-net backed by a tap.
    #[serde(default)]
    pub net: Option<NetConfig>,
    /// virtio-vsock with the hybrid unix-socket backend.
    #[serde(default)]
    pub vsock: Option<VsockConfig>,
    /// virtio-fs shares of host directories.
    #[serde(default)]
    pub fs: Vec<FsConfig>,
    /// After a stop request (ctrl-alt-del sent to the guest), how long the
    /// guest has to reset or power off before its vCPUs are stopped.
    #[serde(default = "default_stop_timeout")]
    pub stop_timeout_ms: u64,
    /// The uid and gid the jailed process runs as (see [`jail`]); absent:
    /// [`jail::default_ids`].
    #[serde(default)]
    pub jail: Option<jail::JailConfig>,
}

fn default_stop_timeout() -> u64 {
    5000
}

#[derive(Debug, Clone, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VsockConfig {
    /// The guest's CID (3 or more).
    pub cid: u64,
    /// Unix socket for host-initiated connections; guest connections to
    /// port P go to `<uds>_<P>`.
    pub uds: PathBuf,
}

#[derive(Debug, Clone, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NetConfig {
    /// Tap device name (created if missing, removed with the VM if so).
    #[serde(default)]
    pub tap: String,
    /// Or an open tap inherited from the parent (made with IFF_VNET_HDR),
    /// instead of `tap`: the caller keeps owning the device.
    #[serde(default)]
    pub fd: Option<i32>,
    /// Network namespace (a path like /run/netns/NAME) to find it in.
    #[serde(default)]
    pub netns: Option<PathBuf>,
    /// Guest MAC, `aa:bb:cc:dd:ee:ff` (default 02:00:00:00:00:01).
    #[serde(default)]
    pub mac: Option<String>,
}

#[derive(Debug, Clone, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FsConfig {
    /// The name the guest mounts it by (`mount -t virtiofs TAG DIR`).
    pub tag: String,
    /// The host directory.
    pub path: PathBuf,
    #[serde(default)]
    pub read_only: bool,
    /// Pass extended attributes through (off by default).
    #[serde(default)]
    pub xattr: bool,
}

#[derive(Debug, Clone, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DiskConfig {
    pub path: PathBuf,
    #[serde(default)]
    pub read_only: bool,
}

fn default_true() -> bool {
    true
}

fn default_mem() -> u64 {
    128
}

fn default_vcpus() -> u8 {
    1
}

#[derive(Debug, thiserror::Error)]
pub enum VmError {
    #[error("invalid configuration: {0}")]
    Config(String),
    #[error("{what}: {source}")]
    Kvm {
        what: &'static str,
        source: kvm_ioctls::Error,
    },
    #[error("kernel {path}: {msg}")]
    Kernel { path: PathBuf, msg: String },
    #[error("{0}")]
    Other(String),
}

impl VmError {
    /// Exit status of the `husk-vmm` process for this error.
    pub fn status(&self) -> i32 {
        match self {
            VmError::Config(_) | VmError::Kernel { .. } => 2,
            _ => 1,
        }
    }
}

fn kvm_err(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> VmError {
    move |source| VmError::Kvm { what, source }
}

/// How a VM ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VmExit {
    /// The guest reset the machine through the i8042 (or asked KVM to).
    Reset,
    /// The guest powered off (a KVM system event).
    Poweroff,
    /// A triple fault: KVM_EXIT_SHUTDOWN.
    TripleFault,
    /// KVM could not run or emulate the guest.
    EmulationFailure(String),
    /// The guest did not stop within the stop timeout and was stopped.
    Killed,
}

impl VmExit {
    /// Exit status of the `husk-vmm` process: 0 reset or poweroff, 3 triple
    /// fault, 4 emulation failure, 5 stopped after the stop timeout (1 VMM
    /// error and 2 bad configuration come from [`VmError`]).
    pub fn status(&self) -> i32 {
        match self {
            VmExit::Reset | VmExit::Poweroff => 0,
            VmExit::TripleFault => 3,
            VmExit::EmulationFailure(_) => 4,
            VmExit::Killed => 5,
        }
    }

    pub fn reason(&self) -> String {
        match self {
            VmExit::Reset => "reset".into(),
            VmExit::Poweroff => "poweroff".into(),
            VmExit::TripleFault => "triple-fault".into(),
            VmExit::EmulationFailure(m) => format!("emulation-failure: {m}"),
            VmExit::Killed => "killed".into(),
        }
    }
}

impl VmConfig {
    pub fn validate(&self) -> Result<(), VmError> {
        if self.mem_mib < 16 {
            return Err(VmError::Config(format!(
                "mem_mib {} is too small (at least 16)",
                self.mem_mib
            )));
        }
        if self.mem_mib > 64 * 1024 {
            return Err(VmError::Config(format!(
                "mem_mib {} is more than 64 GiB",
                self.mem_mib
            )));
        }
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        if self.vcpus == 0 || usize::from(self.vcpus) > cores {
            return Err(VmError::Config(format!(
                "vcpus {} must be between 1 and this host's {cores} cores",
                self.vcpus
            )));
        }
        if !self.kernel.is_file() {
            return Err(VmError::Kernel {
                path: self.kernel.clone(),
                msg: "no such file".into(),
            });
        }
        if let Some(n) = &self.net {
            if let Some(m) = &n.mac {
                if tap::parse_mac(m).is_none() {
                    return Err(VmError::Config(format!(
                        "net mac {m:?}: use aa:bb:cc:dd:ee:ff"
                    )));
                }
            }
            if let Some(fd) = n.fd {
                if !n.tap.is_empty() || n.netns.is_some() {
                    return Err(VmError::Config(
                        "net: give either tap (and netns) or fd, not both".into(),
                    ));
                }
                if fd < 3 {
                    return Err(VmError::Config(format!(
                        "net fd {fd}: use an inherited descriptor above 2"
                    )));
                }
            } else if n.tap.is_empty() || n.tap.len() > 15 {
                return Err(VmError::Config(format!(
                    "net tap {:?} must be 1 to 15 bytes",
                    n.tap
                )));
            }
        }
        if let Some(v) = &self.vsock {
            if v.cid < 3 || v.cid > u64::from(u32::MAX) {
                return Err(VmError::Config(format!(
                    "vsock cid {} must be between 3 and 2^32-1",
                    v.cid
                )));
            }
            if v.uds.exists() {
                return Err(VmError::Config(format!(
                    "vsock uds {} exists; remove it or choose another path",
                    v.uds.display()
                )));
            }
        }
        if self.disks.len()
            + usize::from(self.rng)
            + usize::from(self.net.is_some())
            + usize::from(self.vsock.is_some())
            + self.fs.len()
            > 8
        {
            return Err(VmError::Config("at most 8 virtio devices".into()));
        }
        for (i, f) in self.fs.iter().enumerate() {
            if f.tag.is_empty() || f.tag.len() > fs::TAG_MAX {
                return Err(VmError::Config(format!(
                    "fs tag {:?} must be 1 to {} bytes",
                    f.tag,
                    fs::TAG_MAX
                )));
            }
            if self.fs[..i].iter().any(|o| o.tag == f.tag) {
                return Err(VmError::Config(format!(
                    "fs tag {:?} is given twice; each share needs its own tag",
                    f.tag
                )));
            }
            if !f.path.is_dir() {
                return Err(VmError::Config(format!(
                    "fs {}: no such directory",
                    f.path.display()
                )));
            }
        }
        for d in &self.disks {
            if !d.path.is_file() {
                return Err(VmError::Config(format!(
                    "disk {}: no such file",
                    d.path.display()
                )));
            }
        }
        if let Some(j) = &self.jail {
            if j.uid == 0 || j.gid == 0 || j.uid == u32::MAX || j.gid == u32::MAX {
                return Err(VmError::Config(format!(
                    "jail uid {} gid {}: use an unprivileged uid and gid (not 0 or -1)",
                    j.uid, j.gid
                )));
            }
        }
        if self.cmdline.len() >= CMDLINE_MAX {
            return Err(VmError::Config(format!(
                "cmdline is {} bytes, the limit is {}",
                self.cmdline.len(),
                CMDLINE_MAX - 1
            )));
        }
        Ok(())
    }
}

/// Interrupts a vCPU thread's KVM_RUN.
const KICK_SIGNAL: i32 = libc::SIGUSR2;

/// Raises the serial interrupt through an irqfd.
struct IrqLine(EventFd);

impl vm_superio::Trigger for IrqLine {
    type E = std::io::Error;

    fn trigger(&self) -> std::io::Result<()> {
        self.0.write(1)
    }
}

type Serial = vm_superio::Serial<IrqLine, vm_superio::serial::NoEvents, Box<dyn Write + Send>>;

/// CPUID from KVM, filtered: the APIC id of the vCPU in leaf 1 and leaf
/// 0xb, and no arch-capabilities (MSR 0x10a cannot be set on these hosts).
fn cpuid_for(supported: &kvm_bindings::CpuId, id: u8) -> kvm_bindings::CpuId {
    let mut cpuid = supported.clone();
    for e in cpuid.as_mut_slice() {
        match e.function {
            1 => {
                e.ebx = (e.ebx & 0x00ff_ffff) | (u32::from(id) << 24);
            }
            7 if e.index == 0 => {
                e.edx &= !(1 << 29);
            }
            0xb => {
                e.edx = u32::from(id);
            }
            _ => {}
        }
    }
    cpuid
}

fn flat_segment(selector: u16, code: bool) -> kvm_segment {
    kvm_segment {
        base: 0,
        limit: 0xffff_ffff,
        selector,
        type_: if code { 0xb } else { 0x3 },
        present: 1,
        dpl: 0,
        db: 1,
        s: 1,
        l: 0,
        g: 1,
        avl: 0,
        unusable: 0,
        padding: 0,
    }
}

/// Entry state of both boot paths: 32-bit protected mode, paging off, the
/// boot GDT loaded, flat `__BOOT_CS`/`__BOOT_DS`; `rbx` (PVH start info) or
/// `rsi` (zero page) as the entry wants.
fn setup_vcpu(vcpu: &VcpuFd, entry: boot::Entry) -> Result<(), VmError> {
    let mut sregs = vcpu.get_sregs().map_err(kvm_err("KVM_GET_SREGS"))?;
    sregs.gdt.base = boot::GDT;
    sregs.gdt.limit = (8 * boot::GDT_ENTRIES.len() - 1) as u16;
    sregs.cs = flat_segment(0x10, true);
    let data = flat_segment(0x18, false);
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.cr0 = 0x11; // PE | ET
    sregs.cr4 = 0;
    sregs.efer = 0;
    vcpu.set_sregs(&sregs).map_err(kvm_err("KVM_SET_SREGS"))?;
    let regs = kvm_regs {
        rip: entry.rip,
        rbx: entry.rbx,
        rsi: entry.rsi,
        rflags: 0x2,
        ..Default::default()
    };
    vcpu.set_regs(&regs).map_err(kvm_err("KVM_SET_REGS"))
}

/// Creates the VM, boots the kernel and runs it until it ends.
/// `on_running` is called once the vCPUs are about to enter the guest.
/// When `stop_requested` becomes true (a signal handler sets it), the guest
/// is sent ctrl-alt-del; if it has not ended `stop_timeout_ms` later, its
/// vCPUs are stopped and the run ends as [`VmExit::Killed`].
pub fn run(
    cfg: &VmConfig,
    on_running: impl FnOnce(),
    stop_requested: &AtomicBool,
) -> Result<VmExit, VmError> {
    // An inherited tap is taken before this process opens anything (the
    // kernel file, /dev/kvm), so its number cannot name one of our files.
    // (With a tap name as well, validate() below says which to give.)
    let mut inherited = match cfg
        .net
        .as_ref()
        .filter(|n| n.tap.is_empty() && n.netns.is_none())
        .and_then(|n| n.fd)
    {
        Some(fd) if fd > 2 => {
            Some(tap::inherit(fd).map_err(|e| VmError::Config(format!("net fd {fd}: {e}")))?)
        }
        _ => None,
    };
    cfg.validate()?;
    let kvm = Kvm::new().map_err(kvm_err("open /dev/kvm"))?;
    let vm = kvm.create_vm().map_err(kvm_err("KVM_CREATE_VM"))?;
    let mem = GuestMemoryMmap::<()>::from_ranges(
        &boot::ram_regions(cfg.mem_mib)
            .into_iter()
            .map(|(start, size)| (GuestAddress(start), size as usize))
            .collect::<Vec<_>>(),
    )
    .map_err(|e| VmError::Other(format!("guest memory: {e}")))?;
    for (slot, region) in mem.iter().enumerate() {
        let host = mem
            .get_host_address(region.start_addr())
            .map_err(|e| VmError::Other(format!("guest memory: {e}")))?;
        let r = kvm_userspace_memory_region {
            slot: slot as u32,
            flags: 0,
            guest_phys_addr: region.start_addr().raw_value(),
            memory_size: region.len(),
            userspace_addr: host as u64,
        };
        // SAFETY: the region is mapped for the lifetime of `mem`, which
        // outlives the VM (both end with this function).
        unsafe { vm.set_user_memory_region(r) }.map_err(kvm_err("KVM_SET_USER_MEMORY_REGION"))?;
    }
    vm.set_tss_address(0xfffb_d000)
        .map_err(kvm_err("KVM_SET_TSS_ADDR"))?;
    vm.create_irq_chip()
        .map_err(kvm_err("KVM_CREATE_IRQCHIP"))?;
    if cfg.pit {
        vm.create_pit2(kvm_pit_config::default())
            .map_err(kvm_err("KVM_CREATE_PIT2"))?;
    }
    // Devices on virtio-mmio, announced on the command line.
    let mut bus = virtio::Bus::default();
    let mut cmdline = cfg.cmdline.clone();
    let mut devices: Vec<Box<dyn virtio::Device>> = Vec::new();
    if cfg.rng {
        devices.push(Box::new(virtio::Rng));
    }
    for d in &cfg.disks {
        let blk = virtio::Block::open(&d.path, d.read_only)
            .map_err(|e| VmError::Config(format!("disk {}: {e}", d.path.display())))?;
        devices.push(Box::new(blk));
    }
    if let Some(n) = &cfg.net {
        let mac = n
            .mac
            .as_deref()
            .and_then(tap::parse_mac)
            .unwrap_or([2, 0, 0, 0, 0, 1]);
        let tap = match inherited.take() {
            Some(tap) => tap,
            None => tap::open(&n.tap, n.netns.as_deref()).map_err(|e| {
                VmError::Config(format!(
                    "net tap {}{}: {e}",
                    n.tap,
                    n.netns
                        .as_ref()
                        .map(|p| format!(" in {}", p.display()))
                        .unwrap_or_default()
                ))
            })?,
        };
        devices.push(Box::new(virtio::Net::new(tap, mac)));
    }
    // What the jail shows of the host: the vsock socket's directory and
    // the shares, as detached trees attached inside it.
    let jailing = jail::can_jail();
    let mut vsock_tree = None;
    if let Some(v) = &cfg.vsock {
        let err =
            |e: std::io::Error| VmError::Config(format!("vsock uds {}: {e}", v.uds.display()));
        let dev = if jailing {
            let dir = v
                .uds
                .parent()
                .filter(|p| !p.as_os_str().is_empty())
                .unwrap_or(std::path::Path::new("."));
            let name = v
                .uds
                .file_name()
                .ok_or_else(|| err(std::io::Error::other("no file name")))?;
            vsock_tree = Some(fs::detached_tree(dir, false).map_err(err)?);
            vsock::Vsock::reached_at(
                v.cid,
                v.uds.clone(),
                std::path::Path::new(jail::VSOCK_DIR).join(name),
            )
        } else {
            vsock::Vsock::new(v.cid, v.uds.clone())
        }
        .map_err(err)?;
        devices.push(Box::new(dev));
    }
    // After the vsock socket is bound: a share clears this process's umask
    // (see fs.rs). No vCPU or device thread runs yet, so none keeps
    // CAP_MKNOD.
    if !cfg.fs.is_empty() {
        fs::give_up_device_nodes()
            .map_err(|e| VmError::Other(format!("dropping CAP_MKNOD: {e}")))?;
    }
    for f in &cfg.fs {
        let dev = fs::Fs::new(&f.tag, &f.path, f.read_only, f.xattr)
            .map_err(|e| VmError::Config(format!("fs {}: {e}", f.path.display())))?;
        devices.push(Box::new(dev));
    }
    // The passthrough file system reaches its files through
    // /proc/self/fd by path (its root on FUSE_INIT, xattrs): the jail
    // shows this process's own fd directory there.
    let proc_fd = if jailing && !cfg.fs.is_empty() {
        Some(
            fs::detached_tree(std::path::Path::new("/proc/self/fd"), false)
                .map_err(|e| VmError::Other(format!("/proc/self/fd for the jail: {e}")))?,
        )
    } else {
        None
    };
    let mut notify: Vec<(EventFd, usize, usize)> = Vec::new();
    for (i, device) in devices.into_iter().enumerate() {
        let base = virtio::MMIO_BASE + i as u64 * virtio::MMIO_SIZE;
        let gsi = virtio::FIRST_IRQ + i as u32;
        let evt = EventFd::new(libc::EFD_NONBLOCK)
            .map_err(|e| VmError::Other(format!("eventfd: {e}")))?;
        vm.register_irqfd(&evt, gsi).map_err(kvm_err("KVM_IRQFD"))?;
        let t = virtio::MmioTransport::new(device, mem.clone(), evt);
        // QueueNotify writes go to eventfds the device thread waits on.
        for q in 0..t.queue_count() {
            let n = EventFd::new(libc::EFD_NONBLOCK)
                .map_err(|e| VmError::Other(format!("eventfd: {e}")))?;
            vm.register_ioevent(&n, &IoEventAddress::Mmio(base + 0x50), q as u32)
                .map_err(kvm_err("KVM_IOEVENTFD"))?;
            notify.push((n, i, q));
        }
        bus.add(base, t);
        cmdline = format!("{cmdline} virtio_mmio.device=4K@{base:#x}:{gsi}")
            .trim()
            .to_owned();
    }
    if cmdline.len() >= CMDLINE_MAX {
        return Err(VmError::Config(format!(
            "cmdline with the device announcements is {} bytes, the limit is {}",
            cmdline.len(),
            CMDLINE_MAX - 1
        )));
    }
    let boot_cfg = VmConfig {
        cmdline,
        ..cfg.clone()
    };
    let entry = boot::load(&boot_cfg, &mem)?;
    mptable::write(&mem, cfg.vcpus).map_err(|e| VmError::Other(format!("MP table: {e}")))?;

    let irq =
        EventFd::new(libc::EFD_NONBLOCK).map_err(|e| VmError::Other(format!("eventfd: {e}")))?;
    vm.register_irqfd(&irq, COM1_IRQ)
        .map_err(kvm_err("KVM_IRQFD"))?;
    let out: Box<dyn Write + Send> = match &cfg.serial {
        Some(p) => Box::new(
            std::fs::OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                // Explicit: a virtio-fs share has cleared the umask.
                .mode(0o640)
                .open(p)
                .map_err(|e| VmError::Config(format!("serial {}: {e}", p.display())))?,
        ),
        None => Box::new(std::io::stdout()),
    };
    let serial: Arc<Mutex<Serial>> =
        Arc::new(Mutex::new(vm_superio::Serial::new(IrqLine(irq), out)));

    let kbd_irq =
        EventFd::new(libc::EFD_NONBLOCK).map_err(|e| VmError::Other(format!("eventfd: {e}")))?;
    vm.register_irqfd(&kbd_irq, i8042::KBD_IRQ)
        .map_err(kvm_err("KVM_IRQFD"))?;
    let i8042 = Mutex::new(I8042::new(kbd_irq));
    // SAFETY: the handler does nothing; it only makes KVM_RUN return EINTR.
    unsafe { signal_hook::low_level::register(KICK_SIGNAL, || {}) }
        .map_err(|e| VmError::Other(format!("signal handler: {e}")))?;
    let killed = AtomicBool::new(false);
    let threads: Mutex<Vec<libc::pthread_t>> = Mutex::new(Vec::new());

    // Asked once; each vCPU gets a copy with its own APIC id.
    let supported_cpuid = kvm
        .get_supported_cpuid(kvm_bindings::KVM_MAX_CPUID_ENTRIES)
        .map_err(kvm_err("KVM_GET_SUPPORTED_CPUID"))?;
    let mut vcpus = Vec::new();
    for id in 0..cfg.vcpus {
        let vcpu = vm
            .create_vcpu(u64::from(id))
            .map_err(kvm_err("KVM_CREATE_VCPU"))?;
        vcpu.set_cpuid2(&cpuid_for(&supported_cpuid, id))
            .map_err(kvm_err("KVM_SET_CPUID2"))?;
        if id == 0 {
            setup_vcpu(&vcpu, entry)?;
        }
        vcpus.push(vcpu);
    }
    // Everything the VM needs from the host by path is open: the jail.
    if jailing {
        use std::os::fd::AsFd;
        jail::enter(&jail::Jail {
            ids: cfg.jail.unwrap_or_else(jail::default_ids),
            vsock_dir: vsock_tree.as_ref().map(|t| t.as_fd()),
            proc_fd: proc_fd.as_ref().map(|t| t.as_fd()),
            shares: !cfg.fs.is_empty(),
        })
        .map_err(|e| VmError::Other(e.to_string()))?;
    } else {
        jail::no_new_privs().map_err(|e| VmError::Other(e.to_string()))?;
    }
    drop(proc_fd);
    drop(vsock_tree);
    on_running();
    let stop = Arc::new(AtomicBool::new(false));
    let stop_evt =
        EventFd::new(libc::EFD_NONBLOCK).map_err(|e| VmError::Other(format!("eventfd: {e}")))?;
    // The first vCPU to end decides how the VM ended; the others are kicked
    // out of KVM_RUN.
    let decider: Mutex<Option<Result<VmExit, VmError>>> = Mutex::new(None);
    let running = std::sync::atomic::AtomicUsize::new(vcpus.len());
    // vCPU threads say here when they end, so the watcher wakes at once.
    let (ended_tx, ended_rx) = std::sync::mpsc::channel::<()>();
    // Read now: the test-only hook that shows a call outside the filter
    // ends the process (HUSK_VMM_TEST_FORBIDDEN_SYSCALL=1).
    let try_forbidden = std::env::var_os("HUSK_VMM_TEST_FORBIDDEN_SYSCALL").is_some();
    let spawn_err = |e: std::io::Error| VmError::Other(format!("starting a thread: {e}"));
    let result = std::thread::scope(|s| {
        // Each thread installs its own seccomp filter before its work; the
        // main thread installs its one after the others have started (a
        // thread inherits the filters of the thread that makes it).
        let events = std::thread::Builder::new()
            .name("devices".into())
            .spawn_scoped(s, || {
                seccomp::install(seccomp::ThreadKind::Device, KICK_SIGNAL)
                    .map_err(|e| VmError::Other(e.to_string()))?;
                device_loop(&bus, &notify, &stop_evt)
            })
            .map_err(spawn_err)?;
        let handles: Vec<_> = vcpus
            .into_iter()
            .enumerate()
            .map(|(id, mut vcpu)| {
                let serial = serial.clone();
                let stop = stop.clone();
                let ended_tx = ended_tx.clone();
                let (bus, stop_evt, i8042, killed, threads, decider, running) = (
                    &bus, &stop_evt, &i8042, &killed, &threads, &decider, &running,
                );
                std::thread::Builder::new()
                    .name(format!("vcpu{id}"))
                    .spawn_scoped(s, move || {
                        if let Ok(mut t) = threads.lock() {
                            // SAFETY: pthread_self has no preconditions.
                            t.push(unsafe { libc::pthread_self() });
                        }
                        let r = seccomp::install(seccomp::ThreadKind::Vcpu, KICK_SIGNAL)
                            .map_err(|e| VmError::Other(e.to_string()))
                            .and_then(|()| {
                                vcpu_loop(&mut vcpu, &serial, bus, i8042, killed, &stop)
                            });
                        if !stop.swap(true, Ordering::SeqCst) {
                            if let Ok(mut d) = decider.lock() {
                                *d = Some(r);
                            }
                        }
                        let _ = stop_evt.write(1);
                        running.fetch_sub(1, Ordering::SeqCst);
                        let _ = ended_tx.send(());
                    })
            })
            .collect::<Result<_, _>>()
            .map_err(spawn_err)?;
        let watcher = {
            let (stop, i8042, killed, threads, running) =
                (&stop, &i8042, &killed, &threads, &running);
            let timeout = std::time::Duration::from_millis(cfg.stop_timeout_ms);
            std::thread::Builder::new()
                .name("watcher".into())
                .spawn_scoped(s, move || {
                    // Without its filter the watcher only waits: the VM goes on.
                    let _ = seccomp::install(seccomp::ThreadKind::Main, KICK_SIGNAL);
                    let tick = std::time::Duration::from_millis(10);
                    let mut asked: Option<std::time::Instant> = None;
                    while running.load(Ordering::SeqCst) > 0 {
                        if !stop.load(Ordering::SeqCst) {
                            match asked {
                                None if stop_requested.load(Ordering::SeqCst) => {
                                    if let Ok(mut k) = i8042.lock() {
                                        k.ctrl_alt_del();
                                    }
                                    asked = Some(std::time::Instant::now());
                                }
                                Some(t) if t.elapsed() >= timeout => {
                                    killed.store(true, Ordering::SeqCst);
                                }
                                _ => {}
                            }
                        }
                        if stop.load(Ordering::SeqCst) || killed.load(Ordering::SeqCst) {
                            for &t in threads.lock().map(|t| t.clone()).unwrap_or_default().iter() {
                                // SAFETY: the thread is a vCPU thread of this
                                // scope, joined only after `running` drops to 0,
                                // so it is alive; the handler is a no-op.
                                unsafe { libc::pthread_kill(t, KICK_SIGNAL) };
                            }
                        }
                        let _ = ended_rx.recv_timeout(tick);
                    }
                })
                .map_err(spawn_err)?
        };
        let filtered = seccomp::install(seccomp::ThreadKind::Main, KICK_SIGNAL)
            .map_err(|e| VmError::Other(e.to_string()));
        if try_forbidden && filtered.is_ok() {
            // SAFETY: execve of a path that does not matter, with no
            // arguments; the filter kills the process before it runs.
            unsafe {
                libc::syscall(
                    libc::SYS_execve,
                    c"/".as_ptr(),
                    std::ptr::null::<*const libc::c_char>(),
                    std::ptr::null::<*const libc::c_char>(),
                )
            };
        }
        for h in handles {
            let _ = h.join();
        }
        let first = decider.lock().ok().and_then(|mut d| d.take()).map(|r| {
            if killed.load(Ordering::SeqCst) {
                Ok(VmExit::Killed)
            } else {
                r
            }
        });
        let _ = stop_evt.write(1);
        let _ = watcher.join();
        let first = first.unwrap_or_else(|| Err(VmError::Other("no vCPU".into())));
        let first = filtered.and(first);
        match events.join() {
            Ok(Ok(())) => first,
            Ok(Err(e)) => first.and(Err(e)),
            Err(_) => first.and(Err(VmError::Other("device thread panicked".into()))),
        }
    });
    // The irqfds and ioeventfds go with the VM fd.
    drop(bus);
    drop(vm);
    drop(mem);
    result
}

/// The device thread: waits on every queue's notify eventfd and every
/// backend fd (edge-triggered: a device drains its backend when it runs),
/// until `stop` fires.
fn device_loop(
    bus: &virtio::Bus,
    notify: &[(EventFd, usize, usize)],
    stop: &EventFd,
) -> Result<(), VmError> {
    use std::os::fd::AsRawFd;
    use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
    let ep = |e: std::io::Error| VmError::Other(format!("epoll: {e}"));
    let epoll = Epoll::new().map_err(ep)?;
    const STOP: u64 = u64::MAX;
    const BACKEND: u64 = 1 << 32;
    epoll
        .ctl(
            ControlOperation::Add,
            stop.as_raw_fd(),
            EpollEvent::new(EventSet::IN, STOP),
        )
        .map_err(ep)?;
    for (k, (evt, _, _)) in notify.iter().enumerate() {
        epoll
            .ctl(
                ControlOperation::Add,
                evt.as_raw_fd(),
                EpollEvent::new(EventSet::IN, k as u64),
            )
            .map_err(ep)?;
    }
    let devices: Vec<_> = bus.devices().map(|(_, t)| t).collect();
    for (i, t) in devices.iter().enumerate() {
        let fd = t.lock().ok().and_then(|t| t.backend_fd());
        if let Some(fd) = fd {
            epoll
                .ctl(
                    ControlOperation::Add,
                    fd,
                    EpollEvent::new(EventSet::IN | EventSet::EDGE_TRIGGERED, BACKEND | i as u64),
                )
                .map_err(ep)?;
        }
    }
    let mut events = vec![EpollEvent::default(); 32];
    loop {
        let n = match epoll.wait(-1, &mut events) {
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(ep(e)),
        };
        for ev in &events[..n] {
            match ev.data() {
                STOP => return Ok(()),
                d if d & BACKEND != 0 => {
                    if let Some(Ok(mut t)) = devices.get((d & !BACKEND) as usize).map(|t| t.lock())
                    {
                        t.backend_event();
                    }
                }
                k => {
                    if let Some((evt, dev, q)) = notify.get(k as usize) {
                        let _ = evt.read();
                        if let Some(Ok(mut t)) = devices.get(*dev).map(|t| t.lock()) {
                            t.notify(*q);
                        }
                    }
                }
            }
        }
    }
}

fn vcpu_loop(
    vcpu: &mut VcpuFd,
    serial: &Mutex<Serial>,
    bus: &virtio::Bus,
    i8042: &Mutex<I8042>,
    killed: &AtomicBool,
    ended: &AtomicBool,
) -> Result<VmExit, VmError> {
    loop {
        if killed.load(Ordering::SeqCst) {
            return Ok(VmExit::Killed);
        }
        if ended.load(Ordering::SeqCst) {
            // Another vCPU ended the VM; this one's result does not count.
            return Ok(VmExit::Poweroff);
        }
        match vcpu.run() {
            Ok(VcpuExit::IoOut(port, data)) => {
                if (COM1..COM1 + 8).contains(&port) {
                    if let (Ok(mut s), Some(b)) = (serial.lock(), data.first()) {
                        let _ = s.write((port - COM1) as u8, *b);
                    }
                } else if port == i8042::CMD_PORT || port == i8042::DATA_PORT {
                    let action = match (i8042.lock(), data.first()) {
                        (Ok(mut k), Some(&b)) if port == i8042::CMD_PORT => k.write_cmd(b),
                        (Ok(mut k), Some(&b)) => k.write_data(b),
                        _ => i8042::Action::None,
                    };
                    if action == i8042::Action::Reset {
                        return Ok(VmExit::Reset);
                    }
                }
            }
            Ok(VcpuExit::IoIn(port, data)) => {
                let v = if (COM1..COM1 + 8).contains(&port) {
                    serial.lock().map_or(0, |mut s| s.read((port - COM1) as u8))
                } else if port == i8042::CMD_PORT {
                    i8042.lock().map_or(0, |k| k.status())
                } else if port == i8042::DATA_PORT {
                    i8042.lock().map_or(0, |mut k| k.read_data())
                } else {
                    0xff
                };
                data.iter_mut().for_each(|b| *b = v);
            }
            Ok(VcpuExit::MmioRead(addr, data)) => {
                if !bus.read(addr, data) {
                    data.iter_mut().for_each(|b| *b = 0xff);
                }
            }
            Ok(VcpuExit::MmioWrite(addr, data)) => {
                bus.write(addr, data);
            }
            Ok(VcpuExit::Hlt) => return Ok(VmExit::Poweroff),
            Ok(VcpuExit::Shutdown) => return Ok(VmExit::TripleFault),
            Ok(VcpuExit::SystemEvent(kind, _)) => {
                return Ok(if kind == kvm_bindings::KVM_SYSTEM_EVENT_RESET {
                    VmExit::Reset
                } else {
                    VmExit::Poweroff
                })
            }
            Ok(VcpuExit::InternalError) => {
                return Ok(VmExit::EmulationFailure("KVM internal error".into()))
            }
            Ok(VcpuExit::FailEntry(reason, _)) => {
                return Ok(VmExit::EmulationFailure(format!(
                    "VM entry failed (hardware reason {reason:#x})"
                )))
            }
            Ok(other) => {
                return Ok(VmExit::EmulationFailure(format!(
                    "unhandled exit {other:?}"
                )))
            }
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => continue,
            Err(e) => {
                return Err(VmError::Kvm {
                    what: "KVM_RUN",
                    source: e,
                })
            }
        }
    }
}
