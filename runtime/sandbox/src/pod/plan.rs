//! The validated pod: what the monitor executes. Every reference is resolved
//! (image paths are absolute, env values from configMaps and secrets are
//! filled in, quantities are numbers), so nothing here can fail to parse
//! later. Secret material is marked so that [`PodPlan::redacted`] can strip it
//! before anything is written to disk.

use super::spec::RestartPolicy;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::PathBuf;

pub const DEFAULT_GRACE_PERIOD_SECS: u64 = 30;

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PodPlan {
    pub name: String,
    pub namespace: String,
    pub uid: String,
    pub labels: BTreeMap<String, String>,
    pub annotations: BTreeMap<String, String>,
    pub runtime_class: String,
    pub restart_policy: RestartPolicy,
    pub grace_period_secs: u64,
    pub init_containers: Vec<ContainerPlan>,
    pub containers: Vec<ContainerPlan>,
    pub volumes: Vec<VolumePlan>,
    /// Pod-level CPU quota: the sum of the containers' limits when every
    /// container has one (as the kubelet sizes a pod cgroup).
    pub cpu_limit_millis: Option<u64>,
    /// Where the manifest came from, if from a file.
    pub source: Option<PathBuf>,
    /// The pod's host name (spec.hostname, else its name).
    #[serde(default)]
    pub hostname: String,
    /// What goes into the containers' /etc/resolv.conf.
    #[serde(default)]
    pub dns: DnsPlan,
    /// Extra /etc/hosts entries (spec.hostAliases): IP and names.
    #[serde(default)]
    pub host_aliases: Vec<(String, Vec<String>)>,
    /// A CRI pod sandbox (huskd): it starts without containers and stays
    /// up, containers coming and going, until it is stopped.
    #[serde(default)]
    pub cri: bool,
    /// The sandbox's own port mappings (CRI's PodSandboxConfig), beside
    /// the containers' hostPorts.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub port_mappings: Vec<PortPlan>,
    /// Kernel parameters for the pod (securityContext.sysctls), checked
    /// names: any for a VM pod (its kernel is its own), `net.*` for a wasm
    /// pod (its network namespace).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub sysctls: Vec<(String, String)>,
    /// A CRI sandbox's `linux.resources` (the kubelet's sum of its
    /// containers' limits): memory in bytes and CPU in millicores. A VM
    /// sandbox is sized from them at boot, before any container exists.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sandbox_limits: Option<(Option<u64>, Option<u64>)>,
}

/// A container's user and privileges: securityContext over the pod's over
/// the image's `User`, as the kubelet merges them.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct SecurityPlan {
    /// `user`, `uid`, `user:group` or `uid:gid`; resolved against the
    /// container's /etc/passwd and /etc/group when it names them. None:
    /// root.
    pub user: Option<String>,
    pub supplemental_groups: Vec<u32>,
    /// supplementalGroupsPolicy Strict: not the image's groups for the user.
    #[serde(default)]
    pub strict_groups: bool,
    /// Refuse to start as uid 0 (or as a user name that cannot be checked).
    pub run_as_non_root: bool,
    pub read_only_root: bool,
    /// no_new_privs (allowPrivilegeEscalation: false).
    pub no_new_privs: bool,
    /// Capabilities beyond the default set (upper-case, without `CAP_`).
    pub cap_add: Vec<String>,
    /// Capabilities taken away (`ALL` takes every one).
    pub cap_drop: Vec<String>,
    /// Paths made unreadable in the container (CRI's masked_paths: the
    /// kubelet's defaults hide /proc/kcore and the like).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub masked_paths: Vec<String>,
    /// Paths made read-only in the container (CRI's readonly_paths).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub readonly_paths: Vec<String>,
    /// The seccomp filter; None: unconfined (Kubernetes' default).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seccomp: Option<super::seccomp::SeccompPlan>,
    /// Join the pod's shared PID namespace (shareProcessNamespace).
    #[serde(default)]
    pub share_pid: bool,
}

impl SecurityPlan {
    /// The capabilities the container keeps: the default set less `drop`,
    /// plus `add` (`ALL` in either means every one).
    pub fn capabilities(&self) -> Vec<String> {
        use husk_protocol::{CAPABILITIES, DEFAULT_CAPABILITIES};
        let mut caps: Vec<String> = if self.cap_drop.iter().any(|c| c == "ALL") {
            Vec::new()
        } else {
            DEFAULT_CAPABILITIES
                .iter()
                .filter(|c| !self.cap_drop.iter().any(|d| d == *c))
                .map(|c| c.to_string())
                .collect()
        };
        if self.cap_add.iter().any(|c| c == "ALL") {
            caps = CAPABILITIES.iter().map(|c| c.to_string()).collect();
        } else {
            for c in &self.cap_add {
                if !caps.contains(c) {
                    caps.push(c.clone());
                }
            }
        }
        caps
    }
}

/// spec.dnsPolicy and spec.dnsConfig, checked.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct DnsPlan {
    /// `None`: only `nameservers`/`searches`/`options` below; otherwise
    /// the host's resolv.conf first (husk runs no cluster DNS, so
    /// ClusterFirst falls back to it, as the kubelet does without one).
    pub policy_none: bool,
    pub nameservers: Vec<String>,
    pub searches: Vec<String>,
    /// `name` or `name:value`.
    pub options: Vec<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ContainerPlan {
    pub name: String,
    /// The image as written in the manifest.
    pub image_ref: String,
    /// The resolved guest file.
    pub image: PathBuf,
    pub guest_kind: String,
    pub argv: Vec<String>,
    pub env: Vec<EnvEntry>,
    pub working_dir: Option<String>,
    pub mounts: Vec<MountPlan>,
    pub ports: Vec<PortPlan>,
    pub memory_limit: Option<u64>,
    pub cpu_limit_millis: Option<u64>,
    /// Who the container runs as and with what privileges (VM pods).
    #[serde(default)]
    pub security: SecurityPlan,
    /// The image config's `User` (Linux images).
    #[serde(default)]
    pub image_user: Option<String>,
    /// A Linux image's unpacked layers, lowest first (VM pods).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub layers: Vec<PathBuf>,
    /// Where each layer's file-system image is kept (VM pods), kept by the
    /// image store beside the layer and removed with it.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub layer_images: Vec<PathBuf>,
    /// `stdin`: its stdin stays open for attach (`stdinOnce`: until the
    /// first attach leaves).
    #[serde(default)]
    pub stdin: bool,
    #[serde(default)]
    pub stdin_once: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct EnvEntry {
    pub name: String,
    pub value: String,
    /// True when the value came from a Secret.
    #[serde(default)]
    pub secret: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct MountPlan {
    pub volume: String,
    pub mount_path: String,
    pub read_only: bool,
    pub sub_path: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PortPlan {
    pub name: Option<String>,
    pub container_port: u16,
    pub host_port: Option<u16>,
    pub protocol: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct VolumePlan {
    pub name: String,
    pub source: VolumeSource,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", tag = "type")]
pub enum VolumeSource {
    EmptyDir {
        memory: bool,
        size_limit: Option<u64>,
    },
    HostPath {
        path: PathBuf,
        create: bool,
        /// `type: File` / `FileOrCreate`: a single file.
        #[serde(default)]
        file: bool,
    },
    ConfigMap {
        name: String,
        files: Vec<VolumeFile>,
        #[serde(default)]
        projection: Projection,
    },
    Secret {
        name: String,
        files: Vec<VolumeFile>,
        #[serde(default)]
        projection: Projection,
    },
}

/// How a configMap or secret volume maps its object's keys to files (kept
/// so that an update of the object can be projected again).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Projection {
    #[serde(default)]
    pub items: Vec<ProjectedKey>,
    #[serde(default)]
    pub default_mode: Option<u32>,
    #[serde(default)]
    pub optional: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ProjectedKey {
    pub key: String,
    pub path: String,
    #[serde(default)]
    pub mode: Option<u32>,
}

impl Projection {
    pub fn new(
        items: &[super::spec::KeyToPath],
        default_mode: Option<u32>,
        optional: bool,
    ) -> Self {
        Projection {
            items: items
                .iter()
                .map(|k| ProjectedKey {
                    key: k.key.clone(),
                    path: k.path.clone(),
                    mode: k.mode,
                })
                .collect(),
            default_mode,
            optional,
        }
    }
}

impl VolumeSource {
    /// configMap and secret volumes are always mounted read-only.
    pub fn forced_read_only(&self) -> bool {
        matches!(
            self,
            VolumeSource::ConfigMap { .. } | VolumeSource::Secret { .. }
        )
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct VolumeFile {
    /// Relative path inside the volume.
    pub path: String,
    pub data: Vec<u8>,
    pub mode: u32,
}

impl PodPlan {
    /// The pod's host name (its name for plans saved before there was one).
    pub fn hostname(&self) -> &str {
        if self.hostname.is_empty() {
            &self.name
        } else {
            &self.hostname
        }
    }

    /// A copy without secret material, safe to write to disk and to show.
    pub fn redacted(&self) -> PodPlan {
        let mut p = self.clone();
        for c in p.init_containers.iter_mut().chain(p.containers.iter_mut()) {
            for e in &mut c.env {
                if e.secret {
                    e.value = "<redacted>".into();
                }
            }
        }
        for v in &mut p.volumes {
            if let VolumeSource::Secret { files, .. } = &mut v.source {
                for f in files {
                    f.data.clear();
                }
            }
        }
        p
    }

    /// Replaces the files of configMap or secret volume `name` (after
    /// `husk apply`); a secret's keep their paths and modes only, as in
    /// [`redacted`](Self::redacted).
    pub fn set_volume_files(&mut self, name: &str, new: Vec<VolumeFile>) {
        for v in self.volumes.iter_mut().filter(|v| v.name == name) {
            match &mut v.source {
                VolumeSource::ConfigMap { files, .. } => *files = new.clone(),
                VolumeSource::Secret { files, .. } => {
                    *files = new.clone();
                    files.iter_mut().for_each(|f| f.data.clear());
                }
                _ => {}
            }
        }
    }

    pub fn all_containers(&self) -> impl Iterator<Item = &ContainerPlan> {
        self.init_containers.iter().chain(self.containers.iter())
    }

    pub fn volume(&self, name: &str) -> Option<&VolumePlan> {
        self.volumes.iter().find(|v| v.name == name)
    }

    pub fn host_ports(&self) -> Vec<(u16, u16, String)> {
        self.containers
            .iter()
            .flat_map(|c| c.ports.iter())
            .chain(self.port_mappings.iter())
            .filter_map(|p| {
                p.host_port
                    .map(|h| (h, p.container_port, p.protocol.to_lowercase()))
            })
            .collect()
    }
}
