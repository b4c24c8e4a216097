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
//! Older clients (kubectl and crictl before 1.30, the API server's proxy)
//! upgrade to SPDY/3.1 instead and open one SPDY stream per channel, named
//! by its `streamtype` header: `v4`/`v3`/`v2.channel.k8s.io` for exec and
//! attach (error, stdin, stdout, stderr, resize), `portforward.k8s.io` for
//! port-forward (a data and an error stream per forwarded connection, with
//! its `port` and `requestid`). Newer clients (client-go's port-forward
//! over WebSocket, critest's `-websocket-portforward`) tunnel that same
//! SPDY session through a WebSocket: subprotocol
//! `SPDY/3.1+portforward.k8s.io`, the SPDY bytes carried in binary
//! messages.

use crate::spdy::{self, Frame, FrameReader, FrameWriter};
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
/// How long a client may take to send its request, and a SPDY client to
/// open the streams it asked for (the kubelet's stream creation timeout).
const CLIENT_TIMEOUT: Duration = Duration::from_secs(30);
/// The largest HTTP request head taken.
const MAX_HEAD: usize = 16 << 10;
/// Forwarded connections at once on one SPDY port-forward.
const MAX_FORWARDS: usize = 256;

/// The WebSocket subprotocol that tunnels a SPDY port-forward session.
const SPDY_TUNNEL: &str = "SPDY/3.1+portforward.k8s.io";

/// A client connection after its request head was read: the head is
/// replayed to the WebSocket handshake.
type Conn = tokio::io::Join<
    tokio::io::Chain<std::io::Cursor<Vec<u8>>, tokio::net::tcp::OwnedReadHalf>,
    tokio::net::tcp::OwnedWriteHalf,
>;

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
    /// A terminal: a SPDY client opens a resize stream for it.
    pub tty: bool,
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

    async fn handle(self: Arc<Self>, mut tcp: TcpStream) {
        let (head, rest) = match tokio::time::timeout(CLIENT_TIMEOUT, read_head(&mut tcp)).await {
            Ok(Ok(h)) => h,
            Ok(Err(e)) => {
                tracing::info!("streaming: a bad request: {e}");
                let _ = respond(&mut tcp, 400, &[], &e).await;
                return;
            }
            Err(_) => return,
        };
        let req = match Head::parse(&head) {
            Ok(r) => r,
            Err(e) => {
                let _ = respond(&mut tcp, 400, &[], &e).await;
                return;
            }
        };
        let upgrade = req
            .values("upgrade")
            .next()
            .unwrap_or_default()
            .to_ascii_lowercase();
        match upgrade.as_str() {
            "websocket" => {
                let (rd, wr) = tcp.into_split();
                let replay = std::io::Cursor::new([head, rest].concat());
                let conn = tokio::io::join(AsyncReadExt::chain(replay, rd), wr);
                self.websocket(conn).await
            }
            "spdy/3.1" => self.spdy(tcp, &req, rest).await,
            _ => {
                let msg = format!(
                    "{}: huskd's streaming server takes a WebSocket (v5/v4.channel.k8s.io) or a SPDY/3.1 upgrade",
                    req.path
                );
                let _ = respond(&mut tcp, 400, &[], &msg).await;
            }
        }
    }

    // The callback's error type is tungstenite's, not ours to shrink.
    #[allow(clippy::result_large_err)]
    async fn websocket(self: Arc<Self>, tcp: Conn) {
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
                    Pending::PortForward { .. } => &["v4.channel.k8s.io", SPDY_TUNNEL, ""],
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
                tracing::info!("streaming: refused a WebSocket connection: {e}");
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
            Some((Pending::PortForward { pod, ports, target }, SPDY_TUNNEL)) => {
                tracing::info!(
                    pod,
                    "streaming: port-forward over SPDY tunneled in a WebSocket"
                );
                let mut s = Session::start(tunnel(ws), Vec::new());
                self.spdy_port_forward(&mut s, &pod, ports, target).await
            }
            Some((Pending::PortForward { pod, ports, target }, _)) => {
                self.port_forward(ws, &pod, ports, target).await
            }
            None => {}
        }
    }

    async fn exec(
        &self,
        ws: WebSocketStream<Conn>,
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
                close_normal(&mut sink).await;
                return;
            }
        };
        // An exec without stdin sees it end at once; an attach leaves the
        // container's stdin alone.
        if !o.io.stdin && !attach {
            let _ = send_msg(&mut wr, &stdin_eof()).await;
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
                    (Some(255), Some(0)) if o.v5 && o.io.stdin => stdin_eof(),
                    _ => continue,
                };
                if send_msg(&mut wr, &m).await.is_err() {
                    break;
                }
            }
        };
        let to_client = async {
            loop {
                let result = match next_msg(&mut rd).await {
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
                    Err(e) => Err(e),
                };
                let result = result.map(|code| (code, argv.clone()));
                let _ = sink.send(Message::binary(status_frame(result))).await;
                close_normal(&mut sink).await;
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
        ws: WebSocketStream<Conn>,
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
            close_normal(&mut sink).await;
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
                    Forward::Netns(netns) => {
                        relay_netns(&netns, port, in_rx, &tx, |d| frame(data_ch, d)).await
                    }
                    Forward::Vm { container } => {
                        relay_vm(&roots, &pod, container, port, in_rx, &tx, |d| {
                            frame(data_ch, d)
                        })
                        .await
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
    frame(3, &serde_json::to_vec(&status(r)).unwrap_or_default())
}

/// The Kubernetes Status that ends an exec or attach.
fn status(r: Result<(i32, Vec<String>), String>) -> serde_json::Value {
    match r {
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
    }
}

async fn send_msg(wr: &mut tokio::net::unix::OwnedWriteHalf, m: &ExecMsg) -> std::io::Result<()> {
    let mut b = serde_json::to_vec(m).map_err(std::io::Error::other)?;
    b.push(b'\n');
    wr.write_all(&b).await
}

type MonitorRead = BufReader<tokio::net::unix::OwnedReadHalf>;
type MonitorWrite = tokio::net::unix::OwnedWriteHalf;

/// The monitor's next message on an exec, attach or forward connection;
/// Err when it closed the connection or sent something else.
async fn next_msg(rd: &mut MonitorRead) -> Result<ExecMsg, String> {
    let mut line = String::new();
    match rd.read_line(&mut line).await {
        Ok(0) | Err(_) => Err("the monitor closed the connection".to_owned()),
        Ok(_) => serde_json::from_str(&line).map_err(|e| format!("the monitor sent {line:?}: {e}")),
    }
}

/// The end of a process's stdin.
fn stdin_eof() -> ExecMsg {
    ExecMsg::Stdin {
        data: vec![],
        eof: true,
    }
}

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

/// Relays one connection to localhost:`port` in `netns`: `input` to it,
/// what it sends (wrapped for the client's protocol) to `out`.
async fn relay_netns<T>(
    netns: &std::path::Path,
    port: u16,
    mut input: mpsc::Receiver<Vec<u8>>,
    out: &mpsc::Sender<T>,
    wrap: impl Fn(&[u8]) -> T,
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
                    if out.send(wrap(&buf[..n])).await.is_err() {
                        break;
                    }
                }
            }
        }
    };
    // The server's end of the connection ends the relay (after a moment
    // for the client's last bytes, as containerd does); the client's end
    // only half-closes it, so a server may still answer.
    tokio::pin!(up, down);
    tokio::select! {
        _ = &mut up => down.await,
        _ = &mut down => {
            let _ = tokio::time::timeout(Duration::from_secs(1), up).await;
        }
    }
    Ok(())
}

/// As relay_netns, to localhost:`port` in a VM pod, through the agent's
/// connect tool in one of its running containers.
async fn relay_vm<T>(
    roots: &Roots,
    pod: &str,
    container: String,
    port: u16,
    mut input: mpsc::Receiver<Vec<u8>>,
    out: &mpsc::Sender<T>,
    wrap: impl Fn(&[u8]) -> T,
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
        let _ = send_msg(&mut wr, &stdin_eof()).await;
        // Keep the connection (and so the relay) until the output ends.
        std::future::pending::<()>().await
    };
    let down = async {
        let mut errors = Vec::new();
        loop {
            match next_msg(&mut rd).await {
                Ok(ExecMsg::Stdout { data }) => {
                    if out.send(wrap(&data)).await.is_err() {
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
                Err(e) => return Err(e),
            }
        }
    };
    tokio::select! {
        r = down => r,
        _ = up => Ok(()),
    }
}

/// Reads an HTTP request head; returns it and whatever followed it.
async fn read_head(tcp: &mut TcpStream) -> Result<(Vec<u8>, Vec<u8>), String> {
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 2048];
    loop {
        let n = tcp.read(&mut chunk).await.map_err(|e| e.to_string())?;
        if n == 0 {
            return Err("the connection closed before its request ended".into());
        }
        let start = buf.len().saturating_sub(3);
        buf.extend_from_slice(&chunk[..n]);
        if let Some(i) = buf[start..].windows(4).position(|w| w == b"\r\n\r\n") {
            let rest = buf.split_off(start + i + 4);
            return Ok((buf, rest));
        }
        if buf.len() > MAX_HEAD {
            return Err(format!("a request head over {MAX_HEAD} bytes"));
        }
    }
}

/// An HTTP request head: its path and headers (names in lower case).
struct Head {
    path: String,
    headers: Vec<(String, String)>,
}

impl Head {
    fn parse(b: &[u8]) -> Result<Head, String> {
        let mut hs = [httparse::EMPTY_HEADER; 64];
        let mut req = httparse::Request::new(&mut hs);
        match req.parse(b) {
            Ok(httparse::Status::Complete(_)) => {}
            Ok(httparse::Status::Partial) => return Err("an incomplete request".into()),
            Err(e) => return Err(format!("a bad request: {e}")),
        }
        Ok(Head {
            path: req.path.unwrap_or("/").to_owned(),
            headers: req
                .headers
                .iter()
                .map(|h| {
                    (
                        h.name.to_ascii_lowercase(),
                        String::from_utf8_lossy(h.value).into_owned(),
                    )
                })
                .collect(),
        })
    }

    /// Every value of header `name`, comma-separated lists split.
    fn values<'a>(&'a self, name: &'a str) -> impl Iterator<Item = &'a str> + 'a {
        self.headers
            .iter()
            .filter(move |(k, _)| k == name)
            .flat_map(|(_, v)| v.split(','))
            .map(str::trim)
            .filter(|v| !v.is_empty())
    }

    /// The stream kind and token the path names (`/exec/TOKEN`).
    fn target(&self) -> (&str, &str) {
        let path = self.path.split('?').next().unwrap_or_default();
        let mut parts = path.trim_start_matches('/').splitn(2, '/');
        (parts.next().unwrap_or(""), parts.next().unwrap_or(""))
    }
}

/// Writes an HTTP response; any but 101 carries `body` and ends the
/// connection.
async fn respond(
    tcp: &mut TcpStream,
    code: u16,
    headers: &[(&str, &str)],
    body: &str,
) -> std::io::Result<()> {
    let reason = match code {
        101 => "Switching Protocols",
        400 => "Bad Request",
        403 => "Forbidden",
        _ => "Not Found",
    };
    let mut r = format!("HTTP/1.1 {code} {reason}\r\n");
    for (k, v) in headers {
        r.push_str(&format!("{k}: {v}\r\n"));
    }
    if code != 101 {
        r.push_str(&format!(
            "Content-Type: text/plain; charset=utf-8\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}\n",
            body.len() + 1
        ));
    } else {
        r.push_str("\r\n");
    }
    tcp.write_all(r.as_bytes()).await
}

/// A SPDY connection after the upgrade. Frames from the client arrive on
/// `frames`, which ends when the client closes the connection, goes away
/// or breaks the protocol; frames sent to `out` are written in order.
/// Client pings are answered here.
struct Session {
    frames: mpsc::Receiver<Frame>,
    out: mpsc::Sender<Frame>,
    reader: tokio::task::JoinHandle<()>,
    writer: Option<tokio::task::JoinHandle<()>>,
}

impl Session {
    /// A SPDY session on `conn` (a client's TCP connection, or a WebSocket
    /// tunnel), `rest` being what was read past the upgrade request.
    fn start<C>(conn: C, rest: Vec<u8>) -> Session
    where
        C: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + 'static,
    {
        let (rd, wr) = tokio::io::split(conn);
        let mut reader = FrameReader::new(AsyncReadExt::chain(std::io::Cursor::new(rest), rd));
        let mut writer = FrameWriter::new(wr);
        let (out, mut queue) = mpsc::channel::<Frame>(64);
        let (to_session, frames) = mpsc::channel::<Frame>(64);
        let echo = out.clone();
        let reader = tokio::spawn(async move {
            loop {
                match reader.read().await {
                    Ok(Some(Frame::Ping(id))) => {
                        let _ = echo.send(Frame::Ping(id)).await;
                    }
                    Ok(Some(Frame::Ignored(_))) => {}
                    Ok(Some(f)) => {
                        if to_session.send(f).await.is_err() {
                            break;
                        }
                    }
                    Ok(None) => break,
                    Err(e) => {
                        tracing::info!("streaming: a SPDY client: {e}");
                        if let spdy::SpdyError::Protocol(_) = e {
                            let _ = echo
                                .send(Frame::GoAway {
                                    last: 0,
                                    status: spdy::PROTOCOL_ERROR,
                                })
                                .await;
                        }
                        break;
                    }
                }
            }
        });
        let writer = tokio::spawn(async move {
            while let Some(f) = queue.recv().await {
                if writer.write(&f).await.is_err() {
                    break;
                }
            }
            let _ = writer.shutdown().await;
        });
        Session {
            frames,
            out,
            reader,
            writer: Some(writer),
        }
    }

    async fn send(&self, f: Frame) {
        let _ = self.out.send(f).await;
    }

    /// Ends the connection: GOAWAY, then a while for the client to close
    /// its side, then what is queued is written and the socket closed.
    async fn close(&mut self, last: u32) {
        self.send(Frame::GoAway { last, status: 0 }).await;
        let _ = tokio::time::timeout(Duration::from_secs(5), async {
            while self.frames.recv().await.is_some() {}
        })
        .await;
        self.reader.abort();
        let (closed, _) = mpsc::channel(1);
        drop(std::mem::replace(&mut self.out, closed));
        if let Some(w) = self.writer.take() {
            let _ = tokio::time::timeout(Duration::from_secs(5), w).await;
        }
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        self.reader.abort();
    }
}

/// The streams of an exec or attach over SPDY.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Channel {
    Error,
    Stdin,
    Stdout,
    Stderr,
    Resize,
}

/// Terminal sizes from a resize stream's JSON objects; a partial one stays
/// in `buf` for the next frame.
/// A terminal's first size, from its resize stream: kubectl sends it as
/// soon as the streams are open, and the program must start with it (a
/// `stty size` run at once printed the default 24 80 when the resize came
/// a moment after the start). Waits up to 1 s; every frame read stays in
/// `early`, handled as before once the process runs.
async fn first_size(
    s: &mut Session,
    resize: u32,
    early: &mut Vec<Frame>,
) -> Option<husk_protocol::TtySize> {
    let mut buf = Vec::new();
    let mut seen = 0;
    let until = tokio::time::Instant::now() + Duration::from_secs(1);
    loop {
        for f in &early[seen..] {
            if let Frame::Data { id, data, .. } = f {
                if *id == resize {
                    buf.extend_from_slice(data);
                }
            }
        }
        seen = early.len();
        if let Some(t) = take_sizes(&mut buf).into_iter().last() {
            return Some(husk_protocol::TtySize {
                rows: t.height,
                cols: t.width,
            });
        }
        match tokio::time::timeout_at(until, s.frames.recv()).await {
            Ok(Some(f)) => early.push(f),
            _ => return None,
        }
    }
}

fn take_sizes(buf: &mut Vec<u8>) -> Vec<TermSize> {
    let mut sizes = Vec::new();
    let mut it = serde_json::Deserializer::from_slice(buf).into_iter::<TermSize>();
    loop {
        match it.next() {
            Some(Ok(s)) => sizes.push(s),
            Some(Err(e)) if e.is_eof() => break,
            Some(Err(_)) => {
                // Not a size: drop what is buffered.
                buf.clear();
                return sizes;
            }
            None => break,
        }
    }
    let used = it.byte_offset();
    buf.drain(..used);
    sizes
}

impl Streaming {
    async fn spdy(self: Arc<Self>, mut tcp: TcpStream, req: &Head, rest: Vec<u8>) {
        let (kind, token) = req.target();
        let Some(p) = self.take(kind, token) else {
            let msg = format!("{}: no such stream (unknown or expired token)", req.path);
            let _ = respond(&mut tcp, 404, &[], &msg).await;
            return;
        };
        let wanted: &[&'static str] = match p {
            Pending::Process { .. } => &[
                "v4.channel.k8s.io",
                "v3.channel.k8s.io",
                "v2.channel.k8s.io",
            ],
            Pending::PortForward { .. } => &["portforward.k8s.io"],
        };
        let offered: Vec<&str> = req.values("x-stream-protocol-version").collect();
        let Some(proto) = wanted.iter().copied().find(|w| offered.contains(w)) else {
            let all = wanted.join(", ");
            let msg = format!(
                "unable to negotiate a stream protocol: the client offers {offered:?}, huskd speaks {all}"
            );
            let accepted = [("X-Accepted-Stream-Protocol-Versions", all.as_str())];
            let _ = respond(&mut tcp, 403, &accepted, &msg).await;
            return;
        };
        let upgrade = [
            ("Connection", "Upgrade"),
            ("Upgrade", "SPDY/3.1"),
            ("X-Stream-Protocol-Version", proto),
        ];
        if respond(&mut tcp, 101, &upgrade, "").await.is_err() {
            return;
        }
        let mut s = Session::start(tcp, rest);
        match p {
            Pending::Process {
                pod,
                request,
                label,
                io,
            } => {
                self.spdy_exec(&mut s, &pod, request, label, io, proto)
                    .await
            }
            Pending::PortForward { pod, ports, target } => {
                self.spdy_port_forward(&mut s, &pod, ports, target).await
            }
        }
    }

    /// An exec or attach over SPDY: once the client has opened the
    /// streams it asked for, the process runs; its end is written to the
    /// error stream and every stream is closed.
    async fn spdy_exec(
        &self,
        s: &mut Session,
        pod: &str,
        req: Request,
        argv: Vec<String>,
        io: Io,
        proto: &str,
    ) {
        let mut wanted = vec![Channel::Error];
        for (on, ch) in [
            (io.stdin, Channel::Stdin),
            (io.stdout, Channel::Stdout),
            (io.stderr, Channel::Stderr),
            (io.tty && proto != "v2.channel.k8s.io", Channel::Resize),
        ] {
            if on {
                wanted.push(ch);
            }
        }
        let mut ids: HashMap<Channel, u32> = HashMap::new();
        let mut early = Vec::new();
        let mut last = 0;
        let deadline = tokio::time::Instant::now() + CLIENT_TIMEOUT;
        while !wanted.iter().all(|c| ids.contains_key(c)) {
            let f = match tokio::time::timeout_at(deadline, s.frames.recv()).await {
                Ok(Some(f)) => f,
                Ok(None) => return,
                Err(_) => {
                    let msg =
                        format!("timed out waiting for the client to open streams {wanted:?}");
                    spdy_finish(s, &ids, proto, Err(msg), last).await;
                    return;
                }
            };
            match f {
                Frame::SynStream { id, headers, .. } => {
                    last = last.max(id);
                    let ch = match spdy::header(&headers, "streamtype") {
                        Some("error") => Some(Channel::Error),
                        Some("stdin") => Some(Channel::Stdin),
                        Some("stdout") => Some(Channel::Stdout),
                        Some("stderr") => Some(Channel::Stderr),
                        Some("resize") => Some(Channel::Resize),
                        _ => None,
                    };
                    match ch {
                        Some(c) if wanted.contains(&c) && !ids.contains_key(&c) => {
                            ids.insert(c, id);
                            s.send(Frame::SynReply {
                                id,
                                fin: false,
                                headers: vec![],
                            })
                            .await;
                        }
                        _ => {
                            tracing::info!(
                                "streaming: refused an unexpected SPDY stream {headers:?} (wanted {wanted:?})"
                            );
                            s.send(Frame::RstStream {
                                id,
                                status: spdy::REFUSED_STREAM,
                            })
                            .await;
                        }
                    }
                }
                Frame::Data { .. } => early.push(f),
                Frame::RstStream { .. } | Frame::GoAway { .. } => return,
                _ => {}
            }
        }
        let attach = matches!(req, Request::AttachStream { .. });
        let mut req = req;
        if let (Some(&rid), Request::ExecStream { spec, .. }) =
            (ids.get(&Channel::Resize), &mut req)
        {
            if spec.tty.is_some() {
                if let Some(size) = first_size(s, rid, &mut early).await {
                    spec.tty = Some(size);
                }
            }
        }
        let (mut rd, mut wr) = match open_stream(&self.roots, pod, req).await {
            Ok(c) => c,
            Err(msg) => {
                spdy_finish(s, &ids, proto, Err(msg), last).await;
                return;
            }
        };
        if !io.stdin && !attach {
            let _ = send_msg(&mut wr, &stdin_eof()).await;
        }
        let id = |c| ids.get(&c).copied();
        let (stdin, resize, stdout, stderr) = (
            id(Channel::Stdin),
            id(Channel::Resize),
            id(Channel::Stdout),
            id(Channel::Stderr),
        );
        let out = s.out.clone();
        let frames = &mut s.frames;
        let from_client = async {
            let mut early = early.into_iter();
            let mut sizes = Vec::new();
            loop {
                let f = match early.next() {
                    Some(f) => f,
                    None => match frames.recv().await {
                        Some(f) => f,
                        None => return,
                    },
                };
                let mut msgs = Vec::new();
                match f {
                    Frame::Data { id, fin, data } if Some(id) == stdin => {
                        if !data.is_empty() {
                            msgs.push(ExecMsg::Stdin { data, eof: false });
                        }
                        if fin {
                            msgs.push(stdin_eof());
                        }
                    }
                    Frame::RstStream { id, .. } if Some(id) == stdin => {
                        msgs.push(stdin_eof());
                    }
                    Frame::Data { id, data, .. } if Some(id) == resize => {
                        sizes.extend(data);
                        for t in take_sizes(&mut sizes) {
                            msgs.push(ExecMsg::Resize {
                                rows: t.height,
                                cols: t.width,
                            });
                        }
                    }
                    Frame::SynStream { id, .. } => {
                        let _ = out
                            .send(Frame::RstStream {
                                id,
                                status: spdy::REFUSED_STREAM,
                            })
                            .await;
                    }
                    Frame::GoAway { .. } => return,
                    _ => {}
                }
                for m in &msgs {
                    if send_msg(&mut wr, m).await.is_err() {
                        return;
                    }
                }
            }
        };
        let to_client = async {
            loop {
                let (id, data) = match next_msg(&mut rd).await? {
                    ExecMsg::Stdout { data } => (stdout, data),
                    ExecMsg::Stderr { data } => (stderr, data),
                    ExecMsg::Exit { code } => return Ok((code, argv.clone())),
                    ExecMsg::Error { message } => return Err(message),
                    _ => continue,
                };
                if let Some(id) = id {
                    let _ = out
                        .send(Frame::Data {
                            id,
                            fin: false,
                            data,
                        })
                        .await;
                }
            }
        };
        // As over WebSocket: the exec ends with its process, or when the
        // client goes away (dropping the monitor connection kills it).
        let result = tokio::select! {
            r = to_client => Some(r),
            _ = from_client => None,
        };
        if let Some(r) = result {
            spdy_finish(s, &ids, proto, r, last).await;
        }
    }

    /// Port-forward over SPDY: each forwarded connection is a data and an
    /// error stream with the same request id; when both are open, the data
    /// is relayed to the port on the pod's localhost.
    async fn spdy_port_forward(
        &self,
        s: &mut Session,
        pod: &str,
        allowed: Vec<u16>,
        target: Forward,
    ) {
        #[derive(Default)]
        struct Fwd {
            data: Option<u32>,
            error: Option<u32>,
            port: Option<String>,
            input: Option<mpsc::Sender<Vec<u8>>>,
            early: Vec<Vec<u8>>,
            eof: bool,
            task: Option<tokio::task::JoinHandle<()>>,
        }
        let mut fwds: HashMap<String, Fwd> = HashMap::new();
        let mut owner: HashMap<u32, String> = HashMap::new();
        let (done_tx, mut done) = mpsc::channel::<String>(16);
        let mut last = 0;
        loop {
            let f = tokio::select! {
                f = s.frames.recv() => match f {
                    Some(f) => f,
                    None => break,
                },
                Some(rid) = done.recv() => {
                    if let Some(fw) = fwds.remove(&rid) {
                        for id in [fw.data, fw.error].into_iter().flatten() {
                            owner.remove(&id);
                        }
                    }
                    continue;
                }
            };
            match f {
                Frame::SynStream { id, headers, .. } => {
                    last = last.max(id);
                    let kind = spdy::header(&headers, "streamtype").unwrap_or_default();
                    // Clients before request ids: a connection's error
                    // stream is opened right before its data stream.
                    let rid = match (spdy::header(&headers, "requestid"), kind) {
                        (Some(r), _) => r.to_owned(),
                        (None, "data") => id.saturating_sub(2).to_string(),
                        (None, _) => id.to_string(),
                    };
                    let refuse = |status| Frame::RstStream { id, status };
                    if kind != "data" && kind != "error" {
                        s.send(refuse(spdy::PROTOCOL_ERROR)).await;
                        continue;
                    }
                    if !fwds.contains_key(&rid) && fwds.len() >= MAX_FORWARDS {
                        s.send(refuse(spdy::REFUSED_STREAM)).await;
                        continue;
                    }
                    let fw = fwds.entry(rid.clone()).or_default();
                    let slot = if kind == "data" {
                        &mut fw.data
                    } else {
                        &mut fw.error
                    };
                    if slot.is_some() {
                        s.send(refuse(spdy::PROTOCOL_ERROR)).await;
                        continue;
                    }
                    *slot = Some(id);
                    if fw.port.is_none() {
                        fw.port = spdy::header(&headers, "port").map(str::to_owned);
                    }
                    owner.insert(id, rid.clone());
                    s.send(Frame::SynReply {
                        id,
                        fin: false,
                        headers: vec![],
                    })
                    .await;
                    let (Some(data_id), Some(err_id)) = (fw.data, fw.error) else {
                        continue;
                    };
                    let port = match fw.port.as_deref().map(str::parse::<u16>) {
                        Some(Ok(p)) if p > 0 && (allowed.is_empty() || allowed.contains(&p)) => {
                            Ok(p)
                        }
                        Some(Ok(p)) if p > 0 => Err(format!(
                            "port {p} is not among the requested ports {allowed:?}"
                        )),
                        _ => Err(format!(
                            "invalid port {:?}",
                            fw.port.as_deref().unwrap_or("")
                        )),
                    };
                    let (in_tx, in_rx) = mpsc::channel::<Vec<u8>>(64);
                    let (out, done_tx) = (s.out.clone(), done_tx.clone());
                    let (roots, target, pod) = (self.roots.clone(), target.clone(), pod.to_owned());
                    fw.task = Some(tokio::spawn(async move {
                        let wrap = |d: &[u8]| Frame::Data {
                            id: data_id,
                            fin: false,
                            data: d.to_vec(),
                        };
                        let r = match port {
                            Err(e) => Err(e),
                            Ok(port) => match target {
                                Forward::Netns(netns) => {
                                    relay_netns(&netns, port, in_rx, &out, wrap).await
                                }
                                Forward::Vm { container } => {
                                    relay_vm(&roots, &pod, container, port, in_rx, &out, wrap).await
                                }
                            }
                            .map_err(|e| {
                                format!("forwarding port {port} of pod sandbox {pod}: {e}")
                            }),
                        };
                        if let Err(e) = r {
                            let _ = out
                                .send(Frame::Data {
                                    id: err_id,
                                    fin: false,
                                    data: e.into_bytes(),
                                })
                                .await;
                        }
                        for id in [data_id, err_id] {
                            let _ = out
                                .send(Frame::Data {
                                    id,
                                    fin: true,
                                    data: vec![],
                                })
                                .await;
                        }
                        let _ = done_tx.send(rid).await;
                    }));
                    for d in fw.early.drain(..) {
                        let _ = in_tx.send(d).await;
                    }
                    if !fw.eof {
                        fw.input = Some(in_tx);
                    }
                }
                Frame::Data { id, fin, data } => {
                    let Some(fw) = owner.get(&id).and_then(|r| fwds.get_mut(r)) else {
                        continue;
                    };
                    if fw.data != Some(id) {
                        continue;
                    }
                    match &fw.input {
                        Some(tx) if !data.is_empty() => {
                            let _ = tx.send(data).await;
                        }
                        None if fw.task.is_none() => fw.early.push(data),
                        _ => {}
                    }
                    if fin {
                        fw.input = None;
                        fw.eof = true;
                    }
                }
                Frame::RstStream { id, .. } => {
                    if let Some(fw) = owner.get(&id).and_then(|r| fwds.get_mut(r)) {
                        fw.input = None;
                        if let Some(t) = fw.task.take() {
                            t.abort();
                        }
                    }
                }
                Frame::GoAway { .. } => break,
                _ => {}
            }
        }
        for fw in fwds.values_mut() {
            if let Some(t) = fw.task.take() {
                t.abort();
            }
        }
        s.close(last).await;
    }
}

/// Ends a WebSocket as client-go expects of a stream that ended well: a
/// Close with status 1000 (client-go takes any other code, or none, for a
/// broken stream and drops the exit Status it read), then the flush.
async fn close_normal<S>(sink: &mut S)
where
    S: futures_util::Sink<Message> + Unpin,
{
    use tokio_tungstenite::tungstenite::protocol::{frame::coding::CloseCode, CloseFrame};
    let _ = sink
        .send(Message::Close(Some(CloseFrame {
            code: CloseCode::Normal,
            reason: "".into(),
        })))
        .await;
    let _ = sink.close().await;
}

/// The byte stream a WebSocket tunnels (client-go's TunnelingConnection):
/// each binary message carries the next bytes; a close ends the stream.
/// Two tasks pump between the WebSocket and one end of an in-memory pipe;
/// the outbound one ends when the session drops its end, and then ends the
/// inbound one.
fn tunnel(ws: WebSocketStream<Conn>) -> tokio::io::DuplexStream {
    let (mine, theirs) = tokio::io::duplex(64 << 10);
    let (mut sink, mut stream) = ws.split();
    let (mut rd, mut wr) = tokio::io::split(mine);
    let inbound = tokio::spawn(async move {
        while let Some(Ok(m)) = stream.next().await {
            match m {
                Message::Binary(b) if wr.write_all(&b).await.is_err() => break,
                Message::Binary(_) => {}
                Message::Close(_) => break,
                // Pings are answered by tungstenite; text has no place in
                // a tunnel.
                _ => {}
            }
        }
        let _ = wr.shutdown().await;
    });
    tokio::spawn(async move {
        let mut buf = vec![0u8; 32 << 10];
        loop {
            let n = match rd.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            };
            if sink.send(Message::binary(buf[..n].to_vec())).await.is_err() {
                break;
            }
        }
        close_normal(&mut sink).await;
        // The session is over: a client that never closes its side does
        // not keep the other task waiting.
        inbound.abort();
    });
    theirs
}

/// Ends an exec over SPDY: its result on the error stream (a Status for
/// v4, the message of a failure before), then every stream closed.
async fn spdy_finish(
    s: &mut Session,
    ids: &HashMap<Channel, u32>,
    proto: &str,
    r: Result<(i32, Vec<String>), String>,
    last: u32,
) {
    if let Some(&id) = ids.get(&Channel::Error) {
        let st = status(r);
        let data = if proto == "v4.channel.k8s.io" {
            serde_json::to_vec(&st).unwrap_or_default()
        } else if st["status"] == "Success" {
            vec![]
        } else {
            st["message"]
                .as_str()
                .unwrap_or_default()
                .as_bytes()
                .to_vec()
        };
        if !data.is_empty() {
            s.send(Frame::Data {
                id,
                fin: false,
                data,
            })
            .await;
        }
    }
    for &id in ids.values() {
        s.send(Frame::Data {
            id,
            fin: true,
            data: vec![],
        })
        .await;
    }
    s.close(last).await;
}
