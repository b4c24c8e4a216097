//! `husk`: run Kubernetes pods as WebAssembly sandboxes, docker/kubectl-style.

use husk_shim::{cli, monitor};

use clap::{Parser, Subcommand};
use husk_sandbox::state::Roots;
use std::path::PathBuf;

#[derive(Parser)]
#[command(
    name = "husk",
    version,
    about = "Run Kubernetes pods in strongly isolated sandboxes (wasm today, microVMs next)"
)]
struct Cli {
    /// Move both state dirs (/run/husk and /var/lib/husk) under DIR.
    #[arg(long, global = true, env = "HUSK_ROOT", value_name = "DIR")]
    root: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run a pod from a manifest (-f) or a one-container pod from an image.
    Run(cli::run::RunArgs),
    /// List pods and their containers.
    Ps(cli::ps::PsArgs),
    /// Print a container's logs.
    Logs(cli::logs::LogsArgs),
    /// Show a pod's spec and status as JSON.
    Inspect(cli::inspect::InspectArgs),
    /// Stop a pod: containers get their grace period, then are killed.
    Stop(cli::stop::StopArgs),
    /// Run a command in a running container of a VM pod.
    Exec(cli::exec::ExecArgs),
    /// Update ConfigMaps and Secrets (-f FILE) in the running pods that use them.
    Apply(cli::apply::ApplyArgs),
    /// Attach to a running container's output (and stdin with -i).
    Attach(cli::attach::AttachArgs),
    /// Forward local ports to ports on a pod's localhost (as kubectl port-forward).
    PortForward(cli::port_forward::PortForwardArgs),
    /// Copy files or directories between a VM pod's container and the host.
    Cp(cli::cp::CpArgs),
    /// CPU, memory and processes of a VM pod's running containers.
    Stats(cli::stats::StatsArgs),
    /// Change a VM pod container's memory or CPU limit while it runs.
    Update(cli::update::UpdateArgs),
    /// Remove pods (their logs and emptyDirs go with them).
    Rm(cli::rm::RmArgs),
    /// What this host runs pods with (hypervisor for VM pods, and why).
    Info(cli::info::InfoArgs),
    /// Pull an image from a registry.
    Pull(cli::images::PullArgs),
    /// List images.
    Images(cli::images::ImagesArgs),
    /// Show an image's layers and how they were made.
    History(cli::images::HistoryArgs),
    /// Remove images; blobs no other image uses leave the disk.
    Rmi(cli::images::RmiArgs),
    /// Give an image another name.
    Tag(cli::images::TagArgs),
    /// Find repositories (and their tags) in a registry's catalog.
    Search(cli::images::SearchArgs),
    /// Image housekeeping.
    #[command(subcommand)]
    Image(cli::images::ImageCommand),
    /// Load images from an OCI layout (dir or tar) or a docker archive.
    Load(cli::images::LoadArgs),
    /// Save images as an OCI layout (dir, or FILE.tar with docker's manifest.json).
    Save(cli::images::SaveArgs),
    /// Unpack a Linux image into its per-layer snapshots; prints them.
    Unpack(cli::images::UnpackArgs),
    /// Store credentials for a registry (checked first).
    Login(cli::images::LoginArgs),
    /// Forget a registry's credentials.
    Logout(cli::images::LogoutArgs),
    /// The per-pod monitor (started by `husk run`).
    #[command(hide = true)]
    Monitor {
        #[arg(long)]
        id: String,
    },
}

fn main() {
    let cli = Cli::parse();
    let root = cli.root.map(|r| {
        if r.is_absolute() {
            r
        } else {
            std::env::current_dir().map(|d| d.join(&r)).unwrap_or(r)
        }
    });
    let roots = Roots::new(root.as_deref());
    // Only root may read husk's state. A user who may not change it (not
    // root) gets the command's own error further on.
    if let Err(e) = roots.secure() {
        tracing::debug!("securing husk's state roots: {e}");
    }
    // Commands that only print: `husk ps | head` ends quietly, as other
    // command-line tools do, instead of panicking on the closed pipe. The
    // monitor and the commands that talk to one keep SIGPIPE ignored, so a
    // peer that goes away is an error they report.
    if matches!(
        cli.command,
        Command::Ps(_)
            | Command::Logs(_)
            | Command::Inspect(_)
            | Command::Images(_)
            | Command::History(_)
            | Command::Info(_)
            | Command::Search(_)
            | Command::Stats(_)
    ) {
        // SAFETY: setting a signal's disposition to its default, before
        // any thread starts.
        unsafe { libc::signal(libc::SIGPIPE, libc::SIG_DFL) };
    }
    let code = match cli.command {
        Command::Monitor { id } => monitor::main(&roots, &id),
        Command::Run(a) => cli::run::run(&roots, a),
        Command::Ps(a) => cli::ps::run(&roots, a),
        Command::Logs(a) => cli::logs::run(&roots, a),
        Command::Inspect(a) => cli::inspect::run(&roots, a),
        Command::Stop(a) => cli::stop::run(&roots, a),
        Command::Exec(a) => cli::exec::run(&roots, a),
        Command::Stats(a) => cli::stats::run(&roots, a),
        Command::Cp(a) => cli::cp::run(&roots, a),
        Command::PortForward(a) => cli::port_forward::run(&roots, a),
        Command::Attach(a) => cli::attach::run(&roots, a),
        Command::Apply(a) => cli::apply::run(&roots, a),
        Command::Update(a) => cli::update::run(&roots, a),
        Command::Rm(a) => cli::rm::run(&roots, a),
        Command::Info(a) => cli::info::run(&roots, a),
        Command::Pull(a) => cli::images::pull(&roots, a),
        Command::Images(a) => cli::images::images(&roots, a),
        Command::History(a) => cli::images::history(&roots, a),
        Command::Rmi(a) => cli::images::rmi(&roots, a),
        Command::Tag(a) => cli::images::tag(&roots, a),
        Command::Search(a) => cli::images::search(&roots, a),
        Command::Image(c) => cli::images::image(&roots, c),
        Command::Load(a) => cli::images::load(&roots, a),
        Command::Save(a) => cli::images::save(&roots, a),
        Command::Unpack(a) => cli::images::unpack(&roots, a),
        Command::Login(a) => cli::images::login(&roots, a),
        Command::Logout(a) => cli::images::logout(&roots, a),
    };
    std::process::exit(code);
}
