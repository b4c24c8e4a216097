//! The Kubernetes API objects husk reads (`v1/Pod`, `v1/ConfigMap`,
//! `v1/Secret`), as serde types that mirror the API field names. Only
//! deserialization lives here; meaning and validation are in `manifest`.

use serde::{Deserialize, Deserializer};
use std::collections::BTreeMap;

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ObjectMeta {
    pub name: Option<String>,
    pub namespace: Option<String>,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    #[serde(default)]
    pub annotations: BTreeMap<String, String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Pod {
    #[serde(default)]
    pub metadata: ObjectMeta,
    pub spec: PodSpec,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PodSpec {
    pub runtime_class_name: Option<String>,
    pub restart_policy: Option<RestartPolicy>,
    pub termination_grace_period_seconds: Option<u64>,
    #[serde(default)]
    pub init_containers: Vec<Container>,
    #[serde(default)]
    pub containers: Vec<Container>,
    #[serde(default)]
    pub volumes: Vec<Volume>,
    /// The pod's host name (default: its name).
    pub hostname: Option<String>,
    pub dns_policy: Option<String>,
    pub dns_config: Option<DnsConfig>,
    #[serde(default)]
    pub host_aliases: Vec<HostAlias>,
    #[serde(default)]
    pub security_context: PodSecurityContext,
    /// One PID namespace for all the pod's containers.
    pub share_process_namespace: Option<bool>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PodSecurityContext {
    pub run_as_user: Option<i64>,
    pub run_as_group: Option<i64>,
    pub run_as_non_root: Option<bool>,
    #[serde(default)]
    pub supplemental_groups: Vec<i64>,
    #[serde(default)]
    pub sysctls: Vec<Sysctl>,
    pub seccomp_profile: Option<SeccompProfile>,
    /// Merge (the default) or Strict.
    pub supplemental_groups_policy: Option<String>,
}

#[derive(Debug, Clone, Default, Deserialize)]
pub struct Sysctl {
    pub name: String,
    pub value: String,
}

/// securityContext.seccompProfile.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SeccompProfile {
    /// RuntimeDefault, Unconfined or Localhost.
    #[serde(rename = "type")]
    pub kind: String,
    /// With Localhost: a path relative to the kubelet's seccomp directory.
    pub localhost_profile: Option<String>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SecurityContext {
    pub run_as_user: Option<i64>,
    pub run_as_group: Option<i64>,
    pub run_as_non_root: Option<bool>,
    pub read_only_root_filesystem: Option<bool>,
    pub allow_privilege_escalation: Option<bool>,
    pub privileged: Option<bool>,
    #[serde(default)]
    pub capabilities: Capabilities,
    pub seccomp_profile: Option<SeccompProfile>,
}

#[derive(Debug, Clone, Default, Deserialize)]
pub struct Capabilities {
    #[serde(default)]
    pub add: Vec<String>,
    #[serde(default)]
    pub drop: Vec<String>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DnsConfig {
    #[serde(default)]
    pub nameservers: Vec<String>,
    #[serde(default)]
    pub searches: Vec<String>,
    #[serde(default)]
    pub options: Vec<DnsOption>,
}

#[derive(Debug, Clone, Default, Deserialize)]
pub struct DnsOption {
    pub name: String,
    pub value: Option<String>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct HostAlias {
    pub ip: String,
    #[serde(default)]
    pub hostnames: Vec<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, serde::Serialize)]
pub enum RestartPolicy {
    Always,
    OnFailure,
    Never,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Container {
    #[serde(default)]
    pub name: String,
    #[serde(default)]
    pub image: String,
    #[serde(default)]
    pub command: Vec<String>,
    #[serde(default)]
    pub args: Vec<String>,
    #[serde(default)]
    pub env: Vec<EnvVar>,
    #[serde(default)]
    pub env_from: Vec<EnvFromSource>,
    pub working_dir: Option<String>,
    #[serde(default)]
    pub volume_mounts: Vec<VolumeMount>,
    #[serde(default)]
    pub ports: Vec<ContainerPort>,
    #[serde(default)]
    pub resources: Resources,
    pub security_context: Option<SecurityContext>,
    /// Keep the container's stdin open for `husk attach -i`.
    #[serde(default)]
    pub stdin: bool,
    /// Close that stdin when the first attach leaves.
    #[serde(default)]
    pub stdin_once: bool,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct EnvVar {
    pub name: String,
    pub value: Option<String>,
    pub value_from: Option<EnvVarSource>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct EnvVarSource {
    pub config_map_key_ref: Option<KeyRef>,
    pub secret_key_ref: Option<KeyRef>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct KeyRef {
    pub name: String,
    pub key: String,
    #[serde(default)]
    pub optional: bool,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct EnvFromSource {
    #[serde(default)]
    pub prefix: String,
    pub config_map_ref: Option<NameRef>,
    pub secret_ref: Option<NameRef>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct NameRef {
    pub name: String,
    #[serde(default)]
    pub optional: bool,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct VolumeMount {
    pub name: String,
    pub mount_path: String,
    #[serde(default)]
    pub read_only: bool,
    #[serde(default)]
    pub sub_path: String,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ContainerPort {
    pub name: Option<String>,
    pub container_port: u16,
    pub host_port: Option<u16>,
    pub protocol: Option<String>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Resources {
    #[serde(default)]
    pub limits: BTreeMap<String, Quantity>,
    #[serde(default)]
    pub requests: BTreeMap<String, Quantity>,
}

/// A quantity as written: YAML allows `cpu: 1` as well as `cpu: "500m"`.
#[derive(Debug, Clone)]
pub struct Quantity(pub String);

impl<'de> Deserialize<'de> for Quantity {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            S(String),
            U(u64),
            F(f64),
        }
        Ok(Quantity(match Raw::deserialize(d)? {
            Raw::S(s) => s,
            Raw::U(u) => u.to_string(),
            Raw::F(f) => f.to_string(),
        }))
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Volume {
    pub name: String,
    pub empty_dir: Option<EmptyDirSource>,
    pub host_path: Option<HostPathSource>,
    pub config_map: Option<ConfigMapSource>,
    pub secret: Option<SecretSource>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct EmptyDirSource {
    #[serde(default)]
    pub medium: String,
    pub size_limit: Option<Quantity>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct HostPathSource {
    pub path: String,
    #[serde(rename = "type", default)]
    pub kind: String,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ConfigMapSource {
    pub name: String,
    #[serde(default)]
    pub items: Vec<KeyToPath>,
    #[serde(default, deserialize_with = "file_mode")]
    pub default_mode: Option<u32>,
    #[serde(default)]
    pub optional: bool,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SecretSource {
    pub secret_name: String,
    #[serde(default)]
    pub items: Vec<KeyToPath>,
    #[serde(default, deserialize_with = "file_mode")]
    pub default_mode: Option<u32>,
    #[serde(default)]
    pub optional: bool,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct KeyToPath {
    pub key: String,
    pub path: String,
    #[serde(default, deserialize_with = "file_mode")]
    pub mode: Option<u32>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ConfigMap {
    #[serde(default)]
    pub metadata: ObjectMeta,
    #[serde(default)]
    pub data: BTreeMap<String, String>,
    #[serde(default)]
    pub binary_data: BTreeMap<String, String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Secret {
    #[serde(default)]
    pub metadata: ObjectMeta,
    #[serde(default)]
    pub data: BTreeMap<String, String>,
    #[serde(default)]
    pub string_data: BTreeMap<String, String>,
}

/// A file mode as kubectl reads it: a number (`256`), or YAML 1.1's octal
/// (`0400`, which YAML 1.2 parsers hand over as a string) and `0o400`.
fn file_mode<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<u32>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Mode {
        Num(u32),
        Text(String),
    }
    let mode = match Option::<Mode>::deserialize(d)? {
        None => return Ok(None),
        Some(Mode::Num(n)) => n,
        Some(Mode::Text(t)) => {
            let digits = t.strip_prefix("0o").or_else(|| t.strip_prefix('0'));
            digits
                .filter(|d| !d.is_empty())
                .and_then(|d| u32::from_str_radix(d, 8).ok())
                .ok_or_else(|| {
                    serde::de::Error::custom(format!(
                        "{t:?} is not a file mode; write it in octal (0644) or decimal (420)"
                    ))
                })?
        }
    };
    if mode > 0o777 {
        return Err(serde::de::Error::custom(format!(
            "{mode:#o} is not a file mode (0000 to 0777)"
        )));
    }
    Ok(Some(mode))
}

#[cfg(test)]
mod mode_tests {
    #[derive(serde::Deserialize)]
    struct M {
        #[serde(default, deserialize_with = "super::file_mode")]
        m: Option<u32>,
    }
    fn parse(y: &str) -> Result<Option<u32>, String> {
        serde_yaml::from_str::<M>(y)
            .map(|m| m.m)
            .map_err(|e| e.to_string())
    }

    #[test]
    fn modes_are_read_as_kubectl_reads_them() {
        assert_eq!(parse("m: 0400").unwrap(), Some(0o400));
        assert_eq!(parse("m: 0o644").unwrap(), Some(0o644));
        assert_eq!(parse("m: 420").unwrap(), Some(0o644));
        assert_eq!(parse("{}").unwrap(), None);
        assert!(parse("m: 0999").unwrap_err().contains("not a file mode"));
        assert!(parse("m: 4096").unwrap_err().contains("not a file mode"));
        assert!(parse("m: rw").unwrap_err().contains("octal"));
    }
}
