//! husk's host configuration (`/etc/husk/config.toml`, or `config.toml` in
//! `--root`): networking, restart back-off and registries. Every key is
//! optional.

use serde::Deserialize;
use std::path::{Path, PathBuf};

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HuskConfig {
    pub network: NetworkConfig,
    pub restart: RestartConfig,
    pub registry: RegistryConfig,
    pub vm: VmConfig,
    pub logs: LogsConfig,
}

/// Container logs of pods husk runs itself (`husk run`); under CRI the
/// kubelet rotates them (ReopenContainerLog) and these do not apply.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogsConfig {
    /// Size at which a container's log is rotated (a quantity: `10Mi`,
    /// the kubelet's containerLogMaxSize default; `0` never rotates).
    pub container_log_max_size: String,
    /// Files kept per container instance, the current one included (≥ 2).
    pub container_log_max_files: u32,
}

impl Default for LogsConfig {
    fn default() -> Self {
        Self {
            container_log_max_size: "10Mi".into(),
            container_log_max_files: 5,
        }
    }
}

impl LogsConfig {
    /// Checks the values (at load, so a bad one is a clear error).
    fn check(&self) -> Result<(), String> {
        crate::pod::quantity::parse_bytes(&self.container_log_max_size)
            .map_err(|e| format!("logs.container_log_max_size: {e}"))?;
        if self.container_log_max_files < 2 {
            return Err(format!(
                "logs.container_log_max_files: {} is too few; at least 2 (the current file and one rotated)",
                self.container_log_max_files
            ));
        }
        Ok(())
    }

    /// The rotation these settings ask for (None: `0`, never rotate).
    pub fn rotation(&self) -> Option<crate::cri_log::LogRotation> {
        let max_size = crate::pod::quantity::parse_bytes(&self.container_log_max_size).ok()?;
        (max_size > 0).then_some(crate::cri_log::LogRotation {
            max_size,
            max_files: self.container_log_max_files.max(2),
        })
    }
}

/// VM pods (`runtimeClassName: husk-vm`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct VmConfig {
    /// `auto` (the probe decides), `qemu-tcg`, `qemu-kvm` or `husk-vmm`.
    pub hypervisor: String,
    /// The guest kernel (a bzImage). Default: kernel B from images/build.sh.
    pub kernel: Option<PathBuf>,
    /// Kernel modules (and `modules.load`) for the initramfs, for a kernel
    /// whose virtio drivers are modules (kernel A).
    pub modules: Option<PathBuf>,
    /// Whether the kernel finds its devices through ACPI (kernel A).
    pub acpi: bool,
    /// The static husk-agent. Default: `husk-agent` next to the husk binary.
    pub agent: Option<PathBuf>,
    pub mem_mib: u32,
    pub vcpus: u32,
    /// The virtio-fs daemon for volumes under QEMU. Default: QEMU's
    /// `/usr/lib/qemu/virtiofsd`.
    pub virtiofsd: Option<PathBuf>,
    /// The husk-vmm binary. Default: `husk-vmm` next to the husk binary,
    /// else from PATH.
    pub husk_vmm: Option<PathBuf>,
    /// How long a VM pod's guest has to boot to its agent (seconds).
    pub boot_timeout_secs: u64,
}

impl Default for VmConfig {
    fn default() -> Self {
        Self {
            hypervisor: "auto".into(),
            kernel: None,
            modules: None,
            acpi: false,
            agent: None,
            mem_mib: 256,
            vcpus: 1,
            virtiofsd: None,
            husk_vmm: None,
            boot_timeout_secs: 120,
        }
    }
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RegistryConfig {
    /// Registries reached over plain HTTP (`host:port`); loopback registries
    /// always are.
    pub insecure: Vec<String>,
    /// Registry host → mirror URL, e.g. `"registry.k8s.io" =
    /// "http://127.0.0.1:5000"`: content is fetched from the mirror.
    pub mirrors: std::collections::BTreeMap<String, String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct NetworkConfig {
    /// Where CNI conflists are looked for (the first `*.conflist` wins, as
    /// in containerd). When none is there, husk writes its own default.
    pub cni_conf_dir: PathBuf,
    /// Where CNI plugin binaries are looked for, in order.
    pub cni_bin_dirs: Vec<PathBuf>,
    /// Bridge of husk's default network.
    pub bridge: String,
    /// Pod CIDR of husk's default network.
    pub subnet: String,
    /// An IPv6 pod CIDR that makes husk's default network dual-stack
    /// (every pod gets an address of each family), e.g. `fd00:88::/64`.
    pub subnet6: Option<String>,
    /// Name of husk's default network.
    pub name: String,
}

impl Default for NetworkConfig {
    fn default() -> Self {
        Self {
            cni_conf_dir: PathBuf::from("/etc/cni/net.d"),
            cni_bin_dirs: vec![PathBuf::from("/usr/lib/cni"), PathBuf::from("/opt/cni/bin")],
            bridge: "husk0".into(),
            subnet: "10.88.0.0/16".into(),
            subnet6: None,
            name: "husk".into(),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RestartConfig {
    /// First back-off delay in milliseconds (kubelet: 10 s).
    pub backoff_initial_ms: u64,
    /// Cap of the back-off in milliseconds (kubelet: 5 min).
    pub backoff_max_ms: u64,
}

impl Default for RestartConfig {
    fn default() -> Self {
        Self {
            backoff_initial_ms: 10_000,
            backoff_max_ms: 300_000,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {msg}; see the configuration section of husk's README")]
    Parse { path: PathBuf, msg: String },
}

impl HuskConfig {
    /// Loads `path`; a missing file means all defaults.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        match std::fs::read_to_string(path) {
            Ok(text) => {
                let c: Self = toml::from_str(&text).map_err(|e| ConfigError::Parse {
                    path: path.to_owned(),
                    msg: e.to_string(),
                })?;
                c.logs.check().map_err(|msg| ConfigError::Parse {
                    path: path.to_owned(),
                    msg,
                })?;
                Ok(c)
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Self::default()),
            Err(source) => Err(ConfigError::Read {
                path: path.to_owned(),
                source,
            }),
        }
    }
}
