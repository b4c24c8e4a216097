//! A stand-in for the Kubernetes API server and the kubelet's streaming
//! proxy, so that a real kubectl (Debian's 1.20, which streams over SPDY
//! only) can exec, attach and port-forward into pods that huskd runs.
//!
//! It answers kubectl's discovery and pod GETs from the pods a test
//! registers. For an exec, attach or portforward it does what the kubelet
//! does: asks huskd over CRI for a streaming URL, then relays the client's
//! upgrade request to that URL and the connection after it byte for byte
//! (the kubelet's proxy mode). Nothing of the streaming protocol is
//! spoken here: kubectl and huskd speak it to each other.

use k8s_cri::v1 as cri;
use k8s_cri::v1::runtime_service_client::RuntimeServiceClient;
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tonic::transport::Channel;

pub struct Container {
    pub name: String,
    pub id: String,
    pub stdin: bool,
}

pub struct Pod {
    pub name: String,
    pub sandbox: String,
    pub containers: Vec<Container>,
}

type Pods = Arc<Mutex<HashMap<String, Pod>>>;

pub struct KubeApi {
    pub kubeconfig: PathBuf,
    pods: Pods,
    task: tokio::task::JoinHandle<()>,
    _dir: tempfile::TempDir,
}

impl KubeApi {
    pub async fn start(rs: RuntimeServiceClient<Channel>) -> KubeApi {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let dir = tempfile::tempdir().unwrap();
        let kubeconfig = dir.path().join("config");
        std::fs::write(
            &kubeconfig,
            format!(
                "apiVersion: v1\nkind: Config\nclusters:\n- name: husk\n  cluster:\n    server: http://{addr}\ncontexts:\n- name: husk\n  context:\n    cluster: husk\n    namespace: default\ncurrent-context: husk\n"
            ),
        )
        .unwrap();
        let pods: Pods = Arc::default();
        let p = pods.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((tcp, _)) = listener.accept().await else {
                    return;
                };
                tokio::spawn(serve(tcp, rs.clone(), p.clone(), addr.to_string()));
            }
        });
        KubeApi {
            kubeconfig,
            pods,
            task,
            _dir: dir,
        }
    }

    pub fn add(&self, pod: Pod) {
        self.pods.lock().unwrap().insert(pod.name.clone(), pod);
    }

    /// A kubectl command against this server (its cache in the temp dir).
    pub fn kubectl(&self, args: &[&str]) -> std::process::Command {
        let mut c = std::process::Command::new(kubectl_bin());
        c.args(self.flags())
            .args(args)
            .env("HOME", self.kubeconfig.parent().unwrap());
        c
    }

    /// A kubectl command line for a shell (the test's paths need no quoting).
    pub fn kubectl_line(&self, args: &str) -> String {
        format!(
            "HOME={} {} {} {args}",
            self.kubeconfig.parent().unwrap().display(),
            kubectl_bin().display(),
            self.flags().join(" ")
        )
    }

    fn flags(&self) -> Vec<String> {
        vec![
            "--kubeconfig".into(),
            self.kubeconfig.display().to_string(),
            "--cache-dir".into(),
            self.kubeconfig
                .with_file_name("cache")
                .display()
                .to_string(),
        ]
    }
}

impl Drop for KubeApi {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Debian's kubectl 1.20, unpacked by images/build.sh.
pub fn kubectl_bin() -> PathBuf {
    let p = husk_tests::images_dir().join("kubectl");
    assert!(
        p.is_file(),
        "{}: missing; run images/build.sh kubectl (tests/run.sh does)",
        p.display()
    );
    p
}

fn response(code: u16, body: &serde_json::Value) -> Vec<u8> {
    let body = body.to_string();
    format!(
        "HTTP/1.1 {code} {}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        if code == 200 { "OK" } else { "Error" },
        body.len()
    )
    .into_bytes()
}

fn failure(code: u16, message: &str) -> Vec<u8> {
    response(
        code,
        &serde_json::json!({"kind": "Status", "apiVersion": "v1", "metadata": {},
            "status": "Failure", "message": message, "code": code}),
    )
}

/// A query string's values, decoded as Go's url package encodes them.
fn query(q: &str) -> Vec<(String, String)> {
    let unescape = |s: &str| {
        let b = s.as_bytes();
        let mut out = Vec::new();
        let mut i = 0;
        while i < b.len() {
            match b[i] {
                b'+' => out.push(b' '),
                b'%' if i + 2 < b.len() => {
                    out.push(u8::from_str_radix(&s[i + 1..i + 3], 16).unwrap());
                    i += 2;
                }
                c => out.push(c),
            }
            i += 1;
        }
        String::from_utf8(out).unwrap()
    };
    q.split('&')
        .filter(|kv| !kv.is_empty())
        .map(|kv| {
            let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
            (unescape(k), unescape(v))
        })
        .collect()
}

async fn serve(mut tcp: TcpStream, rs: RuntimeServiceClient<Channel>, pods: Pods, addr: String) {
    let mut buf = Vec::new();
    loop {
        let end = loop {
            if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break i + 4;
            }
            let mut chunk = [0u8; 4096];
            match tcp.read(&mut chunk).await {
                Ok(0) | Err(_) => return,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        };
        let head: Vec<u8> = buf.drain(..end).collect();
        let head = String::from_utf8_lossy(&head).into_owned();
        let mut lines = head.split("\r\n");
        let mut first = lines.next().unwrap_or_default().split(' ');
        let (method, target) = (
            first.next().unwrap_or_default().to_owned(),
            first.next().unwrap_or_default().to_owned(),
        );
        let (path, q) = target.split_once('?').unwrap_or((&target, ""));
        let segs: Vec<&str> = path.trim_matches('/').split('/').collect();
        let reply = match (method.as_str(), segs.as_slice()) {
            ("GET", ["api"]) => response(
                200,
                &serde_json::json!({"kind": "APIVersions", "versions": ["v1"],
                    "serverAddressByClientCIDRs": [{"clientCIDR": "0.0.0.0/0", "serverAddress": addr}]}),
            ),
            ("GET", ["apis"]) => response(
                200,
                &serde_json::json!({"kind": "APIGroupList", "apiVersion": "v1", "groups": []}),
            ),
            ("GET", ["api", "v1"]) => {
                let sub = |name: &str, kind: &str| {
                    serde_json::json!({"name": name, "singularName": "", "namespaced": true,
                        "kind": kind, "verbs": ["create", "get"]})
                };
                response(
                    200,
                    &serde_json::json!({"kind": "APIResourceList", "apiVersion": "v1",
                    "groupVersion": "v1", "resources": [
                        {"name": "pods", "singularName": "", "namespaced": true, "kind": "Pod",
                         "verbs": ["get", "list"], "shortNames": ["po"]},
                        sub("pods/attach", "PodAttachOptions"),
                        sub("pods/exec", "PodExecOptions"),
                        sub("pods/portforward", "PodPortForwardOptions"),
                    ]}),
                )
            }
            ("GET", ["api", "v1", "namespaces", ns, "pods", name]) => {
                match pods.lock().unwrap().get(*name) {
                    Some(p) => response(200, &pod_json(p, ns)),
                    None => failure(404, &format!("pods \"{name}\" not found")),
                }
            }
            (_, ["api", "v1", "namespaces", _, "pods", name, sub]) => {
                let q = query(q);
                let url = match stream_url(&rs, &pods, name, sub, &q).await {
                    Ok(u) => u,
                    Err(e) => {
                        let _ = tcp.write_all(&failure(500, &e)).await;
                        continue;
                    }
                };
                // The kubelet's proxy: the same request, to huskd's URL.
                let rest = url.strip_prefix("http://").unwrap();
                let (host, upath) = rest.split_once('/').unwrap();
                let mut up = TcpStream::connect(host).await.unwrap();
                let mut req = format!("{method} /{upath} HTTP/1.1\r\nHost: {host}\r\n");
                for l in head.split("\r\n").skip(1).filter(|l| !l.is_empty()) {
                    if !l.to_ascii_lowercase().starts_with("host:") {
                        req.push_str(l);
                        req.push_str("\r\n");
                    }
                }
                req.push_str("\r\n");
                up.write_all(req.as_bytes()).await.unwrap();
                up.write_all(&buf).await.unwrap();
                let _ = tokio::io::copy_bidirectional(&mut tcp, &mut up).await;
                return;
            }
            _ => failure(404, &format!("{method} {path}: not served here")),
        };
        if tcp.write_all(&reply).await.is_err() {
            return;
        }
    }
}

fn pod_json(p: &Pod, ns: &str) -> serde_json::Value {
    let containers: Vec<_> = p
        .containers
        .iter()
        .map(|c| serde_json::json!({"name": c.name, "image": "husk", "stdin": c.stdin}))
        .collect();
    let statuses: Vec<_> = p
        .containers
        .iter()
        .map(|c| {
            serde_json::json!({"name": c.name, "ready": true, "restartCount": 0,
            "image": "husk", "imageID": "", "containerID": format!("husk://{}", c.id),
            "state": {"running": {}}})
        })
        .collect();
    serde_json::json!({"kind": "Pod", "apiVersion": "v1",
        "metadata": {"name": p.name, "namespace": ns, "uid": p.sandbox},
        "spec": {"containers": containers},
        "status": {"phase": "Running", "containerStatuses": statuses}})
}

/// Asks huskd (CRI) for the streaming URL of an exec, attach or
/// portforward, as the kubelet does with the client's parameters.
async fn stream_url(
    rs: &RuntimeServiceClient<Channel>,
    pods: &Pods,
    pod: &str,
    sub: &str,
    q: &[(String, String)],
) -> Result<String, String> {
    let get = |k: &str| q.iter().find(|(n, _)| n == k).map(|(_, v)| v.as_str());
    let flag = |k: &str| get(k) == Some("true") || get(k) == Some("1");
    let (sandbox, container) = {
        let pods = pods.lock().unwrap();
        let p = pods.get(pod).ok_or(format!("pods \"{pod}\" not found"))?;
        let c = match get("container") {
            Some(name) => p.containers.iter().find(|c| c.name == name),
            None => p.containers.first(),
        };
        (p.sandbox.clone(), c.map(|c| c.id.clone()))
    };
    let mut rs = rs.clone();
    let container = || container.clone().ok_or("no such container".to_owned());
    let r = match sub {
        "exec" => rs
            .exec(cri::ExecRequest {
                container_id: container()?,
                cmd: q
                    .iter()
                    .filter(|(k, _)| k == "command")
                    .map(|(_, v)| v.clone())
                    .collect(),
                tty: flag("tty"),
                stdin: flag("stdin"),
                stdout: flag("stdout"),
                stderr: flag("stderr"),
            })
            .await
            .map(|r| r.into_inner().url),
        "attach" => rs
            .attach(cri::AttachRequest {
                container_id: container()?,
                tty: flag("tty"),
                stdin: flag("stdin"),
                stdout: flag("stdout"),
                stderr: flag("stderr"),
            })
            .await
            .map(|r| r.into_inner().url),
        "portforward" => rs
            .port_forward(cri::PortForwardRequest {
                pod_sandbox_id: sandbox,
                port: q
                    .iter()
                    .filter(|(k, _)| k == "ports")
                    .filter_map(|(_, v)| v.parse().ok())
                    .collect(),
            })
            .await
            .map(|r| r.into_inner().url),
        other => return Err(format!("no subresource {other}")),
    };
    r.map_err(|s| s.message().to_owned())
}

/// Runs a command to its end on a blocking thread (the runtime keeps
/// serving kubectl meanwhile).
pub async fn output(mut c: std::process::Command, stdin: &[u8]) -> std::process::Output {
    use std::io::Write;
    use std::process::Stdio;
    let stdin = stdin.to_vec();
    tokio::task::spawn_blocking(move || {
        let mut child = c
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let mut w = child.stdin.take().unwrap();
        let feeder = std::thread::spawn(move || {
            let _ = w.write_all(&stdin);
        });
        let out = child.wait_with_output().unwrap();
        feeder.join().unwrap();
        out
    })
    .await
    .unwrap()
}

/// `kubectl port-forward` running until dropped: the local port it listens on.
pub struct PortForward {
    child: std::process::Child,
    pub port: u16,
    errors: tempfile::NamedTempFile,
}

impl PortForward {
    pub async fn start(mut c: std::process::Command) -> PortForward {
        use std::io::BufRead;
        use std::process::Stdio;
        let errors = tempfile::NamedTempFile::new().unwrap();
        let stderr = errors.reopen().unwrap();
        tokio::task::spawn_blocking(move || {
            let mut child = c
                .stdin(Stdio::null())
                .stdout(Stdio::piped())
                .stderr(stderr)
                .spawn()
                .unwrap();
            let mut out = std::io::BufReader::new(child.stdout.take().unwrap());
            let mut line = String::new();
            out.read_line(&mut line).unwrap();
            // "Forwarding from 127.0.0.1:PORT -> REMOTE"
            let port = line
                .split_whitespace()
                .nth(2)
                .and_then(|a| a.rsplit(':').next())
                .and_then(|p| p.parse().ok())
                .unwrap_or_else(|| panic!("kubectl port-forward said {line:?}"));
            // Keep draining its stdout so it never blocks on it.
            std::thread::spawn(move || {
                let mut sink = String::new();
                while out.read_line(&mut sink).map(|n| n > 0).unwrap_or(false) {
                    sink.clear();
                }
            });
            PortForward {
                child,
                port,
                errors,
            }
        })
        .await
        .unwrap()
    }

    /// What kubectl has reported on stderr so far.
    pub fn errors(&self) -> String {
        std::fs::read_to_string(self.errors.path()).unwrap()
    }
}

impl Drop for PortForward {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
