//! The monitor's control socket: one JSON request per connection, one JSON
//! reply. Callers (the CLI today, huskd and the containerd shim later) find
//! it at `<run>/pods/<id>/monitor.sock`. The socket only carries requests;
//! status is also readable from the pod's status file without it.

use serde::{Deserialize, Serialize};
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "camelCase")]
pub enum Request {
    /// Stop the pod: stdin closes, survivors are killed after `grace_secs`
    /// (the pod's terminationGracePeriodSeconds when absent).
    Stop { grace_secs: Option<u64> },
    /// The pod's status.
    Status,
    /// Runs a command in a running container and answers with its output
    /// and exit code (`kubectl exec` without a TTY).
    Exec {
        container: Option<String>,
        argv: Vec<String>,
        timeout_secs: u64,
    },
    /// Resource usage of the running containers.
    Stats,
    /// Starts a command (or a copy) in a running container with its stdin
    /// open; after an ok reply, the connection carries `ExecMsg` JSON
    /// lines both ways (stdin and resizes in; stdout, stderr and the exit
    /// out) until the exit.
    ExecStream {
        container: Option<String>,
        #[serde(flatten)]
        spec: husk_sandbox::ExecSpec,
    },
    /// Attaches to a running container (a CRI container's id, or a
    /// manifest container's name): after an ok reply, the connection
    /// carries `ExecMsg` lines as for ExecStream; leaving does not end the
    /// container.
    AttachStream { id: String },
    /// Replaces the files of a configMap or secret volume (`husk apply`).
    UpdateVolume {
        volume: String,
        files: Vec<husk_sandbox::pod::VolumeFile>,
    },
    /// CRI: creates a container in a CRI pod sandbox (its mounts name
    /// `volumes`); the reply carries its id.
    CreateContainer {
        container: Box<husk_sandbox::pod::ContainerPlan>,
        volumes: Vec<husk_sandbox::pod::VolumePlan>,
        meta: husk_sandbox::state::CriMeta,
    },
    /// CRI: starts a created container.
    StartContainer { id: String },
    /// CRI: stops a container (stdin closes; killed after `timeout_secs`);
    /// answers once it has exited.
    StopContainer { id: String, timeout_secs: u64 },
    /// CRI: removes a container (stopping it first).
    RemoveContainer { id: String },
    /// CRI: reopens a container's log file.
    ReopenLog { id: String },
    /// Changes a container's limits (the given ones).
    Update {
        container: Option<String>,
        memory_bytes: Option<u64>,
        cpu_millis: Option<u64>,
    },
}

#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Reply {
    pub ok: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// What kind of failure `error` is, when the sandbox said (huskd's
    /// gRPC status comes from it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub code: Option<husk_sandbox::Code>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<serde_json::Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exec: Option<husk_sandbox::ExecOutput>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stats: Option<husk_sandbox::PodStats>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
}

impl Reply {
    pub fn ok() -> Self {
        Reply {
            ok: true,
            ..Default::default()
        }
    }

    pub fn err(message: impl Into<String>) -> Self {
        Reply {
            ok: false,
            error: Some(message.into()),
            ..Default::default()
        }
    }

    /// A sandbox's failure, with its code.
    pub fn failed(f: husk_sandbox::Failure) -> Self {
        Reply {
            ok: false,
            error: Some(f.message),
            code: f.code,
            ..Default::default()
        }
    }
}

/// Sends one request to a monitor and reads its reply.
pub fn call(socket: &Path, req: &Request) -> std::io::Result<Reply> {
    call_waiting(socket, req, Duration::from_secs(10))
}

/// As [`call`], waiting up to `timeout` for the reply.
pub fn call_waiting(socket: &Path, req: &Request, timeout: Duration) -> std::io::Result<Reply> {
    let mut s = UnixStream::connect(socket)?;
    s.set_read_timeout(Some(timeout))?;
    let mut line = serde_json::to_vec(req).expect("json");
    line.push(b'\n');
    s.write_all(&line)?;
    let mut reply = String::new();
    BufReader::new(s).read_line(&mut reply)?;
    serde_json::from_str(&reply)
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))
}
