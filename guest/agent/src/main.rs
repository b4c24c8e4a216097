//! husk-agent: PID 1 inside a microVM pod. As init it mounts /dev, /proc,
//! /sys, /run and cgroup2, loads the kernel modules its initramfs carries
//! (kernel A ships virtio as modules), finds the virtio-serial port named
//! `husk.agent` and serves husk-protocol on it until the host asks it to
//! shut down. It must stay small and static (it is the whole user space of
//! the guest until containers start) and trusts nothing but its own host
//! connection.
//!
//! `husk-agent --serve PATH` serves one connection on an existing stream
//! (a device or a unix socket) without setting anything up: how the host
//! side is tested without a VM.

use husk_protocol::{
    read_frame, write_frame, ExecRequest, ExecResult, ProtocolError, Request, Response,
};
use std::ffi::CString;
use std::io::Write;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn log(msg: &str) {
    // The console is the kernel's: the host keeps it as the VM's log.
    let _ = writeln!(std::io::stderr(), "husk-agent: {msg}");
}

fn mount(source: &str, target: &str, fstype: &str, flags: libc::c_ulong, data: &str) {
    let _ = std::fs::create_dir_all(target);
    let (s, t, f, d) = (
        CString::new(source).unwrap_or_default(),
        CString::new(target).unwrap_or_default(),
        CString::new(fstype).unwrap_or_default(),
        CString::new(data).unwrap_or_default(),
    );
    // SAFETY: every pointer is a NUL-terminated string that outlives the call.
    let r = unsafe { libc::mount(s.as_ptr(), t.as_ptr(), f.as_ptr(), flags, d.as_ptr().cast()) };
    if r != 0 {
        let e = std::io::Error::last_os_error();
        if e.raw_os_error() != Some(libc::EBUSY) {
            log(&format!("mount {fstype} on {target}: {e}"));
        }
    }
}

/// Points stdin/stdout/stderr at the console (the kernel starts init with
/// them closed when the initramfs has no /dev/console).
fn console() {
    if let Ok(f) = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/console")
    {
        use std::os::fd::AsRawFd;
        for fd in 0..3 {
            // SAFETY: dup2 onto the standard descriptors of this process.
            unsafe { libc::dup2(f.as_raw_fd(), fd) };
        }
    }
}

fn setup() {
    let nosuid = libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC;
    mount("devtmpfs", "/dev", "devtmpfs", libc::MS_NOSUID, "mode=0755");
    console();
    mount("proc", "/proc", "proc", nosuid, "");
    mount("sysfs", "/sys", "sysfs", nosuid, "");
    mount(
        "tmpfs",
        "/run",
        "tmpfs",
        libc::MS_NOSUID | libc::MS_NODEV,
        "mode=0755",
    );
    mount("cgroup2", "/sys/fs/cgroup", "cgroup2", nosuid, "");
    load_modules();
}

/// `name.param=value` words of the kernel command line, for module `name`,
/// as modprobe passes them ('-' and '_' are the same in module names).
fn module_params(cmdline: &str, name: &str) -> String {
    let norm = |s: &str| s.replace('-', "_");
    let want = norm(name);
    cmdline
        .split_whitespace()
        .filter_map(|w| w.split_once('.'))
        .filter(|(m, _)| norm(m) == want)
        .map(|(_, p)| p)
        .collect::<Vec<_>>()
        .join(" ")
}

fn load_modules() {
    let Ok(list) = std::fs::read_to_string("/lib/modules/modules.load") else {
        return;
    };
    let cmdline = std::fs::read_to_string("/proc/cmdline").unwrap_or_default();
    for name in list.lines().map(str::trim).filter(|l| !l.is_empty()) {
        let path = format!("/lib/modules/{name}.ko");
        let params = CString::new(module_params(&cmdline, name)).unwrap_or_default();
        let r = std::fs::File::open(&path).and_then(|f| {
            use std::os::fd::AsRawFd;
            // SAFETY: finit_module with an open fd and a NUL-terminated string.
            let r =
                unsafe { libc::syscall(libc::SYS_finit_module, f.as_raw_fd(), params.as_ptr(), 0) };
            if r == 0 {
                Ok(())
            } else {
                Err(std::io::Error::last_os_error())
            }
        });
        match r {
            Ok(()) => {}
            Err(e) if e.raw_os_error() == Some(libc::EEXIST) => {}
            Err(e) => log(&format!("module {name}: {e}")),
        }
    }
}

/// The /dev node of the virtio-serial port called `name`, once the driver
/// has probed it.
fn find_port(name: &str, wait: Duration) -> Option<PathBuf> {
    let t0 = Instant::now();
    loop {
        if let Ok(dir) = std::fs::read_dir("/sys/class/virtio-ports") {
            for e in dir.flatten() {
                let n = std::fs::read_to_string(e.path().join("name")).unwrap_or_default();
                let dev = Path::new("/dev").join(e.file_name());
                if n.trim() == name && dev.exists() {
                    return Some(dev);
                }
            }
        }
        if t0.elapsed() > wait {
            return None;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn kernel_release() -> String {
    std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_owned())
        .unwrap_or_default()
}

fn exec(req: &ExecRequest) -> Response {
    let Some(program) = req.argv.first() else {
        return Response::Error {
            message: "exec: argv is empty".into(),
        };
    };
    let mut cmd = Command::new(program);
    cmd.args(&req.argv[1..]).env_clear();
    for kv in &req.env {
        match kv.split_once('=') {
            Some((k, v)) if !k.is_empty() => {
                cmd.env(k, v);
            }
            _ => {
                return Response::Error {
                    message: format!("exec: env entry {kv:?} is not NAME=value"),
                }
            }
        }
    }
    if let Some(cwd) = &req.cwd {
        cmd.current_dir(cwd);
    }
    cmd.stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = match cmd.spawn() {
        Ok(c) => c,
        Err(e) => {
            return Response::Error {
                message: format!("exec {program}: {e}"),
            }
        }
    };
    // Feed stdin from its own thread so a process that writes before it
    // reads cannot deadlock against us.
    let stdin = child.stdin.take().map(|mut w| {
        let data = req.stdin.clone();
        std::thread::spawn(move || {
            let _ = w.write_all(&data);
        })
    });
    let out = child.wait_with_output();
    if let Some(t) = stdin {
        let _ = t.join();
    }
    match out {
        Ok(o) => Response::Exited(ExecResult {
            code: o.status.code(),
            signal: o.status.signal(),
            stdout: o.stdout,
            stderr: o.stderr,
        }),
        Err(e) => Response::Error {
            message: format!("exec {program}: {e}"),
        },
    }
}

/// Serves one connection; returns true when the host asked for shutdown.
fn serve(stream: &mut (impl std::io::Read + Write)) -> Result<bool, ProtocolError> {
    loop {
        let req: Request = match read_frame(stream) {
            Ok(r) => r,
            Err(ProtocolError::Closed) => return Ok(false),
            Err(ProtocolError::Malformed(e)) => {
                write_frame(
                    stream,
                    &Response::Error {
                        message: format!("malformed request: {e}"),
                    },
                )?;
                continue;
            }
            Err(e) => return Err(e),
        };
        let resp = match &req {
            Request::Hello { nonce, .. } => Response::Hello {
                version: husk_protocol::VERSION,
                nonce: *nonce,
                kernel: kernel_release(),
            },
            Request::Exec(e) => exec(e),
            Request::Shutdown => Response::ShuttingDown,
        };
        write_frame(stream, &resp)?;
        if req == Request::Shutdown {
            return Ok(true);
        }
    }
}

fn power_off() -> ! {
    // SAFETY: sync and reboot take no pointers; reboot=k on the kernel
    // command line makes the restart an i8042 reset, which ends the VM.
    unsafe {
        libc::sync();
        libc::reboot(libc::RB_AUTOBOOT);
    }
    loop {
        std::thread::sleep(Duration::from_secs(1));
    }
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.get(1).map(String::as_str) == Some("--serve") {
        let Some(path) = args.get(2) else {
            eprintln!("usage: husk-agent --serve PATH");
            std::process::exit(2);
        };
        let stream = std::os::unix::net::UnixStream::connect(path)
            .map(|s| Box::new(s) as Box<dyn ReadWrite>);
        let mut stream = match stream {
            Ok(s) => s,
            Err(e) => {
                eprintln!("husk-agent: {path}: {e}");
                std::process::exit(1);
            }
        };
        match serve(&mut stream) {
            Ok(_) => std::process::exit(0),
            Err(e) => {
                eprintln!("husk-agent: {e}");
                std::process::exit(1);
            }
        }
    }
    if std::process::id() != 1 {
        eprintln!("husk-agent runs as PID 1 of a microVM (or: husk-agent --serve PATH)");
        std::process::exit(2);
    }
    setup();
    log(&format!("started on Linux {}", kernel_release()));
    let Some(port) = find_port(husk_protocol::PORT_NAME, Duration::from_secs(30)) else {
        log(&format!(
            "no virtio-serial port named {}",
            husk_protocol::PORT_NAME
        ));
        power_off();
    };
    loop {
        let mut dev = match std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&port)
        {
            Ok(d) => d,
            Err(e) => {
                log(&format!("{}: {e}", port.display()));
                power_off();
            }
        };
        match serve(&mut dev) {
            Ok(true) => power_off(),
            // The host went away (a virtio-serial port reads EOF while
            // nobody is connected): wait for it to come back.
            Ok(false) => std::thread::sleep(Duration::from_millis(50)),
            Err(e) => {
                log(&e.to_string());
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    }
}

trait ReadWrite: std::io::Read + Write {}
impl<T: std::io::Read + Write> ReadWrite for T {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn module_parameters_come_from_the_command_line() {
        let c = "console=ttyS0 virtio_mmio.device=4K@0xd0000000:5 virtio-mmio.device=4K@0xd0001000:6 virtio_blk.x=1";
        assert_eq!(
            module_params(c, "virtio_mmio"),
            "device=4K@0xd0000000:5 device=4K@0xd0001000:6"
        );
        assert_eq!(module_params(c, "virtio-rng"), "");
    }

    #[test]
    fn exec_runs_a_process_with_only_the_given_env() {
        let r = exec(&ExecRequest {
            argv: vec![
                "/bin/sh".into(),
                "-c".into(),
                "cat; echo \"$A\" >&2; exit 3".into(),
            ],
            env: vec!["A=from env".into()],
            cwd: Some("/".into()),
            stdin: b"from stdin".to_vec(),
        });
        assert_eq!(
            r,
            Response::Exited(ExecResult {
                code: Some(3),
                signal: None,
                stdout: b"from stdin".to_vec(),
                stderr: b"from env\n".to_vec(),
            })
        );
        let r = exec(&ExecRequest {
            argv: vec!["/nonexistent".into()],
            ..Default::default()
        });
        assert!(matches!(r, Response::Error { message } if message.contains("/nonexistent")));
        let r = exec(&ExecRequest {
            argv: vec!["/bin/true".into()],
            env: vec!["NOEQUALS".into()],
            ..Default::default()
        });
        assert!(matches!(r, Response::Error { message } if message.contains("NAME=value")));
    }
}
