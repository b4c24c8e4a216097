//! Per-pod networking: the pod's network namespace (a bind-mounted nsfs file
//! under the run root) and the CNI plugins that wire it up, called as
//! containerd and CRI-O call them (ADD on create, DEL in reverse order on
//! removal). [`PodNetwork`] owns both; it removes them in `teardown`, and on
//! every error path of `setup` before returning.

use crate::config::NetworkConfig;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use std::io::Write;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

#[derive(Debug, thiserror::Error)]
pub enum NetworkError {
    #[error("network namespace {path}: {msg}")]
    Netns { path: PathBuf, msg: String },
    #[error("CNI config {path}: {msg}")]
    Config { path: PathBuf, msg: String },
    #[error("CNI plugin {plugin:?} not found in {dirs}; install containernetworking-plugins")]
    PluginMissing { plugin: String, dirs: String },
    #[error("CNI plugin {plugin} {command} failed: {msg}")]
    Plugin {
        plugin: String,
        command: String,
        msg: String,
    },
}

/// Plugins that create host-wide iptables chains (CNI-HOSTPORT-*, CNI-FORWARD,
/// the bridge's masquerade chains). They check for a chain, then create it,
/// so two pods set up at once (two monitors, or two husk roots) fail with
/// "chain already exists"; husk runs them one at a time on the host.
const HOST_TABLE_PLUGINS: &[&str] = &["portmap", "firewall", "bridge"];
/// The host-wide lock for them: not iptables' own /run/xtables.lock, which
/// the plugins' iptables calls take inside.
const HOST_TABLES_LOCK: &str = "/run/lock/husk-cni-host-tables.lock";

/// How long a pod's CNI call waits for a plugin of an earlier, killed
/// call of the same pod to end.
const PLUGIN_LOCK_WAIT: std::time::Duration = std::time::Duration::from_secs(60);

/// An exclusive flock on [`HOST_TABLES_LOCK`], released on drop (and by the
/// kernel when the process dies).
struct HostTablesLock {
    _file: std::fs::File,
}

impl HostTablesLock {
    fn take() -> std::io::Result<Self> {
        let path = Path::new(HOST_TABLES_LOCK);
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        let f = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(path)?;
        loop {
            // SAFETY: flock on a descriptor this function owns.
            if unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX) } == 0 {
                return Ok(HostTablesLock { _file: f });
            }
            let e = std::io::Error::last_os_error();
            if e.kind() != std::io::ErrorKind::Interrupted {
                return Err(e);
            }
        }
    }
}

/// A resolved CNI network: a conflist and where its plugins live.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CniNetwork {
    pub conflist: Value,
    pub source: PathBuf,
    pub bin_dirs: Vec<PathBuf>,
}

impl CniNetwork {
    /// The first `*.conflist` in the configured dir, else husk's default
    /// (bridge + host-local, dual-stack when `subnet6` is set, plus
    /// portmap when the pod maps host ports),
    /// written under `cni_dir` so users can see what runs.
    pub fn resolve(
        cfg: &NetworkConfig,
        cni_dir: &Path,
        with_portmap: bool,
    ) -> Result<Self, NetworkError> {
        if let Ok(rd) = std::fs::read_dir(&cfg.cni_conf_dir) {
            let mut lists: Vec<PathBuf> = rd
                .flatten()
                .map(|e| e.path())
                .filter(|p| p.extension().is_some_and(|e| e == "conflist"))
                .collect();
            lists.sort();
            if let Some(first) = lists.first() {
                let text = std::fs::read_to_string(first).map_err(|e| NetworkError::Config {
                    path: first.clone(),
                    msg: e.to_string(),
                })?;
                let conflist: Value =
                    serde_json::from_str(&text).map_err(|e| NetworkError::Config {
                        path: first.clone(),
                        msg: e.to_string(),
                    })?;
                return Ok(Self {
                    conflist,
                    source: first.clone(),
                    bin_dirs: cfg.cni_bin_dirs.clone(),
                });
            }
        }
        let mut ranges = vec![json!([{ "subnet": cfg.subnet }])];
        if let Some(v6) = &cfg.subnet6 {
            ranges.push(json!([{ "subnet": v6 }]));
        }
        let mut plugins = vec![json!({
            "type": "bridge",
            "bridge": cfg.bridge,
            "isGateway": true,
            "ipMasq": false,
            "hairpinMode": true,
            "ipam": {
                "type": "host-local",
                "ranges": ranges,
                "dataDir": cni_dir.join("ipam"),
            }
        })];
        if with_portmap {
            plugins.push(json!({ "type": "portmap", "capabilities": { "portMappings": true } }));
        }
        let conflist = json!({ "cniVersion": "1.0.0", "name": cfg.name, "plugins": plugins });
        let name = if with_portmap {
            "husk-default-portmap.conflist"
        } else {
            "husk-default.conflist"
        };
        let source = cni_dir.join(name);
        let text = serde_json::to_vec_pretty(&conflist).expect("json");
        if std::fs::read(&source).ok().as_deref() != Some(&text[..]) {
            crate::state::write_atomic(&source, &text).map_err(|e| NetworkError::Config {
                path: source.clone(),
                msg: e.to_string(),
            })?;
        }
        Ok(Self {
            conflist,
            source,
            bin_dirs: cfg.cni_bin_dirs.clone(),
        })
    }

    fn plugins(&self) -> Result<Vec<Value>, NetworkError> {
        self.conflist
            .get("plugins")
            .and_then(|p| p.as_array())
            .cloned()
            .ok_or_else(|| NetworkError::Config {
                path: self.source.clone(),
                msg: "no \"plugins\" list".into(),
            })
    }

    fn find_plugin(&self, ty: &str) -> Result<PathBuf, NetworkError> {
        for d in &self.bin_dirs {
            let p = d.join(ty);
            if p.is_file() {
                return Ok(p);
            }
        }
        Err(NetworkError::PluginMissing {
            plugin: ty.into(),
            dirs: self
                .bin_dirs
                .iter()
                .map(|d| d.display().to_string())
                .collect::<Vec<_>>()
                .join(":"),
        })
    }
}

/// What is needed to undo an attachment, persisted so that `husk rm` can
/// clean up after a monitor that died.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct NetworkRecord {
    pub container_id: String,
    pub netns: PathBuf,
    pub ifname: String,
    pub network: CniNetwork,
    /// Result of the last successful ADD (CNI DEL gets it as prevResult).
    pub result: Option<Value>,
    /// How many plugins of the list were added (DEL runs those in reverse).
    pub added: usize,
    pub runtime_config: Value,
    pub cni_args: String,
}

impl NetworkRecord {
    /// The pod's addresses from the ADD result, without prefix length: the
    /// first IPv4 one first (the pod's primary IP, as containerd picks
    /// it), then the others in CNI's order.
    pub fn pod_ips(&self) -> Vec<String> {
        let mut ips: Vec<String> = self
            .addresses()
            .into_iter()
            .map(|(a, _)| a.split('/').next().unwrap_or(&a).to_owned())
            .collect();
        if let Some(v4) = ips
            .iter()
            .position(|a| a.parse::<std::net::Ipv4Addr>().is_ok())
        {
            let first = ips.remove(v4);
            ips.insert(0, first);
        }
        ips
    }

    /// The pod's primary IP (see [`pod_ips`](Self::pod_ips)).
    pub fn pod_ip(&self) -> Option<String> {
        self.pod_ips().into_iter().next()
    }

    /// Each address of the ADD result with its prefix length, and its
    /// gateway: what a VM's NIC takes over.
    pub fn addresses(&self) -> Vec<(String, Option<String>)> {
        let Some(ips) = self
            .result
            .as_ref()
            .and_then(|r| r.get("ips"))
            .and_then(|i| i.as_array())
        else {
            return Vec::new();
        };
        ips.iter()
            .filter_map(|ip| {
                let cidr = ip.get("address")?.as_str()?.to_owned();
                let gw = ip
                    .get("gateway")
                    .and_then(|g| g.as_str())
                    .map(str::to_owned);
                Some((cidr, gw))
            })
            .collect()
    }
}

/// Creates a network namespace and pins it at `path` (a bind mount of the
/// nsfs inode), without changing the caller's namespace.
pub fn create_netns(path: &Path) -> Result<(), NetworkError> {
    let err = |msg: String| NetworkError::Netns {
        path: path.to_owned(),
        msg,
    };
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(|e| err(e.to_string()))?;
    }
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(path)
        .map_err(|e| err(format!("cannot create the mount point: {e}")))?;
    let target = path.to_owned();
    // A short-lived thread unshares so the caller's thread stays where it is.
    let res = std::thread::spawn(move || -> Result<(), String> {
        nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET)
            .map_err(|e| format!("unshare(CLONE_NEWNET): {e}"))?;
        nix::mount::mount(
            Some("/proc/thread-self/ns/net"),
            &target,
            None::<&str>,
            nix::mount::MsFlags::MS_BIND,
            None::<&str>,
        )
        .map_err(|e| format!("bind mount: {e}"))
    })
    .join()
    .unwrap_or_else(|_| Err("namespace thread panicked".into()));
    if let Err(msg) = res {
        let _ = std::fs::remove_file(path);
        return Err(err(msg));
    }
    Ok(())
}

/// Unpins and removes a namespace created by [`create_netns`]. Missing is fine.
pub fn delete_netns(path: &Path) -> Result<(), NetworkError> {
    if !path.exists() {
        return Ok(());
    }
    match nix::mount::umount2(path, nix::mount::MntFlags::MNT_DETACH) {
        Ok(()) | Err(nix::errno::Errno::EINVAL) | Err(nix::errno::Errno::ENOENT) => {}
        Err(e) => {
            return Err(NetworkError::Netns {
                path: path.to_owned(),
                msg: format!("umount: {e}"),
            })
        }
    }
    std::fs::remove_file(path).map_err(|e| NetworkError::Netns {
        path: path.to_owned(),
        msg: e.to_string(),
    })
}

/// Writes `net.*` sysctls in the network namespace pinned at `netns`, from
/// a thread of its own that enters it (/proc/sys/net shows the opening
/// thread's namespace).
pub fn set_sysctls(netns: &Path, sysctls: &[(String, String)]) -> Result<(), NetworkError> {
    let netns = netns.to_owned();
    let list = sysctls.to_vec();
    let err = |msg: String| NetworkError::Netns {
        path: netns.clone(),
        msg,
    };
    for (name, _) in &list {
        if !(name.starts_with("net.") || name.starts_with("net/")) {
            return Err(err(format!(
                "sysctl {name:?} is not a network namespace's (net.*)"
            )));
        }
    }
    let path = netns.clone();
    std::thread::spawn(move || -> Result<(), NetworkError> {
        enter_netns(&path)?;
        for (name, value) in &list {
            let rel =
                husk_protocol::seccomp::sysctl_path(name).map_err(|msg| NetworkError::Netns {
                    path: path.clone(),
                    msg,
                })?;
            std::fs::write(Path::new("/proc/sys").join(rel), value).map_err(|e| {
                NetworkError::Netns {
                    path: path.clone(),
                    msg: format!("sysctl {name}={value:?}: {e}"),
                }
            })?;
        }
        Ok(())
    })
    .join()
    .map_err(|_| err("sysctl thread panicked".into()))?
}

/// Moves the calling thread into the namespace pinned at `path`.
pub fn enter_netns(path: &Path) -> Result<(), NetworkError> {
    let f = std::fs::File::open(path).map_err(|e| NetworkError::Netns {
        path: path.to_owned(),
        msg: e.to_string(),
    })?;
    nix::sched::setns(f.as_fd(), nix::sched::CloneFlags::CLONE_NEWNET).map_err(|e| {
        NetworkError::Netns {
            path: path.to_owned(),
            msg: format!("setns: {e}"),
        }
    })
}

/// An fd of the calling thread's current netns, to come back to it.
pub fn current_netns() -> std::io::Result<OwnedFd> {
    Ok(std::fs::File::open("/proc/thread-self/ns/net")?.into())
}

/// Moves the calling thread into the namespace of `fd`.
pub fn enter_netns_fd(fd: &OwnedFd) -> nix::Result<()> {
    nix::sched::setns(fd.as_fd(), nix::sched::CloneFlags::CLONE_NEWNET)
}

/// Brings the loopback interface of the calling thread's netns up.
pub fn loopback_up() -> std::io::Result<()> {
    // SAFETY: plain socket(2); the fd is wrapped in OwnedFd right away.
    let raw = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if raw < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: `raw` is a fresh, valid fd that nothing else owns.
    let sock = unsafe { <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(raw) };
    // SAFETY: ifreq is plain old data; zeroed is a valid value.
    let mut ifr: libc::ifreq = unsafe { std::mem::zeroed() };
    for (d, s) in ifr.ifr_name.iter_mut().zip(b"lo\0") {
        *d = *s as libc::c_char;
    }
    // SAFETY: SIOCGIFFLAGS reads into `ifr`, which outlives the call.
    if unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCGIFFLAGS, &mut ifr) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: the flags member of the union was just filled by the kernel.
    unsafe { ifr.ifr_ifru.ifru_flags |= libc::IFF_UP as libc::c_short };
    // SAFETY: SIOCSIFFLAGS reads `ifr`, which outlives the call.
    if unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCSIFFLAGS, &ifr) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// The pod's attachment: namespace + CNI.
pub struct PodNetwork {
    pub record: NetworkRecord,
    /// Where the record is kept while the attachment exists (None: not
    /// kept, the caller owns the attachment alone).
    record_path: Option<PathBuf>,
}

impl PodNetwork {
    /// The attachment a record kept at `path` describes (from a monitor
    /// that died): [`teardown`](Self::teardown) undoes it and then removes
    /// the record.
    pub fn recorded(record: NetworkRecord, path: PathBuf) -> Self {
        PodNetwork {
            record,
            record_path: Some(path),
        }
    }

    /// The network of the pod `plan` at `paths`: CNI from the config and
    /// `cni_dir` (portmap when it maps host ports), the netns and CNI ADD,
    /// and the record that lets a later `husk rm` undo it. Nothing is left
    /// when any step fails. From a thread in the host's network namespace.
    pub fn for_pod(
        plan: &crate::pod::PodPlan,
        paths: &crate::state::PodPaths,
        config: &NetworkConfig,
        cni_dir: &Path,
    ) -> Result<Self, crate::SandboxError> {
        let host_ports = plan.host_ports();
        let cni = CniNetwork::resolve(config, cni_dir, !host_ports.is_empty())?;
        let record = paths.network_record();
        let mut net = PodNetwork::setup(
            cni,
            &paths.id,
            &paths.netns,
            &plan.name,
            &plan.namespace,
            &host_ports,
            Some(&record),
        )?;
        // A wasm pod's kernel is the host's: its net.* sysctls (the only
        // ones it may have) go into its network namespace. A VM pod's go
        // into its guest.
        if plan.runtime_class != crate::pod::manifest::RUNTIME_VM && !plan.sysctls.is_empty() {
            if let Err(e) = set_sysctls(&paths.netns, &plan.sysctls) {
                let _ = net.teardown();
                return Err(e.into());
            }
        }
        Ok(net)
    }

    /// Creates the netns at `netns` and runs CNI ADD for every plugin. On
    /// failure everything done so far is undone before the error returns.
    /// With `record`, what is about to be made is written there before it
    /// is made (the netns, then each plugin's ADD), so that whoever finds
    /// the record after this process died (kill -9 half-way) can undo it:
    /// CNI DEL of a plugin whose ADD never ran or never ended is harmless
    /// (plugins must tolerate it). Must be called from a thread in the
    /// host's network namespace.
    pub fn setup(
        network: CniNetwork,
        container_id: &str,
        netns: &Path,
        pod_name: &str,
        pod_namespace: &str,
        port_mappings: &[(u16, u16, String)],
        record: Option<&Path>,
    ) -> Result<Self, NetworkError> {
        let mappings: Vec<Value> = port_mappings
            .iter()
            .map(|(h, c, p)| json!({ "hostPort": h, "containerPort": c, "protocol": p }))
            .collect();
        let mut me = PodNetwork {
            record: NetworkRecord {
                container_id: container_id.to_owned(),
                netns: netns.to_owned(),
                ifname: "eth0".into(),
                network,
                result: None,
                added: 0,
                runtime_config: json!({ "portMappings": mappings }),
                cni_args: format!(
                    "IgnoreUnknown=1;K8S_POD_NAMESPACE={pod_namespace};K8S_POD_NAME={pod_name};K8S_POD_INFRA_CONTAINER_ID={container_id}"
                ),
            },
            record_path: record.map(Path::to_owned),
        };
        me.persist()?;
        if let Err(e) = create_netns(netns) {
            me.forget();
            return Err(e);
        }
        if let Err(e) = me.add_all() {
            let _ = me.teardown();
            return Err(e);
        }
        Ok(me)
    }

    fn add_all(&mut self) -> Result<(), NetworkError> {
        let plugins = self.record.network.plugins()?;
        let mut prev: Option<Value> = None;
        for p in plugins {
            // Recorded as added before it runs: a DEL is due from here on.
            self.record.added += 1;
            self.persist()?;
            let out = self.exec("ADD", &p, prev.as_ref())?;
            prev = Some(out);
            self.record.result = prev.clone();
        }
        self.persist()
    }

    /// Writes the record where it is kept, when it is kept.
    fn persist(&self) -> Result<(), NetworkError> {
        let Some(path) = &self.record_path else {
            return Ok(());
        };
        crate::state::write_json_atomic(path, &self.record).map_err(|e| NetworkError::Netns {
            path: self.record.netns.clone(),
            msg: format!("cannot record the pod's network: {e}"),
        })
    }

    /// The pod's plugin lock (`network.lock` beside the kept record), taken:
    /// every plugin runs holding it and hands it down (the descriptor is
    /// inherited by the plugin and whatever it runs, iptables included),
    /// so that when the monitor is killed during an ADD, the orphaned
    /// plugin keeps it until it ends, and whoever releases the pod's
    /// network (`husk rm`, a failed start) runs its DELs after that ADD,
    /// not beside it (a DEL beside an ADD leaves chains, leases and links
    /// that nothing records). None when no record is kept.
    fn plugins_lock(&self) -> Result<Option<std::fs::File>, String> {
        let Some(record) = &self.record_path else {
            return Ok(None);
        };
        let path = record.with_extension("lock");
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        }
        let f = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(|e| format!("{}: {e}", path.display()))?;
        let t0 = std::time::Instant::now();
        loop {
            // SAFETY: flock on a descriptor this function owns.
            if unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } == 0 {
                return Ok(Some(f));
            }
            let e = std::io::Error::last_os_error();
            if e.kind() != std::io::ErrorKind::WouldBlock
                && e.kind() != std::io::ErrorKind::Interrupted
            {
                return Err(format!("cannot lock {}: {e}", path.display()));
            }
            if t0.elapsed() > PLUGIN_LOCK_WAIT {
                return Err(format!(
                    "a CNI plugin of this pod still runs after {}s (it holds {}); try again once it ended",
                    PLUGIN_LOCK_WAIT.as_secs(),
                    path.display()
                ));
            }
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
    }

    /// Removes the kept record: nothing of the attachment is left.
    fn forget(&self) {
        if let Some(path) = &self.record_path {
            let _ = std::fs::remove_file(path);
            let _ = std::fs::remove_file(path.with_extension("lock"));
        }
    }

    /// CNI DEL in reverse order, then the netns goes. Idempotent; keeps
    /// going past failures and reports the first.
    pub fn teardown(&mut self) -> Result<(), NetworkError> {
        let mut first_err = None;
        if let Ok(plugins) = self.record.network.plugins() {
            let n = self.record.added.min(plugins.len());
            for p in plugins[..n].iter().rev() {
                let prev = self.record.result.clone();
                if let Err(e) = self.exec("DEL", p, prev.as_ref()) {
                    first_err.get_or_insert(e);
                }
            }
        }
        self.record.added = 0;
        if let Err(e) = delete_netns(&self.record.netns) {
            first_err.get_or_insert(e);
        }
        if first_err.is_none() {
            self.forget();
        }
        match first_err {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    fn exec(
        &self,
        command: &str,
        plugin: &Value,
        prev: Option<&Value>,
    ) -> Result<Value, NetworkError> {
        let ty = plugin
            .get("type")
            .and_then(|t| t.as_str())
            .ok_or_else(|| NetworkError::Config {
                path: self.record.network.source.clone(),
                msg: "a plugin has no \"type\"".into(),
            })?
            .to_owned();
        let bin = self.record.network.find_plugin(&ty)?;
        let mut conf = plugin.clone();
        let obj = conf.as_object_mut().ok_or_else(|| NetworkError::Config {
            path: self.record.network.source.clone(),
            msg: format!("plugin {ty} is not an object"),
        })?;
        for k in ["name", "cniVersion"] {
            if let Some(v) = self.record.network.conflist.get(k) {
                obj.insert(k.into(), v.clone());
            }
        }
        if let Some(prev) = prev {
            obj.insert("prevResult".into(), prev.clone());
        }
        if let Some(caps) = plugin.get("capabilities").and_then(|c| c.as_object()) {
            let mut rc = serde_json::Map::new();
            for (cap, on) in caps {
                if on.as_bool() == Some(true) {
                    if let Some(v) = self.record.runtime_config.get(cap) {
                        rc.insert(cap.clone(), v.clone());
                    }
                }
            }
            obj.insert("runtimeConfig".into(), Value::Object(rc));
        }
        let path_env = self
            .record
            .network
            .bin_dirs
            .iter()
            .map(|d| d.display().to_string())
            .collect::<Vec<_>>()
            .join(":");
        let pod_lock = self.plugins_lock().map_err(|e| NetworkError::Plugin {
            plugin: ty.clone(),
            command: command.into(),
            msg: e,
        })?;
        let _host_tables = if HOST_TABLE_PLUGINS.contains(&ty.as_str()) {
            Some(HostTablesLock::take().map_err(|e| NetworkError::Plugin {
                plugin: ty.clone(),
                command: command.into(),
                msg: format!("cannot lock {HOST_TABLES_LOCK}: {e}"),
            })?)
        } else {
            None
        };
        let mut cmd = Command::new(&bin);
        // Both locks go down to the plugin and what it runs: a plugin
        // orphaned by a killed monitor holds them until it ends.
        let inherited: Vec<i32> = pod_lock
            .iter()
            .map(|f| f.as_raw_fd())
            .chain(_host_tables.iter().map(|l| l._file.as_raw_fd()))
            .collect();
        if !inherited.is_empty() {
            // SAFETY: fcntl on descriptors that stay open across the fork;
            // async-signal-safe, no allocation (the Vec is moved in).
            unsafe {
                std::os::unix::process::CommandExt::pre_exec(&mut cmd, move || {
                    for &fd in &inherited {
                        let flags = libc::fcntl(fd, libc::F_GETFD);
                        if flags < 0
                            || libc::fcntl(fd, libc::F_SETFD, flags & !libc::FD_CLOEXEC) < 0
                        {
                            return Err(std::io::Error::last_os_error());
                        }
                    }
                    Ok(())
                });
            }
        }
        let mut child = cmd
            .env_clear()
            .env("CNI_COMMAND", command)
            .env("CNI_CONTAINERID", &self.record.container_id)
            .env("CNI_NETNS", &self.record.netns)
            .env("CNI_IFNAME", &self.record.ifname)
            .env("CNI_PATH", &path_env)
            .env("CNI_ARGS", &self.record.cni_args)
            .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| NetworkError::Plugin {
                plugin: ty.clone(),
                command: command.into(),
                msg: format!("cannot start {}: {e}", bin.display()),
            })?;
        let input = serde_json::to_vec(&conf).expect("json");
        if let Some(mut stdin) = child.stdin.take() {
            let _ = stdin.write_all(&input);
        }
        let out = child.wait_with_output().map_err(|e| NetworkError::Plugin {
            plugin: ty.clone(),
            command: command.into(),
            msg: e.to_string(),
        })?;
        let parsed: Option<Value> = serde_json::from_slice(&out.stdout).ok();
        if !out.status.success() {
            let msg = parsed
                .as_ref()
                .and_then(|v| {
                    let m = v.get("msg")?.as_str()?;
                    let d = v.get("details").and_then(|d| d.as_str()).unwrap_or("");
                    Some(if d.is_empty() {
                        m.to_owned()
                    } else {
                        format!("{m}: {d}")
                    })
                })
                .unwrap_or_else(|| {
                    format!(
                        "{} {}",
                        out.status,
                        String::from_utf8_lossy(&out.stderr).trim()
                    )
                });
            return Err(NetworkError::Plugin {
                plugin: ty,
                command: command.into(),
                msg,
            });
        }
        Ok(match (command, parsed) {
            ("ADD", Some(v)) => v,
            (_, _) => prev.cloned().unwrap_or(Value::Null),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pod_ip_from_result() {
        let rec = NetworkRecord {
            container_id: "x".into(),
            netns: "/x".into(),
            ifname: "eth0".into(),
            network: CniNetwork {
                conflist: json!({}),
                source: "/x".into(),
                bin_dirs: vec![],
            },
            result: Some(json!({"ips": [{"address": "10.88.0.7/16"}]})),
            added: 1,
            runtime_config: json!({}),
            cni_args: String::new(),
        };
        assert_eq!(rec.pod_ip().as_deref(), Some("10.88.0.7"));
        // Dual-stack, IPv6 range first: the IPv4 address is still primary.
        let rec = NetworkRecord {
            result: Some(json!({"ips": [
                {"address": "fd00:88::7/64", "gateway": "fd00:88::1"},
                {"address": "10.88.0.7/16", "gateway": "10.88.0.1"},
            ]})),
            ..rec
        };
        assert_eq!(rec.pod_ips(), ["10.88.0.7", "fd00:88::7"]);
        assert_eq!(
            rec.addresses(),
            [
                ("fd00:88::7/64".to_owned(), Some("fd00:88::1".to_owned())),
                ("10.88.0.7/16".to_owned(), Some("10.88.0.1".to_owned())),
            ]
        );
    }
}
