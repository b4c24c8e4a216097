//! The probe-boot behind `[vm] hypervisor = "auto"` on a host whose KVM is
//! not kvm-pvm: husk-vmm boots the real guest kernel with the real agent,
//! and the probe passes only when the agent answers over vsock, mounts a
//! virtio-fs share husk-vmm serves, and powers the VM off cleanly. (A
//! guest that only does port I/O would pass on PVM, where Linux fails, so
//! the probe runs what a pod runs.) The answer is cached in the state
//! directory, keyed by the husk-vmm, kernel and agent files it was made
//! with; a changed file probes again.

use super::husk_vmm::{FsShare, HuskVmmConfig, HuskVmmVm};
use super::hypervisor::Vm;
use crate::config::VmConfig;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// The cache file in the state (lib) directory.
pub const CACHE: &str = "hypervisor-probe.json";
const TAG: &str = "probe";

/// What the probe found: whether husk-vmm ran the guest, why not, and
/// whether this answer came from the cache.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Probe {
    pub ok: bool,
    pub detail: String,
    pub cached: bool,
}

/// Identifies the files a probe was made with: path, size, mtime.
fn key(files: &[&Path]) -> serde_json::Value {
    files
        .iter()
        .map(|p| {
            let m = std::fs::metadata(p).ok();
            serde_json::json!({
                "path": p,
                "size": m.as_ref().map(|m| m.len()),
                "mtime": m.and_then(|m| m.modified().ok())
                    .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
                    .map(|d| d.as_nanos().to_string()),
            })
        })
        .collect()
}

/// The probe's answer for this host, from `lib`'s cache or by booting.
pub fn husk_vmm(config: &VmConfig, lib: &Path) -> Probe {
    let binary = config
        .husk_vmm
        .clone()
        .unwrap_or_else(super::husk_vmm::default_binary);
    let (kernel, agent) = match super::sandbox::guest_files(config) {
        Ok(f) => f,
        Err(e) => {
            return Probe {
                ok: false,
                detail: e.to_string(),
                cached: false,
            }
        }
    };
    let key = key(&[&binary, &kernel, &agent]);
    let cache = lib.join(CACHE);
    // Pods that start together probe once: the others wait here, then
    // find the answer in the cache.
    let _ = std::fs::create_dir_all(lib);
    let lock = std::fs::File::create(lib.join(format!("{CACHE}.lock")));
    if let Ok(l) = &lock {
        use std::os::fd::AsRawFd;
        // SAFETY: flock on a descriptor we hold; released when it closes.
        unsafe { libc::flock(l.as_raw_fd(), libc::LOCK_EX) };
    }
    if let Some(v) = std::fs::read(&cache)
        .ok()
        .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
    {
        if v["key"] == key {
            return Probe {
                ok: v["ok"].as_bool().unwrap_or(false),
                detail: v["detail"].as_str().unwrap_or_default().to_owned(),
                cached: true,
            };
        }
    }
    let started = std::time::Instant::now();
    let (ok, detail) = match boot(config, &binary, &kernel, &agent, lib) {
        Ok(()) => (
            true,
            format!(
                "husk-vmm booted the guest kernel to its agent, which mounted a virtio-fs share, in {:.2} s",
                started.elapsed().as_secs_f64()
            ),
        ),
        Err(e) => (false, format!("husk-vmm's probe-boot failed: {e}")),
    };
    let _ = std::fs::write(
        &cache,
        serde_json::json!({"key": key, "ok": ok, "detail": detail}).to_string(),
    );
    Probe {
        ok,
        detail,
        cached: false,
    }
}

/// A directory removed on drop.
struct TempDir(PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn boot(
    config: &VmConfig,
    binary: &Path,
    kernel: &Path,
    agent: &Path,
    lib: &Path,
) -> Result<(), String> {
    if config.acpi {
        return Err("the kernel finds its devices through ACPI ([vm] acpi = true), and husk-vmm announces them on the command line".into());
    }
    let dir = TempDir(lib.join(format!("probe-boot.{}", std::process::id())));
    let _ = std::fs::remove_dir_all(&dir.0);
    let share = dir.0.join("share");
    std::fs::create_dir_all(&share).map_err(|e| format!("{}: {e}", share.display()))?;
    let initrd = dir.0.join("initramfs.cpio");
    super::sandbox::write_agent_initramfs(agent, config.modules.as_deref(), &initrd)?;
    let mut vm = HuskVmmVm::start(
        &HuskVmmConfig {
            binary: binary.to_owned(),
            kernel: kernel.to_owned(),
            initrd,
            cmdline: String::new(),
            mem_mib: config.mem_mib,
            vcpus: 1,
            disks: Vec::new(),
            shares: vec![FsShare {
                tag: TAG.into(),
                path: share,
                read_only: true,
                xattr: false,
            }],
        },
        &dir.0.join("vm"),
        None,
    )
    .map_err(|e| e.to_string())?;
    let timeout = Duration::from_secs(config.boot_timeout_secs.min(30));
    let agent = vm.agent(timeout).map_err(|e| e.to_string())?;
    agent
        .add_volumes(vec![husk_protocol::VolumeRequest {
            name: TAG.into(),
            source: husk_protocol::VolumeSource::VirtioFs {
                tag: TAG.into(),
                read_only: true,
            },
        }])
        .map_err(|e| format!("mounting a virtio-fs share: {e}"))?;
    agent.shutdown().map_err(|e| format!("shutdown: {e}"))?;
    drop(agent);
    if !vm.wait(Duration::from_secs(10)) {
        return Err("the VM did not power off after the agent's shutdown".into());
    }
    Ok(())
}
