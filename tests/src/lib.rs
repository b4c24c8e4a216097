//! Helpers shared by the end-to-end tests and the benchmarks; the guests
//! themselves are built by build.rs.

use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

/// A docker-registry process serving a fresh directory on 127.0.0.1.
pub struct Registry {
    child: Child,
    pub port: u16,
    _dir: tempfile::TempDir,
}

impl Registry {
    pub fn start() -> Self {
        Self::start_with(None)
    }

    /// A registry that wants HTTP basic auth (htpasswd, bcrypt).
    pub fn with_auth(user: &str, password: &str) -> Self {
        let hash = bcrypt::hash(password, 5).unwrap();
        Self::start_with(Some(format!("{user}:{hash}\n")))
    }

    fn start_with(htpasswd: Option<String>) -> Self {
        let bin = Path::new("/usr/bin/docker-registry");
        assert!(
            bin.exists(),
            "docker-registry missing: apt-get install docker-registry (tests/run.sh does)"
        );
        let dir = tempfile::tempdir().unwrap();
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let cfg = dir.path().join("config.yml");
        let auth = match htpasswd {
            Some(lines) => {
                let f = dir.path().join("htpasswd");
                std::fs::write(&f, lines).unwrap();
                format!(
                    "auth:\n  htpasswd:\n    realm: husk-test\n    path: {}\n",
                    f.display()
                )
            }
            None => String::new(),
        };
        std::fs::write(
            &cfg,
            auth + &format!(
                "version: 0.1\nlog:\n  level: error\nstorage:\n  filesystem:\n    rootdirectory: {}\n  delete:\n    enabled: true\nhttp:\n  addr: 127.0.0.1:{port}\n",
                dir.path().join("data").display()
            ),
        )
        .unwrap();
        let child = Command::new(bin)
            .arg("serve")
            .arg(&cfg)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let t0 = Instant::now();
        while TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                t0.elapsed() < Duration::from_secs(20),
                "registry did not start"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        Registry {
            child,
            port,
            _dir: dir,
        }
    }

    pub fn host(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `husk --root ROOT`, with the husk binary built next to the caller.
/// Where images/build.sh put the guest kernels and test initramfs.
pub fn images_dir() -> PathBuf {
    std::env::var_os("HUSK_IMAGES_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(std::env::var_os("HOME").unwrap_or_default()).join(".cache/husk-images")
        })
}

/// The static husk-agent that tests/run.sh builds for the guests, for
/// test binaries (target/<profile>/deps/…) and bench binaries
/// (target/<profile>/…) alike.
pub fn static_agent() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let mut profile = exe.parent().unwrap();
    if profile.ends_with("deps") {
        profile = profile.parent().unwrap();
    }
    let agent = profile
        .parent()
        .unwrap()
        .join("x86_64-unknown-linux-gnu/release/husk-agent");
    assert!(
        agent.exists(),
        "{} missing: build it with RUSTFLAGS=\"-C target-feature=+crt-static\" cargo build --release -p husk-agent --target x86_64-unknown-linux-gnu (tests/run.sh does)",
        agent.display()
    );
    agent
}

pub fn husk_at(root: &Path) -> Command {
    let exe = std::env::current_exe().unwrap();
    let mut c = Command::new(exe.with_file_name("husk"));
    c.arg("--root").arg(root);
    c
}

/// Runs `cmd` and panics with its stderr unless it succeeds.
pub fn run_ok(cmd: &mut Command) -> Output {
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "{:?}: {}",
        cmd,
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// A current-thread tokio runtime for the OCI client.
pub fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

/// An OCI client for the plain-HTTP test registry.
pub fn oci_client() -> oci_client::Client {
    oci_client::Client::new(oci_client::client::ClientConfig {
        protocol: oci_client::client::ClientProtocol::Http,
        ..Default::default()
    })
}

/// What a layer entry holds: file contents, or a symlink's target.
pub type Body<'a> = Result<&'a [u8], &'a str>;

/// A tar layer from (path, mode, body) entries.
pub fn layer_tar(entries: &[(&str, u32, Body)]) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    for (path, mode, body) in entries {
        let mut h = tar::Header::new_gnu();
        h.set_mode(*mode);
        h.set_mtime(1_700_000_000);
        match body {
            Ok(data) => {
                h.set_entry_type(tar::EntryType::Regular);
                h.set_size(data.len() as u64);
                b.append_data(&mut h, path, *data).unwrap();
            }
            Err(target) => {
                h.set_entry_type(tar::EntryType::Symlink);
                h.set_size(0);
                b.append_link(&mut h, path, target).unwrap();
            }
        }
    }
    b.into_inner().unwrap()
}

/// Pushes a two-layer linux/amd64 image to `reg` as `name` (`repo:tag`)
/// and returns its reference: Debian's static busybox as /bin/busybox and
/// /bin/sh, /etc/motd and /etc/keep, then a layer that adds /etc/greeting
/// and deletes /etc/motd (a whiteout). Its config sets PATH, GREETING and
/// a cmd.
pub fn push_busybox_image(reg: &Registry, name: &str) -> String {
    let busybox = std::fs::read("/bin/busybox").expect("/bin/busybox (busybox-static)");
    let base = layer_tar(&[
        ("bin/busybox", 0o755, Ok(&busybox)),
        ("bin/sh", 0o777, Err("busybox")),
        ("etc/motd", 0o644, Ok(b"from the base layer\n")),
        ("etc/keep", 0o644, Ok(b"kept\n")),
    ]);
    let top = layer_tar(&[
        ("etc/greeting", 0o644, Ok(b"from the top layer\n")),
        ("etc/.wh.motd", 0o644, Ok(b"")),
    ]);
    push_linux_image(
        reg,
        name,
        vec![base, top],
        serde_json::json!({
            "Env": ["PATH=/bin", "GREETING=from-the-image"],
            "Cmd": ["/bin/sh", "-c", "cat /etc/greeting"],
        }),
    )
}

/// Pushes a linux/amd64 image of `layers` (uncompressed tars, lowest
/// first) whose config's `config` is `config`; returns its reference.
pub fn push_linux_image(
    reg: &Registry,
    name: &str,
    layers: Vec<Vec<u8>>,
    config: serde_json::Value,
) -> String {
    use sha2::Digest as _;
    let diff_ids: Vec<String> = layers
        .iter()
        .map(|t| format!("sha256:{}", hex::encode(sha2::Sha256::digest(t))))
        .collect();
    let config = serde_json::json!({
        "architecture": "amd64", "os": "linux", "config": config,
        "rootfs": {"type": "layers", "diff_ids": diff_ids},
    });
    let reference = format!("{}/{name}", reg.host());
    let layers: Vec<_> = layers
        .into_iter()
        .map(|t| {
            oci_client::client::ImageLayer::new(
                t,
                "application/vnd.oci.image.layer.v1.tar".into(),
                None,
            )
        })
        .collect();
    let cfg = oci_client::client::Config::new(
        config.to_string().into_bytes(),
        "application/vnd.oci.image.config.v1+json".into(),
        None,
    );
    rt().block_on(oci_client().push(
        &reference.parse().unwrap(),
        &layers,
        cfg,
        &oci_client::secrets::RegistryAuth::Anonymous,
        None,
    ))
    .unwrap();
    reference
}

/// A gRPC channel to a CRI server (huskd) on a unix socket.
pub async fn cri_channel(socket: &Path) -> tonic::transport::Channel {
    let sock = socket.to_owned();
    tonic::transport::Endpoint::try_from("http://[::]:50051")
        .unwrap()
        .connect_with_connector(tower::service_fn(move |_: tonic::transport::Uri| {
            let s = sock.clone();
            async move {
                Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(
                    tokio::net::UnixStream::connect(s).await?,
                ))
            }
        }))
        .await
        .unwrap()
}

/// A WebSocket to a CRI streaming URL (`http://…`), offering `protocol`.
pub async fn ws_connect(
    url: &str,
    protocol: &str,
) -> tokio_tungstenite::WebSocketStream<tokio::net::TcpStream> {
    ws_try(url, protocol)
        .await
        .unwrap_or_else(|e| panic!("{url}: {e}"))
}

/// Whether the streaming server refuses a WebSocket to `url`.
pub async fn ws_refused(url: &str, protocol: &str) -> bool {
    ws_try(url, protocol).await.is_err()
}

async fn ws_try(
    url: &str,
    protocol: &str,
) -> Result<tokio_tungstenite::WebSocketStream<tokio::net::TcpStream>, String> {
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    let rest = url.strip_prefix("http://").ok_or("not an http URL")?;
    let host = rest.split('/').next().unwrap_or_default();
    let tcp = tokio::net::TcpStream::connect(host)
        .await
        .map_err(|e| e.to_string())?;
    let mut req = format!("ws://{rest}")
        .into_client_request()
        .map_err(|e| e.to_string())?;
    req.headers_mut().insert(
        "Sec-WebSocket-Protocol",
        protocol.parse().map_err(|_| "bad protocol")?,
    );
    let (ws, _) = tokio_tungstenite::client_async(req, tcp)
        .await
        .map_err(|e| e.to_string())?;
    Ok(ws)
}

/// Pushes `file` as a one-layer wasm image (`application/wasm`, wasip1)
/// named `name` to `reg`; returns its reference.
pub fn push_wasm(reg: &Registry, name: &str, file: &Path) -> String {
    use oci_client::client::{Config, ImageLayer};
    let reference = format!("{}/{name}", reg.host());
    let r: oci_client::Reference = reference.parse().unwrap();
    let layer = ImageLayer::new(
        std::fs::read(file).unwrap(),
        "application/wasm".into(),
        None,
    );
    let config = Config::new(
        br#"{"architecture":"wasm","os":"wasip1"}"#.to_vec(),
        "application/vnd.wasm.config.v0+json".into(),
        None,
    );
    rt().block_on(oci_client().push(
        &r,
        &[layer],
        config,
        &oci_client::secrets::RegistryAuth::Anonymous,
        None,
    ))
    .unwrap();
    reference
}
