//! The VM pod (`runtimeClassName: husk-vm`): one microVM per pod with its
//! own kernel, husk-agent as its init, every container on its image's
//! layers inside it, and the pod IP on the guest's NIC (tc-filter model).
//! It owns the pod's host resources: the netns and CNI attachment, the
//! layer images and initramfs in the pod's run directory, and the
//! hypervisor process; `teardown` releases them all. Containers are
//! supervised as in a wasm pod: init containers in order, then all at
//! once, restarted by the pod's restartPolicy with the kubelet's back-off,
//! output in CRI log files, SIGTERM then SIGKILL after the grace period.

use super::agent::{AgentClient, Signaller};
use super::cri::{CriShare, VmCriEntry, CRI_TAG, CRI_VOLUME};
use super::husk_vmm::{FsShare, HuskVmmConfig, HuskVmmVm};
use super::hypervisor::{Hypervisor, Vm};
use super::identity::VmIdentity;
use super::initramfs::Initramfs;
use super::nic;
use super::qemu::{Accel, QemuConfig, QemuVm};
use super::share::FsShares;
use crate::attach::AttachHub;
use crate::config::HuskConfig;
use crate::cri_log::{self, Stream};
use crate::lifecycle::{crash_loop_back_off, should_restart, StatusCell, BACKOFF_RESET};
use crate::network::PodNetwork;
use crate::pod::{ContainerPlan, PodPlan};
use crate::state::{ContainerState, PodPaths, PodPhase, PodStatus};
use crate::volume::PodVolumes;
use crate::{Sandbox, SandboxError};
use husk_protocol::{Event, StartRequest};
use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

#[cfg(test)]
mod tests {
    #[test]
    fn static_and_dynamic_executables_are_told_apart() {
        // This test binary is dynamic; /bin/busybox (busybox-static) is not.
        let me = std::env::current_exe().unwrap();
        assert!(super::is_dynamic_elf(&me).unwrap());
        if std::path::Path::new("/bin/busybox").exists() {
            assert!(!super::is_dynamic_elf(std::path::Path::new("/bin/busybox")).unwrap());
        }
        assert!(super::is_dynamic_elf(std::path::Path::new("/etc/hostname")).is_err());
    }

    #[test]
    fn the_vm_is_sized_for_the_containers_limits() {
        const MIB: u64 = 1 << 20;
        // No limits: the base.
        assert_eq!(super::vm_size((256, 1), 2, &[], &[(None, None)]), (256, 1));
        // Containers run together: their limits add up; init containers
        // one at a time: the largest counts.
        let main = [
            (Some(100 * MIB), Some(500)),
            (Some(50 * MIB + 1), Some(700)),
        ];
        let init = [(Some(120 * MIB), None), (Some(30 * MIB), None)];
        assert_eq!(super::vm_size((256, 1), 4, &init, &main), (256 + 151, 2));
        let big_init = [(Some(400 * MIB), Some(3000))];
        assert_eq!(super::vm_size((256, 1), 2, &big_init, &main), (656, 2));
    }

    #[test]
    fn layers_and_volumes_go_over_one_share_when_their_devices_do_not_fit() {
        use super::{virtio_slots, vm_transport, Hypervisor};
        let t = |layers, volumes, cri, acpi| {
            vm_transport(
                layers,
                volumes,
                cri,
                virtio_slots(Hypervisor::QemuTcg, acpi),
            )
        };
        // rng, agent port and NIC take 3 of microvm's 8 slots.
        assert_eq!(t(5, 0, false, false), (false, false));
        assert_eq!(t(6, 0, false, false), (true, false));
        assert_eq!(t(1, 4, false, false), (false, false));
        assert_eq!(t(2, 4, false, false), (true, false));
        // A CRI sandbox's share takes a slot, and takes the layers in.
        assert_eq!(t(1, 4, true, false), (true, false));
        // Too many volumes: they share; the layers stay disks if they fit.
        assert_eq!(t(2, 5, false, false), (false, true));
        assert_eq!(t(8, 5, false, false), (true, true));
        // 24 slots with ACPI.
        assert_eq!(t(10, 4, false, true), (false, false));
        assert_eq!(t(20, 4, false, true), (true, false));
        assert_eq!(t(1, 21, false, true), (false, true));
        // husk-vmm takes 8 devices (rng, vsock, NIC and 5 more), ACPI or not.
        assert_eq!(virtio_slots(Hypervisor::HuskVmm, true), 8);
        assert_eq!(virtio_slots(Hypervisor::QemuKvm, true), 24);
    }
}

#[derive(Debug, thiserror::Error)]
pub enum VmPodError {
    #[error("VM pod: {0}")]
    Setup(String),
    #[error("VM pod network: {0}")]
    Nic(#[from] nic::NicError),
    #[error("VM pod layers: {0}")]
    Rootfs(#[from] super::rootfs::RootfsError),
    #[error(transparent)]
    Hypervisor(#[from] super::hypervisor::HypervisorError),
    #[error("VM pod agent: {0}")]
    Agent(#[from] super::agent::AgentError),
    #[error("VM pod {0}")]
    Volume(#[from] crate::volume::VolumeError),
    #[error("VM pod volumes: {0}")]
    Share(#[from] super::share::ShareError),
    #[error("VM pod: {0}")]
    Identity(#[from] super::identity::IdentityError),
}

/// A container's layers in the guest: block devices, or directories of a
/// share.
type Layers = (Vec<String>, Option<husk_protocol::LayerDirs>);

/// The owner name of host-side volumes bound into the pod's share.
const POD_VOLUMES: &str = "pod";

/// virtio-mmio slots of the pod's machine: QEMU's microvm has 8, or 24
/// with ACPI; husk-vmm takes 8 devices.
fn virtio_slots(hypervisor: Hypervisor, acpi: bool) -> usize {
    if acpi && hypervisor != Hypervisor::HuskVmm {
        24
    } else {
        8
    }
}

/// How a pod's `layers` distinct image layers and `volumes` host-side
/// volumes reach its guest within the machine's virtio slots, beside the
/// three fixed devices (rng, agent port or vsock, NIC): (layers over one virtio-fs
/// share instead of a disk each, volumes through that share instead of a
/// virtiofsd each). Disks and a virtiofsd per volume where they fit (disks
/// read faster); then the layers on the share; then the volumes on it
/// too; then both. `cri`: the pod has the share anyway.
fn vm_transport(layers: usize, volumes: usize, cri: bool, slots: usize) -> (bool, bool) {
    const FIXED: usize = 3;
    let share = usize::from(cri);
    if FIXED + volumes + share + layers <= slots {
        (false, false)
    } else if FIXED + volumes < slots {
        (true, false)
    } else if FIXED + 1 + layers <= slots {
        (false, true)
    } else {
        (true, true)
    }
}

/// The pod annotation that picks a VM pod's hypervisor over `[vm]
/// hypervisor`: `auto`, `qemu-tcg`, `qemu-kvm` or `husk-vmm`.
pub const HYPERVISOR_ANNOTATION: &str = "husk.io/hypervisor";
/// What `[vm] hypervisor` and the annotation accept.
pub const HYPERVISORS: [&str; 4] = ["auto", "qemu-tcg", "qemu-kvm", "husk-vmm"];

/// The hypervisor of one pod: its annotation if it has one, else the host's.
/// `lib`: the state directory (the probe's cache).
pub fn pod_hypervisor(
    plan: &PodPlan,
    config: &crate::config::VmConfig,
    lib: &Path,
) -> (Hypervisor, String) {
    match plan.annotations.get(HYPERVISOR_ANNOTATION) {
        Some(h) if h != "auto" => {
            let (hypervisor, _) = choose_hypervisor(
                &crate::config::VmConfig {
                    hypervisor: h.clone(),
                    ..config.clone()
                },
                lib,
            );
            (
                hypervisor,
                format!("the pod's annotation {HYPERVISOR_ANNOTATION}: {h}"),
            )
        }
        _ => choose_hypervisor(config, lib),
    }
}

/// Which hypervisor runs VM pods on this host, and why. `auto`: QEMU with
/// TCG where KVM is missing or is kvm-pvm (a Linux guest's user space
/// cannot run there); elsewhere husk-vmm when its probe-boot of the real
/// guest kernel and agent passes (see [`super::probe`], cached in `lib`),
/// else QEMU with KVM.
pub fn choose_hypervisor(config: &crate::config::VmConfig, lib: &Path) -> (Hypervisor, String) {
    match config.hypervisor.as_str() {
        "qemu-tcg" => (
            Hypervisor::QemuTcg,
            "configured ([vm] hypervisor = qemu-tcg)".into(),
        ),
        "qemu-kvm" => (
            Hypervisor::QemuKvm,
            "configured ([vm] hypervisor = qemu-kvm)".into(),
        ),
        "husk-vmm" => (
            Hypervisor::HuskVmm,
            "configured ([vm] hypervisor = husk-vmm)".into(),
        ),
        _ if !Path::new("/dev/kvm").exists() => (
            Hypervisor::QemuTcg,
            "no /dev/kvm: QEMU with software emulation (TCG)".into(),
        ),
        _ if Path::new("/sys/module/kvm_pvm").exists() => (
            Hypervisor::QemuTcg,
            "this host's KVM is kvm-pvm, which runs a guest kernel without PVM support under instruction emulation with no user space: QEMU with software emulation (TCG)".into(),
        ),
        _ => {
            let probe = super::probe::husk_vmm(config, lib);
            if probe.ok {
                (Hypervisor::HuskVmm, probe.detail)
            } else {
                (
                    Hypervisor::QemuKvm,
                    format!("{}: QEMU with -accel kvm", probe.detail),
                )
            }
        }
    }
}

/// Whether the ELF at `path` asks for a program interpreter (is
/// dynamically linked): such an agent cannot be PID 1 of an initramfs
/// that holds nothing else.
pub fn is_dynamic_elf(path: &Path) -> std::io::Result<bool> {
    let b = std::fs::read(path)?;
    let bad = || std::io::Error::new(std::io::ErrorKind::InvalidData, "not a 64-bit ELF");
    if b.len() < 64 || &b[..4] != b"\x7fELF" || b[4] != 2 {
        return Err(bad());
    }
    let u16_at = |o: usize| u16::from_le_bytes([b[o], b[o + 1]]) as usize;
    let phoff = u64::from_le_bytes(b[0x20..0x28].try_into().map_err(|_| bad())?) as usize;
    let (size, count) = (u16_at(0x36), u16_at(0x38));
    for i in 0..count {
        let at = phoff + i * size;
        let Some(t) = b.get(at..at + 4) else {
            return Err(bad());
        };
        // PT_INTERP
        if u32::from_le_bytes(t.try_into().map_err(|_| bad())?) == 3 {
            return Ok(true);
        }
    }
    Ok(false)
}

/// Where the guest kernel and agent are; `pub` for `husk info`.
pub fn guest_files(config: &crate::config::VmConfig) -> Result<(PathBuf, PathBuf), VmPodError> {
    let kernel = config.kernel.clone().unwrap_or_else(|| {
        std::env::var_os("HUSK_IMAGES_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(|| {
                PathBuf::from(std::env::var_os("HOME").unwrap_or_default())
                    .join(".cache/husk-images")
            })
            .join("kernel-b.bzImage")
    });
    let agent = config.agent.clone().unwrap_or_else(|| {
        std::env::current_exe()
            .map(|e| e.with_file_name("husk-agent"))
            .unwrap_or_default()
    });
    if !kernel.is_file() {
        return Err(VmPodError::Setup(format!(
            "guest kernel {} not found; run images/build.sh or set [vm] kernel in husk's config",
            kernel.display()
        )));
    }
    if !agent.is_file() {
        return Err(VmPodError::Setup(format!(
            "guest agent {} not found; build the static husk-agent or set [vm] agent in husk's config",
            agent.display()
        )));
    }
    if is_dynamic_elf(&agent).unwrap_or(true) {
        return Err(VmPodError::Setup(format!(
            "guest agent {} is not a static executable; build it with RUSTFLAGS=\"-C target-feature=+crt-static\" cargo build --release -p husk-agent --target x86_64-unknown-linux-gnu and set [vm] agent to it",
            agent.display()
        )));
    }
    Ok((kernel, agent))
}

/// The guest's initramfs at `out`: the agent as /init, and the kernel
/// modules of `modules` (a kernel whose virtio drivers are modules).
pub(crate) fn write_agent_initramfs(
    agent: &Path,
    modules: Option<&Path>,
    out: &Path,
) -> Result<(), String> {
    let mut initramfs = Initramfs::default();
    initramfs
        .copy("init", agent)
        .map_err(|e| format!("{}: {e}", agent.display()))?;
    if let Some(m) = modules {
        initramfs.dir("lib").dir("lib/modules");
        let entries = std::fs::read_dir(m).map_err(|e| format!("{}: {e}", m.display()))?;
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            initramfs
                .copy(&format!("lib/modules/{name}"), &e.path())
                .map_err(|err| format!("{}: {err}", e.path().display()))?;
        }
    }
    std::fs::File::create(out)
        .and_then(|mut f| initramfs.write_to(&mut f))
        .map_err(|e| format!("{}: {e}", out.display()))
}

pub(crate) struct Resources {
    network: Option<PodNetwork>,
    vm: Option<Box<dyn Vm>>,
    /// virtiofsd for the host-side volumes.
    shares: Option<FsShares>,
    /// The host-side volumes (emptyDir on disk, hostPath).
    volumes: Option<PodVolumes>,
    /// What CRI containers see of the host (CRI sandboxes only).
    pub(crate) cri_share: Option<CriShare>,
    /// The unprivileged uid the hypervisor runs as.
    identity: Option<VmIdentity>,
}

pub struct VmSandbox {
    /// This sandbox, for the threads it starts.
    me: std::sync::Weak<VmSandbox>,
    pub(crate) plan: Arc<PodPlan>,
    pub(crate) paths: PodPaths,
    config: HuskConfig,
    pub(crate) status: StatusCell,
    pub(crate) agent: AgentClient,
    /// Each container's layers, lowest first: guest block devices, or
    /// directories of the layer share (see `create_inner`).
    layers: HashMap<String, Layers>,
    /// Host-side volumes bound into the pod's share instead of a virtiofsd
    /// each (when the virtio slots ran out): name → path in the share.
    shared_volumes: HashMap<String, String>,
    pub(crate) stop: StopState,
    pub(crate) resources: Mutex<Resources>,
    /// Limits changed by `update`, by container: they replace the plan's.
    limits: Mutex<HashMap<String, husk_protocol::Limits>>,
    /// Containers created through CRI, by id.
    pub(crate) cri: Mutex<HashMap<String, VmCriEntry>>,
    /// Who is attached to the manifest's containers, by name (kept across
    /// restarts).
    hubs: crate::attach::Hubs,
}

/// The pod-wide stop request and the processes it signals.
#[derive(Default)]
pub(crate) struct StopState {
    pub(crate) requested: AtomicBool,
    pub(crate) deadline: Mutex<Option<Instant>>,
    /// Running processes by their id in the guest.
    pub(crate) running: Mutex<HashMap<String, Signaller>>,
}

impl VmSandbox {
    /// Creates the pod's network (netns + CNI, from the host namespace; the
    /// calling thread never leaves it), the tap mirrored to the pod's veth,
    /// one ext4 image per image layer and the agent's initramfs, then boots
    /// the VM and hands the pod IP to the guest. On error everything
    /// created is removed again.
    pub fn create(
        plan: PodPlan,
        paths: PodPaths,
        config: HuskConfig,
        cni_dir: &Path,
    ) -> Result<Arc<Self>, SandboxError> {
        let mut res = Resources {
            network: None,
            vm: None,
            shares: None,
            volumes: None,
            cri_share: None,
            identity: None,
        };
        match Self::create_inner(&plan, &paths, &config, cni_dir, &mut res) {
            Ok((agent, layers, shared_volumes, status)) => Ok(Arc::new_cyclic(|me| VmSandbox {
                me: me.clone(),
                status: StatusCell::new(status, paths.clone(), plan.init_containers.len()),
                plan: Arc::new(plan),
                paths,
                config,
                agent,
                layers,
                shared_volumes,
                stop: StopState::default(),
                resources: Mutex::new(res),
                limits: Mutex::new(HashMap::new()),
                cri: Mutex::new(HashMap::new()),
                hubs: Default::default(),
            })),
            Err(e) => {
                release(&mut res, &paths);
                Err(e)
            }
        }
    }

    #[allow(clippy::type_complexity)]
    fn create_inner(
        plan: &PodPlan,
        paths: &PodPaths,
        config: &HuskConfig,
        cni_dir: &Path,
        res: &mut Resources,
    ) -> Result<
        (
            AgentClient,
            HashMap<String, Layers>,
            HashMap<String, String>,
            PodStatus,
        ),
        SandboxError,
    > {
        let io = |path: &Path| {
            let path = path.to_owned();
            move |e| crate::state::StateError::Io { path, source: e }
        };
        let t0 = Instant::now();
        std::fs::create_dir_all(&paths.run).map_err(io(&paths.run))?;
        let (kernel, agent_bin) = guest_files(&config.vm).map_err(vm_err)?;
        // The state directory: lib/pods/<id> is this pod's.
        let lib = paths
            .lib
            .parent()
            .and_then(Path::parent)
            .unwrap_or(&paths.lib);
        let (hypervisor, why) = pod_hypervisor(plan, &config.vm, lib);
        tracing::info!(hypervisor = hypervisor.name(), "{why}");
        let husk_vmm = hypervisor == Hypervisor::HuskVmm;
        if husk_vmm && config.vm.acpi {
            return Err(vm_err(VmPodError::Setup(
                "husk-vmm announces its virtio devices on the kernel command line, and [vm] acpi = true says this kernel finds them through ACPI: use kernel B, or the hypervisor qemu-tcg or qemu-kvm".into(),
            )));
        }
        let slots = virtio_slots(hypervisor, config.vm.acpi);

        // Layers: one read-only ext4 image per distinct layer directory,
        // when the machine has a virtio slot for each; otherwise all of
        // them over one virtio-fs share (as a CRI sandbox has them).
        let (host_side, in_guest) = split_volumes(plan);
        let distinct: std::collections::HashSet<&PathBuf> =
            plan.all_containers().flat_map(|c| &c.layers).collect();
        let (layers_shared, volumes_shared) =
            vm_transport(distinct.len(), host_side.len(), plan.cri, slots);
        if layers_shared || volumes_shared {
            tracing::info!(
                layers = distinct.len(),
                volumes = host_side.len(),
                layers_shared,
                volumes_shared,
                "more devices than the machine's {slots} virtio slots: sharing over one virtio-fs share",
            );
        }
        let vm_dir = paths.run.join("vm-files");
        std::fs::create_dir_all(&vm_dir).map_err(io(&vm_dir))?;
        let mut disks: Vec<(PathBuf, bool)> = Vec::new();
        let mut by_dir: HashMap<PathBuf, String> = HashMap::new();
        let mut layers = HashMap::new();
        if layers_shared || volumes_shared || plan.cri {
            // Containers that CRI creates after the boot find their layers
            // and host mounts here too (see super::cri).
            res.cri_share = Some(
                CriShare::new(paths.run.join("cri-share"))
                    .map_err(|e| vm_err(VmPodError::Setup(e.to_string())))?,
            );
        }
        for c in plan.all_containers() {
            if layers_shared {
                let share = res.cri_share.as_mut().expect("made above");
                let dirs = c
                    .layers
                    .iter()
                    .map(|d| share.layer(d))
                    .collect::<Result<Vec<_>, _>>()
                    .map_err(|e| vm_err(VmPodError::Setup(e.to_string())))?;
                let dirs = husk_protocol::LayerDirs {
                    volume: CRI_VOLUME.into(),
                    dirs,
                };
                layers.insert(c.name.clone(), (Vec::new(), Some(dirs)));
                continue;
            }
            let mut devs = Vec::new();
            for (n, dir) in c.layers.iter().enumerate() {
                let dev = match by_dir.get(dir) {
                    Some(d) => d.clone(),
                    None => {
                        let i = disks.len();
                        if i >= 20 {
                            return Err(vm_err(VmPodError::Setup(
                                "the pod's images have more than 20 distinct layers".into(),
                            )));
                        }
                        // The store keeps each layer's image beside the layer
                        // (made once, removed with it); without a place
                        // there, the pod makes its own.
                        let img = c
                            .layer_images
                            .get(n)
                            .cloned()
                            .unwrap_or_else(|| vm_dir.join(format!("layer{i}.ext4")));
                        if !img.is_file() {
                            super::rootfs::ext4_image(dir, &img).map_err(|e| vm_err(e.into()))?;
                        }
                        disks.push((img, true));
                        let dev = format!("/dev/vd{}", (b'a' + i as u8) as char);
                        by_dir.insert(dir.clone(), dev.clone());
                        dev
                    }
                };
                devs.push(dev);
            }
            layers.insert(c.name.clone(), (devs, None));
        }

        let initrd = vm_dir.join("initramfs.cpio");
        write_agent_initramfs(&agent_bin, config.vm.modules.as_deref(), &initrd)
            .map_err(|e| vm_err(VmPodError::Setup(e)))?;

        // Network, from the host's namespace (this thread never leaves it).
        let net = PodNetwork::for_pod(plan, paths, &config.network, cni_dir)?;
        let pod_ips = net.record.pod_ips();
        let addresses = net.record.addresses();
        res.network = Some(net);
        // husk-vmm takes the tap with the virtio-net header on it.
        let vm_nic =
            nic::attach(&paths.netns, "eth0", "tap0", husk_vmm).map_err(|e| vm_err(e.into()))?;

        // Volumes: host directories go over virtio-fs; the rest is made in
        // guest memory once the agent answers.
        let volumes = res.volumes.insert(
            PodVolumes::setup(
                &PodPlan {
                    volumes: host_side.iter().map(|(v, _)| v.clone()).collect(),
                    ..plan.clone()
                },
                paths,
            )
            .map_err(|e| vm_err(e.into()))?,
        );
        let shares = res.shares.insert(FsShares::new(paths.run.join("vm-fs")));
        let virtiofsd = config
            .vm
            .virtiofsd
            .clone()
            .unwrap_or_else(|| super::share::DEFAULT_VIRTIOFSD.into());
        let mut guest_volumes = in_guest;
        let mut shared_volumes = HashMap::new();
        // husk-vmm serves the shares itself: no virtiofsd.
        let mut vmm_shares = Vec::new();
        for (i, (v, read_only)) in host_side.iter().enumerate() {
            let tag = format!("v{i}");
            let dir = volumes
                .host_dir(&v.name)
                .ok_or_else(|| {
                    vm_err(VmPodError::Setup(format!("volume {:?} not set up", v.name)))
                })?
                .to_owned();
            if volumes_shared {
                // A file volume's directory guards its files itself (its
                // tmpfs and binds carry their read-only flags): it is bound
                // in with them.
                let ro = *read_only && !volumes.is_file_volume(&v.name);
                let share = res.cri_share.as_mut().expect("made above");
                let rel = share
                    .bind_for(POD_VOLUMES, &v.name, &dir, ro)
                    .map_err(|e| vm_err(VmPodError::Setup(e.to_string())))?;
                shared_volumes.insert(v.name.clone(), rel);
                continue;
            }
            if husk_vmm {
                // husk-vmm serves a detached, nosuid and nodev copy of the
                // tree itself (open_tree + mount_setattr): no bind here.
                vmm_shares.push(FsShare {
                    path: dir,
                    tag: tag.clone(),
                    read_only: *read_only,
                    xattr: false,
                });
            } else {
                shares
                    .add(&virtiofsd, &tag, &dir, *read_only)
                    .map_err(|e| vm_err(e.into()))?;
            }
            guest_volumes.push(husk_protocol::VolumeRequest {
                name: v.name.clone(),
                source: husk_protocol::VolumeSource::VirtioFs {
                    tag,
                    read_only: *read_only,
                },
            });
        }
        if let Some(share) = res.cri_share.as_ref() {
            if husk_vmm {
                vmm_shares.push(FsShare {
                    tag: CRI_TAG.into(),
                    path: share.root().to_owned(),
                    read_only: false,
                    xattr: true,
                });
            } else {
                let shares = res.shares.as_mut().expect("made above");
                shares
                    .add_with_xattrs(&virtiofsd, CRI_TAG, share.root())
                    .map_err(|e| vm_err(e.into()))?;
            }
            guest_volumes.push(husk_protocol::VolumeRequest {
                name: CRI_VOLUME.into(),
                source: husk_protocol::VolumeSource::VirtioFs {
                    tag: CRI_TAG.into(),
                    read_only: false,
                },
            });
        }

        let (mem_mib, vcpus) = pod_vm_size(plan, &config.vm);
        let host_before_boot = t0.elapsed();
        let run_dir = paths.run.join("vm");
        let vm: Box<dyn Vm> = match hypervisor {
            Hypervisor::HuskVmm => Box::new(
                HuskVmmVm::start(
                    &HuskVmmConfig {
                        binary: config
                            .vm
                            .husk_vmm
                            .clone()
                            .unwrap_or_else(super::husk_vmm::default_binary),
                        kernel,
                        initrd,
                        cmdline: String::new(),
                        mem_mib,
                        vcpus,
                        disks,
                        shares: vmm_shares,
                    },
                    &run_dir,
                    Some(&vm_nic),
                )
                .map_err(|e| vm_err(e.into()))?,
            ),
            Hypervisor::QemuTcg | Hypervisor::QemuKvm => {
                let identity = res.identity.insert(
                    VmIdentity::claim(&paths.vm_ids, &run_dir).map_err(|e| vm_err(e.into()))?,
                );
                let qemu = QemuConfig {
                    kernel,
                    initrd,
                    cmdline: String::new(),
                    mem_mib,
                    vcpus,
                    accel: if hypervisor == Hypervisor::QemuKvm {
                        Accel::Kvm
                    } else {
                        Accel::Tcg
                    },
                    acpi: config.vm.acpi,
                    disks,
                    shares: res
                        .shares
                        .as_ref()
                        .map(|s| s.shares().to_vec())
                        .unwrap_or_default(),
                    extra_args: Vec::new(),
                    run_as: Some((identity.uid, identity.gid)),
                };
                Box::new(
                    QemuVm::start_with_nic(&qemu, &run_dir, Some(&vm_nic))
                        .map_err(|e| vm_err(e.into()))?,
                )
            }
        };
        let t_spawned = Instant::now();
        let mac = vm_nic.mac.clone();
        drop(vm_nic); // the hypervisor holds the tap now
        let vm = res.vm.insert(vm);
        let agent = vm
            .agent(Duration::from_secs(config.vm.boot_timeout_secs))
            .map_err(|e| vm_err(e.into()))?;
        let boot = t_spawned.elapsed();
        let t_net = Instant::now();
        if !addresses.is_empty() {
            agent
                .configure_network(husk_protocol::NetworkConfig {
                    mac,
                    addresses: addresses
                        .into_iter()
                        .map(|(address, gateway)| husk_protocol::IpConfig { address, gateway })
                        .collect(),
                })
                .map_err(|e| vm_err(e.into()))?;
        }
        if !plan.sysctls.is_empty() {
            agent
                .configure_pod(husk_protocol::PodConfig {
                    sysctls: plan.sysctls.clone(),
                })
                .map_err(|e| vm_err(e.into()))?;
        }
        let net_ms = t_net.elapsed().as_secs_f64() * 1e3;
        guest_volumes.push(etc_volume(plan, &pod_ips));
        agent
            .add_volumes(guest_volumes)
            .map_err(|e| vm_err(e.into()))?;

        // Where a VM pod's start goes (husk-vm-bench reads this line).
        tracing::info!(
            host_ms = (host_before_boot + t_net.elapsed()).as_secs_f64() * 1e3,
            before_boot_ms = host_before_boot.as_secs_f64() * 1e3,
            after_boot_ms = t_net.elapsed().as_secs_f64() * 1e3,
            net_ms,
            boot_ms = boot.as_secs_f64() * 1e3,
            "vm pod timing"
        );
        let statuses = plan
            .all_containers()
            .map(|c| crate::lifecycle::creating(c, paths, None))
            .collect();
        let status = crate::lifecycle::pending(plan, statuses, pod_ips, None);
        status.save(paths)?;
        Ok((agent, layers, shared_volumes, status))
    }

    /// Releases every host resource: the VM (its process, tap and run
    /// directory), CNI DEL and the netns. Idempotent.
    pub fn teardown(&self) {
        let mut res = self.resources.lock().unwrap_or_else(|p| p.into_inner());
        release(&mut res, &self.paths);
    }

    /// Runs the pod to its end (all containers finished for good, or a
    /// stop request honoured), then powers the VM off. Returns the phase.
    pub async fn run(self: &Arc<Self>) -> PodPhase {
        let me = self.clone();
        tokio::task::spawn_blocking(move || me.run_blocking())
            .await
            .unwrap_or(PodPhase::Failed)
    }

    fn run_blocking(self: &Arc<Self>) -> PodPhase {
        if self.plan.cri {
            self.cri_run();
            return self.power_off();
        }
        let mut init_ok = true;
        for i in 0..self.plan.init_containers.len() {
            if !self.supervise(true, i) {
                init_ok = false;
                break;
            }
        }
        if init_ok {
            let threads: Vec<_> = (0..self.plan.containers.len())
                .map(|i| {
                    let me = self.clone();
                    std::thread::spawn(move || me.supervise(false, i))
                })
                .collect();
            for t in threads {
                let _ = t.join();
            }
        } else {
            self.status
                .init_failed(self.stop.requested.load(Ordering::SeqCst));
        }
        self.power_off()
    }

    /// Records the pod's end, then powers the guest off.
    fn power_off(&self) -> PodPhase {
        let phase = self.status.finish();
        // Power the guest off; the teardown kills it if it does not go.
        if let Err(e) = self.agent.shutdown() {
            tracing::warn!("guest shutdown: {e}");
        }
        if let Some(vm) = self
            .resources
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .vm
            .as_mut()
        {
            vm.wait(Duration::from_secs(10));
        }
        phase
    }

    /// Runs one container until it is done for good; for an init container,
    /// returns whether it completed successfully.
    fn supervise(self: &Arc<Self>, init: bool, idx: usize) -> bool {
        let plan = self.plan.clone();
        let c = if init {
            &plan.init_containers[idx]
        } else {
            &plan.containers[idx]
        };
        let initial = Duration::from_millis(self.config.restart.backoff_initial_ms);
        let cap = Duration::from_millis(self.config.restart.backoff_max_ms);
        let mut backoff = initial;
        let mut restarts: u32 = 0;
        loop {
            if self.stop.requested.load(Ordering::SeqCst) {
                return false;
            }
            let started = chrono::Utc::now();
            let t0 = Instant::now();
            let log_path = self.paths.log_file(&c.name, restarts);
            self.status.with_container(init, idx, |s| {
                s.state = ContainerState::Running {
                    started_at: started,
                };
                s.ready = true;
                s.log_path = log_path.clone();
            });
            let (code, reason, message) = match self.run_instance(c, restarts, &log_path) {
                Ok((code, signal, oom)) => match (code, signal) {
                    // As the kubelet reports it, whatever the exit status.
                    _ if oom => (
                        code.unwrap_or(128 + signal.unwrap_or(libc::SIGKILL)),
                        "OOMKilled",
                        None,
                    ),
                    (Some(0), _) => (0, "Completed", None),
                    (Some(n), _) => (n, "Error", None),
                    (None, Some(s)) => (128 + s, "Error", Some(format!("killed by signal {s}"))),
                    (None, None) => (1, "Error", None),
                },
                Err(msg) => {
                    tracing::warn!(container = %c.name, "{msg}");
                    let line = format!("{} stderr F husk: {msg}\n", cri_log::timestamp());
                    if let Ok(mut f) = cri_log::open_log(&log_path) {
                        let _ = f.write_all(line.as_bytes());
                    }
                    if self.agent.is_closed() {
                        (137, "Error", Some(msg))
                    } else {
                        (128, "StartError", Some(msg))
                    }
                }
            };
            let terminated = ContainerState::Terminated {
                exit_code: code,
                reason: reason.into(),
                message,
                started_at: started,
                finished_at: chrono::Utc::now(),
            };
            self.status.with_container(init, idx, |s| {
                s.state = terminated.clone();
                s.ready = false;
            });
            // A VM that ended (a guest kernel panic, a killed hypervisor)
            // ends the pod: nothing can restart without it.
            if self.agent.is_closed() {
                let message = self.vm_ended_message();
                self.status.with_container(init, idx, |s| {
                    if let ContainerState::Terminated { message: m, .. } = &mut s.state {
                        *m = Some(message.clone());
                    }
                });
                self.status.update(|st| {
                    st.reason = Some("VMExited".into());
                    st.message = Some(message);
                });
                return false;
            }
            let restart = !self.stop.requested.load(Ordering::SeqCst)
                && should_restart(init, plan.restart_policy, code);
            if !restart {
                return code == 0;
            }
            if t0.elapsed() >= BACKOFF_RESET {
                backoff = initial;
            }
            let delay = backoff;
            self.status.with_container(init, idx, |s| {
                s.last_state = Some(terminated.clone());
                s.state = crash_loop_back_off(delay, code, &c.name);
            });
            let until = Instant::now() + delay;
            while Instant::now() < until {
                if self.stop.requested.load(Ordering::SeqCst) {
                    return false;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            backoff = (backoff * 2).min(cap);
            restarts += 1;
            self.status
                .with_container(init, idx, |s| s.restart_count = restarts);
        }
    }

    /// The named container, or the pod's first (as kubectl picks it); in
    /// a CRI sandbox, a CRI container by id. With the id of its running
    /// process in the guest, if it runs.
    fn container(
        &self,
        name: Option<&str>,
    ) -> Result<(Arc<ContainerPlan>, Option<String>), String> {
        if self.plan.cri {
            let id = name.ok_or_else(|| {
                format!(
                    "pod sandbox {} has containers by id only; name one",
                    self.paths.id
                )
            })?;
            let plan = self
                .cri_plan(id)
                .ok_or_else(|| format!("pod sandbox {} has no container {id:?}", self.paths.id))?;
            let running = self
                .stop
                .running
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .contains_key(id)
                .then(|| id.to_owned());
            return Ok((plan, running));
        }
        let c = match name {
            None => self.plan.containers.first(),
            Some(name) => self.plan.all_containers().find(|c| c.name == name),
        }
        .ok_or_else(|| {
            format!(
                "pod {} has no container {:?}",
                self.plan.name,
                name.unwrap_or_default()
            )
        })?;
        Ok((Arc::new(c.clone()), self.running_id(&c.name)))
    }

    /// A container's limits: the plan's, or what `update` set.
    fn limits_of(&self, c: &ContainerPlan) -> husk_protocol::Limits {
        self.limits
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&c.name)
            .cloned()
            .unwrap_or(husk_protocol::Limits {
                memory_max: c.memory_limit,
                cpu_max_millis: c.cpu_limit_millis,
            })
    }

    /// The id of a container's running instance (`<name>.<restart>`;
    /// container names have no dots).
    fn running_id(&self, name: &str) -> Option<String> {
        self.stop
            .running
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .keys()
            .find(|id| id.strip_prefix(name).is_some_and(|r| r.starts_with('.')))
            .cloned()
    }

    /// Starts `argv` in the running instance of a container (kubectl exec):
    /// its root, namespaces, cgroup, user and env.
    fn start_exec(
        &self,
        container: Option<&str>,
        spec: crate::ExecSpec,
        stdin: bool,
    ) -> Result<super::agent::Process, String> {
        let pod = &self.plan.name;
        let (c, running) = self.container(container)?;
        let crate::ExecSpec { argv, tty, copy } = spec;
        match (&copy, argv.is_empty()) {
            (None, true) => return Err("exec: no command given".into()),
            (Some(_), false) => return Err("exec: a copy takes no command".into()),
            _ => {}
        }
        let target =
            running.ok_or_else(|| format!("container {:?} of pod {pod} is not running", c.name))?;
        static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let id = format!("exec-{}", NEXT.fetch_add(1, Ordering::Relaxed));
        let mut env: Vec<String> = vec![format!("HOSTNAME={}", self.plan.hostname())];
        env.extend(c.env.iter().map(|e| format!("{}={}", e.name, e.value)));
        // A copy runs as root, as `docker cp` does, with the agent's own
        // tar rather than the image's.
        let security = copy.is_none().then(|| security(&c.security));
        self.agent
            .start(StartRequest {
                id,
                argv,
                env,
                cwd: c.working_dir.clone(),
                stdin,
                exec_in: Some(target),
                security,
                tty,
                tool: copy,
                ..Default::default()
            })
            .map_err(|e| e.to_string())
    }

    /// Why the pod's VM is gone, with the end of its console.
    pub(crate) fn vm_ended_message(&self) -> String {
        let console = self
            .resources
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .vm
            .as_ref()
            .map(|vm| vm.console())
            .unwrap_or_default();
        let tail: Vec<&str> = console.lines().rev().take(3).collect();
        let tail: Vec<&str> = tail.into_iter().rev().collect();
        format!(
            "the pod's VM ended; its console ends with: {}",
            tail.join(" | ")
        )
    }

    /// One run of a container in the guest, its output into the CRI log.
    /// Returns (exit code, signal, whether the OOM killer struck).
    fn run_instance(
        &self,
        c: &ContainerPlan,
        restart: u32,
        log_path: &Path,
    ) -> Result<(Option<i32>, Option<i32>, bool), String> {
        let log = Arc::new(Mutex::new(cri_log::LogFile::open(
            log_path,
            self.config.logs.rotation(),
        )?));
        let mut req = self.start_request(
            c,
            format!("{}.{restart}", c.name),
            husk_protocol::Rootfs {
                layers: self
                    .layers
                    .get(&c.name)
                    .map(|l| l.0.clone())
                    .unwrap_or_default(),
                layer_dirs: self.layers.get(&c.name).and_then(|l| l.1.clone()),
                hostname: Some(self.plan.hostname().to_owned()),
                pod_pid: c.security.share_pid,
            },
        );
        req.stdin = c.stdin;
        self.run_process(req, log, None, Some(self.hubs.get(&c.name)))
    }

    /// What starts container `c` in the guest as `id`, on `rootfs`.
    pub(crate) fn start_request(
        &self,
        c: &ContainerPlan,
        id: String,
        rootfs: husk_protocol::Rootfs,
    ) -> StartRequest {
        let mut env: Vec<String> = vec![format!("HOSTNAME={}", self.plan.hostname())];
        env.extend(c.env.iter().map(|e| format!("{}={}", e.name, e.value)));
        StartRequest {
            id,
            argv: c.argv.clone(),
            env,
            cwd: c.working_dir.clone(),
            stdin: false,
            rootfs: Some(rootfs),
            mounts: container_mounts(&self.plan, c, &self.shared_volumes),
            limits: Some(self.limits_of(c)),
            exec_in: None,
            security: Some(security(&c.security)),
            tty: None,
            tool: None,
        }
    }

    /// Starts `req` in the guest and pumps its output into `log`, in the
    /// CRI format, until it exits; `started` hears whether it started.
    /// Returns (exit code, signal, whether the OOM killer struck).
    pub(crate) fn run_process(
        &self,
        req: StartRequest,
        log: Arc<Mutex<cri_log::LogFile>>,
        started: Option<
            std::sync::mpsc::SyncSender<Result<Option<husk_protocol::ProcessUser>, String>>,
        >,
        hub: Option<Arc<AttachHub>>,
    ) -> Result<(Option<i32>, Option<i32>, bool), String> {
        let id = req.id.clone();
        let proc = match self.agent.start(req) {
            Ok(p) => p,
            Err(e) => {
                if let Some(s) = started {
                    let _ = s.send(Err(e.to_string()));
                }
                return Err(e.to_string());
            }
        };
        self.stop
            .running
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(id.clone(), proc.signaller());
        // A stop that came while starting reaches this process too.
        if self.stop.requested.load(Ordering::SeqCst) {
            let _ = proc.signal(libc::SIGTERM);
        }
        if let Some(h) = &hub {
            let (write, resize) = (proc.stdin_writer(), proc.resizer());
            h.connect(
                Box::new(move |d: &[u8], eof: bool| write(d, eof).map_err(|e| e.to_string())),
                Some(Box::new(move |s| resize(s).map_err(|e| e.to_string()))),
            );
        }
        if let Some(s) = started {
            let _ = s.send(Ok(proc.user.clone()));
        }
        // Output goes through pipes into the CRI framing of cri_log::pump.
        let pipes = [Stream::Stdout, Stream::Stderr].map(|s| {
            let (r, w) = std::io::pipe().map_err(|e| format!("pipe: {e}"))?;
            let log = log.clone();
            let pump = std::thread::spawn(move || cri_log::pump(r, s, log));
            Ok::<_, String>((w, pump))
        });
        let [out, err] = pipes;
        let ((mut out_w, out_pump), (mut err_w, err_pump)) = (out?, err?);
        let mut killed = false;
        let result = loop {
            match proc.next_event(Duration::from_millis(100)) {
                Ok(Event::Output { stream, data, .. }) => {
                    let w = match stream {
                        husk_protocol::Stream::Stdout => &mut out_w,
                        husk_protocol::Stream::Stderr => &mut err_w,
                    };
                    let _ = w.write_all(&data);
                    if let Some(h) = &hub {
                        h.publish(match stream {
                            husk_protocol::Stream::Stdout => crate::ExecMsg::Stdout { data },
                            husk_protocol::Stream::Stderr => crate::ExecMsg::Stderr { data },
                        });
                    }
                }
                Ok(Event::Exited {
                    code,
                    signal,
                    oom_killed,
                    ..
                }) => break Ok((code, signal, oom_killed)),
                Ok(Event::Error { message, .. }) => break Err(message),
                Ok(_) => {}
                Err(super::agent::AgentError::Timeout(_)) => {
                    let deadline = *self.stop.deadline.lock().unwrap_or_else(|p| p.into_inner());
                    if !killed && deadline.is_some_and(|d| Instant::now() >= d) {
                        let _ = proc.signal(libc::SIGKILL);
                        killed = true;
                    }
                }
                Err(e) => break Err(e.to_string()),
            }
        };
        self.stop
            .running
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&id);
        drop((out_w, err_w));
        let _ = out_pump.join();
        let _ = err_pump.join();
        if let Some(h) = &hub {
            h.close(match &result {
                Ok((code, signal, _)) => crate::ExecMsg::Exit {
                    code: code.unwrap_or_else(|| 128 + signal.unwrap_or(libc::SIGKILL)),
                },
                Err(message) => crate::ExecMsg::Error {
                    message: message.clone(),
                },
            });
        }
        result
    }
}

/// What the agent applies for a container's securityContext: its
/// capabilities ([`crate::pod::SecurityPlan::capabilities`]), paths and
/// seccomp filter (husk's default one fitted to those capabilities).
fn security(s: &crate::pod::SecurityPlan) -> husk_protocol::Security {
    use crate::pod::seccomp::{runtime_default, SeccompPlan};
    let caps = s.capabilities();
    let seccomp = match &s.seccomp {
        None => None,
        Some(SeccompPlan::RuntimeDefault) => Some(runtime_default(&caps)),
        Some(SeccompPlan::Profile(p)) => Some(p.clone()),
    };
    husk_protocol::Security {
        user: s.user.clone(),
        supplemental_groups: s.supplemental_groups.clone(),
        strict_groups: s.strict_groups,
        run_as_non_root: s.run_as_non_root,
        read_only_root: s.read_only_root,
        no_new_privs: s.no_new_privs,
        capabilities: caps,
        masked_paths: s.masked_paths.clone(),
        readonly_paths: s.readonly_paths.clone(),
        seccomp,
    }
}

/// The files the kubelet gives every container: /etc/hostname, /etc/hosts
/// and /etc/resolv.conf, in a guest tmpfs each container mounts from.
fn etc_volume(plan: &PodPlan, pod_ips: &[String]) -> husk_protocol::VolumeRequest {
    let host_resolv = std::fs::read_to_string("/etc/resolv.conf").unwrap_or_default();
    let file = |path: &str, data: String| husk_protocol::File {
        path: path.into(),
        data: data.into_bytes(),
        mode: 0o644,
    };
    husk_protocol::VolumeRequest {
        name: husk_protocol::ETC_VOLUME.into(),
        source: husk_protocol::VolumeSource::Tmpfs {
            size: Some(1 << 20),
            mode: 0o755,
            files: vec![
                file("hostname", format!("{}\n", plan.hostname())),
                file("hosts", crate::dns::hosts_file(plan, pod_ips)),
                file(
                    "resolv.conf",
                    crate::dns::resolv_conf(&plan.dns, &host_resolv),
                ),
            ],
            read_only: false,
            atomic: false,
        },
    }
}

/// A container's mounts: its volumes, then the pod's /etc files where it
/// mounts nothing of its own. A file hostPath is the file of its
/// directory that has the mount's name.
fn container_mounts(
    plan: &PodPlan,
    c: &ContainerPlan,
    shared: &HashMap<String, String>,
) -> Vec<husk_protocol::Mount> {
    let is_file = |v: &str| {
        plan.volume(v).is_some_and(|v| {
            matches!(
                v.source,
                crate::pod::VolumeSource::HostPath { file: true, .. }
            )
        })
    };
    let mut out: Vec<husk_protocol::Mount> = c
        .mounts
        .iter()
        .map(|m| {
            let sub_path = if is_file(&m.volume) {
                crate::volume::file_volume_entry(&m.mount_path)
            } else {
                m.sub_path.clone()
            };
            // A volume bound into the pod's share is a path in it.
            match shared.get(&m.volume) {
                Some(rel) => husk_protocol::Mount {
                    volume: CRI_VOLUME.into(),
                    path: m.mount_path.clone(),
                    read_only: m.read_only,
                    sub_path: Some(match sub_path {
                        Some(sub) => format!("{rel}/{sub}"),
                        None => rel.clone(),
                    }),
                },
                None => husk_protocol::Mount {
                    volume: m.volume.clone(),
                    path: m.mount_path.clone(),
                    read_only: m.read_only,
                    sub_path,
                },
            }
        })
        .collect();
    for f in ["hostname", "hosts", "resolv.conf"] {
        let path = format!("/etc/{f}");
        let taken = c.mounts.iter().any(|m| {
            let p = m.mount_path.trim_end_matches('/');
            p == path || p == "/etc"
        });
        if !taken {
            out.push(husk_protocol::Mount {
                volume: husk_protocol::ETC_VOLUME.into(),
                path,
                read_only: false,
                sub_path: Some(f.into()),
            });
        }
    }
    out
}

/// The VM size of the pod `plan` on this host (see [`vm_size`]).
fn pod_vm_size(plan: &PodPlan, vm: &crate::config::VmConfig) -> (u32, u32) {
    let limits = |cs: &[ContainerPlan]| -> Vec<(Option<u64>, Option<u64>)> {
        cs.iter()
            .map(|c| (c.memory_limit, c.cpu_limit_millis))
            .collect()
    };
    // A CRI sandbox boots before its containers exist: the kubelet's sum
    // of their limits stands for them (as Kata's static sizing reads it).
    let main = match plan.sandbox_limits {
        Some(l) if plan.containers.is_empty() => vec![l],
        _ => limits(&plan.containers),
    };
    vm_size(
        (vm.mem_mib, vm.vcpus),
        std::thread::available_parallelism().map_or(1, |n| n.get() as u32),
        &limits(&plan.init_containers),
        &main,
    )
}

/// The VM's memory (MiB) and vCPUs, as Kata sizes it: the configured
/// base for the guest kernel and agent, plus room for the containers'
/// memory limits (init containers run one at a time, the others together),
/// and enough vCPUs for their CPU limits, up to the host's.
fn vm_size(
    (base_mib, base_vcpus): (u32, u32),
    host_cpus: u32,
    init: &[(Option<u64>, Option<u64>)],
    main: &[(Option<u64>, Option<u64>)],
) -> (u32, u32) {
    let mib = |b: u64| b.div_ceil(1 << 20);
    let during_init = init.iter().filter_map(|l| l.0).map(mib).max().unwrap_or(0);
    let running = main.iter().filter_map(|l| l.0).map(mib).sum::<u64>();
    let mem = u64::from(base_mib) + during_init.max(running);
    let cpus = main
        .iter()
        .filter_map(|l| l.1)
        .sum::<u64>()
        .max(init.iter().filter_map(|l| l.1).max().unwrap_or(0))
        .div_ceil(1000);
    let vcpus = u64::from(base_vcpus)
        .max(cpus)
        .min(u64::from(host_cpus.max(1)));
    (mem.min(u64::from(u32::MAX)) as u32, vcpus.max(1) as u32)
}

/// A VM pod's volumes: those served from the host over virtio-fs
/// (emptyDir on disk, hostPath; with whether every mount of it is
/// read-only, so the host serves it read-only), and those made in guest
/// memory (emptyDir `medium: Memory`, configMap, secret: the host sends
/// their files, so secret bytes never reach the host's disk). Volumes no
/// container mounts are left out.
fn split_volumes(
    plan: &PodPlan,
) -> (
    Vec<(crate::pod::VolumePlan, bool)>,
    Vec<husk_protocol::VolumeRequest>,
) {
    use crate::pod::VolumeSource as S;
    let files = crate::volume::protocol_files;
    let (mut host, mut guest) = (Vec::new(), Vec::new());
    for v in &plan.volumes {
        let mounts: Vec<_> = plan
            .all_containers()
            .flat_map(|c| &c.mounts)
            .filter(|m| m.volume == v.name)
            .collect();
        if mounts.is_empty() {
            continue;
        }
        let source = match &v.source {
            S::EmptyDir { memory: false, .. } | S::HostPath { .. } => {
                host.push((v.clone(), mounts.iter().all(|m| m.read_only)));
                continue;
            }
            S::EmptyDir {
                memory: true,
                size_limit,
            } => husk_protocol::VolumeSource::Tmpfs {
                size: *size_limit,
                mode: 0o777,
                files: vec![],
                read_only: false,
                atomic: false,
            },
            S::ConfigMap { files: f, .. } | S::Secret { files: f, .. } => {
                husk_protocol::VolumeSource::Tmpfs {
                    size: Some(husk_protocol::projected::tmpfs_size(
                        f.iter().map(|f| f.data.len()),
                    )),
                    mode: 0o755,
                    files: files(f),
                    // Containers mount it read-only; the tmpfs itself
                    // stays writable for updates.
                    read_only: false,
                    atomic: true,
                }
            }
        };
        guest.push(husk_protocol::VolumeRequest {
            name: v.name.clone(),
            source,
        });
    }
    (host, guest)
}

fn vm_err(e: VmPodError) -> SandboxError {
    SandboxError::Vm(e)
}

fn release(res: &mut Resources, paths: &PodPaths) {
    // The hypervisor goes first: it holds the tap inside the netns, and
    // the virtio-fs connections.
    res.vm = None;
    // Free for another pod only once its hypervisor is gone.
    res.identity = None;
    res.shares = None;
    res.cri_share = None;
    if let Some(mut v) = res.volumes.take() {
        v.teardown();
    }
    if let Some(mut net) = res.network.take() {
        if let Err(e) = net.teardown() {
            tracing::warn!("{e}");
        }
    }
    let _ = std::fs::remove_dir_all(paths.run.join("vm-files"));
}

impl Sandbox for VmSandbox {
    fn runtime_class(&self) -> &'static str {
        crate::pod::manifest::RUNTIME_VM
    }

    fn plan(&self) -> &PodPlan {
        &self.plan
    }

    fn status(&self) -> PodStatus {
        self.status.get()
    }

    fn update_volume(&self, volume: &str, files: &[crate::pod::VolumeFile]) -> Result<(), String> {
        use crate::pod::VolumeSource as S;
        let v = self
            .plan
            .volumes
            .iter()
            .find(|v| v.name == volume)
            .ok_or_else(|| format!("pod {} has no volume {volume:?}", self.plan.name))?;
        if !matches!(v.source, S::ConfigMap { .. } | S::Secret { .. }) {
            return Err(format!(
                "volume {volume:?} is not a configMap or secret volume"
            ));
        }
        self.agent
            .update_files(volume, crate::volume::protocol_files(files))
            .map_err(|e| format!("volume {volume:?}: {e}"))
    }

    fn exec_interactive(
        &self,
        container: Option<&str>,
        spec: crate::ExecSpec,
    ) -> Result<crate::ExecSession, crate::Failure> {
        let proc = self.start_exec(container, spec, true)?;
        let resize = proc.resizer();
        let resize: crate::Resizer = Box::new(move |size| resize(size).map_err(|e| e.to_string()));
        let signaller = proc.signaller();
        let kill: crate::Killer = Box::new(move || {
            let _ = signaller.signal(libc::SIGKILL);
        });
        let write = proc.stdin_writer();
        let stdin: crate::StdinWriter =
            Box::new(move |data: &[u8], eof: bool| write(data, eof).map_err(|e| e.to_string()));
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || loop {
            let msg = match proc.next_event(Duration::from_secs(24 * 3600)) {
                Ok(Event::Output { stream, data, .. }) => match stream {
                    husk_protocol::Stream::Stdout => crate::ExecMsg::Stdout { data },
                    husk_protocol::Stream::Stderr => crate::ExecMsg::Stderr { data },
                },
                Ok(Event::Exited { code, signal, .. }) => crate::ExecMsg::Exit {
                    code: code.unwrap_or_else(|| 128 + signal.unwrap_or(libc::SIGKILL)),
                },
                Ok(Event::Error { message, .. }) => crate::ExecMsg::Error { message },
                Ok(other) => crate::ExecMsg::Error {
                    message: format!("unexpected {other:?}"),
                },
                Err(e) => crate::ExecMsg::Error {
                    message: e.to_string(),
                },
            };
            let last = matches!(
                msg,
                crate::ExecMsg::Exit { .. } | crate::ExecMsg::Error { .. }
            );
            if tx.send(msg).is_err() {
                // Nobody listens any more: end the command.
                let _ = proc.signal(libc::SIGKILL);
                return;
            }
            if last {
                return;
            }
        });
        Ok(crate::ExecSession {
            output: rx,
            stdin,
            resize,
            kill,
        })
    }

    fn exec(
        &self,
        container: Option<&str>,
        argv: Vec<String>,
        timeout: Duration,
    ) -> Result<crate::ExecOutput, crate::Failure> {
        let proc = self.start_exec(
            container,
            crate::ExecSpec {
                argv,
                ..Default::default()
            },
            false,
        )?;
        let killer = proc.signaller();
        match proc.wait(timeout) {
            Ok(f) => Ok(crate::ExecOutput {
                exit_code: f
                    .code
                    .unwrap_or_else(|| 128 + f.signal.unwrap_or(libc::SIGKILL)),
                stdout: f.stdout,
                stderr: f.stderr,
            }),
            Err(super::agent::AgentError::Timeout(_)) => {
                // Killed and reaped before the answer: a caller that looks
                // for the process next does not find it.
                let _ = killer.signal(libc::SIGKILL);
                let _ = proc.wait(Duration::from_secs(10));
                Err(crate::Failure::new(
                    crate::Code::DeadlineExceeded,
                    format!("exec timed out after {} s", timeout.as_secs()),
                ))
            }
            Err(e) => Err(e.to_string().into()),
        }
    }

    fn update(
        &self,
        container: Option<&str>,
        memory_bytes: Option<u64>,
        cpu_millis: Option<u64>,
    ) -> Result<(), crate::Failure> {
        let (c, running) = self.container(container)?;
        let c = &*c;
        let mut limits = self.limits_of(c);
        if memory_bytes.is_some() {
            limits.memory_max = memory_bytes;
        }
        if cpu_millis.is_some() {
            limits.cpu_max_millis = cpu_millis;
        }
        // The VM's memory was sized at boot; it cannot grow.
        if let Some(m) = limits.memory_max {
            let others: u64 = self
                .plan
                .containers
                .iter()
                .filter(|o| o.name != c.name)
                .filter_map(|o| self.limits_of(o).memory_max)
                .sum();
            // The guest's memory, sized from the plan at boot.
            let vm_mib = pod_vm_size(&self.plan, &self.config.vm).0;
            let room = u64::from(vm_mib) << 20;
            if m + others > room {
                return Err(format!(
                    "a memory limit of {m} bytes does not fit the pod's VM ({} MiB, sized at start); stop the pod and run it with the new limit",
                    vm_mib
                ).into());
            }
        }
        if let Some(id) = running {
            self.agent
                .update(&id, limits.clone())
                .map_err(|e| e.to_string())?;
        }
        self.limits
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(c.name.clone(), limits);
        Ok(())
    }

    fn stats(&self) -> Result<crate::PodStats, crate::Failure> {
        let s = self.agent.stats().map_err(|e| e.to_string())?;
        Ok(crate::PodStats {
            containers: s
                .containers
                .into_iter()
                // Execs have no cgroup of their own; a container's id is
                // `<name>.<restart>`.
                .filter_map(|c| {
                    let name = if self.plan.cri {
                        self.cri_plan(&c.id).map(|_| c.id.clone())?
                    } else {
                        c.id.rsplit_once('.')?.0.to_owned()
                    };
                    Some(crate::ContainerUsage {
                        name,
                        cpu_usage_usec: c.cpu_usage_usec,
                        memory_bytes: c.memory_bytes,
                        memory_limit_bytes: c.memory_limit_bytes,
                        pids: c.pids,
                    })
                })
                .collect(),
            vm: Some(crate::VmUsage {
                cpu_usage_usec: s.cpu_usage_usec,
                memory_total_bytes: s.memory_total_bytes,
                memory_available_bytes: s.memory_available_bytes,
            }),
        })
    }

    fn create_container(
        &self,
        container: ContainerPlan,
        volumes: Vec<crate::pod::VolumePlan>,
        meta: crate::state::CriMeta,
    ) -> Result<String, crate::Failure> {
        self.cri_create(container, volumes, meta)
    }

    fn start_container(&self, id: &str) -> Result<(), crate::Failure> {
        self.me
            .upgrade()
            .ok_or_else(|| "the sandbox is going away".to_owned())?
            .cri_start(id)
    }

    fn stop_container(&self, id: &str, timeout: Duration) -> Result<(), crate::Failure> {
        self.cri_stop(id, timeout)
    }

    fn remove_container(&self, id: &str) -> Result<(), crate::Failure> {
        self.cri_remove(id)
    }

    fn reopen_log(&self, id: &str) -> Result<(), crate::Failure> {
        self.cri_reopen_log(id)
    }

    fn attach(&self, id: &str) -> Result<crate::ExecSession, crate::Failure> {
        if self.plan.cri {
            return self.cri_attach(id);
        }
        let c = crate::attach::running_container(&self.plan, &self.status.get(), id)?;
        Ok(self.hubs.get(id).attach(id, c.stdin, c.stdin_once))
    }

    fn request_stop(&self, grace: Duration) {
        if !self.stop.requested.swap(true, Ordering::SeqCst) {
            *self.stop.deadline.lock().unwrap_or_else(|p| p.into_inner()) =
                Some(Instant::now() + grace);
        }
        let running: Vec<Signaller> = self
            .stop
            .running
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .cloned()
            .collect();
        for s in running {
            let _ = s.signal(if grace.is_zero() {
                libc::SIGKILL
            } else {
                libc::SIGTERM
            });
        }
    }
}
