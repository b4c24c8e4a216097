//! CRI's RuntimeService over husk pods: a pod sandbox is a husk pod run by
//! its own monitor in CRI mode (no containers until they are created);
//! containers live in the monitor and their records in the pod's status.

use crate::store::{internal, CriSandbox, Huskd, SandboxView};
use crate::stream::{Forward, Io, Pending};
use husk_sandbox::pod::{
    spec, DnsPlan, PodPlan, PortPlan, RestartPolicy, VolumePlan, VolumeSource,
};
use husk_sandbox::state::{CriContainer, CriMeta, CriState, PodRecord};
use husk_shim::control::Request;
use k8s_cri::v1 as cri;
use k8s_cri::v1::runtime_service_server::RuntimeService;
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use tonic::{Request as Req, Response, Status};

pub const HANDLER_WASM: &str = "husk-wasm";
pub const HANDLER_VM: &str = "husk-vm";
const NAMESPACE_NODE: i32 = cri::NamespaceMode::Node as i32;
const NAMESPACE_CONTAINER: i32 = cri::NamespaceMode::Container as i32;
const NAMESPACE_TARGET: i32 = cri::NamespaceMode::Target as i32;

pub struct Runtime(pub Arc<Huskd>);

type R<T> = Result<Response<T>, Status>;

pub(crate) fn nanos(t: Option<chrono::DateTime<chrono::Utc>>) -> i64 {
    t.and_then(|t| t.timestamp_nanos_opt()).unwrap_or(0)
}

fn hmap(m: &BTreeMap<String, String>) -> HashMap<String, String> {
    m.iter().map(|(k, v)| (k.clone(), v.clone())).collect()
}

fn bmap(m: &HashMap<String, String>) -> BTreeMap<String, String> {
    m.iter().map(|(k, v)| (k.clone(), v.clone())).collect()
}

fn labels_match(have: &BTreeMap<String, String>, want: &HashMap<String, String>) -> bool {
    want.iter().all(|(k, v)| have.get(k) == Some(v))
}

fn sandbox_meta(sb: &SandboxView) -> cri::PodSandboxMetadata {
    cri::PodSandboxMetadata {
        name: sb.record.plan.name.clone(),
        uid: sb.record.plan.uid.clone(),
        namespace: sb.record.plan.namespace.clone(),
        attempt: sb.cri.attempt,
    }
}

fn sandbox_state(sb: &SandboxView) -> i32 {
    if sb.ready() {
        cri::PodSandboxState::SandboxReady as i32
    } else {
        cri::PodSandboxState::SandboxNotready as i32
    }
}

pub(crate) fn container_state(sb: &SandboxView, c: &CriContainer) -> i32 {
    match c.state {
        CriState::Created | CriState::Running if sb.monitor_lost() => {
            cri::ContainerState::ContainerUnknown as i32
        }
        CriState::Created => cri::ContainerState::ContainerCreated as i32,
        CriState::Running => cri::ContainerState::ContainerRunning as i32,
        CriState::Exited => cri::ContainerState::ContainerExited as i32,
    }
}

fn image_spec(c: &CriContainer) -> cri::ImageSpec {
    cri::ImageSpec {
        image: c.meta.image.clone(),
        user_specified_image: c.meta.image.clone(),
        ..Default::default()
    }
}

fn to_container(sb: &SandboxView, c: &CriContainer) -> cri::Container {
    cri::Container {
        id: c.id.clone(),
        pod_sandbox_id: sb.id().to_owned(),
        metadata: Some(cri::ContainerMetadata {
            name: c.meta.name.clone(),
            attempt: c.meta.attempt,
        }),
        image: Some(image_spec(c)),
        image_ref: c.meta.image_ref.clone(),
        image_id: c.meta.image_ref.clone(),
        state: container_state(sb, c),
        created_at: nanos(Some(c.created_at)),
        labels: hmap(&c.meta.labels),
        annotations: hmap(&c.meta.annotations),
    }
}

pub(crate) fn to_container_status(sb: &SandboxView, c: &CriContainer) -> cri::ContainerStatus {
    let state = container_state(sb, c);
    let (reason, message) = if state == cri::ContainerState::ContainerUnknown as i32 {
        (
            "MonitorDied".to_owned(),
            format!(
                "the monitor of pod sandbox {} is gone; the container's fate is unknown",
                sb.id()
            ),
        )
    } else {
        (c.reason.clone(), c.message.clone())
    };
    cri::ContainerStatus {
        id: c.id.clone(),
        metadata: Some(cri::ContainerMetadata {
            name: c.meta.name.clone(),
            attempt: c.meta.attempt,
        }),
        state,
        created_at: nanos(Some(c.created_at)),
        started_at: nanos(c.started_at),
        finished_at: nanos(c.finished_at),
        exit_code: c.exit_code,
        image: Some(image_spec(c)),
        image_ref: c.meta.image_ref.clone(),
        image_id: c.meta.image_ref.clone(),
        reason,
        message,
        labels: hmap(&c.meta.labels),
        annotations: hmap(&c.meta.annotations),
        mounts: c
            .meta
            .mounts
            .iter()
            .map(|(h, p, ro)| cri::Mount {
                container_path: p.clone(),
                host_path: h.display().to_string(),
                readonly: *ro,
                ..Default::default()
            })
            .collect(),
        log_path: c.meta.log_path.display().to_string(),
        resources: None,
        user: c.user.as_ref().map(|u| cri::ContainerUser {
            linux: Some(cri::LinuxContainerUser {
                uid: u.uid.into(),
                gid: u.gid.into(),
                supplemental_groups: u.groups.iter().map(|g| i64::from(*g)).collect(),
            }),
        }),
    }
}

pub(crate) fn to_sandbox_status(sb: &SandboxView) -> cri::PodSandboxStatus {
    let ip = sb
        .status
        .as_ref()
        .and_then(|s| s.pod_ip.clone())
        .unwrap_or_default();
    // The kubelet's dual-stack pods: the primary IP, then the others.
    let additional_ips = sb
        .status
        .iter()
        .flat_map(|s| s.pod_ips.iter().skip(1))
        .map(|p| cri::PodIp { ip: p.ip.clone() })
        .collect();
    cri::PodSandboxStatus {
        id: sb.id().to_owned(),
        metadata: Some(sandbox_meta(sb)),
        state: sandbox_state(sb),
        created_at: nanos(Some(sb.record.created_at)),
        network: Some(cri::PodSandboxNetworkStatus { ip, additional_ips }),
        linux: Some(cri::LinuxPodSandboxStatus {
            namespaces: Some(cri::Namespace {
                options: Some(cri::NamespaceOption::default()),
            }),
        }),
        labels: hmap(&sb.record.plan.labels),
        annotations: hmap(&sb.record.plan.annotations),
        runtime_handler: sb.cri.runtime_handler.clone(),
    }
}

/// Checks that container `c` can take an exec or an attach (`what`): it
/// runs, and a new process (`new_process`: an exec) is in a VM sandbox (a
/// wasm container has no processes beside its guest; attaching to that
/// guest is fine).
fn process_host(
    sb: &SandboxView,
    c: &CriContainer,
    what: &str,
    new_process: bool,
) -> Result<(), Status> {
    if c.state != CriState::Running {
        return Err(Status::failed_precondition(format!(
            "container {} is not running",
            c.id
        )));
    }
    if sb.cri.runtime_handler != HANDLER_VM && new_process {
        return Err(Status::unimplemented(format!(
            "{}: no {what} into a wasm container (it has no processes beside its guest)",
            sb.cri.runtime_handler
        )));
    }
    Ok(())
}

/// Refuses host namespaces and privileged sandboxes: a wasm or VM pod has
/// no host namespaces to join and no privileges to grant.
fn check_namespaces(ns: Option<&cri::NamespaceOption>, what: &str) -> Result<(), Status> {
    if let Some(ns) = ns {
        for (mode, name) in [(ns.network, "network"), (ns.pid, "pid"), (ns.ipc, "ipc")] {
            if mode == NAMESPACE_NODE {
                return Err(Status::invalid_argument(format!(
                    "{what}: the host {name} namespace is not available: husk pods are isolated sandboxes (wasm guests or microVMs); use a runc runtime class for host namespaces"
                )));
            }
        }
    }
    Ok(())
}

fn sandbox_plan(cfg: &cri::PodSandboxConfig, handler: &str) -> Result<PodPlan, Status> {
    let meta = cfg
        .metadata
        .as_ref()
        .ok_or_else(|| Status::invalid_argument("config.metadata is missing"))?;
    for (v, f) in [
        (&meta.name, "name"),
        (&meta.namespace, "namespace"),
        (&meta.uid, "uid"),
    ] {
        if v.is_empty() {
            return Err(Status::invalid_argument(format!(
                "config.metadata.{f} is empty"
            )));
        }
    }
    if let Some(linux) = &cfg.linux {
        if let Some(sc) = &linux.security_context {
            if sc.privileged {
                return Err(Status::invalid_argument(
                    "config.linux.security_context.privileged: husk pods cannot be privileged (a wasm guest has no privileges to grant; a VM pod's guest is its boundary)",
                ));
            }
            check_namespaces(
                sc.namespace_options.as_ref(),
                "config.linux.security_context.namespace_options",
            )?;
        }
    }
    let mut sysctls: Vec<(String, String)> = cfg
        .linux
        .as_ref()
        .map(|l| {
            l.sysctls
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect()
        })
        .unwrap_or_default();
    sysctls.sort();
    for (name, _) in &sysctls {
        husk_sandbox::pod::manifest::check_sysctl(name, handler == HANDLER_VM).map_err(|e| {
            Status::invalid_argument(format!("config.linux.sysctls[{name:?}]: {e}"))
        })?;
    }
    let hostname = if cfg.hostname.is_empty() {
        default_hostname(&meta.name)
    } else if cfg.hostname.len() > 63 {
        return Err(Status::invalid_argument(format!(
            "config.hostname {:?} is longer than 63 bytes (a host name is one DNS label)",
            cfg.hostname
        )));
    } else {
        cfg.hostname.clone()
    };
    let dns = match &cfg.dns_config {
        Some(d) => DnsPlan {
            policy_none: true,
            nameservers: d.servers.clone(),
            searches: d.searches.clone(),
            options: d.options.clone(),
        },
        None => DnsPlan::default(),
    };
    let mut port_mappings = Vec::new();
    for (i, p) in cfg.port_mappings.iter().enumerate() {
        let protocol = match cri::Protocol::try_from(p.protocol) {
            Ok(cri::Protocol::Tcp) => "TCP",
            Ok(cri::Protocol::Udp) => "UDP",
            _ => {
                return Err(Status::invalid_argument(format!(
                    "config.port_mappings[{i}].protocol: only TCP and UDP are supported"
                )))
            }
        };
        let cport = u16::try_from(p.container_port).ok().filter(|p| *p > 0);
        let Some(container_port) = cport else {
            return Err(Status::invalid_argument(format!(
                "config.port_mappings[{i}].container_port {} is not a port",
                p.container_port
            )));
        };
        let host_port = match p.host_port {
            0 => None,
            h => Some(u16::try_from(h).ok().filter(|h| *h > 0).ok_or_else(|| {
                Status::invalid_argument(format!(
                    "config.port_mappings[{i}].host_port {h} is not a port"
                ))
            })?),
        };
        port_mappings.push(PortPlan {
            name: None,
            container_port,
            host_port,
            protocol: protocol.into(),
        });
    }
    Ok(PodPlan {
        name: meta.name.clone(),
        namespace: meta.namespace.clone(),
        uid: meta.uid.clone(),
        labels: bmap(&cfg.labels),
        annotations: bmap(&cfg.annotations),
        runtime_class: handler.to_owned(),
        restart_policy: RestartPolicy::Never,
        grace_period_secs: husk_sandbox::pod::DEFAULT_GRACE_PERIOD_SECS,
        init_containers: vec![],
        containers: vec![],
        volumes: vec![],
        cpu_limit_millis: None,
        source: None,
        hostname,
        dns,
        host_aliases: vec![],
        cri: true,
        port_mappings,
        sysctls,
        sandbox_limits: cfg
            .linux
            .as_ref()
            .and_then(|l| l.resources.as_ref())
            .map(|r| {
                let mem = u64::try_from(r.memory_limit_in_bytes)
                    .ok()
                    .filter(|m| *m > 0);
                let cpu = (r.cpu_quota > 0 && r.cpu_period > 0)
                    .then(|| (r.cpu_quota * 1000 / r.cpu_period) as u64);
                (mem, cpu)
            })
            .filter(|l| *l != (None, None)),
    })
}

/// The one image a CRI container names, already in the store.
struct Pulled<'a>(&'a husk_image::Store, &'a husk_image::ImageRecord);

impl husk_sandbox::pod::ImageResolver for Pulled<'_> {
    fn resolve(&self, _reference: &str) -> Result<PathBuf, String> {
        let Pulled(store, rec) = self;
        store
            .wasm_file(rec)
            .map_err(|e| e.to_string())?
            .ok_or_else(|| {
                format!(
                    "{} is not a wasm image; the husk-wasm runtime handler runs wasm modules and components",
                    rec.name
                )
            })
    }

    fn resolve_linux(&self, _reference: &str) -> Result<husk_sandbox::pod::LinuxImage, String> {
        husk_shim::cli::images::linux_image(self.0, self.1)
    }
}

/// The host name of a sandbox whose config names none: its pod's name,
/// cut to the 63 bytes a host name may have, without a trailing `-` or
/// `.` (as the kubelet does).
fn default_hostname(name: &str) -> String {
    let mut end = name.len().min(63);
    while !name.is_char_boundary(end) {
        end -= 1;
    }
    name[..end].trim_end_matches(['-', '.']).to_owned()
}

/// A CRI container's security context onto its plan: who it runs as (the
/// image's user unless the client names one), its groups, a read-only
/// root, no_new_privs, capabilities, masked and read-only paths, seccomp
/// and the PID namespace. The agent in a VM applies them; a wasm guest
/// makes no syscalls and sees only its preopened directories, so the
/// paths, seccomp and PID namespace mean nothing to it.
fn apply_security(
    plan: &mut husk_sandbox::pod::SecurityPlan,
    sc: &cri::LinuxContainerSecurityContext,
) -> Result<(), Status> {
    let group = sc.run_as_group.as_ref().map(|g| g.value);
    if group.is_some() && sc.run_as_user.is_none() && sc.run_as_username.is_empty() {
        return Err(Status::invalid_argument(
            "config.linux.security_context.run_as_group needs run_as_user or run_as_username",
        ));
    }
    let user = if !sc.run_as_username.is_empty() {
        Some(sc.run_as_username.clone())
    } else {
        sc.run_as_user.as_ref().map(|u| u.value.to_string())
    };
    match (user, group) {
        (Some(u), Some(g)) => plan.user = Some(format!("{u}:{g}")),
        (Some(u), None) => plan.user = Some(u),
        (None, _) => {}
    }
    plan.supplemental_groups = sc
        .supplemental_groups
        .iter()
        .filter_map(|g| u32::try_from(*g).ok())
        .collect();
    plan.strict_groups =
        sc.supplemental_groups_policy == cri::SupplementalGroupsPolicy::Strict as i32;
    plan.read_only_root = sc.readonly_rootfs;
    plan.no_new_privs = sc.no_new_privs;
    if let Some(caps) = &sc.capabilities {
        let norm = |c: &String| {
            let c = c.to_ascii_uppercase();
            c.strip_prefix("CAP_").map(str::to_owned).unwrap_or(c)
        };
        plan.cap_add = caps.add_capabilities.iter().map(norm).collect();
        plan.cap_drop = caps.drop_capabilities.iter().map(norm).collect();
    }
    plan.masked_paths = checked_paths(&sc.masked_paths, "masked_paths")?;
    plan.readonly_paths = checked_paths(&sc.readonly_paths, "readonly_paths")?;
    plan.seccomp = seccomp_plan(sc, &plan.capabilities())?;
    // As containerd: a container joins the sandbox's PID namespace unless
    // it asks for its own (POD is the field's zero value).
    plan.share_pid = match sc.namespace_options.as_ref().map(|n| n.pid) {
        Some(NAMESPACE_CONTAINER) => false,
        Some(NAMESPACE_TARGET) => {
            return Err(Status::unimplemented(
                "config.linux.security_context.namespace_options.pid: TARGET (another container's PID namespace) is not supported",
            ))
        }
        _ => true,
    };
    Ok(())
}

/// masked_paths / readonly_paths: absolute paths in the container.
fn checked_paths(paths: &[String], field: &str) -> Result<Vec<String>, Status> {
    for (i, p) in paths.iter().enumerate() {
        if !p.starts_with('/') || p.contains('\0') {
            return Err(Status::invalid_argument(format!(
                "config.linux.security_context.{field}[{i}] {p:?} is not an absolute path"
            )));
        }
    }
    Ok(paths.to_vec())
}

/// The container's seccomp choice: the `seccomp` field, else the
/// deprecated `seccomp_profile_path`; a Localhost profile is a file on
/// this host, read now (as containerd reads it at create).
fn seccomp_plan(
    sc: &cri::LinuxContainerSecurityContext,
    caps: &[String],
) -> Result<Option<husk_sandbox::pod::seccomp::SeccompPlan>, Status> {
    use husk_sandbox::pod::seccomp::{parse_profile, SeccompPlan};
    let localhost = |path: &str, field: &str| {
        if !path.starts_with('/') {
            return Err(Status::invalid_argument(format!(
                "config.linux.security_context.{field} {path:?} must be an absolute path to a profile on the node"
            )));
        }
        let json = std::fs::read(path).map_err(|e| {
            Status::invalid_argument(format!(
                "config.linux.security_context.{field}: {path}: {e}"
            ))
        })?;
        parse_profile(&json, caps, path)
            .map(|p| Some(SeccompPlan::Profile(p)))
            .map_err(|e| {
                Status::invalid_argument(format!("config.linux.security_context.{field}: {e}"))
            })
    };
    if let Some(p) = &sc.seccomp {
        return match cri::security_profile::ProfileType::try_from(p.profile_type) {
            Ok(cri::security_profile::ProfileType::RuntimeDefault) => Ok(Some(SeccompPlan::RuntimeDefault)),
            Ok(cri::security_profile::ProfileType::Unconfined) => Ok(None),
            Ok(cri::security_profile::ProfileType::Localhost) => {
                localhost(&p.localhost_ref, "seccomp.localhost_ref")
            }
            Err(_) => Err(Status::invalid_argument(format!(
                "config.linux.security_context.seccomp.profile_type {} is not RuntimeDefault, Unconfined or Localhost",
                p.profile_type
            ))),
        };
    }
    // Kubelets before 1.19's `seccomp` field still send the path.
    #[allow(deprecated)]
    let path = sc.seccomp_profile_path.as_str();
    match path {
        "" | "unconfined" => Ok(None),
        "runtime/default" | "docker/default" => Ok(Some(SeccompPlan::RuntimeDefault)),
        p => match p.strip_prefix("localhost/") {
            Some(path) => localhost(path, "seccomp_profile_path"),
            None => Err(Status::invalid_argument(format!(
                "config.linux.security_context.seccomp_profile_path {p:?} is not runtime/default, unconfined or localhost/PATH"
            ))),
        },
    }
}

/// A mount as the client gave it: host path, container path, read-only.
type ClientMount = (PathBuf, String, bool);

/// The container as the manifest code knows it, and the host directories
/// its mounts name.
fn container_spec(
    cfg: &cri::ContainerConfig,
    image: &str,
) -> Result<(spec::Container, Vec<VolumePlan>, Vec<ClientMount>), Status> {
    let meta = cfg
        .metadata
        .as_ref()
        .ok_or_else(|| Status::invalid_argument("config.metadata is missing"))?;
    let mut env = Vec::new();
    for e in &cfg.envs {
        env.push(serde_json::json!({ "name": e.key, "value": e.value }));
    }
    let mut volumes = Vec::new();
    let mut mounts = Vec::new();
    let mut recorded = Vec::new();
    for (i, m) in cfg.mounts.iter().enumerate() {
        if m.image.is_some() {
            return Err(Status::unimplemented(format!(
                "config.mounts[{i}].image: image volumes are not supported"
            )));
        }
        let host = Path::new(&m.host_path);
        if !host.is_absolute() {
            return Err(Status::invalid_argument(format!(
                "config.mounts[{i}].host_path {:?} must be an absolute path",
                m.host_path
            )));
        }
        if !host.exists() {
            return Err(Status::invalid_argument(format!(
                "config.mounts[{i}].host_path {} does not exist",
                m.host_path
            )));
        }
        recorded.push((host.to_owned(), m.container_path.clone(), m.readonly));
        // Directories and files (the kubelet's /etc/hosts and
        // /dev/termination-log): over virtio-fs into a VM; into a wasm
        // guest as a directory of their own (WASI preopens are
        // directories). Anything else (a socket, a device) is skipped.
        if !(host.is_dir() || host.is_file()) {
            tracing::info!(
                container = %meta.name,
                "skipping mount {} -> {}: neither a directory nor a file",
                m.host_path,
                m.container_path,
            );
            continue;
        }
        let name = format!("m{i}");
        volumes.push(VolumePlan {
            name: name.clone(),
            source: VolumeSource::HostPath {
                path: host.to_owned(),
                create: false,
                file: host.is_file(),
            },
        });
        mounts.push(serde_json::json!({
            "name": name, "mountPath": m.container_path, "readOnly": m.readonly
        }));
    }
    let c: spec::Container = serde_json::from_value(serde_json::json!({
        "name": meta.name,
        "image": image,
        "command": cfg.command,
        "args": cfg.args,
        "env": env,
        "workingDir": if cfg.working_dir.is_empty() { None } else { Some(&cfg.working_dir) },
        "volumeMounts": mounts,
    }))
    .map_err(|e| Status::invalid_argument(format!("config: {e}")))?;
    Ok((c, volumes, recorded))
}

impl Runtime {
    fn handler(&self, h: &str) -> Result<String, Status> {
        let h = if h.is_empty() {
            self.0.default_handler.as_str()
        } else {
            h
        };
        match h {
            HANDLER_WASM | HANDLER_VM => Ok(h.to_owned()),
            other => Err(Status::invalid_argument(format!(
                "unknown runtime handler {other:?}; huskd serves {HANDLER_WASM} and {HANDLER_VM}"
            ))),
        }
    }

    /// The running VM container that an exec or attach with `io` may
    /// stream from.
    fn stream_target(
        &self,
        id: &str,
        io: Io,
        what: &str,
    ) -> Result<(SandboxView, CriContainer), Status> {
        let (sb, c) = self.0.container(id)?;
        if !(io.stdin || io.stdout || io.stderr) {
            return Err(Status::invalid_argument(
                "one of stdin, stdout and stderr must be set",
            ));
        }
        process_host(&sb, &c, what, what == "exec")?;
        Ok((sb, c))
    }

    /// A sandbox's usage figures from its monitor (VM sandboxes), if any.
    async fn usage(&self, sb: &SandboxView) -> Option<husk_sandbox::PodStats> {
        if !sb.ready() || sb.cri.runtime_handler != HANDLER_VM {
            return None;
        }
        let reply = self
            .0
            .call_ok(sb.id(), Request::Stats, Duration::from_secs(10))
            .await
            .ok()?;
        reply.stats
    }

    /// Stops a sandbox's monitor (containers are killed at once) and waits
    /// until it has released the pod's host resources.
    /// Stops a sandbox at once (the kubelet stopped its containers with
    /// their grace periods already): a monitor that does not answer or
    /// end is killed, and what a dead monitor left (its network above
    /// all, which CRI says StopPodSandbox reclaims) is released.
    async fn stop_sandbox(&self, sb: &SandboxView) -> Result<(), Status> {
        let finished = sb.status.as_ref().is_some_and(|s| s.finished);
        if finished {
            return Ok(());
        }
        let roots = self.0.roots.clone();
        let id = sb.id().to_owned();
        let name = sb.record.plan.name.clone();
        let monitor = sb.monitor;
        tokio::task::spawn_blocking(move || {
            if monitor.is_some() {
                husk_shim::cli::rm::stop_now(&roots, &id, &name, monitor, true)
            } else {
                husk_shim::cli::rm::release_pod(&roots, &id, &name)
            }
        })
        .await
        .map_err(internal)?
        .map_err(Status::unknown)
    }
}

#[tonic::async_trait]
impl RuntimeService for Runtime {
    async fn version(&self, _: Req<cri::VersionRequest>) -> R<cri::VersionResponse> {
        Ok(Response::new(cri::VersionResponse {
            version: "0.1.0".into(),
            runtime_name: "husk".into(),
            runtime_version: env!("CARGO_PKG_VERSION").into(),
            runtime_api_version: "v1".into(),
        }))
    }

    async fn run_pod_sandbox(
        &self,
        req: Req<cri::RunPodSandboxRequest>,
    ) -> R<cri::RunPodSandboxResponse> {
        let _events = crate::events::Guard::new(&self.0);
        let req = req.into_inner();
        let cfg = req
            .config
            .ok_or_else(|| Status::invalid_argument("config is missing"))?;
        let handler = self.handler(&req.runtime_handler)?;
        let plan = sandbox_plan(&cfg, &handler)?;
        let attempt = cfg.metadata.as_ref().map(|m| m.attempt).unwrap_or(0);
        let roots = self.0.roots.clone();
        let id = husk_sandbox::state::new_pod_id();
        {
            let _names = self.0.names.lock().await;
            if let Some(other) = self.0.sandboxes().into_iter().find(|s| {
                s.record.plan.name == plan.name
                    && s.record.plan.namespace == plan.namespace
                    && s.record.plan.uid == plan.uid
                    && s.cri.attempt == attempt
            }) {
                return Err(Status::already_exists(format!(
                    "pod sandbox {}/{} (uid {}, attempt {attempt}) already exists: {}",
                    plan.namespace,
                    plan.name,
                    plan.uid,
                    other.id()
                )));
            }
            let record = PodRecord {
                id: id.clone(),
                created_at: chrono::Utc::now(),
                auto_remove: false,
                plan: plan.redacted(),
            };
            let info = CriSandbox {
                attempt,
                log_directory: cfg.log_directory.clone(),
                runtime_handler: handler.clone(),
            };
            let info = serde_json::to_vec_pretty(&info).map_err(internal)?;
            // The record and huskd's own file appear together or not at
            // all (huskd killed here leaves nothing a kubelet cannot see).
            record
                .create(&roots, &[("cri.json", info)])
                .map_err(internal)?;
        }
        let husk = self.0.husk.clone();
        let id2 = id.clone();
        let started = tokio::task::spawn_blocking(move || {
            let r = husk_shim::cli::run::start_monitor_with(&husk, &roots, &id2, &plan);
            match r {
                Ok(mut child) => {
                    // Reap the monitor when it ends (it outlives nobody's
                    // wait otherwise while huskd runs).
                    std::thread::spawn(move || {
                        let _ = child.wait();
                    });
                    Ok(())
                }
                // The kubelet never learns the id of a sandbox that did
                // not start, so nothing of it may stay: what a monitor
                // that died half-way left is released here, and the end
                // of its log goes into the error.
                Err(e) => {
                    let message = husk_shim::cli::run::after_failed_start(&roots, &id2, &e, false);
                    Err((e.bad_input, message))
                }
            }
        })
        .await
        .map_err(internal)?;
        started.map_err(|(bad_input, e)| {
            let message = format!("pod sandbox: {e}");
            if bad_input {
                Status::invalid_argument(message)
            } else {
                Status::unknown(message)
            }
        })?;
        Ok(Response::new(cri::RunPodSandboxResponse {
            pod_sandbox_id: id,
        }))
    }

    async fn stop_pod_sandbox(
        &self,
        req: Req<cri::StopPodSandboxRequest>,
    ) -> R<cri::StopPodSandboxResponse> {
        let _events = crate::events::Guard::new(&self.0);
        let sb = match self.0.sandbox(&req.into_inner().pod_sandbox_id) {
            Ok(sb) => sb,
            // Stopping what is gone is done (the kubelet retries stops).
            Err(s) if s.code() == tonic::Code::NotFound => {
                return Ok(Response::new(cri::StopPodSandboxResponse {}))
            }
            Err(s) => return Err(s),
        };
        self.stop_sandbox(&sb).await?;
        Ok(Response::new(cri::StopPodSandboxResponse {}))
    }

    async fn remove_pod_sandbox(
        &self,
        req: Req<cri::RemovePodSandboxRequest>,
    ) -> R<cri::RemovePodSandboxResponse> {
        let _events = crate::events::Guard::new(&self.0);
        let id = req.into_inner().pod_sandbox_id;
        let sb = match self.0.sandbox(&id) {
            Ok(sb) => sb,
            // Removing what is gone is done.
            Err(s) if s.code() == tonic::Code::NotFound => {
                return Ok(Response::new(cri::RemovePodSandboxResponse {}))
            }
            Err(s) => return Err(s),
        };
        self.stop_sandbox(&sb).await?;
        let roots = self.0.roots.clone();
        tokio::task::spawn_blocking(move || husk_shim::cli::rm::remove_pod(&roots, &id))
            .await
            .map_err(internal)?
            .map_err(Status::unknown)?;
        Ok(Response::new(cri::RemovePodSandboxResponse {}))
    }

    async fn pod_sandbox_status(
        &self,
        req: Req<cri::PodSandboxStatusRequest>,
    ) -> R<cri::PodSandboxStatusResponse> {
        let req = req.into_inner();
        let sb = self.0.sandbox(&req.pod_sandbox_id)?;
        let mut info = HashMap::new();
        if req.verbose {
            info.insert(
                "info".into(),
                serde_json::json!({
                    "monitorPid": sb.status.as_ref().and_then(|s| s.monitor_pid),
                    "monitorAlive": sb.monitor_alive(),
                    "runtimeHandler": sb.cri.runtime_handler,
                    "logDirectory": sb.cri.log_directory,
                })
                .to_string(),
            );
        }
        Ok(Response::new(cri::PodSandboxStatusResponse {
            status: Some(to_sandbox_status(&sb)),
            info,
            containers_statuses: sb
                .containers()
                .iter()
                .map(|c| to_container_status(&sb, c))
                .collect(),
            timestamp: nanos(Some(chrono::Utc::now())),
        }))
    }

    async fn list_pod_sandbox(
        &self,
        req: Req<cri::ListPodSandboxRequest>,
    ) -> R<cri::ListPodSandboxResponse> {
        let filter = req.into_inner().filter.unwrap_or_default();
        let items = self
            .0
            .sandboxes()
            .into_iter()
            .filter(|sb| filter.id.is_empty() || sb.id().starts_with(&filter.id))
            .filter(|sb| {
                filter
                    .state
                    .as_ref()
                    .is_none_or(|s| s.state == sandbox_state(sb))
            })
            .filter(|sb| labels_match(&sb.record.plan.labels, &filter.label_selector))
            .map(|sb| cri::PodSandbox {
                id: sb.id().to_owned(),
                metadata: Some(sandbox_meta(&sb)),
                state: sandbox_state(&sb),
                created_at: nanos(Some(sb.record.created_at)),
                labels: hmap(&sb.record.plan.labels),
                annotations: hmap(&sb.record.plan.annotations),
                runtime_handler: sb.cri.runtime_handler.clone(),
            })
            .collect();
        Ok(Response::new(cri::ListPodSandboxResponse { items }))
    }

    async fn create_container(
        &self,
        req: Req<cri::CreateContainerRequest>,
    ) -> R<cri::CreateContainerResponse> {
        let _events = crate::events::Guard::new(&self.0);
        let req = req.into_inner();
        let sb = self.0.sandbox(&req.pod_sandbox_id)?;
        let cfg = req
            .config
            .ok_or_else(|| Status::invalid_argument("config is missing"))?;
        let meta = cfg
            .metadata
            .clone()
            .ok_or_else(|| Status::invalid_argument("config.metadata is missing"))?;
        if meta.name.is_empty() {
            return Err(Status::invalid_argument("config.metadata.name is empty"));
        }
        let image = cfg
            .image
            .as_ref()
            .map(|i| i.image.clone())
            .filter(|i| !i.is_empty())
            .ok_or_else(|| Status::invalid_argument("config.image.image is empty"))?;
        if let Some(linux) = &cfg.linux {
            if let Some(sc) = &linux.security_context {
                if sc.privileged {
                    return Err(Status::invalid_argument(
                        "config.linux.security_context.privileged: husk containers cannot be privileged",
                    ));
                }
                check_namespaces(
                    sc.namespace_options.as_ref(),
                    "config.linux.security_context.namespace_options",
                )?;
            }
        }
        if !sb.ready() {
            return Err(Status::failed_precondition(format!(
                "pod sandbox {} is not ready",
                sb.id()
            )));
        }
        let vm = sb.cri.runtime_handler == HANDLER_VM;
        let (spec, volumes, recorded) = container_spec(&cfg, &image)?;
        let roots = self.0.roots.clone();
        let image2 = image.clone();
        let (mut cplan, volumes, image_ref) = tokio::task::spawn_blocking(move || {
            let store = husk_shim::cli::images::open_store(&roots)
                .map_err(|e| Status::unknown(e.to_string()))?;
            // CRI pulls with PullImage; CreateContainer never does.
            let rec = crate::image::find(&store, &image2).ok_or_else(|| {
                Status::not_found(format!(
                    "image {image2:?} not found; pull it first (PullImage)"
                ))
            })?;
            let plan = husk_sandbox::pod::manifest::cri_container_plan(
                &spec,
                &volumes,
                &Pulled(&store, &rec),
                vm,
                "config",
            )
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
            Ok::<_, Status>((plan, volumes, rec.digest))
        })
        .await
        .map_err(internal)??;
        if let Some(sc) = cfg.linux.as_ref().and_then(|l| l.security_context.as_ref()) {
            apply_security(&mut cplan.security, sc)?;
        }
        if let Some(res) = cfg.linux.as_ref().and_then(|l| l.resources.as_ref()) {
            if res.memory_limit_in_bytes > 0 {
                cplan.memory_limit = Some(res.memory_limit_in_bytes as u64);
            }
            if res.cpu_quota > 0 && res.cpu_period > 0 {
                cplan.cpu_limit_millis = Some((res.cpu_quota * 1000 / res.cpu_period) as u64);
            }
        }
        let log_path = if sb.cri.log_directory.is_empty() || cfg.log_path.is_empty() {
            PathBuf::new()
        } else {
            Path::new(&sb.cri.log_directory).join(&cfg.log_path)
        };
        let meta = CriMeta {
            name: meta.name,
            attempt: meta.attempt,
            image,
            image_ref,
            labels: bmap(&cfg.labels),
            annotations: bmap(&cfg.annotations),
            log_path,
            mounts: recorded,
            stdin: cfg.stdin,
            stdin_once: cfg.stdin_once,
            tty: cfg.tty,
        };
        let reply = self
            .0
            .call_ok(
                sb.id(),
                Request::CreateContainer {
                    container: Box::new(cplan),
                    volumes,
                    meta,
                },
                Duration::from_secs(120),
            )
            .await?;
        let id = reply
            .id
            .ok_or_else(|| internal("the monitor gave no container id"))?;
        Ok(Response::new(cri::CreateContainerResponse {
            container_id: id,
        }))
    }

    async fn start_container(
        &self,
        req: Req<cri::StartContainerRequest>,
    ) -> R<cri::StartContainerResponse> {
        let _events = crate::events::Guard::new(&self.0);
        let id = req.into_inner().container_id;
        let (sb, _) = self.0.container(&id)?;
        if !sb.ready() {
            return Err(Status::failed_precondition(format!(
                "pod sandbox {} is not ready",
                sb.id()
            )));
        }
        self.0
            .call_ok(
                sb.id(),
                Request::StartContainer { id },
                Duration::from_secs(30),
            )
            .await?;
        Ok(Response::new(cri::StartContainerResponse {}))
    }

    async fn stop_container(
        &self,
        req: Req<cri::StopContainerRequest>,
    ) -> R<cri::StopContainerResponse> {
        let _events = crate::events::Guard::new(&self.0);
        let req = req.into_inner();
        let (sb, c) = match self.0.container(&req.container_id) {
            Ok(x) => x,
            Err(s) if s.code() == tonic::Code::NotFound => {
                return Ok(Response::new(cri::StopContainerResponse {}))
            }
            Err(s) => return Err(s),
        };
        if c.state != CriState::Running || !sb.monitor_alive() {
            return Ok(Response::new(cri::StopContainerResponse {}));
        }
        let timeout = req.timeout.max(0) as u64;
        self.0
            .call_ok(
                sb.id(),
                Request::StopContainer {
                    id: req.container_id,
                    timeout_secs: timeout,
                },
                Duration::from_secs(timeout + 30),
            )
            .await?;
        Ok(Response::new(cri::StopContainerResponse {}))
    }

    async fn remove_container(
        &self,
        req: Req<cri::RemoveContainerRequest>,
    ) -> R<cri::RemoveContainerResponse> {
        let _events = crate::events::Guard::new(&self.0);
        let id = req.into_inner().container_id;
        let (sb, _) = match self.0.container(&id) {
            Ok(x) => x,
            Err(s) if s.code() == tonic::Code::NotFound => {
                return Ok(Response::new(cri::RemoveContainerResponse {}))
            }
            Err(s) => return Err(s),
        };
        if sb.monitor_alive() && !sb.status.as_ref().is_some_and(|s| s.finished) {
            self.0
                .call_ok(
                    sb.id(),
                    Request::RemoveContainer { id },
                    Duration::from_secs(60),
                )
                .await?;
        } else {
            // No monitor: the record is all that is left of it.
            let paths = self.0.roots.pod(sb.id());
            let mut st = husk_sandbox::state::PodStatus::load(&paths).map_err(internal)?;
            st.cri_containers.retain(|c| c.id != id);
            st.save(&paths).map_err(internal)?;
        }
        Ok(Response::new(cri::RemoveContainerResponse {}))
    }

    async fn list_containers(
        &self,
        req: Req<cri::ListContainersRequest>,
    ) -> R<cri::ListContainersResponse> {
        let f = req.into_inner().filter.unwrap_or_default();
        let mut containers = Vec::new();
        for sb in self.0.sandboxes() {
            if !f.pod_sandbox_id.is_empty() && !sb.id().starts_with(&f.pod_sandbox_id) {
                continue;
            }
            for c in sb.containers() {
                let out = to_container(&sb, c);
                if (f.id.is_empty() || c.id.starts_with(&f.id))
                    && f.state.as_ref().is_none_or(|s| s.state == out.state)
                    && labels_match(&c.meta.labels, &f.label_selector)
                {
                    containers.push(out);
                }
            }
        }
        Ok(Response::new(cri::ListContainersResponse { containers }))
    }

    async fn container_status(
        &self,
        req: Req<cri::ContainerStatusRequest>,
    ) -> R<cri::ContainerStatusResponse> {
        let req = req.into_inner();
        let (sb, c) = self.0.container(&req.container_id)?;
        let mut info = HashMap::new();
        if req.verbose {
            info.insert(
                "info".into(),
                serde_json::json!({ "podSandboxId": sb.id(), "monitorAlive": sb.monitor_alive() })
                    .to_string(),
            );
        }
        Ok(Response::new(cri::ContainerStatusResponse {
            status: Some(to_container_status(&sb, &c)),
            info,
        }))
    }

    async fn update_container_resources(
        &self,
        req: Req<cri::UpdateContainerResourcesRequest>,
    ) -> R<cri::UpdateContainerResourcesResponse> {
        let req = req.into_inner();
        let (sb, c) = self.0.container(&req.container_id)?;
        if sb.cri.runtime_handler != HANDLER_VM {
            return Err(Status::unimplemented(format!(
                "{}: a wasm container's memory limit is fixed when it starts",
                sb.cri.runtime_handler
            )));
        }
        let res = req.linux.unwrap_or_default();
        let memory_bytes =
            (res.memory_limit_in_bytes > 0).then_some(res.memory_limit_in_bytes as u64);
        let cpu_millis = (res.cpu_quota > 0 && res.cpu_period > 0)
            .then(|| (res.cpu_quota * 1000 / res.cpu_period) as u64);
        self.0
            .call_ok(
                sb.id(),
                Request::Update {
                    container: Some(c.id),
                    memory_bytes,
                    cpu_millis,
                },
                Duration::from_secs(10),
            )
            .await?;
        Ok(Response::new(cri::UpdateContainerResourcesResponse {}))
    }

    async fn reopen_container_log(
        &self,
        req: Req<cri::ReopenContainerLogRequest>,
    ) -> R<cri::ReopenContainerLogResponse> {
        let id = req.into_inner().container_id;
        let (sb, c) = self.0.container(&id)?;
        if c.state != CriState::Running || !sb.monitor_alive() {
            return Err(Status::failed_precondition(format!(
                "container {id} is not running"
            )));
        }
        self.0
            .call_ok(sb.id(), Request::ReopenLog { id }, Duration::from_secs(10))
            .await?;
        Ok(Response::new(cri::ReopenContainerLogResponse {}))
    }

    async fn exec_sync(&self, req: Req<cri::ExecSyncRequest>) -> R<cri::ExecSyncResponse> {
        let req = req.into_inner();
        let (sb, c) = self.0.container(&req.container_id)?;
        if req.cmd.is_empty() {
            return Err(Status::invalid_argument("cmd is empty"));
        }
        process_host(&sb, &c, "exec", true)?;
        // No timeout: a day, as good as none for a probe.
        let secs = if req.timeout > 0 {
            req.timeout as u64
        } else {
            24 * 3600
        };
        let reply = self
            .0
            .call_ok(
                sb.id(),
                Request::Exec {
                    container: Some(c.id.clone()),
                    argv: req.cmd,
                    timeout_secs: secs,
                },
                Duration::from_secs(secs + 30),
            )
            .await?;
        let out = reply
            .exec
            .ok_or_else(|| Status::internal("the monitor's exec reply had no output"))?;
        Ok(Response::new(cri::ExecSyncResponse {
            stdout: out.stdout,
            stderr: out.stderr,
            exit_code: out.exit_code,
        }))
    }

    async fn exec(&self, req: Req<cri::ExecRequest>) -> R<cri::ExecResponse> {
        let req = req.into_inner();
        if req.cmd.is_empty() {
            return Err(Status::invalid_argument("cmd is empty"));
        }
        if req.tty && req.stderr {
            return Err(Status::invalid_argument(
                "tty and stderr cannot both be set (a terminal has one output stream)",
            ));
        }
        let io = Io {
            stdin: req.stdin,
            stdout: req.stdout,
            stderr: req.stderr,
            tty: req.tty,
        };
        let (sb, c) = self.stream_target(&req.container_id, io, "exec")?;
        let spec = husk_sandbox::ExecSpec {
            argv: req.cmd.clone(),
            tty: req
                .tty
                .then_some(husk_sandbox::TtySize { rows: 24, cols: 80 }),
            copy: None,
        };
        let url = self.0.streaming.register(Pending::Process {
            pod: sb.id().to_owned(),
            request: Request::ExecStream {
                container: Some(c.id),
                spec,
            },
            label: req.cmd,
            io,
        });
        Ok(Response::new(cri::ExecResponse { url }))
    }

    async fn attach(&self, req: Req<cri::AttachRequest>) -> R<cri::AttachResponse> {
        let req = req.into_inner();
        let io = Io {
            stdin: req.stdin,
            stdout: req.stdout,
            stderr: req.stderr,
            tty: req.tty,
        };
        let (sb, c) = self.stream_target(&req.container_id, io, "attach")?;
        if req.stdin && !c.meta.stdin {
            return Err(Status::invalid_argument(format!(
                "container {} was created without stdin; attach without it",
                c.id
            )));
        }
        let url = self.0.streaming.register(Pending::Process {
            pod: sb.id().to_owned(),
            label: vec![format!("attach {}", c.id)],
            request: Request::AttachStream { id: c.id },
            io: Io {
                // A terminal has one output stream.
                stderr: req.stderr && !c.meta.tty,
                ..io
            },
        });
        Ok(Response::new(cri::AttachResponse { url }))
    }

    async fn port_forward(&self, req: Req<cri::PortForwardRequest>) -> R<cri::PortForwardResponse> {
        let req = req.into_inner();
        let sb = self.0.sandbox(&req.pod_sandbox_id)?;
        let mut ports = Vec::new();
        for p in &req.port {
            ports.push(
                u16::try_from(*p)
                    .ok()
                    .filter(|p| *p > 0)
                    .ok_or_else(|| Status::invalid_argument(format!("port {p} is not a port")))?,
            );
        }
        if !sb.ready() {
            return Err(Status::failed_precondition(format!(
                "pod sandbox {} is not ready",
                sb.id()
            )));
        }
        let target = if sb.cri.runtime_handler == HANDLER_VM {
            // Containers share the VM's network: any running one reaches
            // the pod's localhost.
            let running = sb.status.as_ref().and_then(|st| {
                st.cri_containers
                    .iter()
                    .find(|c| c.state == CriState::Running)
                    .map(|c| c.id.clone())
            });
            let container = running.ok_or_else(|| {
                Status::failed_precondition(format!(
                    "pod sandbox {} has no running container to forward to",
                    sb.id()
                ))
            })?;
            Forward::Vm { container }
        } else {
            Forward::Netns(self.0.roots.pod(sb.id()).netns)
        };
        let url = self.0.streaming.register(Pending::PortForward {
            pod: sb.id().to_owned(),
            ports,
            target,
        });
        Ok(Response::new(cri::PortForwardResponse { url }))
    }

    async fn container_stats(
        &self,
        req: Req<cri::ContainerStatsRequest>,
    ) -> R<cri::ContainerStatsResponse> {
        let (sb, c) = self.0.container(&req.into_inner().container_id)?;
        let usage = self.usage(&sb).await;
        Ok(Response::new(cri::ContainerStatsResponse {
            stats: Some(stats_of(&c, usage.as_ref())),
        }))
    }

    async fn list_container_stats(
        &self,
        req: Req<cri::ListContainerStatsRequest>,
    ) -> R<cri::ListContainerStatsResponse> {
        let f = req.into_inner().filter.unwrap_or_default();
        let mut stats = Vec::new();
        for sb in self.0.sandboxes() {
            if !f.pod_sandbox_id.is_empty() && !sb.id().starts_with(&f.pod_sandbox_id) {
                continue;
            }
            let wanted: Vec<&CriContainer> = sb
                .containers()
                .iter()
                .filter(|c| {
                    (f.id.is_empty() || c.id.starts_with(&f.id))
                        && labels_match(&c.meta.labels, &f.label_selector)
                        && c.state == CriState::Running
                })
                .collect();
            if wanted.is_empty() {
                continue;
            }
            let usage = self.usage(&sb).await;
            stats.extend(wanted.into_iter().map(|c| stats_of(c, usage.as_ref())));
        }
        Ok(Response::new(cri::ListContainerStatsResponse { stats }))
    }

    async fn pod_sandbox_stats(
        &self,
        req: Req<cri::PodSandboxStatsRequest>,
    ) -> R<cri::PodSandboxStatsResponse> {
        let sb = self.0.sandbox(&req.into_inner().pod_sandbox_id)?;
        let usage = self.usage(&sb).await;
        Ok(Response::new(cri::PodSandboxStatsResponse {
            stats: Some(sandbox_stats(&sb, usage.as_ref())),
        }))
    }

    async fn list_pod_sandbox_stats(
        &self,
        req: Req<cri::ListPodSandboxStatsRequest>,
    ) -> R<cri::ListPodSandboxStatsResponse> {
        let f = req.into_inner().filter.unwrap_or_default();
        let mut stats = Vec::new();
        for sb in self
            .0
            .sandboxes()
            .iter()
            .filter(|sb| f.id.is_empty() || sb.id().starts_with(&f.id))
            .filter(|sb| labels_match(&sb.record.plan.labels, &f.label_selector))
            .filter(|sb| sb.ready())
        {
            let usage = self.usage(sb).await;
            stats.push(sandbox_stats(sb, usage.as_ref()));
        }
        Ok(Response::new(cri::ListPodSandboxStatsResponse { stats }))
    }

    async fn update_runtime_config(
        &self,
        _: Req<cri::UpdateRuntimeConfigRequest>,
    ) -> R<cri::UpdateRuntimeConfigResponse> {
        // The pod CIDR comes from husk's CNI configuration, not from here.
        Ok(Response::new(cri::UpdateRuntimeConfigResponse {}))
    }

    async fn status(&self, req: Req<cri::StatusRequest>) -> R<cri::StatusResponse> {
        let verbose = req.into_inner().verbose;
        let cni = Path::new("/usr/lib/cni/bridge").is_file()
            || Path::new("/opt/cni/bin/bridge").is_file();
        let conditions = vec![
            cri::RuntimeCondition {
                r#type: "RuntimeReady".into(),
                status: true,
                reason: String::new(),
                message: String::new(),
            },
            cri::RuntimeCondition {
                r#type: "NetworkReady".into(),
                status: cni,
                reason: if cni {
                    String::new()
                } else {
                    "NetworkPluginNotReady".into()
                },
                message: if cni {
                    String::new()
                } else {
                    "no CNI bridge plugin in /usr/lib/cni or /opt/cni/bin (install containernetworking-plugins)".into()
                },
            },
        ];
        let mut info = HashMap::new();
        if verbose {
            info.insert(
                "config".into(),
                serde_json::json!({
                    "defaultRuntimeHandler": self.0.default_handler,
                    "runRoot": self.0.roots.run,
                    "libRoot": self.0.roots.lib,
                })
                .to_string(),
            );
        }
        Ok(Response::new(cri::StatusResponse {
            status: Some(cri::RuntimeStatus { conditions }),
            info,
            runtime_handlers: [HANDLER_WASM, HANDLER_VM]
                .iter()
                .map(|h| cri::RuntimeHandler {
                    name: h.to_string(),
                    features: Some(cri::RuntimeHandlerFeatures::default()),
                })
                .collect(),
            // supplementalGroupsPolicy (Merge and Strict) is honoured in
            // VM containers; wasm guests have no groups.
            features: Some(cri::RuntimeFeatures {
                supplemental_groups_policy: true,
            }),
        }))
    }

    async fn checkpoint_container(
        &self,
        _: Req<cri::CheckpointContainerRequest>,
    ) -> R<cri::CheckpointContainerResponse> {
        Err(Status::unimplemented("checkpointing is not supported"))
    }

    type GetContainerEventsStream = std::pin::Pin<
        Box<
            dyn tokio_stream::Stream<Item = Result<cri::ContainerEventResponse, Status>>
                + Send
                + 'static,
        >,
    >;

    async fn get_container_events(
        &self,
        _: Req<cri::GetEventsRequest>,
    ) -> R<Self::GetContainerEventsStream> {
        let rx = crate::events::subscribe(&self.0).map_err(internal)?;
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(rx),
        )))
    }

    async fn list_metric_descriptors(
        &self,
        _: Req<cri::ListMetricDescriptorsRequest>,
    ) -> R<cri::ListMetricDescriptorsResponse> {
        // Stats come from ContainerStats and PodSandboxStats; the
        // cAdvisor-style metrics are not served (the kubelet then uses
        // the stats calls).
        Err(Status::unimplemented(
            "metric descriptors are not served; use the stats calls",
        ))
    }

    async fn list_pod_sandbox_metrics(
        &self,
        _: Req<cri::ListPodSandboxMetricsRequest>,
    ) -> R<cri::ListPodSandboxMetricsResponse> {
        Err(Status::unimplemented(
            "pod sandbox metrics are not served; use the stats calls",
        ))
    }

    async fn runtime_config(
        &self,
        _: Req<cri::RuntimeConfigRequest>,
    ) -> R<cri::RuntimeConfigResponse> {
        Ok(Response::new(cri::RuntimeConfigResponse {
            linux: Some(cri::LinuxRuntimeConfiguration {
                cgroup_driver: cri::CgroupDriver::Cgroupfs as i32,
            }),
        }))
    }
}

/// A wasm container's stats: who it is; husk does not meter a wasm guest's
/// CPU or memory separately from its pod's monitor, so those are absent
/// rather than made up.
/// CPU and memory figures as CRI has them, at `ts` (ns since the epoch).
fn cpu_mem(
    ts: i64,
    cpu_usec: u64,
    memory_bytes: u64,
    available: Option<u64>,
) -> (cri::CpuUsage, cri::MemoryUsage) {
    let v = |x: u64| Some(cri::UInt64Value { value: x });
    (
        cri::CpuUsage {
            timestamp: ts,
            usage_core_nano_seconds: v(cpu_usec.saturating_mul(1000)),
            ..Default::default()
        },
        cri::MemoryUsage {
            timestamp: ts,
            working_set_bytes: v(memory_bytes),
            usage_bytes: v(memory_bytes),
            available_bytes: available.and_then(v),
            ..Default::default()
        },
    )
}

fn now_ns() -> i64 {
    chrono::Utc::now().timestamp_nanos_opt().unwrap_or_default()
}

/// A container's stats: its attributes, and its CPU and memory when the
/// sandbox measures them (VM sandboxes: the container's cgroup in the
/// guest); wasm sandboxes leave the figures out rather than make them up.
fn stats_of(c: &CriContainer, usage: Option<&husk_sandbox::PodStats>) -> cri::ContainerStats {
    let measured = usage.and_then(|u| u.containers.iter().find(|x| x.name == c.id));
    let (cpu, memory) = match measured {
        Some(m) => {
            let (cpu, mem) = cpu_mem(
                now_ns(),
                m.cpu_usage_usec,
                m.memory_bytes,
                m.memory_limit_bytes
                    .map(|l| l.saturating_sub(m.memory_bytes)),
            );
            (Some(cpu), Some(mem))
        }
        None => (None, None),
    };
    cri::ContainerStats {
        cpu,
        memory,
        attributes: Some(cri::ContainerAttributes {
            id: c.id.clone(),
            metadata: Some(cri::ContainerMetadata {
                name: c.meta.name.clone(),
                attempt: c.meta.attempt,
            }),
            labels: hmap(&c.meta.labels),
            annotations: hmap(&c.meta.annotations),
        }),
        ..Default::default()
    }
}

fn sandbox_stats(sb: &SandboxView, usage: Option<&husk_sandbox::PodStats>) -> cri::PodSandboxStats {
    let (cpu, memory) = match usage.and_then(|u| u.vm.as_ref()) {
        Some(vm) => {
            let used = vm
                .memory_total_bytes
                .saturating_sub(vm.memory_available_bytes);
            let (cpu, mem) = cpu_mem(
                now_ns(),
                vm.cpu_usage_usec,
                used,
                Some(vm.memory_available_bytes),
            );
            (Some(cpu), Some(mem))
        }
        None => (None, None),
    };
    cri::PodSandboxStats {
        attributes: Some(cri::PodSandboxAttributes {
            id: sb.id().to_owned(),
            metadata: Some(sandbox_meta(sb)),
            labels: hmap(&sb.record.plan.labels),
            annotations: hmap(&sb.record.plan.annotations),
        }),
        linux: Some(cri::LinuxPodSandboxStats {
            containers: sb
                .containers()
                .iter()
                .filter(|c| c.state == CriState::Running)
                .map(|c| stats_of(c, usage))
                .collect(),
            cpu,
            memory,
            ..Default::default()
        }),
        windows: None,
    }
}
