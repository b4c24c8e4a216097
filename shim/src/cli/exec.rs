//! `husk exec [-c CONTAINER] [--timeout SECONDS] POD -- COMMAND [ARG…]`:
//! runs a command in a running container through the pod's monitor and
//! exits with its exit code (`kubectl exec` without `-it`). VM pods run it
//! in the container's root, volumes, namespaces and cgroup inside the
//! guest; wasm pods have no processes to start beside a guest and say so.

use super::{fail, running_pod, EXIT_FAILURE};
use crate::control::{self, Request};
use husk_sandbox::state::Roots;
use husk_sandbox::{ExecSpec, TtySize};
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
    /// Give the command a terminal (its output then comes as one stream);
    /// with -i and a terminal on stdin, keys go to it as typed.
    #[arg(short, long)]
    tty: bool,
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
    if a.interactive || a.tty {
        let socket = roots.pod(&v.record.id).socket();
        return match interactive(
            &socket,
            a.container.clone(),
            a.command,
            a.interactive,
            a.tty,
        ) {
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

/// `exec -i` and `-t`: stdin goes to the command as it is read (with -i),
/// output comes back as it is written; returns the command's exit code. With a terminal
/// (`-t`), the caller's own terminal (when stdin is one) is raw for the
/// while, and its size follows the caller's.
fn interactive(
    socket: &std::path::Path,
    container: Option<String>,
    argv: Vec<String>,
    interactive: bool,
    tty: bool,
) -> Result<i32, String> {
    use std::os::fd::AsRawFd;
    let stdin_fd = std::io::stdin().as_raw_fd();
    let size = tty.then(|| {
        term_size(stdin_fd)
            .or_else(|| term_size(std::io::stdout().as_raw_fd()))
            .unwrap_or(TtySize { rows: 24, cols: 80 })
    });
    let _raw = match tty {
        true => RawMode::enter(stdin_fd),
        false => None,
    };
    let spec = ExecSpec {
        argv,
        tty: size,
        copy: None,
    };
    let (mut out, mut err) = (std::io::stdout(), std::io::stderr());
    stream(
        socket,
        container,
        spec,
        interactive.then(|| Box::new(std::io::stdin()) as Box<dyn std::io::Read + Send>),
        &mut out,
        &mut err,
        tty,
    )
}

/// Runs `spec` over a monitor's exec stream: `input` feeds stdin until it
/// ends, output goes to `out` and `err`; with `follow_size`, the size of
/// the terminal on stdin follows SIGWINCH. Returns the exit code.
pub(super) fn stream(
    socket: &std::path::Path,
    container: Option<String>,
    spec: ExecSpec,
    input: Option<Box<dyn std::io::Read + Send>>,
    out: &mut dyn Write,
    err: &mut dyn Write,
    follow_size: bool,
) -> Result<i32, String> {
    let req = Request::ExecStream { container, spec };
    stream_request(socket, &req, input, out, err, follow_size)
}

/// As [`stream`], for any request the monitor answers with a stream
/// (an exec, or an attach).
pub(super) fn stream_request(
    socket: &std::path::Path,
    req: &Request,
    input: Option<Box<dyn std::io::Read + Send>>,
    out: &mut dyn Write,
    err: &mut dyn Write,
    follow_size: bool,
) -> Result<i32, String> {
    use husk_sandbox::ExecMsg;
    use std::io::{BufRead, BufReader};
    let mut s = std::os::unix::net::UnixStream::connect(socket)
        .map_err(|e| format!("cannot reach its monitor: {e}"))?;
    let mut line = serde_json::to_vec(req).expect("json");
    line.push(b'\n');
    s.write_all(&line).map_err(|e| e.to_string())?;
    let mut reader = BufReader::new(s.try_clone().map_err(|e| e.to_string())?);
    let mut first = String::new();
    reader.read_line(&mut first).map_err(|e| e.to_string())?;
    let reply: control::Reply = serde_json::from_str(&first).map_err(|e| e.to_string())?;
    if !reply.ok {
        return Err(reply.error.unwrap_or_else(|| "exec failed".into()));
    }
    let send = |w: &mut std::os::unix::net::UnixStream, m: &ExecMsg| {
        let mut line = serde_json::to_vec(m).expect("json");
        line.push(b'\n');
        w.write_all(&line)
    };
    if follow_size {
        use std::os::fd::AsRawFd;
        let mut w = s.try_clone().map_err(|e| e.to_string())?;
        let (mut rx, tx) = std::io::pipe().map_err(|e| e.to_string())?;
        signal_hook::low_level::pipe::register(signal_hook::consts::SIGWINCH, tx)
            .map_err(|e| e.to_string())?;
        std::thread::spawn(move || {
            let mut b = [0u8; 64];
            while matches!(std::io::Read::read(&mut rx, &mut b), Ok(n) if n > 0) {
                if let Some(TtySize { rows, cols }) = term_size(std::io::stdin().as_raw_fd()) {
                    if send(&mut w, &ExecMsg::Resize { rows, cols }).is_err() {
                        return;
                    }
                }
            }
        });
    }
    // stdin, in its own thread, until it ends (without input, the
    // command's stdin stays open and empty, as with `kubectl exec -t`).
    let mut w = s;
    std::thread::spawn(move || {
        let Some(mut input) = input else {
            // The connection must stay open: its end ends the command.
            let _keep = w;
            loop {
                std::thread::park();
            }
        };
        let mut buf = vec![0u8; 32 * 1024];
        loop {
            let (data, eof) = match input.read(&mut buf) {
                Ok(0) | Err(_) => (Vec::new(), true),
                Ok(n) => (buf[..n].to_vec(), false),
            };
            if send(&mut w, &ExecMsg::Stdin { data, eof }).is_err() || eof {
                return;
            }
        }
    });
    for line in reader.lines() {
        let line = line.map_err(|e| e.to_string())?;
        match serde_json::from_str::<ExecMsg>(&line).map_err(|e| e.to_string())? {
            ExecMsg::Stdout { data } => {
                out.write_all(&data).map_err(|e| e.to_string())?;
                let _ = out.flush();
            }
            ExecMsg::Stderr { data } => {
                let _ = err.write_all(&data);
            }
            ExecMsg::Exit { code } => return Ok(code),
            ExecMsg::Error { message } => return Err(message),
            ExecMsg::Stdin { .. } | ExecMsg::Resize { .. } => {}
        }
    }
    Err("the monitor closed the connection before the command ended".into())
}

/// The size of the terminal on `fd`, if it is one.
fn term_size(fd: std::os::fd::RawFd) -> Option<TtySize> {
    // SAFETY: a zeroed winsize is valid; TIOCGWINSZ fills it.
    let (ws, r) = unsafe {
        let mut ws: libc::winsize = std::mem::zeroed();
        let r = libc::ioctl(fd, libc::TIOCGWINSZ, &mut ws);
        (ws, r)
    };
    (r == 0 && ws.ws_row > 0 && ws.ws_col > 0).then_some(TtySize {
        rows: ws.ws_row,
        cols: ws.ws_col,
    })
}

/// The caller's terminal in raw mode (keys go to the command's terminal
/// as typed, Ctrl-C included), restored when dropped.
struct RawMode {
    fd: std::os::fd::RawFd,
    saved: libc::termios,
}

impl RawMode {
    /// None when `fd` is not a terminal.
    fn enter(fd: std::os::fd::RawFd) -> Option<Self> {
        // SAFETY: tcgetattr/tcsetattr read and write a termios owned here.
        unsafe {
            let mut saved: libc::termios = std::mem::zeroed();
            if libc::tcgetattr(fd, &mut saved) != 0 {
                return None;
            }
            let mut raw = saved;
            libc::cfmakeraw(&mut raw);
            if libc::tcsetattr(fd, libc::TCSANOW, &raw) != 0 {
                return None;
            }
            Some(RawMode { fd, saved })
        }
    }
}

impl Drop for RawMode {
    fn drop(&mut self) {
        // SAFETY: restores the settings read in `enter`.
        unsafe { libc::tcsetattr(self.fd, libc::TCSANOW, &self.saved) };
    }
}
