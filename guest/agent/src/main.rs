//! husk-agent: PID 1 inside a microVM pod. As init it mounts /dev, /proc,
//! /sys, /run and cgroup2, loads the kernel modules its initramfs carries
//! (kernel A ships virtio as modules), finds the virtio-serial port named
//! `husk.agent` and serves husk-protocol on it until the host asks it to
//! shut down. It must stay small and static (it is the whole user space of
//! the guest until containers start) and trusts nothing but its own host
//! connection.
//! The protocol handling (`serve`) works on any stream, and is unit-tested
//! over a socket pair.

mod cgroup;
mod network;
mod seccomp;
mod user;
mod volume;

use husk_protocol::{
    read_frame, write_frame, Event, ProtocolError, Request, Rootfs, StartRequest, Stream,
};
use std::collections::HashMap;
use std::ffi::CString;
use std::io::{Read, Write};
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
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

/// PID 1 starts on the kernel's rootfs (the initramfs), which
/// pivot_root(2) cannot leave: it is the one mount without a parent. The
/// agent first moves onto a bind mount of it (bound on a directory, moved
/// over `/`, then entered), so that every container can pivot_root into
/// its own root and detach the agent's whole mount tree, where a chroot
/// left it reachable (a double chroot climbs out of one).
fn leave_rootfs() -> std::io::Result<()> {
    const STAGE: &str = "/.husk-root";
    let c = |s: &str| CString::new(s).unwrap_or_default();
    let (root, stage, dot, none) = (c("/"), c(STAGE), c("."), c(""));
    std::fs::create_dir(STAGE)?;
    // SAFETY: plain syscalls on NUL-terminated strings that outlive them;
    // PID 1 runs alone this early.
    unsafe {
        check(libc::mount(
            root.as_ptr(),
            stage.as_ptr(),
            none.as_ptr(),
            libc::MS_BIND | libc::MS_REC,
            std::ptr::null(),
        ))?;
        check(libc::chdir(stage.as_ptr()))?;
        check(libc::mount(
            dot.as_ptr(),
            root.as_ptr(),
            std::ptr::null(),
            libc::MS_MOVE,
            std::ptr::null(),
        ))?;
        check(libc::chroot(dot.as_ptr()))?;
        check(libc::chdir(root.as_ptr()))?;
    }
    // The directory the bind was staged on, seen through the bind.
    std::fs::remove_dir(STAGE)
}

fn setup() {
    let nosuid = libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC;
    if let Err(e) = leave_rootfs() {
        log(&format!(
            "leaving the initramfs root: {e}; containers cannot start"
        ));
    }
    mount("devtmpfs", "/dev", "devtmpfs", libc::MS_NOSUID, "mode=0755");
    console();
    // Terminals for `exec -t` (containers see them through their /dev).
    mount(
        "devpts",
        "/dev/pts",
        "devpts",
        libc::MS_NOSUID | libc::MS_NOEXEC,
        "gid=5,mode=0620,ptmxmode=0666",
    );
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

/// The agent's side of one connection: where events go (one writer,
/// shared by the threads that report output and exits) and the processes
/// it runs, by the host's id.
struct Session<W: Write + Send + 'static> {
    out: Arc<Mutex<W>>,
    procs: Arc<Mutex<HashMap<String, Proc>>>,
}

struct Proc {
    pid: u32,
    stdin: Option<Box<dyn Write + Send>>,
    /// The terminal's master side, for resizes (processes with a TTY).
    tty: Option<std::fs::File>,
    /// `pid` is the parent that stayed outside a PID namespace (see
    /// [`fork_into_pid_namespace`]); the program is its only child.
    outside_parent: bool,
}

impl<W: Write + Send + 'static> Session<W> {
    fn new(out: W) -> Self {
        Session {
            out: Arc::new(Mutex::new(out)),
            procs: Arc::new(Mutex::new(HashMap::new())),
        }
    }

    fn send(&self, ev: &Event) -> Result<(), ProtocolError> {
        send(&self.out, ev)
    }

    fn error(&self, id: Option<&str>, message: String) -> Result<(), ProtocolError> {
        self.send(&Event::Error {
            id: id.map(str::to_owned),
            message,
        })
    }

    fn start(&self, req: &StartRequest) -> Result<(), ProtocolError> {
        let id = req.id.as_str();
        // A tool is the agent itself, run in the container from a
        // descriptor opened here (the container's root does not hold it).
        let tool = match &req.tool {
            None => None,
            Some(_) if !req.argv.is_empty() || req.exec_in.is_none() || req.tty.is_some() => {
                return self.error(
                    Some(id),
                    "start: a tool runs in a container (exec_in), without argv or tty".into(),
                )
            }
            Some(t) => match tool_exec(t) {
                Ok(t) => Some(t),
                Err(e) => return self.error(Some(id), format!("start: tool: {e}")),
            },
        };
        let program = match (&tool, req.argv.first()) {
            (Some(_), _) => &"/proc/self/exe".to_owned(),
            (None, Some(p)) => p,
            (None, None) => return self.error(Some(id), "start: argv is empty".into()),
        };
        let tty = match req.tty.map(open_pty).transpose() {
            Ok(t) => t,
            Err(e) => return self.error(Some(id), format!("start: terminal: {e}")),
        };
        let mut procs = lock(&self.procs);
        if procs.contains_key(id) {
            return self.error(
                Some(id),
                format!("start: a process with id {id:?} is running"),
            );
        }
        let mut cmd = Command::new(program);
        cmd.args(req.argv.get(1..).unwrap_or_default()).env_clear();
        for kv in &req.env {
            match kv.split_once('=') {
                Some((k, v)) if !k.is_empty() => {
                    cmd.env(k, v);
                }
                _ => {
                    return self.error(
                        Some(id),
                        format!("start: env entry {kv:?} is not NAME=value"),
                    )
                }
            }
        }
        // Every process leads its own session and process group, which
        // ends with it (see the waiter below).
        {
            use std::os::unix::process::CommandExt;
            let with_tty = tty.is_some();
            // SAFETY: setsid and ioctl are async-signal-safe and take no
            // pointers.
            unsafe {
                cmd.pre_exec(move || {
                    if libc::setsid() < 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    // The terminal on stdin becomes the session's: the
                    // program (a child of this one when it runs in a PID
                    // namespace) inherits it.
                    if with_tty && libc::ioctl(0, libc::TIOCSCTTY, 0) < 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    Ok(())
                });
            }
        }
        let root = match &req.rootfs {
            Some(r) => match container_root(id, r) {
                Ok(root) => Some(root),
                Err(e) => return self.error(Some(id), format!("container root: {e}")),
            },
            None => None,
        };
        if let Some(target) = &req.exec_in {
            if req.rootfs.is_some() || !req.mounts.is_empty() || req.limits.is_some() {
                return self.error(
                    Some(id),
                    "start: exec_in runs in an existing container; it takes no rootfs, mounts or limits".into(),
                );
            }
            let Some(p) = procs.get(target) else {
                return self.error(
                    Some(id),
                    format!("exec: no running container process {target:?}"),
                );
            };
            if let Err(e) = exec_into(&mut cmd, target, p.pid, req.cwd.as_deref()) {
                return self.error(Some(id), format!("exec in {target:?}: {e}"));
            }
        }
        // A container gets its own cgroup, which the child joins before exec.
        let cgroup = match (&root, &req.limits) {
            (Some(_), limits) => {
                match cgroup::Cgroup::create(
                    Path::new(cgroup::ROOT),
                    id,
                    &limits.clone().unwrap_or_default(),
                ) {
                    Ok(cg) => {
                        use std::os::unix::process::CommandExt;
                        let fd = cg.procs_fd();
                        // SAFETY: write(2) is async-signal-safe; the fd
                        // stays open in the parent until the spawn returns.
                        unsafe {
                            cmd.pre_exec(move || {
                                if libc::write(fd, b"0".as_ptr().cast(), 1) != 1 {
                                    return Err(std::io::Error::last_os_error());
                                }
                                Ok(())
                            });
                        }
                        Some(cg)
                    }
                    Err(e) => {
                        remove_container_root(id);
                        return self.error(Some(id), format!("container cgroup: {e}"));
                    }
                }
            }
            (None, Some(_)) => {
                return self.error(Some(id), "start: limits need a container rootfs".into())
            }
            (None, None) => None,
        };
        let mounts = match (&root, req.mounts.is_empty()) {
            (_, true) => Vec::new(),
            (None, false) => {
                return self.error(Some(id), "start: mounts need a container rootfs".into())
            }
            (Some(root), false) => match volume::prepare(root, &req.mounts) {
                Ok(m) => m,
                Err(e) => {
                    remove_container_root(id);
                    return self.error(Some(id), e);
                }
            },
        };
        match (&root, &req.cwd) {
            _ if req.exec_in.is_some() => {}
            (Some(root), cwd) => {
                let sec = req.security.clone().unwrap_or_default();
                let share = req.rootfs.as_ref().is_some_and(|r| r.pod_pid);
                let pod_pid = match share.then(pod_pid_namespace).transpose() {
                    Ok(ns) => ns,
                    Err(e) => {
                        remove_container_root(id);
                        return self.error(Some(id), format!("the pod's PID namespace: {e}"));
                    }
                };
                enter_container(
                    &mut cmd,
                    root,
                    cwd.as_deref(),
                    req.rootfs.as_ref().and_then(|r| r.hostname.clone()),
                    mounts,
                    Hardening {
                        read_only_root: sec.read_only_root,
                        masked: sec.masked_paths,
                        readonly: sec.readonly_paths,
                        pod_pid,
                    },
                )
            }
            (None, Some(cwd)) => {
                cmd.current_dir(cwd);
            }
            (None, None) => {}
        }
        // The user and privileges, applied last in the child (after the
        // fork into the PID namespace and the pivot_root).
        let mut started_as = None;
        if let Some(sec) = &req.security {
            let container_root = match (&root, &req.exec_in) {
                (Some(r), _) => r.clone(),
                (None, Some(t)) => Path::new(CONTAINERS).join(t).join("root"),
                (None, None) => PathBuf::from("/"),
            };
            match user::resolve(&container_root, sec) {
                Ok(r) => {
                    started_as = Some(r.report());
                    if !req.env.iter().any(|e| e.starts_with("HOME=")) {
                        cmd.env("HOME", &r.home);
                    }
                    use std::os::unix::process::CommandExt;
                    // SAFETY: user::apply makes only async-signal-safe calls.
                    unsafe {
                        cmd.pre_exec(move || user::apply(&r));
                    }
                }
                Err(e) => {
                    if root.is_some() {
                        remove_container_root(id);
                    }
                    return self.error(Some(id), format!("container user: {e}"));
                }
            }
        }
        if let Some((exe, argv)) = tool {
            use std::os::fd::AsRawFd;
            use std::os::unix::process::CommandExt;
            let ptrs: Vec<*const libc::c_char> = argv
                .iter()
                .map(|a| a.as_ptr())
                .chain(std::iter::once(std::ptr::null()))
                .collect();
            // The pointers point into `argv`, which the closure owns.
            let ptrs = SendPtrs(ptrs);
            // SAFETY: fexecve is async-signal-safe; the descriptor and the
            // strings were made before the fork and live in the closure.
            unsafe {
                cmd.pre_exec(move || {
                    let _keep = &argv;
                    let ptrs = &ptrs;
                    let env: [*const libc::c_char; 1] = [std::ptr::null()];
                    libc::fexecve(exe.as_raw_fd(), ptrs.0.as_ptr(), env.as_ptr());
                    Err(std::io::Error::last_os_error())
                });
            }
        }
        let mut master = None;
        match tty {
            Some((m, slave)) => {
                let dup = |f: &std::fs::File| f.try_clone().map(Stdio::from);
                match (dup(&slave), dup(&slave)) {
                    (Ok(a), Ok(b)) => {
                        cmd.stdin(Stdio::from(slave)).stdout(a).stderr(b);
                    }
                    (Err(e), _) | (_, Err(e)) => {
                        if root.is_some() {
                            remove_container_root(id);
                        }
                        return self.error(Some(id), format!("start: terminal: {e}"));
                    }
                }
                master = Some(m);
            }
            None => {
                cmd.stdin(if req.stdin {
                    Stdio::piped()
                } else {
                    Stdio::null()
                })
                .stdout(Stdio::piped())
                .stderr(Stdio::piped());
            }
        }
        let spawned = cmd.spawn();
        // The child's copies of the terminal's slave side go now: the
        // master reads EIO once the last process holding it is gone.
        drop(cmd);
        let mut child = match spawned {
            Ok(c) => c,
            Err(e) => {
                if root.is_some() {
                    remove_container_root(id);
                }
                return self.error(Some(id), format!("start {program}: {e}"));
            }
        };
        let in_container = root.is_some();
        let pid = child.id();
        let (stdin, output, tty): (Option<Box<dyn Write + Send>>, _, _) = match master {
            Some(m) => match (m.try_clone(), m.try_clone()) {
                (Ok(w), Ok(r)) => (
                    Some(Box::new(w)),
                    Some(Box::new(r) as Box<dyn Read + Send>),
                    Some(m),
                ),
                _ => (None, None, None),
            },
            None => (
                child
                    .stdin
                    .take()
                    .map(|w| Box::new(w) as Box<dyn Write + Send>),
                child
                    .stdout
                    .take()
                    .map(|r| Box::new(r) as Box<dyn Read + Send>),
                None,
            ),
        };
        procs.insert(
            id.to_owned(),
            Proc {
                pid,
                stdin,
                tty,
                outside_parent: root.is_some() || req.exec_in.is_some(),
            },
        );
        drop(procs);
        self.send(&Event::Started {
            id: id.to_owned(),
            pid,
            user: started_as,
        })?;
        // One thread per output stream; the waiter reports the exit after
        // both have drained, so Exited is the last event of the id.
        let pumps: Vec<_> = [
            (Stream::Stdout, output),
            (
                Stream::Stderr,
                child
                    .stderr
                    .take()
                    .map(|r| Box::new(r) as Box<dyn Read + Send>),
            ),
        ]
        .into_iter()
        .filter_map(|(stream, r)| r.map(|r| (stream, r)))
        .map(|(stream, mut r)| {
            let (out, id) = (self.out.clone(), id.to_owned());
            std::thread::spawn(move || {
                let mut buf = vec![0u8; 32 * 1024];
                loop {
                    // A terminal's master reads EIO once the last process
                    // holding its other side is gone: the end, as EOF.
                    match r.read(&mut buf) {
                        Ok(0) | Err(_) => break,
                        Ok(n) => {
                            let ev = Event::Output {
                                id: id.clone(),
                                stream,
                                data: buf[..n].to_vec(),
                            };
                            if send(&out, &ev).is_err() {
                                break;
                            }
                        }
                    }
                }
            })
        })
        .collect();
        let (out, procs, id, pid) = (self.out.clone(), self.procs.clone(), id.to_owned(), pid);
        std::thread::spawn(move || {
            // Wait without reaping (a pid in the table is never one the
            // kernel could have reused), then end what the process left
            // behind in its process group: a container ends with its first
            // process, and its leftovers would hold the output open.
            // SAFETY: waitid fills a zeroed siginfo_t for our own child;
            // kill takes plain integers (the group of our own child).
            unsafe {
                let mut info: libc::siginfo_t = std::mem::zeroed();
                libc::waitid(libc::P_PID, pid, &mut info, libc::WEXITED | libc::WNOWAIT);
                libc::kill(-(pid as i32), libc::SIGKILL);
            }
            if let Some(cg) = &cgroup {
                cg.kill_all();
            }
            for p in pumps {
                let _ = p.join();
            }
            let status = {
                let mut procs = lock(&procs);
                procs.remove(&id);
                child.wait()
            };
            let oom_killed = cgroup.as_ref().is_some_and(|c| c.oom_killed());
            drop(cgroup);
            if in_container {
                remove_container_root(&id);
            }
            let ev = match status {
                Ok(s) => Event::Exited {
                    id,
                    code: s.code(),
                    signal: s.signal(),
                    oom_killed,
                },
                Err(e) => Event::Error {
                    id: Some(id),
                    message: format!("wait: {e}"),
                },
            };
            let _ = send(&out, &ev);
        });
        Ok(())
    }

    fn stdin(&self, id: &str, data: &[u8], eof: bool) -> Result<(), ProtocolError> {
        let mut procs = lock(&self.procs);
        let Some(p) = procs.get_mut(id) else {
            return self.error(Some(id), format!("stdin: no process {id:?}"));
        };
        let Some(w) = p.stdin.as_mut() else {
            return self.error(Some(id), format!("stdin: process {id:?} has no open stdin"));
        };
        // A process that stopped reading gets EPIPE; that is its business.
        let _ = w.write_all(data);
        if eof {
            if p.tty.is_some() {
                // A terminal ends its input with the EOF character (it
                // cannot be closed while its output is still read).
                let _ = w.write_all(&[4]);
            } else {
                p.stdin = None;
            }
        }
        Ok(())
    }

    fn resize(&self, id: &str, size: husk_protocol::TtySize) -> Result<(), ProtocolError> {
        use std::os::fd::AsRawFd;
        let procs = lock(&self.procs);
        let Some(p) = procs.get(id) else {
            return self.error(Some(id), format!("resize: no process {id:?}"));
        };
        let Some(tty) = &p.tty else {
            return self.error(Some(id), format!("resize: process {id:?} has no terminal"));
        };
        let ws = winsize(size);
        // SAFETY: TIOCSWINSZ reads a winsize that outlives the call; the
        // process group of the terminal gets SIGWINCH from the kernel.
        if unsafe { libc::ioctl(tty.as_raw_fd(), libc::TIOCSWINSZ, &ws) } != 0 {
            let e = std::io::Error::last_os_error();
            return self.error(Some(id), format!("resize: {e}"));
        }
        Ok(())
    }

    fn signal(&self, id: &str, signal: i32) -> Result<(), ProtocolError> {
        let found = lock(&self.procs).get(id).map(|p| (p.pid, p.outside_parent));
        let Some((mut pid, outside_parent)) = found else {
            return self.error(Some(id), format!("signal: no process {id:?}"));
        };
        // SIGKILL cannot be forwarded: it goes to the program itself, which
        // the parent outside then reaps before it ends. Killing that parent
        // instead would leave the program to the container's PID 1 (a
        // zombie, or worse, in a shell's `wait`).
        if signal == libc::SIGKILL && outside_parent {
            if let Some(child) = child_of(pid) {
                pid = child;
            }
        } else if outside_parent && redelivered(signal) {
            // SAFETY: kill with signal 0 only checks that the pid (a child
            // in the table, so not reused) exists.
            if unsafe { libc::kill(pid as i32, 0) } != 0 {
                let e = std::io::Error::last_os_error();
                return self.error(Some(id), format!("signal {signal}: {e}"));
            }
            std::thread::spawn(move || deliver_until_handled(pid, signal, REDELIVER_FOR));
            return Ok(());
        }
        // SAFETY: kill takes plain integers; a pid in the table is a child
        // not yet reaped (it leaves the table as it is reaped), so not reused.
        if unsafe { libc::kill(pid as i32, signal) } != 0 {
            let e = std::io::Error::last_os_error();
            return self.error(Some(id), format!("signal {signal}: {e}"));
        }
        Ok(())
    }

    fn kill_all(&self) {
        for p in lock(&self.procs).values() {
            // SAFETY: as in `signal`.
            unsafe { libc::kill(p.pid as i32, libc::SIGKILL) };
        }
    }
}

const LAYERS: &str = "/run/husk/layers";
const CONTAINERS: &str = "/run/husk/containers";

fn mount_checked(
    source: &str,
    target: &Path,
    fstype: &str,
    flags: libc::c_ulong,
    data: &str,
) -> std::io::Result<()> {
    let c = |s: &str| {
        CString::new(s).map_err(|_| std::io::Error::from(std::io::ErrorKind::InvalidInput))
    };
    let (s, t, f, d) = (
        c(source)?,
        c(&target.to_string_lossy())?,
        c(fstype)?,
        c(data)?,
    );
    // SAFETY: every pointer is a NUL-terminated string that outlives the call.
    if unsafe { libc::mount(s.as_ptr(), t.as_ptr(), f.as_ptr(), flags, d.as_ptr().cast()) } != 0 {
        let e = std::io::Error::last_os_error();
        return Err(std::io::Error::new(
            e.kind(),
            format!("mount {source} on {}: {e}", target.display()),
        ));
    }
    Ok(())
}

fn umount(target: &Path) {
    if let Ok(t) = CString::new(target.to_string_lossy().as_bytes()) {
        // SAFETY: a NUL-terminated path.
        unsafe { libc::umount2(t.as_ptr(), libc::MNT_DETACH) };
    }
}

/// Mounts each layer device read-only once (layers are shared between
/// containers), then the container's overlay: the layers under a writable
/// layer of its own on /run's tmpfs. Returns the root.
fn container_root(id: &str, r: &Rootfs) -> std::io::Result<PathBuf> {
    if id.is_empty() || id.contains('/') || id.starts_with('.') {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            format!("id {id:?} cannot name a directory"),
        ));
    }
    let bad = |msg: String| std::io::Error::new(std::io::ErrorKind::InvalidInput, msg);
    let mut lowers = Vec::new();
    match &r.layer_dirs {
        Some(_) if !r.layers.is_empty() => {
            return Err(bad("layers and layer_dirs exclude each other".into()))
        }
        None if r.layers.is_empty() => return Err(bad("no layers".into())),
        Some(ld) if ld.dirs.is_empty() => return Err(bad("no layers".into())),
        Some(ld) => {
            let volume = volume::path_of(&ld.volume).map_err(bad)?;
            for d in &ld.dirs {
                let rel = Path::new(d);
                if d.is_empty()
                    || !rel
                        .components()
                        .all(|c| matches!(c, std::path::Component::Normal(_)))
                {
                    return Err(bad(format!("layer dir {d:?} is not a relative path")));
                }
                let at = volume.join(rel);
                if !at.is_dir() {
                    return Err(bad(format!(
                        "layer dir {d:?} is not a directory of volume {:?}",
                        ld.volume
                    )));
                }
                lowers.push(at);
            }
        }
        None => {}
    }
    for dev in &r.layers {
        if !dev.starts_with("/dev/") || dev.contains("..") {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                format!("layer {dev:?} is not a /dev path"),
            ));
        }
        let at = Path::new(LAYERS).join(dev.trim_start_matches("/dev/").replace('/', "_"));
        if !volume::is_mount_point(&at) {
            std::fs::create_dir_all(&at)?;
            mount_checked(dev, &at, "ext4", libc::MS_RDONLY | libc::MS_NODEV, "")?;
        }
        lowers.push(at);
    }
    let dir = Path::new(CONTAINERS).join(id);
    let (upper, work, root) = (dir.join("upper"), dir.join("work"), dir.join("root"));
    for d in [&upper, &work, &root] {
        std::fs::create_dir_all(d)?;
    }
    // overlayfs wants the top layer first.
    let lowerdir: Vec<String> = lowers
        .iter()
        .rev()
        .map(|p| p.to_string_lossy().into_owned())
        .collect();
    let opts = format!(
        "lowerdir={},upperdir={},workdir={}",
        lowerdir.join(":"),
        upper.display(),
        work.display()
    );
    if let Err(e) = mount_checked("overlay", &root, "overlay", 0, &opts) {
        let _ = std::fs::remove_dir_all(&dir);
        return Err(e);
    }
    for d in ["proc", "dev", "sys", "tmp"] {
        let _ = std::fs::create_dir_all(root.join(d));
    }
    Ok(root)
}

fn remove_container_root(id: &str) {
    let dir = Path::new(CONTAINERS).join(id);
    umount(&dir.join("root"));
    let _ = std::fs::remove_dir_all(&dir);
}

/// What a container's securityContext asks of its mounts, and the pod's
/// PID namespace when the containers share one.
struct Hardening {
    read_only_root: bool,
    /// Paths made unreadable (runc's maskedPaths).
    masked: Vec<String>,
    /// Paths made read-only (runc's readonlyPaths).
    readonly: Vec<String>,
    pod_pid: Option<std::os::fd::OwnedFd>,
}

/// The child's side, between fork and exec: its own mount and UTS
/// namespaces (the IPC namespace is the pod's: the VM's), a PID namespace
/// of its own or the pod's, the host name, then the container's root with
/// /proc, /dev and its volumes, masked and read-only paths, and its
/// working directory.
fn enter_container(
    cmd: &mut Command,
    root: &Path,
    cwd: Option<&str>,
    hostname: Option<String>,
    mounts: Vec<volume::Prepared>,
    hardening: Hardening,
) {
    use std::os::fd::AsRawFd;
    use std::os::unix::process::CommandExt;
    let c = |s: &str| CString::new(s).unwrap_or_default();
    let Hardening {
        read_only_root,
        masked,
        readonly,
        pod_pid,
    } = hardening;
    // Paths inside the container, resolved after the chroot: a symlink in
    // the image cannot point them outside it.
    let masked: Vec<CString> = masked.iter().map(|p| c(p)).collect();
    let readonly: Vec<CString> = readonly.iter().map(|p| c(p)).collect();
    let (tmpfs, devnull) = (c("tmpfs"), c("/dev/null"));
    let root_c = c(&root.to_string_lossy());
    let proc_c = c(&root.join("proc").to_string_lossy());
    let dev_c = c(&root.join("dev").to_string_lossy());
    let sys_c = c(&root.join("sys").to_string_lossy());
    let cgroup_c = c(&root.join("sys/fs/cgroup").to_string_lossy());
    let (sysfs, cgroup2) = (c("sysfs"), c("cgroup2"));
    let cwd_c = c(cwd.unwrap_or("/"));
    let host_c = hostname.map(|h| h.into_bytes());
    let (slash, none, proc_t, devfs) = (c("/"), c(""), c("proc"), c("/dev"));
    let dot = c(".");
    // SAFETY: between fork and exec only async-signal-safe calls are made
    // (unshare, mount, sethostname, pivot_root, umount2, chdir), on strings
    // allocated before the fork.
    unsafe {
        cmd.pre_exec(move || {
            // The cgroup namespace is rooted at the container's own cgroup,
            // joined before this. The PID namespace takes the next child:
            // the container's program, after the fork below.
            let pid_ns = if pod_pid.is_some() {
                0
            } else {
                libc::CLONE_NEWPID
            };
            check(libc::unshare(
                libc::CLONE_NEWNS | libc::CLONE_NEWUTS | libc::CLONE_NEWCGROUP | pid_ns,
            ))?;
            if let Some(ns) = &pod_pid {
                check(libc::setns(ns.as_raw_fd(), libc::CLONE_NEWPID))?;
            }
            check(libc::mount(
                none.as_ptr(),
                slash.as_ptr(),
                std::ptr::null(),
                libc::MS_REC | libc::MS_PRIVATE,
                std::ptr::null(),
            ))?;
            // The root becomes a mount of its own (pivot_root needs one),
            // before anything is mounted under it.
            check(libc::mount(
                root_c.as_ptr(),
                root_c.as_ptr(),
                std::ptr::null(),
                libc::MS_BIND | libc::MS_REC,
                std::ptr::null(),
            ))?;
            if let Some(h) = &host_c {
                check(libc::sethostname(h.as_ptr().cast(), h.len()))?;
            }
            // From here on this is PID 1 of the container's PID namespace
            // (its /proc is mounted from inside it).
            fork_into_pid_namespace()?;
            check(libc::mount(
                devfs.as_ptr(),
                dev_c.as_ptr(),
                std::ptr::null(),
                libc::MS_BIND | libc::MS_REC,
                std::ptr::null(),
            ))?;
            check(libc::mount(
                proc_t.as_ptr(),
                proc_c.as_ptr(),
                proc_t.as_ptr(),
                libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
                std::ptr::null(),
            ))?;
            // /sys and the container's cgroup, read-only, as Docker and the
            // kubelet's runtimes give them.
            let ro = libc::MS_RDONLY | libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC;
            check(libc::mount(
                sysfs.as_ptr(),
                sys_c.as_ptr(),
                sysfs.as_ptr(),
                ro,
                std::ptr::null(),
            ))?;
            check(libc::mount(
                cgroup2.as_ptr(),
                cgroup_c.as_ptr(),
                cgroup2.as_ptr(),
                ro,
                std::ptr::null(),
            ))?;
            for m in &mounts {
                if m.file {
                    // Under /dev (the VM's, bound in above) the file made
                    // in the container's layer is hidden: make it there.
                    let fd = libc::open(
                        m.target.as_ptr(),
                        libc::O_WRONLY | libc::O_CREAT | libc::O_NOFOLLOW | libc::O_CLOEXEC,
                        0o644,
                    );
                    if fd >= 0 {
                        libc::close(fd);
                    }
                }
                check(libc::mount(
                    m.source.as_ptr(),
                    m.target.as_ptr(),
                    std::ptr::null(),
                    libc::MS_BIND | libc::MS_REC,
                    std::ptr::null(),
                ))?;
                if m.read_only {
                    check(libc::mount(
                        std::ptr::null(),
                        m.target.as_ptr(),
                        std::ptr::null(),
                        libc::MS_BIND | libc::MS_REMOUNT | libc::MS_RDONLY | libc::MS_REC,
                        std::ptr::null(),
                    ))?;
                }
            }
            if read_only_root {
                // The root's own mount only: volumes keep their mode.
                check(libc::mount(
                    std::ptr::null(),
                    root_c.as_ptr(),
                    std::ptr::null(),
                    libc::MS_REMOUNT | libc::MS_BIND | libc::MS_RDONLY,
                    std::ptr::null(),
                ))?;
            }
            // Into the container's root for good: pivot_root stacks the
            // agent's root on it, and detaching that takes every mount of
            // the agent (other containers' roots, the volumes, secrets)
            // out of this namespace. No chroot escape finds them: there is
            // nothing left to climb to but the initramfs' own files.
            // (As runc does: the old root is left by descriptor, since
            // after the pivot no path names it.)
            let flags = libc::O_DIRECTORY | libc::O_RDONLY | libc::O_CLOEXEC;
            let old_root = libc::open(slash.as_ptr(), flags);
            if old_root < 0 {
                return Err(std::io::Error::last_os_error());
            }
            check(libc::chdir(root_c.as_ptr()))?;
            check(libc::syscall(libc::SYS_pivot_root, dot.as_ptr(), dot.as_ptr()) as libc::c_int)?;
            check(libc::fchdir(old_root))?;
            libc::close(old_root);
            check(libc::umount2(dot.as_ptr(), libc::MNT_DETACH))?;
            check(libc::chdir(slash.as_ptr()))?;
            for p in &masked {
                let mut st: libc::stat = std::mem::zeroed();
                if libc::stat(p.as_ptr(), &mut st) != 0 {
                    continue; // nothing there to mask
                }
                if st.st_mode & libc::S_IFMT == libc::S_IFDIR {
                    check(libc::mount(
                        tmpfs.as_ptr(),
                        p.as_ptr(),
                        tmpfs.as_ptr(),
                        libc::MS_RDONLY,
                        std::ptr::null(),
                    ))?;
                } else {
                    check(libc::mount(
                        devnull.as_ptr(),
                        p.as_ptr(),
                        std::ptr::null(),
                        libc::MS_BIND,
                        std::ptr::null(),
                    ))?;
                }
            }
            for p in &readonly {
                let mut st: libc::stat = std::mem::zeroed();
                if libc::stat(p.as_ptr(), &mut st) != 0 {
                    continue;
                }
                check(libc::mount(
                    p.as_ptr(),
                    p.as_ptr(),
                    std::ptr::null(),
                    libc::MS_BIND | libc::MS_REC,
                    std::ptr::null(),
                ))?;
                // Keep the flags the mount has (nosuid, noexec… of /proc).
                // (glibc's statvfs is one statfs call on kernels that
                // report mount flags, as every kernel since 2.6.36 does.)
                let mut fs: libc::statvfs = std::mem::zeroed();
                let kept = if libc::statvfs(p.as_ptr(), &mut fs) == 0 {
                    fs.f_flag & (libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC)
                } else {
                    0
                };
                check(libc::mount(
                    std::ptr::null(),
                    p.as_ptr(),
                    std::ptr::null(),
                    libc::MS_BIND | libc::MS_REMOUNT | libc::MS_RDONLY | kept,
                    std::ptr::null(),
                ))?;
            }
            check(libc::chdir(cwd_c.as_ptr()))?;
            Ok(())
        });
    }
}

/// The pod's shared PID namespace ([`husk_protocol::Rootfs::pod_pid`]):
/// its `pause` process, PID 1 of the namespace, started on first use.
struct PodPid {
    /// The pause, as the agent sees it.
    pause: u32,
}

static POD_PID: Mutex<Option<PodPid>> = Mutex::new(None);

/// The PID namespace shared by the pod's containers that share one, its
/// pause started when none runs, as the kubelet's pause container is.
fn pod_pid_namespace() -> Result<std::os::fd::OwnedFd, String> {
    let mut pod = lock(&POD_PID);
    if pod.is_none() {
        *pod = Some(start_pause()?);
    }
    let pause = pod.as_ref().map_or(0, |p| p.pause);
    std::fs::File::open(format!("/proc/{pause}/ns/pid"))
        .map(Into::into)
        .map_err(|e| format!("pause (pid {pause}): {e}"))
}

/// Applies the pod-wide settings: sysctls, in the VM's namespaces (which
/// are the pod's alone).
fn configure_pod(cfg: &husk_protocol::PodConfig) -> Result<(), String> {
    for (name, value) in &cfg.sysctls {
        let path = husk_protocol::seccomp::sysctl_path(name)?;
        std::fs::write(Path::new("/proc/sys").join(&path), value)
            .map_err(|e| format!("sysctl {name}={value:?}: {e}"))?;
    }
    Ok(())
}

/// `/pause` (this binary), PID 1 of a new PID namespace: it holds the
/// namespace for the pod's containers and reaps what is orphaned in it.
fn start_pause() -> Result<PodPid, String> {
    use std::os::unix::process::CommandExt;
    let mut cmd = Command::new("/proc/self/exe");
    cmd.arg0(PAUSE)
        .env_clear()
        .current_dir("/")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    // SAFETY: between fork and exec only async-signal-safe calls (setsid,
    // unshare, and the raw clone of fork_into_pid_namespace).
    unsafe {
        cmd.pre_exec(|| {
            if libc::setsid() < 0 {
                return Err(std::io::Error::last_os_error());
            }
            check(libc::unshare(libc::CLONE_NEWPID))?;
            fork_into_pid_namespace()
        });
    }
    let mut child = cmd.spawn().map_err(|e| format!("pause: {e}"))?;
    let outside = child.id();
    // The namespace is the pause's once it runs; containers must not
    // enter it before (the first process in it becomes its PID 1).
    let t0 = Instant::now();
    let pause = loop {
        if let Some(p) = child_of(outside) {
            let cmdline = std::fs::read(format!("/proc/{p}/cmdline")).unwrap_or_default();
            if cmdline.starts_with(PAUSE.as_bytes()) {
                break p;
            }
        }
        if t0.elapsed() > Duration::from_secs(10) {
            // SAFETY: kill on our own child's pid.
            unsafe { libc::kill(outside as i32, libc::SIGKILL) };
            let _ = child.wait();
            return Err("pause did not start".into());
        }
        std::thread::sleep(Duration::from_millis(5));
    };
    std::thread::spawn(move || {
        let status = child.wait();
        *lock(&POD_PID) = None;
        log(&format!("the pod's pause process ended: {status:?}"));
    });
    Ok(PodPid { pause })
}

/// argv[0] of the pause process, which is what `ps` and /proc/1/cmdline
/// show in a pod that shares its PID namespace.
const PAUSE: &str = "/pause";

/// The pause process's life: nothing, until killed. SIGCHLD ignored makes
/// the kernel reap the orphans it inherits; as PID 1 of its namespace it
/// gets no signal from inside without a handler.
fn pause() -> ! {
    // SAFETY: signal with SIG_IGN, and pause, take no pointers.
    unsafe {
        libc::signal(libc::SIGCHLD, libc::SIG_IGN);
        loop {
            libc::pause();
        }
    }
}

/// The child's side of an exec into a running container (whose first
/// process is `pid`): its cgroup, then its cgroup, IPC, UTS and mount
/// namespaces, its root and the working directory.
fn exec_into(cmd: &mut Command, target: &str, pid: u32, cwd: Option<&str>) -> std::io::Result<()> {
    use std::os::fd::{AsRawFd, OwnedFd};
    use std::os::unix::fs::OpenOptionsExt;
    use std::os::unix::process::CommandExt;
    let root = Path::new(CONTAINERS).join(target).join("root");
    if target.contains('/') || target.starts_with('.') || !root.is_dir() {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            "not a container",
        ));
    }
    let mut ns: Vec<(OwnedFd, libc::c_int)> = Vec::new();
    for (name, kind) in [
        ("cgroup", libc::CLONE_NEWCGROUP),
        // The container's first process is the parent that stayed outside;
        // its children's PID namespace is the container's.
        ("pid_for_children", libc::CLONE_NEWPID),
        ("ipc", libc::CLONE_NEWIPC),
        ("uts", libc::CLONE_NEWUTS),
        ("mnt", libc::CLONE_NEWNS),
    ] {
        let f = std::fs::File::open(format!("/proc/{pid}/ns/{name}"))?;
        ns.push((OwnedFd::from(f), kind));
    }
    let procs = std::fs::OpenOptions::new().write(true).open(
        Path::new(cgroup::ROOT)
            .join("husk")
            .join(target)
            .join("cgroup.procs"),
    )?;
    // The container's root as its first process sees it: after its
    // pivot_root, no path of the agent's names it.
    let root_fd = OwnedFd::from(
        std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_PATH | libc::O_DIRECTORY)
            .open(format!("/proc/{pid}/root"))?,
    );
    let c = |s: &str| CString::new(s).unwrap_or_default();
    let dot = c(".");
    let cwd_c = c(cwd.unwrap_or("/"));
    // SAFETY: between fork and exec only async-signal-safe calls are made
    // (write, setns, fchdir, chroot, chdir) on descriptors and strings made
    // before.
    unsafe {
        cmd.pre_exec(move || {
            if libc::write(procs.as_raw_fd(), b"0".as_ptr().cast(), 1) != 1 {
                return Err(std::io::Error::last_os_error());
            }
            for (fd, kind) in &ns {
                check(libc::setns(fd.as_raw_fd(), *kind))?;
            }
            fork_into_pid_namespace()?;
            check(libc::fchdir(root_fd.as_raw_fd()))?;
            check(libc::chroot(dot.as_ptr()))?;
            check(libc::chdir(cwd_c.as_ptr()))?;
            Ok(())
        });
    }
    Ok(())
}

/// A child of `parent`, from /proc (the kernels husk builds have no
/// /proc/PID/task/TID/children).
fn child_of(parent: u32) -> Option<u32> {
    std::fs::read_dir("/proc").ok()?.flatten().find_map(|e| {
        let pid: u32 = e.file_name().to_str()?.parse().ok()?;
        let stat = std::fs::read_to_string(e.path().join("stat")).ok()?;
        // `pid (comm) state ppid …`; comm may hold spaces and parentheses.
        let ppid: u32 = stat
            .rsplit_once(')')?
            .1
            .split_whitespace()
            .nth(1)?
            .parse()
            .ok()?;
        (ppid == parent).then_some(pid)
    })
}

/// How long a signal is re-delivered to a namespace init that has no
/// handler for it (the host's grace period ends with SIGKILL long before).
const REDELIVER_FOR: Duration = Duration::from_secs(3600);
const REDELIVER_EVERY: Duration = Duration::from_millis(20);

/// Signals whose default action ends (or stops) a process: the kernel
/// drops these for a PID-namespace init without a handler, where a process
/// elsewhere would have ended.
fn redelivered(signal: i32) -> bool {
    matches!(
        signal,
        libc::SIGHUP
            | libc::SIGINT
            | libc::SIGQUIT
            | libc::SIGTERM
            | libc::SIGUSR1
            | libc::SIGUSR2
            | libc::SIGALRM
    )
}

/// What a process does with a signal, from /proc/PID/status.
#[derive(Debug, PartialEq)]
enum Disposition {
    Handled,
    Ignored,
    Default,
}

/// The program's disposition of `signal`, and whether the program is the
/// init of its own PID namespace (its NSpid ends in 1); None once gone.
fn disposition(pid: u32, signal: i32) -> Option<(Disposition, bool)> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .map(str::trim)
    };
    let mask = |name: &str| {
        field(name)
            .and_then(|v| u64::from_str_radix(v, 16).ok())
            .unwrap_or(0)
    };
    let bit = 1u64 << (signal - 1);
    let ns_init = field("NSpid:").is_some_and(|v| {
        let ids: Vec<&str> = v.split_whitespace().collect();
        ids.len() > 1 && ids.last() == Some(&"1")
    });
    let d = if mask("SigCgt:") & bit != 0 {
        Disposition::Handled
    } else if mask("SigIgn:") & bit != 0 {
        Disposition::Ignored
    } else {
        Disposition::Default
    };
    Some((d, ns_init))
}

/// Delivers `signal` to the program under `outside` (the parent that stayed
/// outside its PID namespace, see [`fork_into_pid_namespace`]). A program
/// that is its namespace's init and has not installed its handler yet (a
/// stop right after a start) would never see it, as the kernel drops it:
/// it is sent again every [`REDELIVER_EVERY`] until the program handles
/// (one last send, which reaches the handler), ignores it or ends, or for
/// `limit`. A send right before the handler is installed may reach it
/// twice; none is lost. The program is held by a pidfd, so a reused pid
/// is never signalled.
fn deliver_until_handled(outside: u32, signal: i32, limit: Duration) {
    use std::os::fd::{FromRawFd, OwnedFd};
    let deadline = Instant::now() + limit;
    let mut program: Option<(u32, OwnedFd)> = None;
    loop {
        if program.is_none() {
            if let Some(pid) = child_of(outside) {
                // SAFETY: pidfd_open takes plain integers; on success the
                // descriptor is new and ours.
                let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
                if fd >= 0 {
                    // SAFETY: fd was just returned open by the kernel.
                    program = Some((pid, unsafe { OwnedFd::from_raw_fd(fd as i32) }));
                }
            } else if disposition(outside, signal).is_none() {
                return;
            }
        }
        if let Some((pid, fd)) = &program {
            use std::os::fd::AsRawFd;
            let Some((d, ns_init)) = disposition(*pid, signal) else {
                return;
            };
            if d == Disposition::Ignored {
                return;
            }
            // SAFETY: pidfd_send_signal on a pidfd we own; no siginfo.
            let r = unsafe {
                libc::syscall(
                    libc::SYS_pidfd_send_signal,
                    fd.as_raw_fd(),
                    signal,
                    std::ptr::null::<libc::siginfo_t>(),
                    0,
                )
            };
            // Delivered for sure: to a handler, or to a process the kernel
            // lets the default action end.
            if r != 0 || d == Disposition::Handled || !ns_init {
                return;
            }
        }
        if Instant::now() >= deadline {
            return;
        }
        std::thread::sleep(REDELIVER_EVERY);
    }
}

/// The child forked by [`fork_into_pid_namespace`], for the forwarder.
static PID_NS_CHILD: std::sync::atomic::AtomicI32 = std::sync::atomic::AtomicI32::new(0);

extern "C" fn forward_signal(sig: libc::c_int) {
    let child = PID_NS_CHILD.load(std::sync::atomic::Ordering::Relaxed);
    if child > 0 {
        // SAFETY: kill is async-signal-safe.
        unsafe { libc::kill(child, sig) };
    }
}

/// Between fork and exec, after joining or making a PID namespace (which
/// only children enter): forks once more. The child returns, to become
/// the program (PID 1 of a new namespace, or a process in the
/// container's). The parent stays behind as the process the agent knows:
/// it forwards the signals it gets to the child, and ends as the child
/// ends (the same exit code, or the same signal). Only async-signal-safe
/// calls (a raw clone rather than fork(), so no atfork handlers run).
///
/// # Safety
/// Only between fork and exec of a child of the agent.
unsafe fn fork_into_pid_namespace() -> std::io::Result<()> {
    // SAFETY: raw syscalls and libc calls on plain values; see above.
    unsafe {
        let child = libc::syscall(libc::SYS_clone, libc::SIGCHLD as libc::c_ulong, 0, 0, 0, 0);
        if child < 0 {
            return Err(std::io::Error::last_os_error());
        }
        if child == 0 {
            return Ok(());
        }
        let child = child as libc::pid_t;
        PID_NS_CHILD.store(child, std::sync::atomic::Ordering::Relaxed);
        // Hold nothing of the agent's: above all not std's exec-error pipe,
        // whose last writer must be the child's exec.
        libc::syscall(libc::SYS_close_range, 3u32, u32::MAX, 0u32);
        for sig in [
            libc::SIGHUP,
            libc::SIGINT,
            libc::SIGQUIT,
            libc::SIGUSR1,
            libc::SIGUSR2,
            libc::SIGTERM,
            libc::SIGCONT,
            libc::SIGWINCH,
            libc::SIGALRM,
        ] {
            let mut sa: libc::sigaction = std::mem::zeroed();
            sa.sa_sigaction = forward_signal as *const () as usize;
            libc::sigemptyset(&mut sa.sa_mask);
            sa.sa_flags = libc::SA_RESTART;
            libc::sigaction(sig, &sa, std::ptr::null_mut());
        }
        let mut status = 0;
        loop {
            let r = libc::waitpid(child, &mut status, 0);
            if r == child {
                break;
            }
            if r < 0 && *libc::__errno_location() != libc::EINTR {
                libc::_exit(127);
            }
        }
        if libc::WIFSIGNALED(status) {
            let sig = libc::WTERMSIG(status);
            libc::signal(sig, libc::SIG_DFL);
            let mut set: libc::sigset_t = std::mem::zeroed();
            libc::sigemptyset(&mut set);
            libc::sigprocmask(libc::SIG_SETMASK, &set, std::ptr::null_mut());
            libc::kill(libc::getpid(), sig);
            libc::_exit(128 + sig);
        }
        libc::_exit(libc::WEXITSTATUS(status));
    }
}

fn winsize(size: husk_protocol::TtySize) -> libc::winsize {
    libc::winsize {
        ws_row: size.rows,
        ws_col: size.cols,
        ws_xpixel: 0,
        ws_ypixel: 0,
    }
}

/// A new terminal of this size: (master, slave).
fn open_pty(size: husk_protocol::TtySize) -> std::io::Result<(std::fs::File, std::fs::File)> {
    use std::os::fd::FromRawFd;
    let (mut master, mut slave) = (-1, -1);
    let ws = winsize(size);
    // SAFETY: openpty fills two descriptors; the name and termios pointers
    // may be null, the winsize outlives the call.
    let r = unsafe {
        libc::openpty(
            &mut master,
            &mut slave,
            std::ptr::null_mut(),
            std::ptr::null(),
            &ws,
        )
    };
    if r != 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: both descriptors were just opened and are owned here.
    let (m, s) = unsafe {
        (
            std::fs::File::from_raw_fd(master),
            std::fs::File::from_raw_fd(slave),
        )
    };
    for f in [&m, &s] {
        use std::os::fd::AsRawFd;
        // SAFETY: fcntl on a descriptor owned here.
        unsafe { libc::fcntl(f.as_raw_fd(), libc::F_SETFD, libc::FD_CLOEXEC) };
    }
    Ok((m, s))
}

/// Raw pointers that cross into the forked child with the strings they
/// point into.
struct SendPtrs(Vec<*const libc::c_char>);
// SAFETY: only read, in the single-threaded child after the fork.
unsafe impl Send for SendPtrs {}
// SAFETY: as above.
unsafe impl Sync for SendPtrs {}

/// The agent's own binary (as a descriptor) and the argv that makes it run
/// `tool` (see [`run_tool`]).
fn tool_exec(tool: &husk_protocol::Tool) -> std::io::Result<(std::fs::File, Vec<CString>)> {
    use husk_protocol::Tool;
    let port;
    let (flag, path) = match tool {
        Tool::TarOut { path } => ("--tar-out", path),
        Tool::TarIn { path } => ("--tar-in", path),
        Tool::Connect { port: p } => {
            port = p.to_string();
            ("--connect", &port)
        }
    };
    if flag != "--connect" && !path.starts_with('/') {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            format!("{path:?} is not an absolute path"),
        ));
    }
    let argv = ["husk-agent", flag, path]
        .iter()
        .map(|a| CString::new(*a))
        .collect::<Result<Vec<_>, _>>()?;
    Ok((std::fs::File::open("/proc/self/exe")?, argv))
}

/// `husk-agent --tar-out PATH` / `--tar-in PATH`, run inside a container
/// for `husk cp`: writes a tar of PATH to stdout, or puts the tar read
/// from stdin at PATH.
/// `--connect PORT`: relays between stdin/stdout and 127.0.0.1:PORT until
/// the connection closes (stdin's end only ends the sending half).
fn relay(port: &str) -> std::io::Result<()> {
    let port: u16 = port.parse().map_err(|_| {
        std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            format!("{port:?} is not a port"),
        )
    })?;
    let conn = std::net::TcpStream::connect((std::net::Ipv4Addr::LOCALHOST, port))
        .map_err(|e| std::io::Error::new(e.kind(), format!("127.0.0.1:{port}: {e}")))?;
    let mut to = conn.try_clone()?;
    std::thread::spawn(move || {
        let _ = std::io::copy(&mut std::io::stdin().lock(), &mut to);
        let _ = to.shutdown(std::net::Shutdown::Write);
    });
    let mut from = conn;
    let mut out = std::io::stdout().lock();
    let mut buf = [0u8; 32 * 1024];
    loop {
        let n = from.read(&mut buf)?;
        if n == 0 {
            return Ok(());
        }
        out.write_all(&buf[..n])?;
        out.flush()?;
    }
}

fn run_tool(flag: &str, path: &str) -> i32 {
    let r = match flag {
        "--connect" => relay(path),
        "--tar-out" => husk_protocol::copy::pack(Path::new(path), std::io::stdout().lock()),
        _ => husk_protocol::copy::unpack(std::io::stdin().lock(), Path::new(path)),
    };
    match r {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("{e}");
            1
        }
    }
}

/// A libc call's 0-or-errno result, in the child between fork and exec.
fn check(r: libc::c_int) -> std::io::Result<()> {
    if r == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn send<W: Write>(out: &Mutex<W>, ev: &Event) -> Result<(), ProtocolError> {
    write_frame(&mut *lock(out), ev)
}

/// Serves one connection; returns true when the host asked for shutdown.
fn serve<R: Read, W: Write + Send + 'static>(
    input: &mut R,
    output: W,
) -> Result<bool, ProtocolError> {
    let session = Session::new(output);
    loop {
        let req: Request = match read_frame(input) {
            Ok(r) => r,
            Err(ProtocolError::Closed) => {
                session.kill_all();
                return Ok(false);
            }
            Err(ProtocolError::Malformed(e)) => {
                session.error(None, format!("malformed request: {e}"))?;
                continue;
            }
            Err(e) => {
                session.kill_all();
                return Err(e);
            }
        };
        match &req {
            Request::Hello {
                nonce,
                time_unix_ms,
                ..
            } => {
                if let Some(ms) = time_unix_ms {
                    set_clock(*ms);
                }
                session.send(&Event::Hello {
                    version: husk_protocol::VERSION,
                    nonce: *nonce,
                    kernel: kernel_release(),
                })?
            }
            Request::Start(s) => session.start(s)?,
            Request::Stdin { id, data, eof } => session.stdin(id, data, *eof)?,
            Request::Signal { id, signal } => session.signal(id, *signal)?,
            Request::Resize { id, size } => session.resize(id, *size)?,
            Request::Pod(cfg) => match configure_pod(cfg) {
                Ok(()) => session.send(&Event::PodReady)?,
                Err(e) => session.error(None, format!("pod: {e}"))?,
            },
            Request::Network(cfg) => match network::configure(cfg) {
                Ok(interface) => session.send(&Event::NetworkReady { interface })?,
                Err(e) => session.error(None, format!("network: {e}"))?,
            },
            Request::Update { id, limits } => {
                match cgroup::update(Path::new(cgroup::ROOT), id, limits) {
                    Ok(()) => session.send(&Event::Updated { id: id.clone() })?,
                    Err(e) => session.error(None, format!("update {id:?}: {e}"))?,
                }
            }
            Request::UpdateFiles { name, files } => match volume::update(name, files) {
                Ok(()) => session.send(&Event::VolumeReady { name: name.clone() })?,
                Err(e) => session.error(None, format!("volume {name:?}: {e}"))?,
            },
            Request::Stats => session.send(&Event::Stats(cgroup::stats(
                Path::new(cgroup::ROOT),
                Path::new("/proc"),
            )))?,
            Request::Volume(v) => match volume::add(v) {
                Ok(()) => session.send(&Event::VolumeReady {
                    name: v.name.clone(),
                })?,
                Err(e) => session.error(None, format!("volume {:?}: {e}", v.name))?,
            },
            Request::Shutdown => {
                session.kill_all();
                session.send(&Event::ShuttingDown)?;
                return Ok(true);
            }
        }
    }
}

/// Sets the guest's wall clock to the host's when they are more than a
/// second apart.
fn set_clock(host_ms: u64) {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64);
    if now.abs_diff(host_ms) > 1000 {
        let ts = libc::timespec {
            tv_sec: (host_ms / 1000) as libc::time_t,
            tv_nsec: ((host_ms % 1000) * 1_000_000) as libc::c_long,
        };
        // SAFETY: a valid timespec for the duration of the call.
        if unsafe { libc::clock_settime(libc::CLOCK_REALTIME, &ts) } != 0 {
            log(&format!(
                "setting the clock: {}",
                std::io::Error::last_os_error()
            ));
        } else {
            log(&format!(
                "clock set from the host ({} ms off)",
                now.abs_diff(host_ms)
            ));
        }
    }
}

fn serve_unix(path: &Path) -> i32 {
    let listener = match std::os::unix::net::UnixListener::bind(path) {
        Ok(l) => l,
        Err(e) => {
            log(&format!("{}: {e}", path.display()));
            return 1;
        }
    };
    let r = listener
        .accept()
        .map_err(ProtocolError::from)
        .and_then(|(s, _)| serve(&mut s.try_clone()?, s));
    let _ = std::fs::remove_file(path);
    match r {
        Ok(_) => 0,
        Err(e) => {
            log(&e.to_string());
            1
        }
    }
}

/// A listening AF_VSOCK stream socket on `port` (any CID).
fn vsock_listener(port: u32) -> std::io::Result<std::os::fd::OwnedFd> {
    use std::os::fd::FromRawFd;
    // SAFETY: plain socket(2); the descriptor is owned right away.
    let fd = unsafe { libc::socket(libc::AF_VSOCK, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: a fresh descriptor nothing else owns.
    let sock = unsafe { std::os::fd::OwnedFd::from_raw_fd(fd) };
    // SAFETY: sockaddr_vm is plain data; zero is a valid start.
    let mut addr: libc::sockaddr_vm = unsafe { std::mem::zeroed() };
    addr.svm_family = libc::AF_VSOCK as libc::sa_family_t;
    addr.svm_cid = libc::VMADDR_CID_ANY;
    addr.svm_port = port;
    // SAFETY: addr is a valid sockaddr_vm of the size passed.
    let r = unsafe {
        libc::bind(
            fd,
            (&addr as *const libc::sockaddr_vm).cast(),
            std::mem::size_of::<libc::sockaddr_vm>() as libc::socklen_t,
        )
    };
    // SAFETY: listen on the descriptor we own.
    if r < 0 || unsafe { libc::listen(fd, 1) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(sock)
}

/// Serves the host over vsock (husk-vmm), one connection at a time: a
/// host that goes away (a restarted monitor) connects again.
fn serve_vsock(port: u32) -> ! {
    use std::os::fd::{AsRawFd, FromRawFd};
    let listener = match vsock_listener(port) {
        Ok(l) => l,
        Err(e) => {
            log(&format!("vsock port {port}: {e}"));
            power_off();
        }
    };
    log(&format!("serving on vsock port {port}"));
    loop {
        // SAFETY: accept on the listener we own; no address wanted.
        let fd = unsafe {
            libc::accept4(
                listener.as_raw_fd(),
                std::ptr::null_mut(),
                std::ptr::null_mut(),
                libc::SOCK_CLOEXEC,
            )
        };
        if fd < 0 {
            log(&format!(
                "vsock accept: {}",
                std::io::Error::last_os_error()
            ));
            std::thread::sleep(Duration::from_millis(50));
            continue;
        }
        // SAFETY: accept4 returned a new descriptor nothing else owns.
        let conn = unsafe { std::fs::File::from_raw_fd(fd) };
        let served = conn
            .try_clone()
            .map_err(ProtocolError::from)
            .and_then(|mut input| serve(&mut input, conn));
        match served {
            Ok(true) => power_off(),
            Ok(false) => {}
            Err(e) => log(&e.to_string()),
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
    if args.len() == 1 && args[0] == PAUSE {
        pause();
    }
    if let [_, flag, path] = &args[..] {
        if flag == "--tar-out" || flag == "--tar-in" || flag == "--connect" {
            std::process::exit(run_tool(flag, path));
        }
    }
    // Tests on the host: the same agent, in namespaces a test made, on a
    // unix socket instead of a VM's port; one connection, then it ends.
    if let [_, flag, path] = &args[..] {
        if flag == "--serve-unix" {
            std::process::exit(serve_unix(Path::new(path)));
        }
    }
    if std::process::id() != 1 {
        eprintln!("husk-agent runs as PID 1 of a microVM");
        std::process::exit(2);
    }
    setup();
    log(&format!("started on Linux {}", kernel_release()));
    let cmdline = std::fs::read_to_string("/proc/cmdline").unwrap_or_default();
    if let Some(port) = husk_protocol::vsock_port(&cmdline) {
        serve_vsock(port);
    }
    let Some(port) = find_port(husk_protocol::PORT_NAME, Duration::from_secs(30)) else {
        log(&format!(
            "no virtio-serial port named {}",
            husk_protocol::PORT_NAME
        ));
        power_off();
    };
    loop {
        let dev = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&port)
            .and_then(|d| Ok((d.try_clone()?, d)));
        let (mut input, output) = match dev {
            Ok(d) => d,
            Err(e) => {
                log(&format!("{}: {e}", port.display()));
                power_off();
            }
        };
        match serve(&mut input, output) {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_vsock_listener_holds_its_port() {
        let port = 40_000 + std::process::id() % 20_000;
        let first = match vsock_listener(port) {
            Ok(l) => l,
            Err(e) if e.raw_os_error() == Some(libc::EAFNOSUPPORT) => {
                println!("SKIPPED: no AF_VSOCK on this host");
                return;
            }
            Err(e) => panic!("{e}"),
        };
        let again = vsock_listener(port).map(|_| ()).unwrap_err();
        assert_eq!(again.raw_os_error(), Some(libc::EADDRINUSE), "{again}");
        drop(first);
        vsock_listener(port).expect("the port is free once the listener is gone");
    }

    #[test]
    fn a_child_is_found_by_its_parent() {
        // A shell whose only child is a sleep (the test process itself
        // has other children: the seccomp tests fork).
        let mut c = std::process::Command::new("/bin/sh")
            .args(["-c", "sleep 5 & echo $!; wait"])
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let mut line = String::new();
        std::io::BufRead::read_line(
            &mut std::io::BufReader::new(c.stdout.take().unwrap()),
            &mut line,
        )
        .unwrap();
        let sleep: u32 = line.trim().parse().unwrap();
        assert_eq!(super::child_of(c.id()), Some(sleep));
        // SAFETY: kill on the sleep this test started.
        unsafe { libc::kill(sleep as i32, libc::SIGKILL) };
        c.wait().unwrap();
        assert_eq!(super::child_of(c.id()), None);
    }

    #[test]
    fn module_parameters_come_from_the_command_line() {
        let c = "console=ttyS0 virtio_mmio.device=4K@0xd0000000:5 virtio-mmio.device=4K@0xd0001000:6 virtio_blk.x=1";
        assert_eq!(
            module_params(c, "virtio_mmio"),
            "device=4K@0xd0000000:5 device=4K@0xd0001000:6"
        );
        assert_eq!(module_params(c, "virtio-rng"), "");
    }

    /// Runs `serve` over a socket pair and returns the host's end.
    fn session() -> std::os::unix::net::UnixStream {
        let (host, agent) = std::os::unix::net::UnixStream::pair().unwrap();
        std::thread::spawn(move || {
            let mut input = agent.try_clone().unwrap();
            let _ = serve(&mut input, agent);
        });
        host
    }

    /// Events for `id` until its Exited, as (stdout, stderr, exit).
    fn collect(host: &mut std::os::unix::net::UnixStream, id: &str) -> (Vec<u8>, Vec<u8>, Event) {
        let (mut out, mut err) = (Vec::new(), Vec::new());
        loop {
            match read_frame::<Event>(host).unwrap() {
                Event::Output {
                    id: i,
                    stream,
                    data,
                } if i == id => match stream {
                    Stream::Stdout => out.extend(data),
                    Stream::Stderr => err.extend(data),
                },
                e @ Event::Exited { .. } => return (out, err, e),
                Event::Started { .. } => {}
                other => panic!("unexpected {other:?}"),
            }
        }
    }

    #[test]
    fn a_terminal_has_the_size_asked_for_and_follows_resizes() {
        let mut host = session();
        let start = |tty| {
            Request::Start(Box::new(StartRequest {
                id: "t".into(),
                argv: vec![
                    "/bin/sh".into(),
                    "-c".into(),
                    "stty size; read x; stty size; test -t 0 && test -t 1 && echo tty".into(),
                ],
                env: vec!["PATH=/usr/bin:/bin".into()],
                tty,
                ..Default::default()
            }))
        };
        write_frame(
            &mut host,
            &start(Some(husk_protocol::TtySize { rows: 33, cols: 99 })),
        )
        .unwrap();
        // The first size, then a resize before the line that lets it go on.
        let mut out = Vec::new();
        while !String::from_utf8_lossy(&out).contains("33 99") {
            match read_frame::<Event>(&mut host).unwrap() {
                Event::Output { stream, data, .. } => {
                    assert_eq!(stream, Stream::Stdout, "a terminal has one stream");
                    out.extend(data)
                }
                Event::Started { .. } => {}
                other => panic!("unexpected {other:?}"),
            }
        }
        for req in [
            Request::Resize {
                id: "t".into(),
                size: husk_protocol::TtySize {
                    rows: 44,
                    cols: 111,
                },
            },
            Request::Stdin {
                id: "t".into(),
                data: b"go\n".to_vec(),
                eof: false,
            },
        ] {
            write_frame(&mut host, &req).unwrap();
        }
        let (rest, err, exit) = collect(&mut host, "t");
        let rest = String::from_utf8_lossy(&rest);
        assert!(rest.contains("44 111") && rest.contains("tty"), "{rest:?}");
        assert!(err.is_empty());
        assert!(
            matches!(exit, Event::Exited { code: Some(0), .. }),
            "{exit:?}"
        );
        // A resize of a process without a terminal names what is wrong.
        write_frame(
            &mut host,
            &Request::Start(Box::new(StartRequest {
                id: "p".into(),
                argv: vec!["/bin/sleep".into(), "5".into()],
                ..Default::default()
            })),
        )
        .unwrap();
        assert!(matches!(
            read_frame::<Event>(&mut host).unwrap(),
            Event::Started { .. }
        ));
        write_frame(
            &mut host,
            &Request::Resize {
                id: "p".into(),
                size: husk_protocol::TtySize { rows: 1, cols: 1 },
            },
        )
        .unwrap();
        match read_frame::<Event>(&mut host).unwrap() {
            Event::Error { message, .. } => assert!(message.contains("no terminal"), "{message}"),
            other => panic!("unexpected {other:?}"),
        }
        write_frame(
            &mut host,
            &Request::Signal {
                id: "p".into(),
                signal: 9,
            },
        )
        .unwrap();
        let (_, _, exit) = collect(&mut host, "p");
        assert!(
            matches!(
                exit,
                Event::Exited {
                    signal: Some(9),
                    ..
                }
            ),
            "{exit:?}"
        );
        // A tool outside a container is refused.
        write_frame(
            &mut host,
            &Request::Start(Box::new(StartRequest {
                id: "x".into(),
                tool: Some(husk_protocol::Tool::TarOut {
                    path: "/etc".into(),
                }),
                ..Default::default()
            })),
        )
        .unwrap();
        match read_frame::<Event>(&mut host).unwrap() {
            Event::Error { message, .. } => assert!(message.contains("exec_in"), "{message}"),
            other => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    fn processes_stream_output_take_stdin_and_report_their_exit() {
        let mut host = session();
        write_frame(
            &mut host,
            &Request::Start(Box::new(StartRequest {
                id: "a".into(),
                argv: vec![
                    "/bin/sh".into(),
                    "-c".into(),
                    "cat; echo \"$A\" >&2; exit 3".into(),
                ],
                env: vec!["A=from env".into()],
                cwd: Some("/".into()),
                stdin: true,
                rootfs: None,
                mounts: vec![],
                limits: None,
                exec_in: None,
                security: None,
                ..Default::default()
            })),
        )
        .unwrap();
        for (data, eof) in [(&b"from "[..], false), (&b"stdin"[..], true)] {
            write_frame(
                &mut host,
                &Request::Stdin {
                    id: "a".into(),
                    data: data.to_vec(),
                    eof,
                },
            )
            .unwrap();
        }
        let (out, err, exit) = collect(&mut host, "a");
        assert_eq!(out, b"from stdin");
        assert_eq!(err, b"from env\n");
        assert_eq!(
            exit,
            Event::Exited {
                id: "a".into(),
                code: Some(3),
                signal: None,
                oom_killed: false,
            }
        );
    }

    /// A stop right after a start: the program is the init of its own
    /// PID namespace (as in a container) and installs its SIGTERM handler
    /// only after a while. The signal still reaches it, once.
    #[test]
    fn a_signal_sent_before_a_namespace_init_handles_it_still_reaches_it() {
        use std::os::unix::process::CommandExt;
        let mut cmd = Command::new("/bin/sh");
        cmd.args([
            "-c",
            "sleep 0.4; trap 'echo got; exit 143' TERM; while :; do sleep 0.05; done",
        ])
        .stdout(Stdio::piped());
        // SAFETY: unshare and the agent's own fork-into-namespace between
        // fork and exec, as `enter_container` does.
        unsafe {
            cmd.pre_exec(|| {
                check(libc::unshare(libc::CLONE_NEWPID))?;
                fork_into_pid_namespace()
            });
        }
        let mut child = cmd.spawn().unwrap();
        let pid = child.id();
        let t0 = Instant::now();
        deliver_until_handled(pid, libc::SIGTERM, Duration::from_secs(10));
        let out = loop {
            if let Some(st) = child.try_wait().unwrap() {
                break st;
            }
            if t0.elapsed() > Duration::from_secs(15) {
                // SAFETY: kill of the program and of our own child.
                unsafe {
                    if let Some(program) = child_of(pid) {
                        libc::kill(program as i32, libc::SIGKILL);
                    }
                    libc::kill(pid as i32, libc::SIGKILL);
                }
                let _ = child.wait();
                panic!("the program never got SIGTERM");
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        assert_eq!(out.code(), Some(143), "{out:?}");
        let mut got = String::new();
        child
            .stdout
            .take()
            .unwrap()
            .read_to_string(&mut got)
            .unwrap();
        assert_eq!(got, "got\n", "the handler ran once");
        // A process gone: nothing to do, and no wait.
        let t0 = Instant::now();
        deliver_until_handled(pid, libc::SIGTERM, Duration::from_secs(10));
        assert!(t0.elapsed() < Duration::from_secs(1));
    }

    #[test]
    fn signals_reach_the_process_and_bad_requests_name_what_is_wrong() {
        let mut host = session();
        let start = |id: &str, argv: &[&str], env: &[&str]| {
            Request::Start(Box::new(StartRequest {
                id: id.into(),
                argv: argv.iter().map(|s| s.to_string()).collect(),
                env: env.iter().map(|s| s.to_string()).collect(),
                ..Default::default()
            }))
        };
        write_frame(&mut host, &start("s", &["/bin/sleep", "60"], &[])).unwrap();
        assert!(matches!(
            read_frame::<Event>(&mut host).unwrap(),
            Event::Started { .. }
        ));
        // The same id again while it runs.
        write_frame(&mut host, &start("s", &["/bin/true"], &[])).unwrap();
        assert!(matches!(read_frame::<Event>(&mut host).unwrap(),
            Event::Error { id: Some(i), message } if i == "s" && message.contains("is running")));
        write_frame(
            &mut host,
            &Request::Signal {
                id: "s".into(),
                signal: 9,
            },
        )
        .unwrap();
        assert_eq!(
            read_frame::<Event>(&mut host).unwrap(),
            Event::Exited {
                id: "s".into(),
                code: None,
                signal: Some(9),
                oom_killed: false,
            }
        );
        for (req, words) in [
            (start("x", &["/nonexistent"], &[]), "/nonexistent"),
            (start("y", &["/bin/true"], &["NOEQUALS"]), "NAME=value"),
            (
                Request::Signal {
                    id: "gone".into(),
                    signal: 15,
                },
                "no process",
            ),
        ] {
            write_frame(&mut host, &req).unwrap();
            match read_frame::<Event>(&mut host).unwrap() {
                Event::Error { message, .. } => assert!(message.contains(words), "{message}"),
                other => panic!("{other:?}"),
            }
        }
    }
}
