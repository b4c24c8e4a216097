//! `husk exec [-c CONTAINER] [--timeout SECONDS] POD -- COMMAND [ARG…]`:
//! runs a command in a running container through the pod's monitor and
//! exits with its exit code (`kubectl exec` without `-it`). VM pods run it
//! in the container's root, volumes, namespaces and cgroup inside the
//! guest; wasm pods have no processes to start beside a guest and say so.

use super::{fail, running_pod, EXIT_FAILURE};
use crate::control::{self, Request};
use husk_sandbox::state::Roots;
use std::io::Write;
use std::time::Duration;

#[derive(clap::Args)]
pub struct ExecArgs {
    /// Container (default: the pod's first container).
    #[arg(short, long)]
    container: Option<String>,
    /// Kill the command after this many seconds (without -i).
    #[arg(long, default_value_t = 300)]
    timeout: u64,
    /// Pass stdin to the command, streaming its output as it comes.
    #[arg(short, long)]
    interactive: bool,
    pod: String,
    /// The command and its arguments (after `--`).
    #[arg(required = true, last = true)]
    command: Vec<String>,
}

pub fn run(roots: &Roots, a: ExecArgs) -> i32 {
    let v = match running_pod(roots, &a.pod, a.container.as_deref()) {
        Ok(v) => v,
        Err(code) => return code,
    };
    let plan = &v.record.plan;
    if a.interactive {
        let socket = roots.pod(&v.record.id).socket();
        return match interactive(&socket, a.container.clone(), a.command) {
            Ok(code) => code,
            Err(e) => fail(EXIT_FAILURE, format!("pod {}: {e}", plan.name)),
        };
    }
    let reply = control::call_waiting(
        &roots.pod(&v.record.id).socket(),
        &Request::Exec {
            container: a.container.clone(),
            argv: a.command,
            timeout_secs: a.timeout,
        },
        Duration::from_secs(a.timeout + 30),
    );
    match reply {
        Ok(r) => match (r.ok, r.exec) {
            (true, Some(out)) => {
                let _ = std::io::stdout().write_all(&out.stdout);
                let _ = std::io::stderr().write_all(&out.stderr);
                let _ = std::io::stdout().flush();
                out.exit_code
            }
            _ => fail(
                EXIT_FAILURE,
                format!(
                    "pod {}: {}",
                    plan.name,
                    r.error.unwrap_or_else(|| "exec failed".into())
                ),
            ),
        },
        Err(e) => fail(
            EXIT_FAILURE,
            format!("pod {}: cannot reach its monitor: {e}", plan.name),
        ),
    }
}

/// `exec -i`: stdin goes to the command as it is read, output comes back
/// as it is written; returns the command's exit code.
fn interactive(
    socket: &std::path::Path,
    container: Option<String>,
    argv: Vec<String>,
) -> Result<i32, String> {
    use husk_sandbox::ExecMsg;
    use std::io::{BufRead, BufReader, Read};
    let mut s = std::os::unix::net::UnixStream::connect(socket)
        .map_err(|e| format!("cannot reach its monitor: {e}"))?;
    let mut line = serde_json::to_vec(&Request::ExecStream { container, argv }).expect("json");
    line.push(b'\n');
    s.write_all(&line).map_err(|e| e.to_string())?;
    let mut reader = BufReader::new(s.try_clone().map_err(|e| e.to_string())?);
    let mut first = String::new();
    reader.read_line(&mut first).map_err(|e| e.to_string())?;
    let reply: control::Reply = serde_json::from_str(&first).map_err(|e| e.to_string())?;
    if !reply.ok {
        return Err(reply.error.unwrap_or_else(|| "exec failed".into()));
    }
    // stdin, in its own thread, until it ends.
    let mut w = s;
    std::thread::spawn(move || {
        let mut buf = vec![0u8; 32 * 1024];
        let mut stdin = std::io::stdin().lock();
        loop {
            let (data, eof) = match stdin.read(&mut buf) {
                Ok(0) | Err(_) => (Vec::new(), true),
                Ok(n) => (buf[..n].to_vec(), false),
            };
            let mut line = serde_json::to_vec(&ExecMsg::Stdin { data, eof }).expect("json");
            line.push(b'\n');
            if w.write_all(&line).is_err() || eof {
                return;
            }
        }
    });
    let (mut out, mut err) = (std::io::stdout(), std::io::stderr());
    for line in reader.lines() {
        let line = line.map_err(|e| e.to_string())?;
        match serde_json::from_str::<ExecMsg>(&line).map_err(|e| e.to_string())? {
            ExecMsg::Stdout { data } => {
                let _ = out.write_all(&data);
                let _ = out.flush();
            }
            ExecMsg::Stderr { data } => {
                let _ = err.write_all(&data);
            }
            ExecMsg::Exit { code } => return Ok(code),
            ExecMsg::Error { message } => return Err(message),
            ExecMsg::Stdin { .. } => {}
        }
    }
    Err("the monitor closed the connection before the command ended".into())
}
