//! The CRI streaming server. Exec, Attach and PortForward answer with a URL of
//! this server holding a one-time token (as the kubelet's own streaming
//! library does); the client (the kubelet's proxy, crictl) then connects
//! there and speaks Kubernetes' WebSocket channel protocols:
//! `v5.channel.k8s.io` / `v4.channel.k8s.io` for exec (channel 0 stdin, 1
//! stdout, 2 stderr, 3 the final status, 4 terminal resizes, 255 a
//! channel's close in v5), and `v4.channel.k8s.io` (or none) for
//! port-forward (for the i-th port, channel 2i carries data and 2i+1
//! errors; each starts with the port, 2 bytes little-endian).
//!
//! An exec is the monitor's ExecStream, an attach its AttachStream (the
//! container's own process: its output from then on, its stdin and
//! terminal; leaving does not end it); a port-forward connects to the
//! port on the pod's localhost: inside its network namespace for a wasm
//! pod, and through the agent (its connect tool) inside a VM.
//!
//! SPDY/3.1, which older clients use, is not spoken: such a request is
//! refused with a message saying so.

use futures_util::{SinkExt, StreamExt};
use husk_sandbox::state::Roots;
use husk_sandbox::ExecMsg;
use husk_shim::control::{Reply, Request};
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream, UnixStream};
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::handshake::server::{
    ErrorResponse, Request as WsRequest, Response as WsResponse,
};
use tokio_tungstenite::tungstenite::{http, Message};
use tokio_tungstenite::WebSocketStream;

/// How long a URL handed out stays valid (the kubelet's default).
const TOKEN_TTL: Duration = Duration::from_secs(60);

/// A stream a client was promised.
#[derive(Debug)]
pub enum Pending {
    /// An exec or an attach: `request` (ExecStream or AttachStream) on
    /// the pod's monitor; `label` names it in a failure status.
    Process {
        pod: String,
        request: Request,
        label: Vec<String>,
        io: Io,
    },
    PortForward {
        pod: String,
        ports: Vec<u16>,
        target: Forward,
    },
}

impl Pending {
    fn kind(&self) -> &'static str {
        match self {
            Pending::Process {
                request: Request::AttachStream { .. },
                ..
            } => "attach",
            Pending::Process { .. } => "exec",
            Pending::PortForward { .. } => "portforward",
        }
    }
}

/// Which of a process's streams the client wants.
#[derive(Debug, Clone, Copy)]
pub struct Io {
    pub stdin: bool,
    pub stdout: bool,
    pub stderr: bool,
}

/// Where a forwarded port is.
#[derive(Debug, Clone)]
pub enum Forward {
    /// localhost in this network namespace (wasm pods).
    Netns(PathBuf),
    /// localhost in the VM, reached from this running container.
    Vm { container: String },
}

pub struct Streaming {
    base: String,
    roots: Roots,
    pending: Mutex<HashMap<String, (Instant, Pending)>>,
}

impl Streaming {
    /// Listens on `addr` (`127.0.0.1:0` picks a free port).
    pub async fn bind(addr: &str, roots: Roots) -> std::io::Result<(Arc<Self>, TcpListener)> {
        let listener = TcpListener::bind(addr).await?;
        let local = listener.local_addr()?;
        Ok((
            Arc::new(Streaming {
                base: format!("http://{local}"),
                roots,
                pending: Mutex::new(HashMap::new()),
            }),
            listener,
        ))
    }

    /// A URL for one use of `p`.
    pub fn register(&self, p: Pending) -> String {
        let kind = p.kind();
        let token = hex::encode(rand::random::<[u8; 16]>());
        let mut map = self.pending.lock().unwrap_or_else(|e| e.into_inner());
        map.retain(|_, (t, _)| t.elapsed() < TOKEN_TTL);
        map.insert(token.clone(), (Instant::now(), p));
        format!("{}/{kind}/{token}", self.base)
    }

    fn take(&self, kind: &str, token: &str) -> Option<Pending> {
        let mut map = self.pending.lock().unwrap_or_else(|e| e.into_inner());
        let (t, p) = map.remove(token)?;
        (p.kind() == kind && t.elapsed() < TOKEN_TTL).then_some(p)
    }

    pub async fn serve(self: Arc<Self>, listener: TcpListener) {
        loop {
            let tcp = match listener.accept().await {
                Ok((tcp, _)) => tcp,
                Err(e) => {
                    // Out of descriptors, say: do not spin on it.
                    tracing::warn!("streaming: accept: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            let me = self.clone();
            tokio::spawn(async move { me.handle(tcp).await });
        }
    }

    // The callback's error type is tungstenite's, not ours to shrink.
    #[allow(clippy::result_large_err)]
    async fn handle(self: Arc<Self>, tcp: TcpStream) {
        let mut found: Option<(Pending, &'static str)> = None;
        let callback =
            |req: &WsRequest, mut resp: WsResponse| -> Result<WsResponse, ErrorResponse> {
                let path = req.uri().path();
                let mut parts = path.trim_start_matches('/').splitn(2, '/');
                let (kind, token) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
                let Some(p) = self.take(kind, token) else {
                    return Err(refuse(
                        http::StatusCode::NOT_FOUND,
                        format!("{path}: no such stream (unknown or expired token)"),
                    ));
                };
                let offered: Vec<String> = req
                    .headers()
                    .get_all(http::header::SEC_WEBSOCKET_PROTOCOL)
                    .iter()
                    .filter_map(|v| v.to_str().ok())
                    .flat_map(|v| v.split(','))
                    .map(|s| s.trim().to_owned())
                    .collect();
                let wanted: &[&'static str] = match p {
                    Pending::Process { .. } => &["v5.channel.k8s.io", "v4.channel.k8s.io"],
                    Pending::PortForward { .. } => &["v4.channel.k8s.io", ""],
                };
                let Some(proto) = wanted.iter().find(|w| {
                    offered.iter().any(|o| o == *w) || (w.is_empty() && offered.is_empty())
                }) else {
                    return Err(refuse(
                        http::StatusCode::BAD_REQUEST,
                        format!(
                            "no supported subprotocol in {offered:?}; huskd speaks {}",
                            wanted.join(", ")
                        ),
                    ));
                };
                if !proto.is_empty() {
                    resp.headers_mut().insert(
                        http::header::SEC_WEBSOCKET_PROTOCOL,
                        http::HeaderValue::from_static(proto),
                    );
                }
                found = Some((p, proto));
                Ok(resp)
            };
        let ws = match tokio_tungstenite::accept_hdr_async(tcp, callback).await {
            Ok(ws) => ws,
            Err(e) => {
                tracing::info!("streaming: refused a connection: {e} (huskd serves WebSocket streams; SPDY is not supported)");
                return;
            }
        };
        match found {
            Some((
                Pending::Process {
                    pod,
                    request,
                    label,
                    io,
                },
                proto,
            )) => {
                let v5 = proto == "v5.channel.k8s.io";
                self.exec(ws, &pod, request, label, ExecOpts { v5, io })
                    .await
            }
            Some((Pending::PortForward { pod, ports, target }, _)) => {
                self.port_forward(ws, &pod, ports, target).await
            }
            None => {}
        }
    }

    async fn exec(
        &self,
        ws: WebSocketStream<TcpStream>,
        pod: &str,
        req: Request,
        argv: Vec<String>,
        o: ExecOpts,
    ) {
        let (mut sink, mut stream) = ws.split();
        let attach = matches!(req, Request::AttachStream { .. });
        let (mut rd, mut wr) = match open_stream(&self.roots, pod, req).await {
            Ok(c) => c,
            Err(msg) => {
                let _ = sink.send(Message::binary(status_frame(Err(msg)))).await;
                let _ = sink.close().await;
                return;
            }
        };
        // An exec without stdin sees it end at once; an attach leaves the
        // container's stdin alone.
        if !o.io.stdin && !attach {
            let _ = send_msg(
                &mut wr,
                &ExecMsg::Stdin {
                    data: vec![],
                    eof: true,
                },
            )
            .await;
        }
        let from_client = async {
            while let Some(Ok(msg)) = stream.next().await {
                let Message::Binary(b) = msg else {
                    if matches!(msg, Message::Close(_)) {
                        break;
                    }
                    continue;
                };
                let m = match (b.first(), b.get(1)) {
                    (Some(0), _) if o.io.stdin => ExecMsg::Stdin {
                        data: b[1..].to_vec(),
                        eof: false,
                    },
                    (Some(4), _) => match serde_json::from_slice::<TermSize>(&b[1..]) {
                        Ok(s) => ExecMsg::Resize {
                            rows: s.height,
                            cols: s.width,
                        },
                        Err(_) => continue,
                    },
                    (Some(255), Some(0)) if o.v5 && o.io.stdin => ExecMsg::Stdin {
                        data: vec![],
                        eof: true,
                    },
                    _ => continue,
                };
                if send_msg(&mut wr, &m).await.is_err() {
                    break;
                }
            }
        };
        let to_client = async {
            let mut line = String::new();
            loop {
                line.clear();
                let result = match rd.read_line(&mut line).await {
                    Ok(0) | Err(_) => Err("the monitor closed the exec".to_owned()),
                    Ok(_) => match serde_json::from_str::<ExecMsg>(&line) {
                        Ok(ExecMsg::Stdout { data }) if o.io.stdout => {
                            let _ = sink.send(Message::binary(frame(1, &data))).await;
                            continue;
                        }
                        Ok(ExecMsg::Stderr { data }) if o.io.stderr => {
                            let _ = sink.send(Message::binary(frame(2, &data))).await;
                            continue;
                        }
                        Ok(ExecMsg::Exit { code }) => Ok(code),
                        Ok(ExecMsg::Error { message }) => Err(message),
                        Ok(_) => continue,
                        Err(e) => Err(format!("the monitor sent {line:?}: {e}")),
                    },
                };
                let result = result.map(|code| (code, argv.clone()));
                let _ = sink.send(Message::binary(status_frame(result))).await;
                let _ = sink.close().await;
                return;
            }
        };
        // The exec ends when its process does; a client that goes away
        // first ends it (dropping the monitor connection kills it).
        tokio::select! {
            _ = to_client => {}
            _ = from_client => {}
        }
    }

    async fn port_forward(
        &self,
        ws: WebSocketStream<TcpStream>,
        pod: &str,
        ports: Vec<u16>,
        target: Forward,
    ) {
        let (mut sink, mut stream) = ws.split();
        let (tx, mut rx) = mpsc::channel::<Vec<u8>>(64);
        let writer = tokio::spawn(async move {
            while let Some(f) = rx.recv().await {
                if sink.send(Message::binary(f)).await.is_err() {
                    break;
                }
            }
            let _ = sink.close().await;
        });
        let mut inputs: HashMap<u8, mpsc::Sender<Vec<u8>>> = HashMap::new();
        for (i, port) in ports.iter().enumerate() {
            let (data_ch, err_ch) = ((2 * i) as u8, (2 * i + 1) as u8);
            let le = port.to_le_bytes();
            let _ = tx.send(frame(data_ch, &le)).await;
            let _ = tx.send(frame(err_ch, &le)).await;
            let (in_tx, in_rx) = mpsc::channel::<Vec<u8>>(64);
            inputs.insert(data_ch, in_tx);
            let tx = tx.clone();
            let port = *port;
            let target = target.clone();
            let pod = pod.to_owned();
            let roots = self.roots.clone();
            tokio::spawn(async move {
                let r = match target {
                    Forward::Netns(netns) => relay_netns(&netns, port, in_rx, &tx, data_ch).await,
                    Forward::Vm { container } => {
                        relay_vm(&roots, &pod, container, port, in_rx, &tx, data_ch).await
                    }
                };
                if let Err(e) = r {
                    let msg = format!("forwarding port {port} of pod sandbox {pod}: {e}");
                    let _ = tx.send(frame(err_ch, msg.as_bytes())).await;
                }
            });
        }
        drop(tx);
        while let Some(Ok(msg)) = stream.next().await {
            match msg {
                Message::Binary(b) if !b.is_empty() => {
                    if let Some(in_tx) = inputs.get(&b[0]) {
                        let _ = in_tx.send(b[1..].to_vec()).await;
                    }
                }
                Message::Close(_) => break,
                _ => {}
            }
        }
        drop(inputs);
        writer.abort();
    }
}

#[derive(Clone, Copy)]
struct ExecOpts {
    v5: bool,
    io: Io,
}

#[derive(serde::Deserialize)]
#[serde(rename_all = "PascalCase")]
struct TermSize {
    width: u16,
    height: u16,
}

fn refuse(code: http::StatusCode, msg: String) -> ErrorResponse {
    let mut r = ErrorResponse::new(Some(msg));
    *r.status_mut() = code;
    r
}

fn frame(channel: u8, data: &[u8]) -> Vec<u8> {
    let mut f = Vec::with_capacity(data.len() + 1);
    f.push(channel);
    f.extend_from_slice(data);
    f
}

/// The final frame on channel 3: a Kubernetes Status, as client-go reads
/// it (a non-zero exit becomes its exit code error).
fn status_frame(r: Result<(i32, Vec<String>), String>) -> Vec<u8> {
    let v = match r {
        Ok((0, _)) => serde_json::json!({"metadata": {}, "status": "Success"}),
        Ok((code, argv)) => serde_json::json!({
            "metadata": {},
            "status": "Failure",
            "message": format!("command terminated with non-zero exit code: error executing command {argv:?}, exit code {code}"),
            "reason": "NonZeroExitCode",
            "details": {"causes": [{"reason": "ExitCode", "message": code.to_string()}]},
        }),
        Err(message) => serde_json::json!({
            "metadata": {},
            "status": "Failure",
            "message": message,
            "reason": "InternalError",
        }),
    };
    frame(3, &serde_json::to_vec(&v).unwrap_or_default())
}

async fn send_msg(wr: &mut tokio::net::unix::OwnedWriteHalf, m: &ExecMsg) -> std::io::Result<()> {
    let mut b = serde_json::to_vec(m).map_err(std::io::Error::other)?;
    b.push(b'\n');
    wr.write_all(&b).await
}

type MonitorRead = BufReader<tokio::net::unix::OwnedReadHalf>;
type MonitorWrite = tokio::net::unix::OwnedWriteHalf;

/// Opens an ExecStream or AttachStream on a pod's monitor; returns the
/// connection once the monitor accepted it.
async fn open_stream(
    roots: &Roots,
    pod: &str,
    req: Request,
) -> Result<(MonitorRead, MonitorWrite), String> {
    let socket = roots.pod(pod).socket();
    let conn = UnixStream::connect(&socket)
        .await
        .map_err(|e| format!("pod sandbox {pod}: its monitor: {e}"))?;
    let (rd, mut wr) = conn.into_split();
    let mut req = serde_json::to_vec(&req).map_err(|e| e.to_string())?;
    req.push(b'\n');
    wr.write_all(&req).await.map_err(|e| e.to_string())?;
    let mut rd = BufReader::new(rd);
    let mut line = String::new();
    rd.read_line(&mut line).await.map_err(|e| e.to_string())?;
    let reply: Reply =
        serde_json::from_str(&line).map_err(|e| format!("the monitor's reply: {e}"))?;
    if !reply.ok {
        return Err(reply.error.unwrap_or_else(|| "exec failed".into()));
    }
    Ok((rd, wr))
}

/// A TCP connection to localhost:`port` made inside `netns` (on a thread
/// of its own that ends with it: the runtime's threads never move).
async fn connect_in(netns: &std::path::Path, port: u16) -> std::io::Result<TcpStream> {
    let netns = netns.to_owned();
    let (tx, rx) = tokio::sync::oneshot::channel();
    std::thread::spawn(move || {
        let r = (|| -> std::io::Result<std::net::TcpStream> {
            let f = std::fs::File::open(&netns)?;
            nix::sched::setns(&f, nix::sched::CloneFlags::CLONE_NEWNET)
                .map_err(std::io::Error::from)?;
            let s = std::net::TcpStream::connect((std::net::Ipv4Addr::LOCALHOST, port))?;
            s.set_nonblocking(true)?;
            Ok(s)
        })();
        let _ = tx.send(r);
    });
    let s = rx
        .await
        .map_err(|_| std::io::Error::other("connect thread died"))??;
    TcpStream::from_std(s)
}

async fn relay_netns(
    netns: &std::path::Path,
    port: u16,
    mut input: mpsc::Receiver<Vec<u8>>,
    out: &mpsc::Sender<Vec<u8>>,
    ch: u8,
) -> Result<(), String> {
    let conn = connect_in(netns, port)
        .await
        .map_err(|e| format!("127.0.0.1:{port}: {e}"))?;
    let (mut r, mut w) = conn.into_split();
    let up = async {
        while let Some(d) = input.recv().await {
            if w.write_all(&d).await.is_err() {
                break;
            }
        }
        let _ = w.shutdown().await;
    };
    let down = async {
        let mut buf = vec![0u8; 32 * 1024];
        loop {
            match r.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    if out.send(frame(ch, &buf[..n])).await.is_err() {
                        break;
                    }
                }
            }
        }
    };
    tokio::join!(up, down);
    Ok(())
}

async fn relay_vm(
    roots: &Roots,
    pod: &str,
    container: String,
    port: u16,
    mut input: mpsc::Receiver<Vec<u8>>,
    out: &mpsc::Sender<Vec<u8>>,
    ch: u8,
) -> Result<(), String> {
    let spec = husk_sandbox::ExecSpec {
        argv: vec![],
        tty: None,
        copy: Some(husk_protocol::Tool::Connect { port }),
    };
    let req = Request::ExecStream {
        container: Some(container),
        spec,
    };
    let (mut rd, mut wr) = open_stream(roots, pod, req).await?;
    let up = async {
        while let Some(d) = input.recv().await {
            if send_msg(
                &mut wr,
                &ExecMsg::Stdin {
                    data: d,
                    eof: false,
                },
            )
            .await
            .is_err()
            {
                return;
            }
        }
        let _ = send_msg(
            &mut wr,
            &ExecMsg::Stdin {
                data: vec![],
                eof: true,
            },
        )
        .await;
        // Keep the connection (and so the relay) until the output ends.
        std::future::pending::<()>().await
    };
    let down = async {
        let mut line = String::new();
        let mut errors = Vec::new();
        loop {
            line.clear();
            match rd.read_line(&mut line).await {
                Ok(0) | Err(_) => return Err("the monitor closed the connection".to_owned()),
                Ok(_) => {}
            }
            match serde_json::from_str::<ExecMsg>(&line) {
                Ok(ExecMsg::Stdout { data }) => {
                    if out.send(frame(ch, &data)).await.is_err() {
                        return Ok(());
                    }
                }
                Ok(ExecMsg::Stderr { data }) => errors.extend(data),
                Ok(ExecMsg::Exit { code: 0 }) => return Ok(()),
                Ok(ExecMsg::Exit { .. }) => {
                    return Err(String::from_utf8_lossy(&errors).trim().to_owned())
                }
                Ok(ExecMsg::Error { message }) => return Err(message),
                Ok(_) => {}
                Err(e) => return Err(e.to_string()),
            }
        }
    };
    tokio::select! {
        r = down => r,
        _ = up => Ok(()),
    }
}
