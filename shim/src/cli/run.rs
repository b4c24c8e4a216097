//! `husk run`: validates the pod (nothing is created when that fails),
//! records it, starts its monitor and, in the foreground, streams the
//! containers' output until the pod ends (Ctrl-C stops it gracefully).

use super::logs::LogFollower;
use super::{fail, EXIT_FAILURE, EXIT_USAGE};
use crate::control::{self, Request};
use husk_sandbox::pod::{self, ManifestSource, PodPlan};
use husk_sandbox::state::{new_pod_id, ContainerState, PodRecord, PodStatus, Roots};
use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

#[derive(clap::Args)]
pub struct RunArgs {
    /// Pod manifest (multi-document YAML: one Pod plus its ConfigMaps and Secrets).
    #[arg(short = 'f', long = "filename", value_name = "FILE")]
    file: Option<PathBuf>,
    /// Run in the background and print the pod id.
    #[arg(short, long)]
    detach: bool,
    /// Remove the pod when it ends.
    #[arg(long)]
    rm: bool,
    /// Pod name (without -f).
    #[arg(long)]
    name: Option<String>,
    /// Environment variable K=V (without -f).
    #[arg(short, long = "env", value_name = "K=V")]
    env: Vec<String>,
    /// Volume HOST:CONTAINER[:ro] (without -f).
    #[arg(short, long = "volume", value_name = "HOST:CTR[:ro]")]
    volume: Vec<String>,
    /// Restart policy (without -f).
    #[arg(long, default_value = "no", value_parser = ["no", "on-failure", "always"])]
    restart: String,
    /// Memory limit, e.g. 64Mi or 64m (without -f).
    #[arg(long)]
    memory: Option<String>,
    /// CPU limit in cores, e.g. 0.5 (without -f).
    #[arg(long)]
    cpus: Option<String>,
    /// Sandbox kind (without -f).
    #[arg(long, value_parser = ["wasm", "vm"])]
    runtime: Option<String>,
    /// Publish a port HOSTPORT:CONTAINERPORT (without -f).
    #[arg(short, long = "publish", value_name = "HOST:CTR")]
    publish: Vec<String>,
    /// Working directory inside the container (without -f).
    #[arg(short, long)]
    workdir: Option<String>,
    /// Image (a .wasm module or component) and its arguments (without -f).
    #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
    image_and_args: Vec<String>,
}

/// Docker's memory units (b, k, m, g) mapped to Kubernetes quantities.
fn docker_memory(s: &str) -> String {
    let lower = s.to_ascii_lowercase();
    for (suf, k8s) in [
        ("kb", "Ki"),
        ("mb", "Mi"),
        ("gb", "Gi"),
        ("k", "Ki"),
        ("m", "Mi"),
        ("g", "Gi"),
        ("b", ""),
    ] {
        if let Some(n) = lower.strip_suffix(suf) {
            if n.chars().all(|c| c.is_ascii_digit() || c == '.') && !n.is_empty() {
                return format!("{n}{k8s}");
            }
        }
    }
    s.to_owned()
}

/// Builds the manifest of a one-container pod from docker-style flags.
fn manifest_from_flags(a: &RunArgs) -> Result<serde_yaml::Value, String> {
    use serde_yaml::{Mapping, Value};
    let Some((image, args)) = a.image_and_args.split_first() else {
        return Err("give a manifest with -f FILE, or an IMAGE to run; see husk run --help".into());
    };
    let name = a.name.clone().unwrap_or_else(|| {
        let b: [u8; 3] = rand_bytes();
        format!("husk-{:02x}{:02x}{:02x}", b[0], b[1], b[2])
    });
    let mut env = Vec::new();
    for e in &a.env {
        let (k, v) = match e.split_once('=') {
            Some((k, v)) => (k.to_owned(), v.to_owned()),
            None => (e.clone(), std::env::var(e).unwrap_or_default()),
        };
        env.push(serde_yaml::to_value(serde_json::json!({"name": k, "value": v})).expect("yaml"));
    }
    let mut volumes = Vec::new();
    let mut mounts = Vec::new();
    for (i, v) in a.volume.iter().enumerate() {
        let parts: Vec<&str> = v.split(':').collect();
        let (host, ctr, ro) = match parts.as_slice() {
            [h, c] => (*h, *c, false),
            [h, c, "ro"] => (*h, *c, true),
            [h, c, "rw"] => (*h, *c, false),
            _ => return Err(format!("-v {v:?}: expected HOST:CONTAINER[:ro]")),
        };
        let host = std::fs::canonicalize(host)
            .unwrap_or_else(|_| std::env::current_dir().unwrap_or_default().join(host));
        let vname = format!("vol-{i}");
        volumes.push(serde_yaml::to_value(serde_json::json!({"name": vname, "hostPath": {"path": host, "type": "DirectoryOrCreate"}})).expect("yaml"));
        mounts.push(
            serde_yaml::to_value(
                serde_json::json!({"name": vname, "mountPath": ctr, "readOnly": ro}),
            )
            .expect("yaml"),
        );
    }
    let mut ports = Vec::new();
    for p in &a.publish {
        let Some((h, c)) = p.split_once(':') else {
            return Err(format!("-p {p:?}: expected HOSTPORT:CONTAINERPORT"));
        };
        let (h, c): (u16, u16) = match (h.parse(), c.parse()) {
            (Ok(h), Ok(c)) => (h, c),
            _ => return Err(format!("-p {p:?}: ports are numbers from 1 to 65535")),
        };
        ports.push(
            serde_yaml::to_value(serde_json::json!({"containerPort": c, "hostPort": h}))
                .expect("yaml"),
        );
    }
    let mut limits = Mapping::new();
    if let Some(m) = &a.memory {
        limits.insert("memory".into(), Value::String(docker_memory(m)));
    }
    if let Some(c) = &a.cpus {
        limits.insert("cpu".into(), Value::String(c.clone()));
    }
    let restart = match a.restart.as_str() {
        "always" => "Always",
        "on-failure" => "OnFailure",
        _ => "Never",
    };
    let runtime = match a.runtime.as_deref() {
        Some("vm") => "husk-vm",
        _ => "husk-wasm",
    };
    let mut container = serde_json::json!({
        "name": "main",
        "image": image,
        "args": args,
        "env": serde_json::to_value(&env).expect("json"),
        "volumeMounts": serde_json::to_value(&mounts).expect("json"),
        "ports": serde_json::to_value(&ports).expect("json"),
        "resources": { "limits": serde_json::to_value(&limits).expect("json") },
    });
    if let Some(w) = &a.workdir {
        container["workingDir"] = w.clone().into();
    }
    let pod = serde_json::json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": { "name": name },
        "spec": {
            "runtimeClassName": runtime,
            "restartPolicy": restart,
            "containers": [container],
            "volumes": serde_json::to_value(&volumes).expect("json"),
        }
    });
    serde_yaml::to_value(pod).map_err(|e| e.to_string())
}

fn rand_bytes() -> [u8; 3] {
    let id = new_pod_id();
    let b = id.as_bytes();
    [b[0] ^ b[3], b[1] ^ b[4], b[2] ^ b[5]]
}

fn load_plan(roots: &Roots, a: &RunArgs) -> Result<PodPlan, String> {
    let images = super::images::StoreResolver { roots };
    if let Some(f) = &a.file {
        if !a.image_and_args.is_empty() {
            return Err("give either -f FILE or an IMAGE, not both".into());
        }
        return pod::load_manifest_file(f, Some(&images)).map_err(|e| e.to_string());
    }
    let doc = manifest_from_flags(a)?;
    let text = serde_yaml::to_string(&doc).map_err(|e| e.to_string())?;
    let cwd = std::env::current_dir().map_err(|e| e.to_string())?;
    pod::parse_manifest(
        &text,
        &ManifestSource {
            display: "command line".into(),
            base_dir: &cwd,
            images: Some(&images),
        },
    )
    .map_err(|e| e.to_string())
}

pub fn run(roots: &Roots, a: RunArgs) -> i32 {
    let plan = match load_plan(roots, &a) {
        Ok(p) => p,
        Err(e) => return fail(EXIT_USAGE, e),
    };
    if let Err(e) = husk_sandbox::config::HuskConfig::load(&roots.config_file()) {
        return fail(EXIT_USAGE, e);
    }
    if let Some(other) = roots
        .list_pods()
        .into_iter()
        .find(|p| p.plan.name == plan.name && p.plan.namespace == plan.namespace)
    {
        return fail(
            EXIT_USAGE,
            format!(
                "a pod named {:?} already exists in namespace {:?} (id {}); remove it with `husk rm {}` or choose another name",
                plan.name, plan.namespace, other.id, plan.name
            ),
        );
    }
    roots.collect_stale();
    let id = new_pod_id();
    let record = PodRecord {
        id: id.clone(),
        created_at: chrono::Utc::now(),
        auto_remove: a.rm && a.detach,
        plan: plan.redacted(),
    };
    if let Err(e) = record.create(roots, &[]) {
        return fail(EXIT_FAILURE, e);
    }
    let child = match start_monitor(roots, &id, &plan) {
        Ok(c) => c,
        Err(e) => {
            let code = if e.bad_input {
                EXIT_USAGE
            } else {
                EXIT_FAILURE
            };
            let message = after_failed_start(roots, &id, &e, !a.rm);
            return fail(code, format!("pod {}: {message}", plan.name));
        }
    };
    if a.detach {
        // The monitor lives on; nobody here waits for it.
        std::mem::forget(child);
        println!("{id}");
        return 0;
    }
    let code = follow(roots, &id, &plan);
    let mut child = child;
    let _ = child.wait();
    if a.rm {
        if let Err(e) = super::rm::remove_pod(roots, &id) {
            eprintln!("husk: {e}");
        }
    }
    code
}

/// Why a monitor did not start its pod.
#[derive(Debug)]
pub struct MonitorStartError {
    pub message: String,
    /// The pod's own input is at fault (a guest file that is not valid
    /// WebAssembly): a usage error, exit 2.
    pub bad_input: bool,
    /// The monitor ended without answering (killed, crashed): it did not
    /// undo what it had made, and its log is all that tells why.
    pub monitor_died: bool,
}

/// How many lines of a dead monitor's log an error quotes when the log
/// itself goes with the pod.
const LOG_TAIL_LINES: usize = 20;

/// After a start that failed: releases whatever the pod's monitor left
/// (it may have died half-way: the network, mounts, cgroup, VM uid claim
/// are found from what it recorded before making them), then removes the
/// pod, unless `keep` and the monitor died without a word: such a pod is
/// kept, with the log that tells why, for `husk ps` and `husk rm` (as
/// `docker run` keeps a container whose start failed). A pod that cannot
/// be released in full is kept too, so that `husk rm` can try again.
/// Returns the message to print.
pub fn after_failed_start(roots: &Roots, id: &str, e: &MonitorStartError, keep: bool) -> String {
    let paths = roots.pod(id);
    let _lock = match super::rm::lock_pod(roots, id, Duration::from_secs(10)) {
        Ok(l) => l,
        Err(why) => return format!("{e}; the pod is kept ({why}): `husk rm` removes it"),
    };
    let problems = husk_sandbox::recovery::release_leftovers(&paths);
    let name = PodRecord::load(&paths)
        .map(|r| r.plan.name)
        .unwrap_or_else(|_| id.to_owned());
    if !problems.is_empty() {
        return format!(
            "{e}; releasing what it left failed ({}); the pod is kept: `husk rm {name}` tries again",
            problems.join("; ")
        );
    }
    if e.monitor_died && keep {
        return format!(
            "{e}; its log is {}; the pod is kept: `husk rm {name}` removes it",
            paths.monitor_log().display()
        );
    }
    let tail = if e.monitor_died {
        log_tail(&paths.monitor_log(), LOG_TAIL_LINES)
    } else {
        String::new()
    };
    let _ = std::fs::remove_dir_all(&paths.lib);
    let _ = std::fs::remove_dir_all(&paths.run);
    if tail.is_empty() {
        e.to_string()
    } else {
        format!("{e}; the end of its log:\n{tail}")
    }
}

/// The last `n` lines of `path` (at most 64 KiB of it), indented.
fn log_tail(path: &std::path::Path, n: usize) -> String {
    use std::io::{Seek, SeekFrom};
    let Ok(mut f) = std::fs::File::open(path) else {
        return String::new();
    };
    let len = f.metadata().map(|m| m.len()).unwrap_or(0);
    let _ = f.seek(SeekFrom::Start(len.saturating_sub(64 * 1024)));
    let mut bytes = Vec::new();
    let _ = std::io::Read::read_to_end(&mut f, &mut bytes);
    let text = String::from_utf8_lossy(&bytes);
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..]
        .iter()
        .map(|l| format!("  {l}"))
        .collect::<Vec<_>>()
        .join("\n")
}

impl std::fmt::Display for MonitorStartError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

impl From<String> for MonitorStartError {
    fn from(message: String) -> Self {
        MonitorStartError {
            message,
            bad_input: false,
            monitor_died: false,
        }
    }
}

/// Starts the monitor and waits for its ready line.
fn start_monitor(
    roots: &Roots,
    id: &str,
    plan: &PodPlan,
) -> Result<std::process::Child, MonitorStartError> {
    let exe = std::env::current_exe().map_err(|e| format!("cannot find the husk binary: {e}"))?;
    start_monitor_with(&exe, roots, id, plan)
}

/// Starts the monitor (`exe monitor --id ID`, `exe` being the husk binary)
/// for the pod whose record is saved, hands it the plan and waits for its
/// ready line.
pub fn start_monitor_with(
    exe: &std::path::Path,
    roots: &Roots,
    id: &str,
    plan: &PodPlan,
) -> Result<std::process::Child, MonitorStartError> {
    let mut cmd = Command::new(exe);
    if let Some(r) = &roots.custom {
        cmd.arg("--root").arg(r);
    }
    cmd.arg("monitor").arg("--id").arg(id);
    // The log exists before the monitor runs, and is its stderr from its
    // first instruction: a start that fails always names a log that is
    // there, and what a monitor printed before it set up its own logging
    // (a panic) is in it.
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o600)
        .open(roots.pod(id).monitor_log())
        .map_err(|e| {
            format!(
                "cannot create {}: {e}",
                roots.pod(id).monitor_log().display()
            )
        })?;
    cmd.stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::from(log));
    // SAFETY: setsid is async-signal-safe; it detaches the monitor from the
    // caller's session and terminal so that Ctrl-C and logout don't reach it.
    unsafe {
        cmd.pre_exec(|| {
            nix::unistd::setsid().map_err(std::io::Error::from)?;
            Ok(())
        });
    }
    let mut child = cmd
        .spawn()
        .map_err(|e| format!("cannot start the pod monitor: {e}"))?;
    let input = serde_json::to_vec(plan).expect("json");
    if let Some(mut stdin) = child.stdin.take() {
        // A monitor that is gone already (killed) is told apart below:
        // it never answers.
        let _ = stdin.write_all(&input);
    }
    let stdout = child.stdout.take().expect("piped");
    let mut line = String::new();
    let _ = BufReader::new(stdout).read_line(&mut line);
    let Ok(reply) = serde_json::from_str::<serde_json::Value>(&line) else {
        let how = match child.wait() {
            Ok(st) => match std::os::unix::process::ExitStatusExt::signal(&st) {
                Some(sig) => format!("killed by signal {sig}"),
                None => st.to_string(),
            },
            Err(e) => e.to_string(),
        };
        return Err(MonitorStartError {
            message: format!("its monitor ended before the pod started ({how})"),
            bad_input: false,
            monitor_died: true,
        });
    };
    if reply.get("ok").and_then(|o| o.as_bool()) == Some(true) {
        return Ok(child);
    }
    let _ = child.wait();
    Err(MonitorStartError {
        message: reply
            .get("error")
            .and_then(|e| e.as_str())
            .unwrap_or("the pod monitor failed")
            .to_owned(),
        bad_input: reply.get("bad_input").and_then(|b| b.as_bool()) == Some(true),
        monitor_died: false,
    })
}

/// Streams the pod's output until it ends; returns the exit code.
fn follow(roots: &Roots, id: &str, plan: &PodPlan) -> i32 {
    let paths = roots.pod(id);
    let names: Vec<(String, u32)> = plan.all_containers().map(|c| (c.name.clone(), 0)).collect();
    let prefix = names.len() > 1;
    let mut follower = LogFollower::new(paths.clone(), names, prefix);
    let interrupts = Arc::new(AtomicUsize::new(0));
    for sig in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        let n = interrupts.clone();
        // SAFETY: the handler only touches an atomic counter.
        let _ = unsafe {
            signal_hook::low_level::register(sig, move || {
                n.fetch_add(1, Ordering::SeqCst);
            })
        };
    }
    let mut sent = 0;
    loop {
        let n = interrupts.load(Ordering::SeqCst);
        if n > sent {
            // First Ctrl-C: graceful stop; second: kill now.
            let grace = if n >= 2 { Some(0) } else { None };
            let _ = control::call(&paths.socket(), &Request::Stop { grace_secs: grace });
            sent = n;
        }
        let done = super::pod_over(roots, id);
        let progressed = follower.poll();
        if done {
            // The rest, all of it: poll reads a bounded amount at a time.
            while follower.poll() {}
            return exit_code(PodStatus::load(&paths).ok().as_ref());
        }
        if !progressed {
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

/// 0 when every container completed, else the code of the first container
/// that failed.
fn exit_code(st: Option<&PodStatus>) -> i32 {
    let Some(st) = st else { return EXIT_FAILURE };
    let mut failed: Vec<(chrono::DateTime<chrono::Utc>, i32)> = st
        .all_containers()
        .filter_map(|c| match &c.state {
            ContainerState::Terminated {
                exit_code,
                finished_at,
                ..
            } if *exit_code != 0 => Some((*finished_at, *exit_code)),
            _ => None,
        })
        .collect();
    failed.sort();
    match failed.first() {
        Some((_, code)) => *code,
        None if st
            .container_statuses
            .iter()
            .all(|c| c.exit_code() == Some(0)) =>
        {
            0
        }
        None => EXIT_FAILURE,
    }
}
