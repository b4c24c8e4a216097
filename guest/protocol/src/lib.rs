//! The protocol between husk on the host and husk-agent, PID 1 inside a
//! microVM pod: the only crate both sides share. It owns the message types
//! and their framing, and does no I/O of its own beyond reading and writing
//! frames on a stream it is given (a virtio-serial port, a vsock or a unix
//! socket).
//!
//! A frame is a 4-byte big-endian length and that many bytes of JSON. The
//! host speaks first with [`Request::Hello`]; the agent answers with its own
//! version, and the host refuses an agent whose [`VERSION`] differs
//! ([`check_hello`]). After that both sides write whenever they have
//! something to say: the host starts processes (each under an id it
//! chooses), feeds their stdin and signals them; the agent reports each
//! process as [`Event::Started`] (or an [`Event::Error`] naming the id),
//! then its [`Event::Output`] as it comes, then exactly one
//! [`Event::Exited`] after the last output. Byte strings travel as base64.

use serde::{Deserialize, Serialize};
use std::io::{Read, Write};

pub mod copy;
pub mod projected;
pub mod seccomp;

pub use seccomp::{Seccomp, SeccompAction, SeccompArg, SeccompOp, SeccompRule};

/// The protocol version; bumped on every incompatible change.
pub const VERSION: u32 = 6;
/// The name of the virtio-serial port the agent listens on (QEMU).
pub const PORT_NAME: &str = "husk.agent";
/// The kernel command-line key that tells the agent where to serve.
pub const CMDLINE_KEY: &str = "husk.agent";

/// The vsock port `cmdline` (a kernel command line) tells the agent to
/// serve on, if it names one (`husk.agent=vsock:PORT`).
pub fn vsock_port(cmdline: &str) -> Option<u32> {
    cmdline
        .split_whitespace()
        .filter_map(|w| w.strip_prefix(CMDLINE_KEY)?.strip_prefix("=vsock:"))
        .next_back()?
        .parse()
        .ok()
}
/// The vsock port the agent listens on (husk-vmm).
pub const VSOCK_PORT: u32 = 1024;
/// The largest frame either side accepts: a hostile or broken peer cannot
/// make the other allocate more.
pub const MAX_FRAME: usize = 16 << 20;

#[derive(Debug, thiserror::Error)]
pub enum ProtocolError {
    /// The stream failed or ended in the middle of a frame.
    #[error("agent connection: {0}")]
    Io(#[from] std::io::Error),
    /// The peer closed the stream between frames.
    #[error("agent connection closed")]
    Closed,
    #[error("frame of {0} bytes is over the {MAX_FRAME}-byte limit")]
    TooLarge(usize),
    #[error("malformed frame: {0}")]
    Malformed(#[from] serde_json::Error),
    #[error("agent speaks protocol version {agent}, husk speaks {VERSION}: use the agent built with this husk")]
    Version { agent: u32 },
    #[error("unexpected answer from the agent: {0}")]
    Unexpected(String),
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum Request {
    /// The first request on a connection. The answer carries the same
    /// nonce, so a host that had to repeat its hello (a virtio-serial port
    /// drops what arrives before the guest opens it) can tell the answers
    /// apart.
    Hello {
        version: u32,
        nonce: u64,
        /// The host's wall clock (ms since the epoch): the agent sets the
        /// guest's from it when they differ (a VM without an RTC starts at
        /// 1970).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        time_unix_ms: Option<u64>,
    },
    /// Starts a process; the agent answers with Started or Error.
    Start(Box<StartRequest>),
    /// Bytes for a process's stdin; `eof` closes it after them.
    Stdin {
        id: String,
        #[serde(with = "b64")]
        data: Vec<u8>,
        #[serde(default)]
        eof: bool,
    },
    /// Sends a signal to a process.
    Signal { id: String, signal: i32 },
    /// Sets the window size of a process's terminal (one started with
    /// `tty`).
    Resize { id: String, size: TtySize },
    /// Gives the guest's NIC with this MAC the pod's addresses and default
    /// route; answered with NetworkReady or an Error.
    Network(NetworkConfig),
    /// Pod-wide settings, before any container starts (sysctls);
    /// answered with PodReady or an Error naming what failed.
    Pod(PodConfig),
    /// Makes a pod volume ready at `/run/husk/volumes/<name>` for
    /// containers to mount; answered with VolumeReady or an Error naming
    /// the volume.
    Volume(VolumeRequest),
    /// Replaces the files of an atomic tmpfs volume (a configMap or secret
    /// update) in one step; answered with VolumeReady or an Error naming
    /// the volume.
    UpdateFiles { name: String, files: Vec<File> },
    /// Asks for resource usage; answered with Stats.
    Stats,
    /// Changes a running container's limits (the container whose first
    /// process has `id`); answered with Updated or an Error naming it.
    Update { id: String, limits: Limits },
    /// Kills what still runs, syncs file systems and ends the VM (a reset,
    /// which the VMM turns into its exit).
    Shutdown,
}

#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StartRequest {
    /// The host's name for the process, unique among those running.
    pub id: String,
    /// argv[0] is the program: an absolute path, or a name looked up in PATH.
    pub argv: Vec<String>,
    /// `NAME=value` pairs; the process gets these and nothing else.
    #[serde(default)]
    pub env: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cwd: Option<String>,
    /// Keep stdin open for Stdin requests (otherwise it is /dev/null).
    #[serde(default)]
    pub stdin: bool,
    /// Run in a container on an image's layers; without it the process
    /// runs in the agent's own root.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rootfs: Option<Rootfs>,
    /// Volumes mounted into the container (only with `rootfs`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub mounts: Vec<Mount>,
    /// The container's cgroup limits (only with `rootfs`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limits: Option<Limits>,
    /// Who the process runs as and what it may do (containers and execs).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub security: Option<Security>,
    /// Run inside the running container whose first process has this id
    /// (`kubectl exec`): its root, volumes, namespaces and cgroup. Not
    /// with `rootfs`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exec_in: Option<String>,
    /// Give the process a terminal of this size as stdin, stdout and
    /// stderr (its output then arrives as stdout only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tty: Option<TtySize>,
    /// Run one of the agent's own tools instead of `argv` (which must be
    /// empty), with `exec_in`: it needs nothing from the container's image.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tool: Option<Tool>,
}

/// A terminal's window size.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TtySize {
    pub rows: u16,
    pub cols: u16,
}

/// The agent's own tools, run inside a container (`husk cp`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "tool", rename_all = "snake_case", deny_unknown_fields)]
pub enum Tool {
    /// Writes a tar of `path` (a file or a directory, under its own name)
    /// to stdout.
    TarOut { path: String },
    /// Reads such a tar from stdin and puts its one top entry at `path`,
    /// or into `path` when that is a directory ([`copy::unpack`]).
    TarIn { path: String },
    /// Connects to `port` on the container's localhost and relays: stdin
    /// to the connection, the connection to stdout (port-forward).
    Connect { port: u16 },
}

#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GuestStats {
    pub containers: Vec<ContainerStats>,
    /// CPU time the guest spent busy (all vCPUs), in microseconds.
    pub cpu_usage_usec: u64,
    pub memory_total_bytes: u64,
    pub memory_available_bytes: u64,
}

/// A running container's usage, from its cgroup.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ContainerStats {
    /// The id its first process was started under.
    pub id: String,
    pub cpu_usage_usec: u64,
    pub memory_bytes: u64,
    /// memory.max, when limited.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory_limit_bytes: Option<u64>,
    pub pids: u64,
}

/// A container's user and privileges.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Security {
    /// `user`, `uid`, `user:group` or `uid:gid`, looked up in the
    /// container's /etc/passwd and /etc/group; None: root.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub supplemental_groups: Vec<u32>,
    /// Only `supplemental_groups` (and the primary group): not the groups
    /// the container's /etc/group gives the user (Kubernetes'
    /// supplementalGroupsPolicy: Strict; the default merges them).
    #[serde(default)]
    pub strict_groups: bool,
    /// Refuse to run as uid 0.
    #[serde(default)]
    pub run_as_non_root: bool,
    #[serde(default)]
    pub read_only_root: bool,
    #[serde(default)]
    pub no_new_privs: bool,
    /// The capabilities kept (names from [`CAPABILITIES`]); every other
    /// one leaves the bounding set. A non-root user has none.
    pub capabilities: Vec<String>,
    /// Paths in the container made unreadable (a directory gets an empty
    /// read-only tmpfs, anything else /dev/null), as runc's maskedPaths.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub masked_paths: Vec<String>,
    /// Paths in the container made read-only, as runc's readonlyPaths.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub readonly_paths: Vec<String>,
    /// A seccomp filter for the process; None: unconfined.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seccomp: Option<Seccomp>,
}

/// The identity a process was started with.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProcessUser {
    pub uid: u32,
    pub gid: u32,
    /// The supplementary groups, the primary one included, sorted (as
    /// containerd reports them).
    pub groups: Vec<u32>,
}

/// The pod-wide settings of [`Request::Pod`].
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PodConfig {
    /// Kernel parameters for the pod, (`net.ipv4.ip_forward`, `1`) or
    /// with `/` separators; the guest kernel is the pod's own, so any
    /// parameter applies to this pod only.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub sysctls: Vec<(String, String)>,
}

/// The capabilities a container keeps by default (Docker's and
/// containerd's default set).
pub const DEFAULT_CAPABILITIES: [&str; 14] = [
    "CHOWN",
    "DAC_OVERRIDE",
    "FSETID",
    "FOWNER",
    "MKNOD",
    "NET_RAW",
    "SETGID",
    "SETUID",
    "SETFCAP",
    "SETPCAP",
    "NET_BIND_SERVICE",
    "SYS_CHROOT",
    "KILL",
    "AUDIT_WRITE",
];

/// Every capability name Linux 6.1 knows, in number order.
pub const CAPABILITIES: [&str; 41] = [
    "CHOWN",
    "DAC_OVERRIDE",
    "DAC_READ_SEARCH",
    "FOWNER",
    "FSETID",
    "KILL",
    "SETGID",
    "SETUID",
    "SETPCAP",
    "LINUX_IMMUTABLE",
    "NET_BIND_SERVICE",
    "NET_BROADCAST",
    "NET_ADMIN",
    "NET_RAW",
    "IPC_LOCK",
    "IPC_OWNER",
    "SYS_MODULE",
    "SYS_RAWIO",
    "SYS_CHROOT",
    "SYS_PTRACE",
    "SYS_PACCT",
    "SYS_ADMIN",
    "SYS_BOOT",
    "SYS_NICE",
    "SYS_RESOURCE",
    "SYS_TIME",
    "SYS_TTY_CONFIG",
    "MKNOD",
    "LEASE",
    "AUDIT_WRITE",
    "AUDIT_CONTROL",
    "SETFCAP",
    "MAC_OVERRIDE",
    "MAC_ADMIN",
    "SYSLOG",
    "WAKE_ALARM",
    "BLOCK_SUSPEND",
    "AUDIT_READ",
    "PERFMON",
    "BPF",
    "CHECKPOINT_RESTORE",
];

/// A container's resource limits (Kubernetes `resources.limits`).
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Limits {
    /// memory.max, in bytes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory_max: Option<u64>,
    /// CPU time per second of wall time, in thousandths of a CPU.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu_max_millis: Option<u64>,
}

/// A pod volume mounted into a container.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Mount {
    /// The volume, as named in a Volume request.
    pub volume: String,
    /// Absolute path in the container.
    pub path: String,
    #[serde(default)]
    pub read_only: bool,
    /// A relative directory inside the volume to mount instead of its root.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sub_path: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VolumeRequest {
    /// A pod volume's name (a DNS label).
    pub name: String,
    pub source: VolumeSource,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum VolumeSource {
    /// A host directory shared over virtio-fs under this tag.
    VirtioFs {
        tag: String,
        #[serde(default)]
        read_only: bool,
    },
    /// A tmpfs in guest memory (emptyDir with `medium: Memory`, configMap
    /// and secret projections: their bytes never reach the host's disk),
    /// holding `files`; at most `size` bytes when given.
    Tmpfs {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        size: Option<u64>,
        /// Mode of the volume's root directory.
        mode: u32,
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        files: Vec<File>,
        /// Remount read-only once the files are written (not with
        /// `atomic`: such a volume stays writable for its updates, and
        /// containers mount it read-only).
        #[serde(default)]
        read_only: bool,
        /// Lay the files out as the kubelet's atomic writer does
        /// ([`projected`]), so that [`Request::UpdateFiles`] can replace
        /// them while containers run (configMap, secret).
        #[serde(default)]
        atomic: bool,
    },
}

/// A file written into a tmpfs volume.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct File {
    /// Relative path inside the volume; directories are created.
    pub path: String,
    #[serde(with = "b64")]
    pub data: Vec<u8>,
    pub mode: u32,
}

/// A container's root: the image's layers (read-only file systems on
/// block devices, or directories in a pod volume) under a writable layer
/// of its own, and its own mount and UTS namespaces (the IPC namespace is
/// the pod's, as the containers of a Kubernetes pod share theirs).
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Rootfs {
    /// Guest block devices holding the layers (ext4), lowest first.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub layers: Vec<String>,
    /// Or: the layers as directories inside a pod volume (a virtio-fs
    /// share the host fills while the VM runs: containers that CRI
    /// creates after the boot), lowest first; relative paths.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub layer_dirs: Option<LayerDirs>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hostname: Option<String>,
    /// Join the pod's PID namespace, shared with its other containers that
    /// join it, whose PID 1 is the agent's `pause` (Kubernetes'
    /// shareProcessNamespace; started on first use); otherwise the
    /// container has a PID namespace of its own.
    #[serde(default)]
    pub pod_pid: bool,
}

/// Image layers as directories of a pod volume.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LayerDirs {
    pub volume: String,
    pub dirs: Vec<String>,
}

/// The pod's network as the guest sees it: its NIC carries the pod IPs
/// that CNI gave the pod's network namespace (Kata's tc-filter model).
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NetworkConfig {
    /// `aa:bb:cc:dd:ee:ff`: how the agent finds the NIC.
    pub mac: String,
    /// One per IP family on a dual-stack network, in CNI's order.
    pub addresses: Vec<IpConfig>,
}

/// One address of the pod's NIC and the default route of its family.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IpConfig {
    /// IPv4 or IPv6 address with prefix length: `10.88.0.5/16`,
    /// `fd00:88::5/64`.
    pub address: String,
    /// The default route's next hop, of the address's family.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gateway: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Stream {
    Stdout,
    Stderr,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum Event {
    Hello {
        version: u32,
        nonce: u64,
        /// The guest kernel's release (`uname -r`).
        kernel: String,
    },
    Started {
        id: String,
        pid: u32,
        /// Who the process runs as, when the request had a security
        /// context (for CRI's ContainerStatus.user).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        user: Option<ProcessUser>,
    },
    Output {
        id: String,
        stream: Stream,
        #[serde(with = "b64")]
        data: Vec<u8>,
    },
    /// The process ended; no more events for this id follow.
    Exited {
        id: String,
        /// The exit code, when the process exited.
        code: Option<i32>,
        /// The signal that killed it, when one did.
        signal: Option<i32>,
        /// The kernel's OOM killer ended a process of the container.
        #[serde(default)]
        oom_killed: bool,
    },
    /// A request failed; `id` names the process it was about, if any.
    Error {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        id: Option<String>,
        message: String,
    },
    /// The network is configured on this interface.
    NetworkReady {
        interface: String,
    },
    /// The pod-wide settings are applied.
    PodReady,
    /// The volume is ready for containers to mount.
    VolumeReady {
        name: String,
    },
    /// Resource usage of each running container and of the whole guest.
    Stats(GuestStats),
    /// The limits of this container were changed.
    Updated {
        id: String,
    },
    ShuttingDown,
}

mod b64 {
    use base64::Engine;
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(v: &[u8], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&base64::engine::general_purpose::STANDARD.encode(v))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        let s = String::deserialize(d)?;
        base64::engine::general_purpose::STANDARD
            .decode(s)
            .map_err(serde::de::Error::custom)
    }
}

/// Writes one frame.
pub fn write_frame<T: Serialize>(w: &mut impl Write, msg: &T) -> Result<(), ProtocolError> {
    let body = serde_json::to_vec(msg)?;
    if body.len() > MAX_FRAME {
        return Err(ProtocolError::TooLarge(body.len()));
    }
    let mut frame = Vec::with_capacity(4 + body.len());
    frame.extend_from_slice(&(body.len() as u32).to_be_bytes());
    frame.extend_from_slice(&body);
    w.write_all(&frame)?;
    w.flush()?;
    Ok(())
}

/// Reads one frame; [`ProtocolError::Closed`] when the stream ends cleanly
/// between frames.
pub fn read_frame<T: for<'de> Deserialize<'de>>(r: &mut impl Read) -> Result<T, ProtocolError> {
    let mut len = [0u8; 4];
    let mut got = 0;
    while got < 4 {
        match r.read(&mut len[got..]) {
            Ok(0) if got == 0 => return Err(ProtocolError::Closed),
            Ok(0) => return Err(std::io::Error::from(std::io::ErrorKind::UnexpectedEof).into()),
            Ok(n) => got += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e.into()),
        }
    }
    let len = u32::from_be_bytes(len) as usize;
    if len > MAX_FRAME {
        return Err(ProtocolError::TooLarge(len));
    }
    let mut body = vec![0u8; len];
    r.read_exact(&mut body)?;
    Ok(serde_json::from_slice(&body)?)
}

/// Checks the agent's answer to the hello with `nonce`: `Ok(Some(kernel
/// release))` when it is that answer, `Ok(None)` for the answer to an
/// earlier hello (skip it), an error for anything else or another version.
pub fn check_hello(answer: Event, nonce: u64) -> Result<Option<String>, ProtocolError> {
    match answer {
        Event::Hello { version, .. } if version != VERSION => {
            Err(ProtocolError::Version { agent: version })
        }
        Event::Hello {
            nonce: n, kernel, ..
        } if n == nonce => Ok(Some(kernel)),
        Event::Hello { .. } => Ok(None),
        other => Err(ProtocolError::Unexpected(format!("{other:?}"))),
    }
}

/// A path relative to a volume (a file in it, a subPath): not empty, not
/// absolute, no `..`, no NUL. Both sides check it: the host before sending,
/// the agent before touching anything.
pub fn is_relative_path(p: &str) -> bool {
    !p.is_empty() && !p.starts_with('/') && !p.contains('\0') && p.split('/').all(|c| c != "..")
}

/// The volume husk itself adds to a pod: its /etc/hosts, /etc/hostname and
/// /etc/resolv.conf, which each container mounts. No pod volume can have
/// this name (it is not a DNS label).
pub const ETC_VOLUME: &str = "_etc";

/// A volume name as Kubernetes allows it (a DNS label), or husk's own
/// [`ETC_VOLUME`], so it can name a directory.
pub fn is_volume_name(n: &str) -> bool {
    let n = if n == ETC_VOLUME { &n[1..] } else { n };
    !n.is_empty()
        && n.len() <= 63
        && n.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !n.starts_with('-')
        && !n.ends_with('-')
}

#[cfg(test)]
mod tests {

    #[test]
    fn the_vsock_port_comes_from_the_kernel_command_line() {
        assert_eq!(
            vsock_port("console=ttyS0 husk.agent=vsock:1024 quiet"),
            Some(1024)
        );
        // The last word wins, as for the kernel's own parameters.
        assert_eq!(vsock_port("husk.agent=vsock:1 husk.agent=vsock:2"), Some(2));
        for no in [
            "console=ttyS0",
            "husk.agent=serial",
            "husk.agent=vsock:x",
            "xhusk.agent=vsock:5",
            "husk.agentx=vsock:5",
        ] {
            assert_eq!(vsock_port(no), None, "{no}");
        }
    }

    use super::*;

    #[test]
    fn volume_names_and_paths_are_checked() {
        for good in ["data", "cfg-1", ETC_VOLUME] {
            assert!(is_volume_name(good), "{good}");
        }
        for bad in ["", "..", "a/b", "-a", "A", "_", "_data", &"x".repeat(64)] {
            assert!(!is_volume_name(bad), "{bad}");
        }
        for good in ["a", "a/b.txt", "..data/x", "a/./b"] {
            assert!(is_relative_path(good), "{good}");
        }
        for bad in ["", "/etc", "../x", "a/../../x", "a\0b", "a/.."] {
            assert!(!is_relative_path(bad), "{bad}");
        }
    }

    #[test]
    fn frames_round_trip_with_binary_payloads() {
        let req = Request::Stdin {
            id: "c1".into(),
            data: vec![0, 1, 2, 255],
            eof: true,
        };
        let ev = Event::Output {
            id: "c1".into(),
            stream: Stream::Stderr,
            data: b"\xffhello".to_vec(),
        };
        let mut buf = Vec::new();
        write_frame(&mut buf, &req).unwrap();
        write_frame(&mut buf, &ev).unwrap();
        let mut r = &buf[..];
        assert_eq!(read_frame::<Request>(&mut r).unwrap(), req);
        assert_eq!(read_frame::<Event>(&mut r).unwrap(), ev);
        assert!(matches!(
            read_frame::<Event>(&mut r),
            Err(ProtocolError::Closed)
        ));
    }

    #[test]
    fn hostile_frames_are_refused_without_allocating() {
        // A length over the limit.
        let mut r = &[0xffu8, 0xff, 0xff, 0xff, b'{'][..];
        assert!(matches!(
            read_frame::<Request>(&mut r),
            Err(ProtocolError::TooLarge(_))
        ));
        // A truncated body, a truncated length, and JSON of the wrong shape.
        let mut r = &[0u8, 0, 0, 10, b'{'][..];
        assert!(matches!(
            read_frame::<Request>(&mut r),
            Err(ProtocolError::Io(_))
        ));
        let mut r = &[0u8, 0][..];
        assert!(matches!(
            read_frame::<Request>(&mut r),
            Err(ProtocolError::Io(_))
        ));
        let body = br#"{"type":"start","id":"x","argv":"not a list"}"#;
        let mut frame = (body.len() as u32).to_be_bytes().to_vec();
        frame.extend_from_slice(body);
        assert!(matches!(
            read_frame::<Request>(&mut &frame[..]),
            Err(ProtocolError::Malformed(_))
        ));
    }

    #[test]
    fn hello_checks_the_version_and_skips_answers_to_earlier_hellos() {
        let hello = |version, nonce| Event::Hello {
            version,
            nonce,
            kernel: "6.1.0".into(),
        };
        assert_eq!(
            check_hello(hello(VERSION, 7), 7).unwrap().as_deref(),
            Some("6.1.0")
        );
        assert_eq!(check_hello(hello(VERSION, 6), 7).unwrap(), None);
        let err = check_hello(hello(VERSION + 1, 7), 7).unwrap_err();
        assert!(err
            .to_string()
            .contains("use the agent built with this husk"));
        assert!(check_hello(Event::ShuttingDown, 7).is_err());
    }
}
