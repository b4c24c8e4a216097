//! Reading a `kubectl apply -f` style manifest: multi-document YAML with one
//! `v1/Pod` and the `v1/ConfigMap` / `v1/Secret` documents it references.
//! Validation is complete here, before anything is created: every error names
//! the file, the document and the field path, and says what to do.

use super::plan::*;
use super::quantity;
use super::spec::{self, Pod, RestartPolicy};
use base64::Engine as _;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};

pub const RUNTIME_WASM: &str = "husk-wasm";
pub const RUNTIME_VM: &str = "husk-vm";

/// A validation error: where it is and what is wrong.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{file}: {doc}{}: {msg}", if path.is_empty() { String::new() } else { format!(": {path}") })]
pub struct ManifestError {
    pub file: String,
    /// Which document, e.g. `document 1 (Pod "web")`.
    pub doc: String,
    /// Field path, e.g. `spec.containers[1].volumeMounts[0].name`.
    pub path: String,
    pub msg: String,
}

/// Where relative image paths resolve and how errors name the input.
pub struct ManifestSource<'a> {
    /// Shown in errors (a file name, or `command line`).
    pub display: String,
    /// Directory that relative image paths are resolved against.
    pub base_dir: &'a Path,
    /// Turns registry references into wasm files (the image store); without
    /// it only file paths are accepted.
    pub images: Option<&'a dyn ImageResolver>,
}

/// Resolves a registry reference to the wasm module or component file of
/// the image (pulling it when missing).
pub trait ImageResolver {
    fn resolve(&self, reference: &str) -> Result<PathBuf, String>;

    /// A Linux image for a VM pod: its unpacked layers and run config.
    fn resolve_linux(&self, reference: &str) -> Result<LinuxImage, String> {
        Err(format!(
            "{reference}: no image store for Linux images is available here"
        ))
    }
}

/// A Linux image, unpacked: what a VM pod's container runs on.
#[derive(Debug, Clone, Default)]
pub struct LinuxImage {
    /// Layer snapshot directories, lowest first.
    pub layers: Vec<PathBuf>,
    /// Where each layer's file-system image is kept (made on first use).
    pub layer_images: Vec<PathBuf>,
    pub entrypoint: Vec<String>,
    pub cmd: Vec<String>,
    /// `NAME=value` from the image config.
    pub env: Vec<String>,
    pub working_dir: Option<String>,
    /// The image config's `User`.
    pub user: Option<String>,
}

/// Whether a container's `image` names a file rather than a registry
/// reference: `file://`, an absolute or `./` path, a `.wasm`/`.wat` name,
/// or a file that exists relative to `base_dir`.
pub fn is_file_image(image: &str, base_dir: &Path) -> bool {
    image.starts_with("file://")
        || image.starts_with('/')
        || image.starts_with("./")
        || image.starts_with("../")
        || image.ends_with(".wasm")
        || image.ends_with(".wat")
        || base_dir.join(image).is_file()
}

/// The ConfigMap and Secret documents of a file: name → (the document's
/// description for errors, key → bytes).
#[derive(Default)]
pub struct Docs {
    pub config_maps: BTreeMap<String, (String, BTreeMap<String, Vec<u8>>)>,
    pub secrets: BTreeMap<String, (String, BTreeMap<String, Vec<u8>>)>,
}

/// The ConfigMaps and Secrets of a file for `husk apply` (which updates the
/// running pods that use them); a Pod document is refused.
pub fn parse_objects(text: &str, display: &str) -> Result<Docs, ManifestError> {
    let (pod, docs) = read_documents(text, display)?;
    if let Some((doc, _)) = pod {
        return Err(ManifestError {
            file: display.to_owned(),
            doc,
            path: "kind".into(),
            msg: "apply updates ConfigMaps and Secrets; start pods with `husk run -f`".into(),
        });
    }
    if docs.config_maps.is_empty() && docs.secrets.is_empty() {
        return Err(ManifestError {
            file: display.to_owned(),
            doc: "file".into(),
            path: String::new(),
            msg: "no kind: ConfigMap or kind: Secret document found".into(),
        });
    }
    Ok(docs)
}

/// The files a pod's configMap or secret volume holds once `docs` apply:
/// None when the volume uses none of them.
pub fn reproject(v: &VolumePlan, docs: &Docs) -> Option<Result<Vec<VolumeFile>, String>> {
    let (kind, name, projection, objects) = match &v.source {
        VolumeSource::ConfigMap {
            name, projection, ..
        } => ("ConfigMap", name, projection, &docs.config_maps),
        VolumeSource::Secret {
            name, projection, ..
        } => ("Secret", name, projection, &docs.secrets),
        _ => return None,
    };
    let (_, data) = objects.get(name)?;
    let err = |path: &str, msg: String| ManifestError {
        file: String::new(),
        doc: format!("volume {:?}", v.name),
        path: path.to_owned(),
        msg,
    };
    Some(
        project(kind, name, Some(data), projection, "", &err)
            .map_err(|e| format!("volume {:?}: {}", v.name, e.msg)),
    )
}

/// Parses and validates a manifest file.
pub fn load_manifest_file(
    path: &Path,
    images: Option<&dyn ImageResolver>,
) -> Result<PodPlan, ManifestError> {
    let text = std::fs::read_to_string(path).map_err(|e| ManifestError {
        file: path.display().to_string(),
        doc: "file".into(),
        path: String::new(),
        msg: format!("cannot read the manifest: {e}"),
    })?;
    let base = path
        .parent()
        .map(|p| {
            if p.as_os_str().is_empty() {
                PathBuf::from(".")
            } else {
                p.to_owned()
            }
        })
        .unwrap_or_else(|| PathBuf::from("."));
    let base = std::fs::canonicalize(&base).unwrap_or(base);
    let mut plan = parse_manifest(
        &text,
        &ManifestSource {
            display: path.display().to_string(),
            base_dir: &base,
            images,
        },
    )?;
    plan.source = Some(std::fs::canonicalize(path).unwrap_or_else(|_| path.to_owned()));
    Ok(plan)
}

/// Parses and validates manifest text.
pub fn parse_manifest(text: &str, src: &ManifestSource<'_>) -> Result<PodPlan, ManifestError> {
    let file = src.display.clone();
    let err = |doc: &str, path: &str, msg: String| ManifestError {
        file: file.clone(),
        doc: doc.to_owned(),
        path: path.to_owned(),
        msg,
    };
    let (pod, docs) = read_documents(text, &file)?;
    let Some((doc, value)) = pod else {
        return Err(err(
            "file",
            "",
            "no kind: Pod document found; add one (apiVersion: v1, kind: Pod)".into(),
        ));
    };
    let pod: Pod = typed(value, &doc, &file)?;
    validate_pod(pod, &docs, src, &|path: &str, msg: String| {
        err(&doc, path, msg)
    })
}

type PodDoc = Option<(String, serde_yaml::Value)>;

/// Reads every document of a file: the Pod (undecoded), ConfigMaps and
/// Secrets.
fn read_documents(text: &str, file: &str) -> Result<(PodDoc, Docs), ManifestError> {
    let file = file.to_owned();
    let err = |doc: &str, path: &str, msg: String| ManifestError {
        file: file.clone(),
        doc: doc.to_owned(),
        path: path.to_owned(),
        msg,
    };
    let mut pod: Option<(String, serde_yaml::Value)> = None;
    let mut docs = Docs {
        config_maps: BTreeMap::new(),
        secrets: BTreeMap::new(),
    };
    if let Err(line) = check_flow_depth(text) {
        return Err(err(
            &format!("line {line}"),
            "",
            format!(
                "malformed YAML: brackets nested deeper than {MAX_FLOW_DEPTH}; no Pod needs that"
            ),
        ));
    }
    for (i, de) in serde_yaml::Deserializer::from_str(text).enumerate() {
        let n = i + 1;
        let value = <serde_yaml::Value as serde::Deserialize>::deserialize(de)
            .map_err(|e| err(&format!("document {n}"), "", format!("malformed YAML: {e}")))?;
        if value.is_null() {
            continue;
        }
        if !value.is_mapping() {
            return Err(err(
                &format!("document {n}"),
                "",
                "expected a Kubernetes object (a mapping with apiVersion and kind)".into(),
            ));
        }
        let kind = value.get("kind").and_then(|k| k.as_str()).unwrap_or("");
        let name = value
            .get("metadata")
            .and_then(|m| m.get("name"))
            .and_then(|n| n.as_str())
            .unwrap_or("")
            .to_owned();
        let doc = format!("document {n} ({kind} {name:?})");
        let api = value.get("apiVersion").and_then(|k| k.as_str());
        match kind {
            "Pod" | "ConfigMap" | "Secret" => {}
            "" => {
                return Err(err(
                    &format!("document {n}"),
                    "kind",
                    "missing; husk reads kind: Pod, ConfigMap and Secret".into(),
                ))
            }
            other => {
                return Err(err(
                    &doc,
                    "kind",
                    format!("unknown kind {other:?}; husk reads kind: Pod, ConfigMap and Secret (apiVersion: v1)"),
                ))
            }
        }
        if api != Some("v1") {
            return Err(err(
                &doc,
                "apiVersion",
                format!(
                    "{} for kind {kind}; use apiVersion: v1",
                    match api {
                        Some(a) => format!("unsupported apiVersion {a:?}"),
                        None => "missing".into(),
                    }
                ),
            ));
        }
        super::strict::check(kind, &value).map_err(|e| err(&doc, &e.path, e.msg))?;
        if let Some(v) = value
            .get("metadata")
            .and_then(|m| m.get("name"))
            .filter(|v| !v.is_string())
        {
            return Err(err(
                &doc,
                "metadata.name",
                format!("must be a string, not {v:?}; quote it (name: \"12345\")"),
            ));
        }
        if name.is_empty() {
            return Err(err(
                &doc,
                "metadata.name",
                "missing; every object needs a name".into(),
            ));
        }
        match kind {
            "Pod" => {
                if let Some((first, _)) = &pod {
                    return Err(err(
                        &doc,
                        "",
                        format!("a manifest holds exactly one Pod, and {first} is one already; put each pod in its own file"),
                    ));
                }
                pod = Some((doc, value));
            }
            "ConfigMap" => {
                let cm: spec::ConfigMap = typed(value, &doc, &file)?;
                let mut data: BTreeMap<String, Vec<u8>> = cm
                    .data
                    .into_iter()
                    .map(|(k, v)| (k, v.into_bytes()))
                    .collect();
                for (k, v) in cm.binary_data {
                    let bytes =
                        decode_b64(&v).map_err(|e| err(&doc, &format!("binaryData.{k}"), e))?;
                    data.insert(k, bytes);
                }
                if docs
                    .config_maps
                    .insert(name.clone(), (doc.clone(), data))
                    .is_some()
                {
                    return Err(err(
                        &doc,
                        "metadata.name",
                        format!("a ConfigMap named {name:?} appears twice"),
                    ));
                }
            }
            _ => {
                let s: spec::Secret = typed(value, &doc, &file)?;
                let mut data = BTreeMap::new();
                for (k, v) in s.data {
                    let bytes = decode_b64(&v).map_err(|e| err(&doc, &format!("data.{k}"), e))?;
                    data.insert(k, bytes);
                }
                for (k, v) in s.string_data {
                    data.insert(k, v.into_bytes());
                }
                if docs
                    .secrets
                    .insert(name.clone(), (doc.clone(), data))
                    .is_some()
                {
                    return Err(err(
                        &doc,
                        "metadata.name",
                        format!("a Secret named {name:?} appears twice"),
                    ));
                }
            }
        }
    }
    Ok((pod, docs))
}

fn typed<T: serde::de::DeserializeOwned>(
    value: serde_yaml::Value,
    doc: &str,
    file: &str,
) -> Result<T, ManifestError> {
    serde_path_to_error::deserialize(value).map_err(|e| {
        let path = e.path().to_string();
        ManifestError {
            file: file.to_owned(),
            doc: doc.to_owned(),
            path: if path == "." { String::new() } else { path },
            msg: e.into_inner().to_string(),
        }
    })
}

fn decode_b64(s: &str) -> Result<Vec<u8>, String> {
    let compact: String = s.chars().filter(|c| !c.is_whitespace()).collect();
    base64::engine::general_purpose::STANDARD
        .decode(compact)
        .map_err(|e| format!("not valid base64 ({e}); use stringData for plain text"))
}

/// DNS-1123 label: what Kubernetes requires of container and volume names.
pub fn is_dns_label(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-')
}

/// DNS-1123 subdomain: what Kubernetes requires of pod names.
pub fn is_dns_subdomain(s: &str) -> bool {
    s.len() <= 253 && s.split('.').all(is_dns_label)
}

fn validate_pod(
    pod: Pod,
    docs: &Docs,
    src: &ManifestSource<'_>,
    err: &dyn Fn(&str, String) -> ManifestError,
) -> Result<PodPlan, ManifestError> {
    let name = pod.metadata.name.clone().unwrap_or_default();
    if !is_dns_subdomain(&name) {
        return Err(err(
            "metadata.name",
            format!("{name:?} is not a valid pod name: use lowercase letters, digits, '-' and '.'"),
        ));
    }
    let namespace = pod
        .metadata
        .namespace
        .clone()
        .unwrap_or_else(|| "default".into());
    if !is_dns_label(&namespace) {
        return Err(err(
            "metadata.namespace",
            format!("{namespace:?} is not a valid namespace name"),
        ));
    }
    let spec = pod.spec;
    let hostname = match &spec.hostname {
        Some(h) if !is_dns_label(h) => {
            return Err(err(
                "spec.hostname",
                format!("{h:?} is not a valid host name (a DNS label)"),
            ))
        }
        Some(h) => h.clone(),
        // As the kubelet does: the pod name, cut to a label's 63 bytes.
        None => name
            .chars()
            .take(63)
            .collect::<String>()
            .trim_end_matches(['-', '.'])
            .to_owned(),
    };
    let dns = validate_dns(&spec, err)?;
    let mut host_aliases = Vec::new();
    for (i, a) in spec.host_aliases.iter().enumerate() {
        if a.ip.parse::<std::net::IpAddr>().is_err() {
            return Err(err(
                &format!("spec.hostAliases[{i}].ip"),
                format!("{:?} is not an IP address", a.ip),
            ));
        }
        for (j, h) in a.hostnames.iter().enumerate() {
            if !is_dns_subdomain(h) {
                return Err(err(
                    &format!("spec.hostAliases[{i}].hostnames[{j}]"),
                    format!("{h:?} is not a host name"),
                ));
            }
        }
        host_aliases.push((a.ip.clone(), a.hostnames.clone()));
    }
    let runtime_class = match spec.runtime_class_name.as_deref() {
        None | Some("") | Some(RUNTIME_WASM) => RUNTIME_WASM.to_owned(),
        Some(RUNTIME_VM) => RUNTIME_VM.to_owned(),
        Some(other) => {
            return Err(err(
                "spec.runtimeClassName",
                format!("unknown runtime class {other:?}; husk provides husk-wasm and husk-vm"),
            ))
        }
    };
    if let Some(h) = pod
        .metadata
        .annotations
        .get(crate::vm::sandbox::HYPERVISOR_ANNOTATION)
    {
        let key = format!(
            "metadata.annotations[{:?}]",
            crate::vm::sandbox::HYPERVISOR_ANNOTATION
        );
        if runtime_class != RUNTIME_VM {
            return Err(err(
                &key,
                "only husk-vm pods have a hypervisor; set spec.runtimeClassName: husk-vm or drop the annotation".into(),
            ));
        }
        if !crate::vm::sandbox::HYPERVISORS.contains(&h.as_str()) {
            return Err(err(
                &key,
                format!(
                    "unknown hypervisor {h:?}; use one of {}",
                    crate::vm::sandbox::HYPERVISORS.join(", ")
                ),
            ));
        }
    }
    if spec.containers.is_empty() {
        return Err(err(
            "spec.containers",
            "a pod needs at least one container".into(),
        ));
    }

    // Volumes first: mounts refer to them.
    let mut volumes = Vec::new();
    let mut vol_names = HashSet::new();
    for (i, v) in spec.volumes.iter().enumerate() {
        let at = format!("spec.volumes[{i}]");
        if !is_dns_label(&v.name) {
            return Err(err(
                &format!("{at}.name"),
                format!(
                    "{:?} is not a valid volume name (lowercase letters, digits, '-')",
                    v.name
                ),
            ));
        }
        if !vol_names.insert(v.name.clone()) {
            return Err(err(
                &format!("{at}.name"),
                format!("duplicate volume name {:?}", v.name),
            ));
        }
        let sources = [
            v.empty_dir.is_some(),
            v.host_path.is_some(),
            v.config_map.is_some(),
            v.secret.is_some(),
        ]
        .iter()
        .filter(|b| **b)
        .count();
        if sources != 1 {
            return Err(err(&at, format!("volume {:?} must have exactly one source: emptyDir, hostPath, configMap or secret", v.name)));
        }
        let source = if let Some(e) = &v.empty_dir {
            let memory = match e.medium.as_str() {
                "" => false,
                "Memory" => true,
                other => {
                    return Err(err(
                        &format!("{at}.emptyDir.medium"),
                        format!("unsupported medium {other:?}; use \"\" (disk) or \"Memory\""),
                    ))
                }
            };
            let size_limit = match &e.size_limit {
                Some(q) => Some(
                    quantity::parse_bytes(&q.0)
                        .map_err(|m| err(&format!("{at}.emptyDir.sizeLimit"), m))?,
                ),
                None => None,
            };
            VolumeSource::EmptyDir { memory, size_limit }
        } else if let Some(h) = &v.host_path {
            let path = PathBuf::from(&h.path);
            if !path.is_absolute() {
                return Err(err(
                    &format!("{at}.hostPath.path"),
                    format!("{:?} must be an absolute path", h.path),
                ));
            }
            // (create, file); an untyped hostPath is what is there.
            let (create, file) = match h.kind.as_str() {
                "" => (false, path.is_file()),
                "Directory" => (false, false),
                "DirectoryOrCreate" => (true, false),
                "File" => (false, true),
                "FileOrCreate" => (true, true),
                other => {
                    return Err(err(&format!("{at}.hostPath.type"), format!("{other:?} is not supported: use Directory, DirectoryOrCreate, File or FileOrCreate")))
                }
            };
            match (create, file) {
                (false, false) if !path.is_dir() => {
                    return Err(err(
                        &format!("{at}.hostPath.path"),
                        format!(
                        "{} is not an existing directory; create it or set type: DirectoryOrCreate",
                        path.display()
                    ),
                    ))
                }
                (false, true) if !path.is_file() => {
                    return Err(err(
                        &format!("{at}.hostPath.path"),
                        format!(
                            "{} is not an existing file; create it or set type: FileOrCreate",
                            path.display()
                        ),
                    ))
                }
                // As the kubelet: FileOrCreate makes the file, not its
                // directory.
                (true, true) if !path.parent().is_some_and(Path::is_dir) => {
                    return Err(err(
                        &format!("{at}.hostPath.path"),
                        format!(
                            "{}: its directory must exist for type: FileOrCreate",
                            path.display()
                        ),
                    ))
                }
                _ => {}
            }
            VolumeSource::HostPath { path, create, file }
        } else if let Some(c) = &v.config_map {
            let projection = Projection::new(&c.items, c.default_mode, c.optional);
            let files = project(
                "ConfigMap",
                &c.name,
                docs.config_maps.get(&c.name).map(|d| &d.1),
                &projection,
                &format!("{at}.configMap"),
                err,
            )?;
            VolumeSource::ConfigMap {
                name: c.name.clone(),
                files,
                projection,
            }
        } else {
            let s = v.secret.as_ref().expect("one source is set");
            let projection = Projection::new(&s.items, s.default_mode, s.optional);
            let files = project(
                "Secret",
                &s.secret_name,
                docs.secrets.get(&s.secret_name).map(|d| &d.1),
                &projection,
                &format!("{at}.secret"),
                err,
            )?;
            VolumeSource::Secret {
                name: s.secret_name.clone(),
                files,
                projection,
            }
        };
        volumes.push(VolumePlan {
            name: v.name.clone(),
            source,
        });
    }

    let mut names = HashSet::new();
    let mut init_containers = Vec::new();
    let mut containers = Vec::new();
    for (list, field, out) in [
        (
            &spec.init_containers,
            "initContainers",
            &mut init_containers,
        ),
        (&spec.containers, "containers", &mut containers),
    ] {
        for (i, c) in list.iter().enumerate() {
            let at = format!("spec.{field}[{i}]");
            if !is_dns_label(&c.name) {
                return Err(err(
                    &format!("{at}.name"),
                    format!(
                        "{:?} is not a valid container name (lowercase letters, digits, '-')",
                        c.name
                    ),
                ));
            }
            if !names.insert(c.name.clone()) {
                return Err(err(
                    &format!("{at}.name"),
                    format!(
                        "duplicate container name {:?}; container names must be unique in a pod",
                        c.name
                    ),
                ));
            }
            let vm = runtime_class == RUNTIME_VM;
            let mut plan = validate_container(c, &at, &volumes, docs, src, vm, err)?;
            plan.security = validate_security(&spec.security_context, c, &plan, &at, err)?;
            plan.security.share_pid = spec.share_process_namespace.unwrap_or(false);
            out.push(plan);
        }
    }
    // The containers of a pod share one netns: a port can be bound once.
    let mut seen: HashMap<(u16, &str), &str> = HashMap::new();
    let mut seen_host: HashMap<(u16, &str), &str> = HashMap::new();
    for (i, c) in containers.iter().enumerate() {
        for (j, port) in c.ports.iter().enumerate() {
            let at = format!("spec.containers[{i}].ports[{j}]");
            let key = (port.container_port, port.protocol.as_str());
            if let Some(other) = seen.insert(key, &c.name) {
                return Err(err(
                    &format!("{at}.containerPort"),
                    format!(
                        "{}/{} is already declared by container {other:?}; the containers of a pod share one network namespace",
                        port.container_port, port.protocol
                    ),
                ));
            }
            if let Some(h) = port.host_port {
                if let Some(other) = seen_host.insert((h, port.protocol.as_str()), &c.name) {
                    return Err(err(
                        &format!("{at}.hostPort"),
                        format!(
                            "{h}/{} is already mapped by container {other:?}",
                            port.protocol
                        ),
                    ));
                }
            }
        }
    }
    let cpu_limit_millis = containers
        .iter()
        .map(|c: &ContainerPlan| c.cpu_limit_millis)
        .sum::<Option<u64>>();
    let mut sysctls = Vec::new();
    for (i, s) in spec.security_context.sysctls.iter().enumerate() {
        let at = format!("spec.securityContext.sysctls[{i}]");
        check_sysctl(&s.name, runtime_class == RUNTIME_VM)
            .map_err(|e| err(&format!("{at}.name"), e))?;
        sysctls.push((s.name.clone(), s.value.clone()));
    }
    Ok(PodPlan {
        name,
        namespace,
        uid: random_uid(),
        labels: pod.metadata.labels,
        annotations: pod.metadata.annotations,
        runtime_class,
        restart_policy: spec.restart_policy.unwrap_or(RestartPolicy::Always),
        grace_period_secs: spec
            .termination_grace_period_seconds
            .unwrap_or(DEFAULT_GRACE_PERIOD_SECS),
        init_containers,
        containers,
        volumes,
        cpu_limit_millis,
        source: None,
        hostname,
        dns,
        host_aliases,
        cri: false,
        port_mappings: Vec::new(),
        sysctls,
        sandbox_limits: None,
    })
}

/// Checks a pod sysctl's name for a VM pod (any parameter: the kernel is
/// the pod's own) or a wasm pod (`net.*` only: the pod's network
/// namespace is all the kernel it has).
pub fn check_sysctl(name: &str, vm: bool) -> Result<(), String> {
    husk_protocol::seccomp::sysctl_path(name)?;
    let net = name.starts_with("net.") || name.starts_with("net/");
    if !vm && !net {
        return Err(format!(
            "sysctl {name:?} does not apply to a wasm pod, which has no kernel of its own; only net.* sysctls (its network namespace) do: run the pod with runtimeClassName husk-vm"
        ));
    }
    Ok(())
}

/// The kubelet's directory of Localhost seccomp profiles.
pub const SECCOMP_ROOT: &str = "/var/lib/kubelet/seccomp";

/// A securityContext.seccompProfile (the container's over the pod's) as a
/// plan: RuntimeDefault, Unconfined (None), or a Localhost profile file
/// read now, relative to [`SECCOMP_ROOT`].
fn seccomp_plan(
    p: Option<&spec::SeccompProfile>,
    capabilities: &[String],
    field: &str,
) -> Result<Option<super::seccomp::SeccompPlan>, String> {
    use super::seccomp::{parse_profile, SeccompPlan};
    let Some(p) = p else { return Ok(None) };
    match (p.kind.as_str(), p.localhost_profile.as_deref()) {
        ("RuntimeDefault", _) => Ok(Some(SeccompPlan::RuntimeDefault)),
        ("Unconfined", _) => Ok(None),
        ("Localhost", Some(rel)) => {
            if rel.starts_with('/') || rel.split('/').any(|c| c == "..") {
                return Err(format!(
                    "{field}.localhostProfile {rel:?} must be a path inside {SECCOMP_ROOT}"
                ));
            }
            let path = Path::new(SECCOMP_ROOT).join(rel);
            let json = std::fs::read(&path).map_err(|e| format!("{}: {e}", path.display()))?;
            let what = path.display().to_string();
            Ok(Some(SeccompPlan::Profile(parse_profile(
                &json,
                capabilities,
                &what,
            )?)))
        }
        ("Localhost", None) => Err(format!("{field}: type Localhost needs localhostProfile")),
        (other, _) => Err(format!(
            "{field}.type {other:?} is not RuntimeDefault, Unconfined or Localhost"
        )),
    }
}

/// A container created through CRI: `c` as the client described it (its
/// mounts name `volumes`, the client's host paths), checked and resolved
/// exactly as a manifest's container is. Errors name `at` and the field.
pub fn cri_container_plan(
    c: &spec::Container,
    volumes: &[VolumePlan],
    images: &dyn ImageResolver,
    vm: bool,
    at: &str,
) -> Result<ContainerPlan, ManifestError> {
    let src = ManifestSource {
        display: "CreateContainer".into(),
        base_dir: Path::new("/"),
        images: Some(images),
    };
    let docs = Docs::default();
    let err = |path: &str, msg: String| ManifestError {
        file: "CreateContainer".into(),
        doc: format!("container {:?}", c.name),
        path: path.to_owned(),
        msg,
    };
    validate_container(c, at, volumes, &docs, &src, vm, &err)
}

/// spec.dnsPolicy and spec.dnsConfig as the API server checks them.
fn validate_dns(
    spec: &super::spec::PodSpec,
    err: &dyn Fn(&str, String) -> ManifestError,
) -> Result<DnsPlan, ManifestError> {
    let policy_none = match spec.dns_policy.as_deref() {
        None | Some("ClusterFirst") | Some("Default") | Some("ClusterFirstWithHostNet") => false,
        Some("None") => true,
        Some(other) => {
            return Err(err(
                "spec.dnsPolicy",
                format!("unknown policy {other:?}; use ClusterFirst, Default or None"),
            ))
        }
    };
    let cfg = spec.dns_config.clone().unwrap_or_default();
    if policy_none && cfg.nameservers.is_empty() {
        return Err(err(
            "spec.dnsConfig.nameservers",
            "dnsPolicy None needs at least one nameserver here".into(),
        ));
    }
    if cfg.nameservers.len() > 3 {
        return Err(err(
            "spec.dnsConfig.nameservers",
            "at most 3 nameservers".into(),
        ));
    }
    for (i, n) in cfg.nameservers.iter().enumerate() {
        if n.parse::<std::net::IpAddr>().is_err() {
            return Err(err(
                &format!("spec.dnsConfig.nameservers[{i}]"),
                format!("{n:?} is not an IP address"),
            ));
        }
    }
    if cfg.searches.len() > 32 {
        return Err(err("spec.dnsConfig.searches", "at most 32 domains".into()));
    }
    for (i, d) in cfg.searches.iter().enumerate() {
        if !is_dns_subdomain(d.trim_end_matches('.')) {
            return Err(err(
                &format!("spec.dnsConfig.searches[{i}]"),
                format!("{d:?} is not a DNS domain"),
            ));
        }
    }
    let mut options = Vec::new();
    for (i, o) in cfg.options.iter().enumerate() {
        if o.name.is_empty() || o.name.contains(char::is_whitespace) {
            return Err(err(
                &format!("spec.dnsConfig.options[{i}].name"),
                format!("{:?} is not an option name", o.name),
            ));
        }
        options.push(match &o.value {
            Some(v) if !v.is_empty() => format!("{}:{v}", o.name),
            _ => o.name.clone(),
        });
    }
    Ok(DnsPlan {
        policy_none,
        nameservers: cfg.nameservers,
        searches: cfg.searches,
        options,
    })
}

fn random_uid() -> String {
    let b: [u8; 16] = rand::random();
    let h = hex::encode(b);
    format!(
        "{}-{}-{}-{}-{}",
        &h[0..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..32]
    )
}

fn project(
    kind: &str,
    name: &str,
    data: Option<&BTreeMap<String, Vec<u8>>>,
    projection: &Projection,
    at: &str,
    err: &dyn Fn(&str, String) -> ManifestError,
) -> Result<Vec<VolumeFile>, ManifestError> {
    let Projection {
        items,
        default_mode,
        optional,
    } = projection;
    let (default_mode, optional) = (*default_mode, *optional);
    let mode = default_mode.unwrap_or(0o644);
    let Some(data) = data else {
        if optional {
            return Ok(Vec::new());
        }
        return Err(err(&format!("{at}.{}", if kind == "Secret" { "secretName" } else { "name" }), format!("no {kind} named {name:?} in this manifest; add a kind: {kind} document to the file")));
    };
    if items.is_empty() {
        return Ok(data
            .iter()
            .map(|(k, v)| VolumeFile {
                path: k.clone(),
                data: v.clone(),
                mode,
            })
            .collect());
    }
    let mut files = Vec::new();
    for (j, it) in items.iter().enumerate() {
        let Some(v) = data.get(&it.key) else {
            return Err(err(
                &format!("{at}.items[{j}].key"),
                format!("{kind} {name:?} has no key {:?}", it.key),
            ));
        };
        if !is_safe_relative(&it.path) {
            return Err(err(
                &format!("{at}.items[{j}].path"),
                format!("{:?} must be a relative path without '..'", it.path),
            ));
        }
        files.push(VolumeFile {
            path: it.path.clone(),
            data: v.clone(),
            mode: it.mode.unwrap_or(mode),
        });
    }
    Ok(files)
}

/// A relative path that cannot climb out of its base.
pub fn is_safe_relative(p: &str) -> bool {
    !p.is_empty()
        && !p.starts_with('/')
        && Path::new(p).components().all(|c| {
            matches!(
                c,
                std::path::Component::Normal(_) | std::path::Component::CurDir
            )
        })
}

/// Resolves a wasm container's `image` to a file: a path relative to the
/// manifest, an absolute path, or a `file://` URL.
pub fn resolve_image(image: &str, base_dir: &Path) -> PathBuf {
    let p = image.strip_prefix("file://").unwrap_or(image);
    let p = Path::new(p);
    if p.is_absolute() {
        p.to_owned()
    } else {
        base_dir.join(p)
    }
}

/// The error for an argument or variable that expands too far.
fn too_long() -> String {
    format!(
        "expands to more than {MAX_EXPANDED} bytes (the most Linux passes to a program); \
         check the $(VAR) references of the env list, each of which may double the one before"
    )
}

fn validate_container(
    c: &spec::Container,
    at: &str,
    volumes: &[VolumePlan],
    docs: &Docs,
    src: &ManifestSource<'_>,
    vm: bool,
    err: &dyn Fn(&str, String) -> ManifestError,
) -> Result<ContainerPlan, ManifestError> {
    if c.image.trim().is_empty() {
        return Err(err(
            &format!("{at}.image"),
            if vm {
                "missing; give a Linux image reference".into()
            } else {
                "missing; give the path of a .wasm module or component".into()
            },
        ));
    }
    let linux = if vm {
        // Checked before the image, which may need a pull.
        for (j, m) in c.volume_mounts.iter().enumerate() {
            if m.mount_path.starts_with('/') && m.mount_path.trim_end_matches('/').is_empty() {
                return Err(err(
                    &format!("{at}.volumeMounts[{j}].mountPath"),
                    "a husk-vm container cannot mount a volume over its root /; mount it on a directory".into(),
                ));
            }
        }
        if is_file_image(&c.image, src.base_dir) {
            return Err(err(
                &format!("{at}.image"),
                format!(
                    "{:?} is a file; husk-vm pods run Linux images by registry reference (husk pull, husk load)",
                    c.image
                ),
            ));
        }
        let Some(store) = src.images else {
            return Err(err(
                &format!("{at}.image"),
                "husk-vm pods run Linux images from the image store, and none is available".into(),
            ));
        };
        Some(
            store
                .resolve_linux(&c.image)
                .map_err(|e| err(&format!("{at}.image"), e))?,
        )
    } else {
        None
    };
    let image = if let Some(l) = &linux {
        l.layers.last().cloned().unwrap_or_default()
    } else if is_file_image(&c.image, src.base_dir) {
        resolve_image(&c.image, src.base_dir)
    } else {
        match src.images {
            Some(store) => store
                .resolve(&c.image)
                .map_err(|e| err(&format!("{at}.image"), e))?,
            None => {
                return Err(err(
                    &format!("{at}.image"),
                    format!(
                    "{:?} is not a file, and no image store is available for registry references",
                    c.image
                ),
                ))
            }
        }
    };
    if linux.is_none() && !image.is_file() {
        return Err(err(
            &format!("{at}.image"),
            format!(
                "{} does not exist (wasm images are file paths, relative to the manifest)",
                image.display()
            ),
        ));
    }
    let kind = match &linux {
        Some(_) => "linux".to_owned(),
        None => husk_wasm::WasmEngine::check_guest_file(&image)
            .map_err(|e| err(&format!("{at}.image"), e.to_string()))?
            .as_str()
            .to_owned(),
    };

    let mut env: Vec<EnvEntry> = Vec::new();
    // A Linux image's own environment comes first; the pod's overrides it.
    for kv in linux.iter().flat_map(|l| &l.env) {
        if let Some((k, v)) = kv.split_once('=') {
            env.push(EnvEntry {
                name: k.to_owned(),
                value: v.to_owned(),
                secret: false,
            });
        }
    }
    let set = |env: &mut Vec<EnvEntry>, e: EnvEntry| {
        env.retain(|x| x.name != e.name);
        env.push(e);
    };
    for (j, f) in c.env_from.iter().enumerate() {
        let (kind_name, r, map, secret) = match (&f.config_map_ref, &f.secret_ref) {
            (Some(r), None) => ("ConfigMap", r, &docs.config_maps, false),
            (None, Some(r)) => ("Secret", r, &docs.secrets, true),
            _ => {
                return Err(err(
                    &format!("{at}.envFrom[{j}]"),
                    "set exactly one of configMapRef and secretRef".into(),
                ))
            }
        };
        match map.get(&r.name) {
            Some((_, data)) => {
                for (k, v) in data {
                    set(
                        &mut env,
                        EnvEntry {
                            name: format!("{}{k}", f.prefix),
                            value: String::from_utf8_lossy(v).into_owned(),
                            secret,
                        },
                    );
                }
            }
            None if r.optional => {}
            None => {
                let field = if secret { "secretRef" } else { "configMapRef" };
                return Err(err(
                    &format!("{at}.envFrom[{j}].{field}.name"),
                    format!("no {kind_name} named {:?} in this manifest", r.name),
                ));
            }
        }
    }
    for (j, e) in c.env.iter().enumerate() {
        let p = format!("{at}.env[{j}]");
        if e.name.is_empty() || e.name.contains('=') {
            return Err(err(
                &format!("{p}.name"),
                format!("{:?} is not a valid variable name", e.name),
            ));
        }
        let (value, secret) = match (&e.value, &e.value_from) {
            // Only a literal value is expanded; one from a ConfigMap or
            // Secret is taken as it is, as the kubelet takes it.
            (Some(v), None) => match expand_vars(v, &env) {
                Some(v) => (Some(v), false),
                None => return Err(err(&format!("{p}.value"), too_long())),
            },
            (None, None) => (Some(String::new()), false),
            (Some(_), Some(_)) => return Err(err(&p, "set value or valueFrom, not both".into())),
            (None, Some(from)) => {
                let (kind_name, r, map, secret, field) =
                    match (&from.config_map_key_ref, &from.secret_key_ref) {
                        (Some(r), None) => {
                            ("ConfigMap", r, &docs.config_maps, false, "configMapKeyRef")
                        }
                        (None, Some(r)) => ("Secret", r, &docs.secrets, true, "secretKeyRef"),
                        _ => {
                            return Err(err(
                                &format!("{p}.valueFrom"),
                                "set exactly one of configMapKeyRef and secretKeyRef".into(),
                            ))
                        }
                    };
                match map.get(&r.name) {
                    None if r.optional => (None, secret),
                    None => return Err(err(&format!("{p}.valueFrom.{field}.name"), format!("no {kind_name} named {:?} in this manifest; add a kind: {kind_name} document", r.name))),
                    Some((_, data)) => match data.get(&r.key) {
                        Some(v) => (Some(String::from_utf8_lossy(v).into_owned()), secret),
                        None if r.optional => (None, secret),
                        None => return Err(err(&format!("{p}.valueFrom.{field}.key"), format!("{kind_name} {:?} has no key {:?}", r.name, r.key))),
                    },
                }
            }
        };
        if let Some(value) = value {
            set(
                &mut env,
                EnvEntry {
                    name: e.name.clone(),
                    value,
                    secret,
                },
            );
        }
    }

    let mut mounts = Vec::new();
    for (j, m) in c.volume_mounts.iter().enumerate() {
        let p = format!("{at}.volumeMounts[{j}]");
        let Some(vol) = volumes.iter().find(|v| v.name == m.name) else {
            return Err(err(
                &format!("{p}.name"),
                format!(
                    "no volume named {:?}; declare it under spec.volumes",
                    m.name
                ),
            ));
        };
        if !m.mount_path.starts_with('/') {
            return Err(err(
                &format!("{p}.mountPath"),
                format!("{:?} must be an absolute path", m.mount_path),
            ));
        }
        if m.mount_path.split('/').any(|s| s == "..") {
            return Err(err(
                &format!("{p}.mountPath"),
                format!("{:?} must not contain '..'", m.mount_path),
            ));
        }
        if mounts
            .iter()
            .any(|x: &MountPlan| x.mount_path == m.mount_path)
        {
            return Err(err(
                &format!("{p}.mountPath"),
                format!("{:?} is mounted twice", m.mount_path),
            ));
        }
        let sub_path = if m.sub_path.is_empty() {
            None
        } else if is_safe_relative(&m.sub_path) {
            Some(m.sub_path.clone())
        } else {
            return Err(err(
                &format!("{p}.subPath"),
                format!("{:?} must be a relative path without '..'", m.sub_path),
            ));
        };
        mounts.push(MountPlan {
            volume: m.name.clone(),
            mount_path: m.mount_path.clone(),
            read_only: m.read_only || vol.source.forced_read_only(),
            sub_path,
        });
    }

    let mut ports = Vec::new();
    for (j, port) in c.ports.iter().enumerate() {
        let p = format!("{at}.ports[{j}]");
        if port.container_port == 0 {
            return Err(err(
                &format!("{p}.containerPort"),
                "must be between 1 and 65535".into(),
            ));
        }
        let protocol = port.protocol.clone().unwrap_or_else(|| "TCP".into());
        if protocol != "TCP" && protocol != "UDP" {
            return Err(err(
                &format!("{p}.protocol"),
                format!("{protocol:?} is not supported; use TCP or UDP"),
            ));
        }
        ports.push(PortPlan {
            name: port.name.clone(),
            container_port: port.container_port,
            host_port: port.host_port.filter(|h| *h != 0),
            protocol,
        });
    }

    let mut memory_limit = None;
    let mut cpu_limit_millis = None;
    for (res, q) in &c.resources.limits {
        let p = format!("{at}.resources.limits.{res}");
        match res.as_str() {
            "memory" => memory_limit = Some(quantity::parse_bytes(&q.0).map_err(|m| err(&p, m))?),
            "cpu" => {
                cpu_limit_millis = Some(quantity::parse_millicores(&q.0).map_err(|m| err(&p, m))?)
            }
            "ephemeral-storage" => {
                quantity::parse_bytes(&q.0).map_err(|m| err(&p, m))?;
            }
            other => {
                return Err(err(
                    &p,
                    format!("unknown resource {other:?}; husk enforces cpu and memory"),
                ))
            }
        }
    }
    for (res, q) in &c.resources.requests {
        let p = format!("{at}.resources.requests.{res}");
        let r = if res == "cpu" {
            quantity::parse_millicores(&q.0)
        } else {
            quantity::parse_bytes(&q.0)
        };
        r.map_err(|m| err(&p, m))?;
    }
    if matches!(memory_limit, Some(0)) {
        return Err(err(
            &format!("{at}.resources.limits.memory"),
            "must be greater than zero".into(),
        ));
    }

    if let Some(w) = &c.working_dir {
        if !w.starts_with('/') {
            return Err(err(
                &format!("{at}.workingDir"),
                format!("{w:?} must be an absolute path"),
            ));
        }
    }

    let expand = |v: &[String], field: &str| -> Result<Vec<String>, ManifestError> {
        v.iter()
            .enumerate()
            .map(|(i, a)| {
                expand_vars(a, &env).ok_or_else(|| err(&format!("{at}.{field}[{i}]"), too_long()))
            })
            .collect()
    };
    let argv: Vec<String> = match &linux {
        // Kubernetes: command replaces the image's entrypoint, args its cmd.
        Some(l) => {
            let mut argv = if c.command.is_empty() {
                l.entrypoint.clone()
            } else {
                expand(&c.command, "command")?
            };
            if c.args.is_empty() && c.command.is_empty() {
                argv.extend(l.cmd.iter().cloned());
            } else {
                argv.extend(expand(&c.args, "args")?);
            }
            if argv.is_empty() {
                return Err(err(
                    &format!("{at}.command"),
                    format!("image {} has no entrypoint or cmd; give a command", c.image),
                ));
            }
            argv
        }
        None => {
            let argv0 = image
                .file_name()
                .map(|f| f.to_string_lossy().into_owned())
                .unwrap_or_else(|| c.name.clone());
            let mut argv: Vec<String> = if c.command.is_empty() {
                vec![argv0]
            } else {
                expand(&c.command, "command")?
            };
            argv.extend(expand(&c.args, "args")?);
            argv
        }
    };
    let working_dir = c
        .working_dir
        .clone()
        .or_else(|| linux.as_ref().and_then(|l| l.working_dir.clone()));
    let image_user = linux.as_ref().and_then(|l| l.user.clone());

    Ok(ContainerPlan {
        name: c.name.clone(),
        image_ref: c.image.clone(),
        image: std::fs::canonicalize(&image).unwrap_or(image),
        guest_kind: kind,
        argv,
        env,
        working_dir,
        layer_images: linux
            .as_ref()
            .map(|l| l.layer_images.clone())
            .unwrap_or_default(),
        layers: linux.map(|l| l.layers).unwrap_or_default(),
        mounts,
        ports,
        memory_limit,
        cpu_limit_millis,
        security: SecurityPlan::default(),
        image_user,
        stdin: c.stdin,
        stdin_once: c.stdin_once,
    })
}

/// A container's securityContext merged over the pod's and the image's
/// User, as the kubelet does. Privileged containers are refused: a VM
/// pod's guest is its boundary, and wasm has no privileges to grant.
fn validate_security(
    pod: &spec::PodSecurityContext,
    c: &spec::Container,
    plan: &ContainerPlan,
    at: &str,
    err: &dyn Fn(&str, String) -> ManifestError,
) -> Result<SecurityPlan, ManifestError> {
    let sc = c.security_context.clone().unwrap_or_default();
    if sc.privileged == Some(true) {
        return Err(err(
            &format!("{at}.securityContext.privileged"),
            "privileged containers are not supported by husk sandboxes; grant single capabilities with capabilities.add".into(),
        ));
    }
    let id = |v: Option<i64>, field: &str| -> Result<Option<u32>, ManifestError> {
        match v {
            None => Ok(None),
            Some(n) if (0..=i64::from(u32::MAX - 1)).contains(&n) => Ok(Some(n as u32)),
            Some(n) => Err(err(field, format!("{n} is not a user or group id"))),
        }
    };
    let uid = match sc.run_as_user {
        Some(u) => id(Some(u), &format!("{at}.securityContext.runAsUser"))?,
        None => id(pod.run_as_user, "spec.securityContext.runAsUser")?,
    };
    let gid = match sc.run_as_group {
        Some(g) => id(Some(g), &format!("{at}.securityContext.runAsGroup"))?,
        None => id(pod.run_as_group, "spec.securityContext.runAsGroup")?,
    };
    let mut groups = Vec::new();
    for (i, g) in pod.supplemental_groups.iter().enumerate() {
        groups.push(
            id(
                Some(*g),
                &format!("spec.securityContext.supplementalGroups[{i}]"),
            )?
            .unwrap_or_default(),
        );
    }
    // The image's User, with runAsUser / runAsGroup taking its place.
    let (image_user, image_group) = match &plan.image_user {
        Some(u) => match u.split_once(':') {
            Some((u, g)) => (Some(u.to_owned()), Some(g.to_owned())),
            None => (Some(u.clone()), None),
        },
        None => (None, None),
    };
    let user = uid.map(|u| u.to_string()).or(image_user);
    let group = gid.map(|g| g.to_string()).or(image_group);
    let user = match (user, group) {
        (None, None) => None,
        (None, Some(g)) => Some(format!("0:{g}")),
        (Some(u), None) => Some(u),
        (Some(u), Some(g)) => Some(format!("{u}:{g}")),
    };
    let caps = |list: &[String], field: &str| -> Result<Vec<String>, ManifestError> {
        list.iter()
            .enumerate()
            .map(|(i, c)| {
                let name = c.trim_start_matches("CAP_").to_ascii_uppercase();
                if name == "ALL" || husk_protocol::CAPABILITIES.contains(&name.as_str()) {
                    Ok(name)
                } else {
                    Err(err(
                        &format!("{at}.securityContext.capabilities.{field}[{i}]"),
                        format!("unknown capability {c:?}"),
                    ))
                }
            })
            .collect()
    };
    let mut plan = SecurityPlan {
        user,
        supplemental_groups: groups,
        run_as_non_root: sc.run_as_non_root.or(pod.run_as_non_root).unwrap_or(false),
        read_only_root: sc.read_only_root_filesystem.unwrap_or(false),
        no_new_privs: sc.allow_privilege_escalation == Some(false),
        cap_add: caps(&sc.capabilities.add, "add")?,
        cap_drop: caps(&sc.capabilities.drop, "drop")?,
        strict_groups: match pod.supplemental_groups_policy.as_deref() {
            None | Some("Merge") => false,
            Some("Strict") => true,
            Some(other) => {
                return Err(err(
                    "spec.securityContext.supplementalGroupsPolicy",
                    format!("{other:?} is not Merge or Strict"),
                ))
            }
        },
        ..Default::default()
    };
    let (profile, field) = match &sc.seccomp_profile {
        Some(p) => (Some(p), format!("{at}.securityContext.seccompProfile")),
        None => (
            pod.seccomp_profile.as_ref(),
            "spec.securityContext.seccompProfile".to_owned(),
        ),
    };
    plan.seccomp =
        seccomp_plan(profile, &plan.capabilities(), &field).map_err(|e| err(&field, e))?;
    Ok(plan)
}

/// The longest string Linux passes to a program (MAX_ARG_STRLEN, 32
/// pages): an argument or variable that expands past it could not be
/// given to the container's program (E2BIG), so it is refused while the
/// manifest is read, before it can take the memory it asks for.
pub const MAX_EXPANDED: usize = 32 * 4096;

/// Kubernetes `$(VAR)` expansion, as the kubelet does it: known variables
/// are replaced by their (already expanded) values, which are not looked
/// into again; unknown references stay as written, `$$` escapes a dollar.
/// Values defined from one another can still double at each step, so the
/// result is bounded: `None` past [`MAX_EXPANDED`] bytes, found without
/// building more than that.
pub fn expand_vars(s: &str, env: &[EnvEntry]) -> Option<String> {
    let mut out = String::with_capacity(s.len().min(MAX_EXPANDED));
    let push = |out: &mut String, piece: &str| {
        if out.len() + piece.len() > MAX_EXPANDED {
            return false;
        }
        out.push_str(piece);
        true
    };
    let mut rest = s;
    while let Some(i) = rest.find('$') {
        if !push(&mut out, &rest[..i]) {
            return None;
        }
        let tail = &rest[i..];
        let ok = if let Some(t) = tail.strip_prefix("$$") {
            rest = t;
            push(&mut out, "$")
        } else if let Some(t) = tail.strip_prefix("$(") {
            match t.find(')') {
                Some(end) => {
                    let name = &t[..end];
                    rest = &t[end + 1..];
                    match env.iter().rev().find(|e| e.name == name) {
                        Some(e) => push(&mut out, &e.value),
                        None => push(&mut out, &tail[..end + 3]),
                    }
                }
                None => {
                    rest = "";
                    push(&mut out, tail)
                }
            }
        } else {
            rest = &tail[1..];
            push(&mut out, "$")
        };
        if !ok {
            return None;
        }
    }
    push(&mut out, rest).then_some(out)
}

#[cfg(test)]
mod security_tests {
    use super::*;

    fn merged(
        pod: spec::PodSecurityContext,
        sc: Option<spec::SecurityContext>,
        image_user: Option<&str>,
    ) -> Result<SecurityPlan, String> {
        let c = spec::Container {
            name: "c".into(),
            security_context: sc,
            ..Default::default()
        };
        let plan: ContainerPlan = serde_json::from_value(serde_json::json!({
            "name": "c", "imageRef": "i", "image": "i", "guestKind": "linux",
            "argv": [], "env": [], "workingDir": null, "mounts": [], "ports": [],
            "memoryLimit": null, "cpuLimitMillis": null, "layers": [], "layerImages": [],
            "imageUser": image_user,
        }))
        .unwrap();
        let err = |path: &str, msg: String| ManifestError {
            file: "f".into(),
            doc: "d".into(),
            path: path.into(),
            msg,
        };
        validate_security(&pod, &c, &plan, "spec.containers[0]", &err)
            .map_err(|e| format!("{}: {}", e.path, e.msg))
    }

    #[test]
    fn the_container_wins_over_the_pod_over_the_image() {
        let pod = spec::PodSecurityContext {
            run_as_user: Some(2000),
            run_as_non_root: Some(true),
            supplemental_groups: vec![7],
            ..Default::default()
        };
        // The image's user:group, runAsUser from the pod replacing the user.
        let p = merged(pod.clone(), None, Some("app:staff")).unwrap();
        assert_eq!(p.user.as_deref(), Some("2000:staff"));
        assert!(p.run_as_non_root);
        assert_eq!(p.supplemental_groups, vec![7]);
        // The container's runAsUser and runAsGroup over both.
        let sc = spec::SecurityContext {
            run_as_user: Some(3000),
            run_as_group: Some(30),
            run_as_non_root: Some(false),
            ..Default::default()
        };
        let p = merged(pod, Some(sc), Some("app:staff")).unwrap();
        assert_eq!(p.user.as_deref(), Some("3000:30"));
        assert!(!p.run_as_non_root);
        // The image alone, and nothing at all (root).
        let none = spec::PodSecurityContext::default();
        let p = merged(none.clone(), None, Some("app")).unwrap();
        assert_eq!(p.user.as_deref(), Some("app"));
        assert_eq!(merged(none.clone(), None, None).unwrap().user, None);
        // Ids out of range are refused by field.
        let sc = spec::SecurityContext {
            run_as_user: Some(-1),
            ..Default::default()
        };
        let e = merged(none, Some(sc), None).unwrap_err();
        assert!(
            e.starts_with("spec.containers[0].securityContext.runAsUser"),
            "{e}"
        );
    }

    #[test]
    fn seccomp_profiles_come_from_the_container_over_the_pod() {
        use crate::pod::seccomp::SeccompPlan;
        let profile = |kind: &str, path: Option<&str>| spec::SeccompProfile {
            kind: kind.into(),
            localhost_profile: path.map(str::to_owned),
        };
        let pod = spec::PodSecurityContext {
            seccomp_profile: Some(profile("RuntimeDefault", None)),
            ..Default::default()
        };
        let p = merged(pod.clone(), None, None).unwrap();
        assert_eq!(p.seccomp, Some(SeccompPlan::RuntimeDefault));
        let sc = spec::SecurityContext {
            seccomp_profile: Some(profile("Unconfined", None)),
            ..Default::default()
        };
        assert_eq!(merged(pod.clone(), Some(sc), None).unwrap().seccomp, None);
        assert_eq!(
            merged(Default::default(), None, None).unwrap().seccomp,
            None
        );
        for (kind, path, want) in [
            (
                "Sometimes",
                None,
                "spec.containers[0].securityContext.seccompProfile: ",
            ),
            ("Localhost", None, "needs localhostProfile"),
            (
                "Localhost",
                Some("../../etc/passwd"),
                "must be a path inside",
            ),
            (
                "Localhost",
                Some("no-such-profile.json"),
                "no-such-profile.json: No such file",
            ),
        ] {
            let sc = spec::SecurityContext {
                seccomp_profile: Some(profile(kind, path)),
                ..Default::default()
            };
            let e = merged(pod.clone(), Some(sc), None).unwrap_err();
            assert!(e.contains(want), "{kind} {path:?}: {e}");
        }
    }

    #[test]
    fn the_supplemental_groups_policy_is_merge_or_strict() {
        let policy = |p: &str| spec::PodSecurityContext {
            supplemental_groups_policy: Some(p.into()),
            ..Default::default()
        };
        assert!(
            !merged(Default::default(), None, None)
                .unwrap()
                .strict_groups
        );
        assert!(!merged(policy("Merge"), None, None).unwrap().strict_groups);
        assert!(merged(policy("Strict"), None, None).unwrap().strict_groups);
        let e = merged(policy("Loose"), None, None).unwrap_err();
        assert!(
            e.starts_with("spec.securityContext.supplementalGroupsPolicy") && e.contains("Loose"),
            "{e}"
        );
    }

    #[test]
    fn a_wasm_pod_takes_only_network_sysctls() {
        assert!(check_sysctl("kernel.shm_rmid_forced", true).is_ok());
        assert!(check_sysctl("net.ipv4.ip_unprivileged_port_start", false).is_ok());
        let e = check_sysctl("kernel.shm_rmid_forced", false).unwrap_err();
        assert!(e.contains("husk-vm"), "{e}");
        assert!(check_sysctl("net/../../x", true).is_err());
    }
}

#[cfg(test)]
mod expansion_tests {
    use super::*;

    fn var(name: &str, value: &str) -> EnvEntry {
        EnvEntry {
            name: name.into(),
            value: value.into(),
            secret: false,
        }
    }

    #[test]
    fn references_are_replaced_once_and_unknown_ones_stay() {
        let env = [var("A", "$(B)"), var("B", "b"), var("C", "c")];
        // A's value holds a reference: it is not looked into again.
        assert_eq!(
            expand_vars("$(A)-$(C)-$(Z)-$$(C)-$-$(", &env).unwrap(),
            "$(B)-c-$(Z)-$(C)-$-$("
        );
        // The last definition of a name wins.
        let env = [var("A", "1"), var("A", "2")];
        assert_eq!(expand_vars("$(A)", &env).unwrap(), "2");
    }

    #[test]
    fn an_expansion_past_what_linux_passes_a_program_is_refused_without_being_built() {
        let big = var("BIG", &"x".repeat(MAX_EXPANDED / 2));
        assert_eq!(
            expand_vars("$(BIG)$(BIG)", std::slice::from_ref(&big))
                .unwrap()
                .len(),
            MAX_EXPANDED
        );
        assert!(expand_vars("$(BIG)$(BIG)!", std::slice::from_ref(&big)).is_none());
        // A million references to it: refused at the third.
        let refs = "$(BIG)".repeat(1_000_000);
        assert!(expand_vars(&refs, &[big]).is_none());
    }
}

/// Deepest `[`/`{` nesting a manifest may have. YAML's scanner takes time
/// quadratic in it: 100k brackets took 24-40 s to refuse (#22 item 8), so
/// this is checked first, in one pass, outside quoted scalars, comments
/// and block scalars (`|`, `>`), whose text may hold any brackets.
pub const MAX_FLOW_DEPTH: usize = 64;

/// Err(line) where flow collections nest deeper than [`MAX_FLOW_DEPTH`].
fn check_flow_depth(text: &str) -> Result<(), usize> {
    let mut depth = 0usize;
    // Inside a block scalar started by a line of this indentation.
    let mut block: Option<usize> = None;
    for (n, line) in text.lines().enumerate() {
        let indent = line.len() - line.trim_start_matches(' ').len();
        if let Some(b) = block {
            if line.trim().is_empty() || indent > b {
                continue;
            }
            block = None;
        }
        let mut quote: Option<char> = None;
        let mut prev = ' ';
        let mut chars = line.chars().peekable();
        while let Some(c) = chars.next() {
            match quote {
                Some('\'') if c == '\'' => {
                    if chars.peek() == Some(&'\'') {
                        chars.next();
                    } else {
                        quote = None;
                    }
                }
                Some('"') if c == '\\' => {
                    chars.next();
                }
                Some('"') if c == '"' => quote = None,
                Some(_) => {}
                None => match c {
                    '#' if prev == ' ' || prev == '\t' => break,
                    '\'' | '"' if matches!(prev, ' ' | '\t' | '[' | '{' | ',' | ':' | '-') => {
                        quote = Some(c)
                    }
                    '[' | '{' => {
                        depth += 1;
                        if depth > MAX_FLOW_DEPTH {
                            return Err(n + 1);
                        }
                    }
                    ']' | '}' => depth = depth.saturating_sub(1),
                    _ => {}
                },
            }
            prev = c;
        }
        if quote.is_none() && depth == 0 {
            // A block scalar header ends its line: `key: |`, `- >-`, `|2`.
            let t = line.trim_end();
            let t = t.split(" #").next().unwrap_or(t).trim_end();
            if let Some(h) = t.rsplit(' ').next() {
                let mut hc = h.chars();
                if matches!(hc.next(), Some('|' | '>'))
                    && hc.all(|c| matches!(c, '-' | '+' | '1'..='9'))
                    && t.len() > h.len()
                {
                    block = Some(indent);
                }
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod flow_depth_tests {
    use super::*;

    #[test]
    fn deep_brackets_are_refused_and_text_is_not_counted() {
        let deep = format!("a: {}{}", "[".repeat(100_000), "]".repeat(100_000));
        assert_eq!(check_flow_depth(&deep), Err(1));
        let ok = format!("a: {}{}", "[".repeat(60), "]".repeat(60));
        assert_eq!(check_flow_depth(&ok), Ok(()));
        let quoted = format!(
            "a: \"{}\"\nb: '{}'\n# {}",
            "[".repeat(500),
            "{".repeat(500),
            "[".repeat(500)
        );
        assert_eq!(check_flow_depth(&quoted), Ok(()));
        let block = format!(
            "data:\n  k: |\n    {}\n  j: >-\n    {}\nnext: {}",
            "[".repeat(500),
            "{".repeat(500),
            "[".repeat(65)
        );
        assert_eq!(check_flow_depth(&block), Err(6));
    }
}
