//! `huskd`: the CRI v1 runtime and image service a kubelet (or crictl)
//! talks to, over a unix socket. It is one more front end over husk's pods:
//! a pod sandbox is a husk pod with its own monitor, started without
//! containers; containers are created, started, stopped and removed in it
//! one by one. Everything huskd knows lives in husk's state directories,
//! so it can be restarted (or killed) while pods run, and the `husk` CLI
//! sees the same pods and images.

mod authority;
mod deadline;
mod events;
mod image;
mod runtime;
mod spdy;
mod store;
mod stream;

use clap::Parser;
use husk_sandbox::state::Roots;
use k8s_cri::v1::image_service_server::ImageServiceServer;
use k8s_cri::v1::runtime_service_server::RuntimeServiceServer;
use std::path::PathBuf;

#[derive(Parser)]
#[command(
    name = "huskd",
    version,
    about = "husk's CRI v1 runtime and image service (for a kubelet, crictl or critest)"
)]
struct Args {
    /// The unix socket to serve CRI on.
    #[arg(long, default_value = "/run/husk/huskd.sock", value_name = "PATH")]
    socket: PathBuf,
    /// Move both state dirs (/run/husk and /var/lib/husk) under DIR, as
    /// `husk --root` does.
    #[arg(long, env = "HUSK_ROOT", value_name = "DIR")]
    root: Option<PathBuf>,
    /// The runtime handler for pods that name none.
    #[arg(long, default_value = "husk-wasm", value_name = "HANDLER")]
    default_runtime_handler: String,
    /// The husk binary that runs pod monitors (default: `husk` beside huskd).
    #[arg(long, value_name = "PATH")]
    husk: Option<PathBuf>,
    /// Where the streaming server (exec, port-forward) listens; port 0
    /// picks a free one.
    #[arg(long, default_value = "127.0.0.1:0", value_name = "ADDR:PORT")]
    streaming_address: String,
}

fn main() {
    let args = Args::parse();
    husk_shim::diag::init_tracing();
    std::process::exit(match serve(args) {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("huskd: {e}");
            1
        }
    });
}

fn serve(args: Args) -> Result<(), String> {
    if !matches!(
        args.default_runtime_handler.as_str(),
        runtime::HANDLER_WASM | runtime::HANDLER_VM
    ) {
        eprintln!(
            "huskd: --default-runtime-handler {:?}: use {} or {}",
            args.default_runtime_handler,
            runtime::HANDLER_WASM,
            runtime::HANDLER_VM
        );
        std::process::exit(2);
    }
    let root = args.root.map(|r| {
        if r.is_absolute() {
            r
        } else {
            std::env::current_dir().map(|d| d.join(&r)).unwrap_or(r)
        }
    });
    let roots = Roots::new(root.as_deref());
    roots
        .secure()
        .map_err(|e| format!("husk's state roots must be root's only: {e}"))?;
    roots.collect_stale();
    let husk = match args.husk {
        Some(p) => p,
        None => std::env::current_exe()
            .map_err(|e| format!("cannot find huskd's own binary: {e}"))?
            .with_file_name("husk"),
    };
    if !husk.is_file() {
        return Err(format!(
            "{}: no husk binary there; give its path with --husk",
            husk.display()
        ));
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|e| format!("runtime: {e}"))?;
    rt.block_on(async move {
        if let Some(dir) = args.socket.parent() {
            std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        }
        // A socket left by a huskd that was killed: nobody answers on it.
        if std::os::unix::net::UnixStream::connect(&args.socket).is_ok() {
            return Err(format!(
                "{}: another huskd serves this socket",
                args.socket.display()
            ));
        }
        let _ = std::fs::remove_file(&args.socket);
        let listener = tokio::net::UnixListener::bind(&args.socket)
            .map_err(|e| format!("{}: {e}", args.socket.display()))?;
        let (streaming, stream_listener) =
            stream::Streaming::bind(&args.streaming_address, roots.clone())
                .await
                .map_err(|e| format!("streaming server on {}: {e}", args.streaming_address))?;
        tokio::spawn(streaming.clone().serve(stream_listener));
        let state = std::sync::Arc::new(store::Huskd::new(
            roots,
            husk,
            args.default_runtime_handler,
            streaming,
        ));
        state.recover();
        tracing::info!(socket = %args.socket.display(), "huskd serving CRI v1");
        // grpc-go's socket-path :authority, mended before h2 reads it.
        let incoming = tokio_stream::StreamExt::map(
            tokio_stream::wrappers::UnixListenerStream::new(listener),
            |conn| conn.map(authority::GrpcGoCompat::new),
        );
        let socket = args.socket.clone();
        let shutdown = async {
            use tokio::signal::unix::{signal, SignalKind};
            let mut term = signal(SignalKind::terminate()).expect("signal");
            let mut int = signal(SignalKind::interrupt()).expect("signal");
            tokio::select! {
                _ = term.recv() => {}
                _ = int.recv() => {}
            }
            tracing::info!("huskd stopping; pods keep running");
        };
        let result = tonic::transport::Server::builder()
            .layer(deadline::DeadlineLayer)
            .add_service(RuntimeServiceServer::new(runtime::Runtime(state.clone())))
            .add_service(ImageServiceServer::new(image::Images(state)))
            .serve_with_incoming_shutdown(incoming, shutdown)
            .await
            .map_err(|e| format!("serving CRI: {e}"));
        let _ = std::fs::remove_file(&socket);
        result
    })
}
