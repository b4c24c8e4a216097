//! husk-agent's container mechanics tested on the host, without a VM: the
//! static agent runs in fresh mount, PID, UTS and IPC namespaces (with its
//! own /run and cgroup2 mounts) and serves husk-protocol on a unix socket
//! (`--serve-unix`). A container's layer is a real ext4 image on a loop
//! device, as a VM pod's layers are ext4 disks. Nothing may be left behind.

mod common;
use common::*;
use husk_protocol::{Rootfs, StartRequest, Tool};
use husk_sandbox::vm::agent::AgentClient;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

/// A loop device, detached when dropped.
struct Loop(String);

impl Drop for Loop {
    fn drop(&mut self) {
        let _ = Command::new("losetup").args(["-d", &self.0]).status();
    }
}

/// The agent's process group (unshare and the agent, PID 1 of its
/// namespace, whose end ends every process in it), killed when dropped:
/// a failing test leaves no agent or container behind.
struct Group(std::process::Child);

impl Drop for Group {
    fn drop(&mut self) {
        let pgid = nix::unistd::Pid::from_raw(-(self.0.id() as i32));
        let _ = nix::sys::signal::kill(pgid, nix::sys::signal::Signal::SIGKILL);
        let _ = self.0.wait();
    }
}

#[test]
fn the_agent_runs_containers_in_fresh_namespaces_on_the_host() {
    let t = tempfile::tempdir().unwrap();
    // One layer: busybox, as an ext4 image on a read-only loop device.
    let tree = t.path().join("tree");
    std::fs::create_dir_all(tree.join("bin")).unwrap();
    std::fs::create_dir_all(tree.join("etc")).unwrap();
    std::fs::copy("/bin/busybox", tree.join("bin/busybox")).unwrap();
    std::os::unix::fs::symlink("busybox", tree.join("bin/sh")).unwrap();
    std::fs::write(tree.join("etc/passwd"), "root:x:0:0:root:/root:/bin/sh\n").unwrap();
    std::fs::create_dir_all(tree.join("srv")).unwrap();
    std::fs::write(tree.join("srv/secret"), "s3cret\n").unwrap();
    let img = t.path().join("layer.ext4");
    std::fs::File::create(&img)
        .unwrap()
        .set_len(16 << 20)
        .unwrap();
    let mkfs = Command::new("mkfs.ext4")
        .args(["-q", "-F", "-d"])
        .arg(&tree)
        .arg(&img)
        .output()
        .unwrap();
    assert!(mkfs.status.success(), "{}", stderr(&mkfs));
    let out = Command::new("losetup")
        .args(["--find", "--show", "--read-only"])
        .arg(&img)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    let dev = Loop(stdout(&out).trim().to_owned());

    // The agent in namespaces of its own.
    let socket = t.path().join("agent.sock");
    let mut agent_proc = Group(
        Command::new("unshare")
        .args(["--mount", "--pid", "--uts", "--ipc", "--fork", "--mount-proc", "--propagation", "private", "--", "/bin/sh", "-c"])
        .arg(format!(
            "mount -t tmpfs tmpfs /run && mount -t cgroup2 none /sys/fs/cgroup && exec {} --serve-unix {}",
            static_agent().display(),
            socket.display()
        ))
        .process_group(0)
        .spawn()
        .unwrap(),
    );
    let deadline = Instant::now() + Duration::from_secs(20);
    while !socket.exists() {
        assert!(Instant::now() < deadline, "the agent never listened");
        assert!(
            agent_proc.0.try_wait().unwrap().is_none(),
            "the agent ended"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let stream = std::os::unix::net::UnixStream::connect(&socket).unwrap();
    let agent = AgentClient::connect(stream, Instant::now() + Duration::from_secs(10)).unwrap();

    // A container: its own root (overlay on the layer), PID namespace,
    // hostname, /proc, and a cgroup.
    let mut c = sh(
        "c1",
        "echo pid=$$; hostname; ls /proc | grep -c '^[0-9]'; echo kept > /tmp/marker; echo up; exec sleep 600",
    );
    c.rootfs = Some(Rootfs {
        layers: vec![dev.0.clone()],
        hostname: Some("hostpod".into()),
        ..Default::default()
    });
    let c1 = agent.start(c).unwrap();
    let mut out = Vec::new();
    while !String::from_utf8_lossy(&out).contains("up") {
        match c1.next_event(Duration::from_secs(20)).unwrap() {
            husk_protocol::Event::Output { data, .. } => out.extend(data),
            other => panic!("unexpected {other:?}: {}", String::from_utf8_lossy(&out)),
        }
    }
    let lines: Vec<String> = String::from_utf8_lossy(&out)
        .lines()
        .map(str::to_owned)
        .collect();
    assert_eq!(lines[0], "pid=1", "{lines:?}");
    assert_eq!(lines[1], "hostpod", "{lines:?}");
    // Only its own processes: the shell and the pipeline.
    let seen: usize = lines[2].parse().unwrap();
    assert!(seen <= 4, "the container sees {seen} processes");

    // An exec joins its root and namespaces; a copy out comes from there.
    let mut e = sh("e1", "cat /tmp/marker; hostname; echo $$");
    e.exec_in = Some("c1".into());
    let f = run(&agent, e);
    let text = String::from_utf8_lossy(&f.stdout).into_owned();
    assert_eq!(
        f.code,
        Some(0),
        "{text} {}",
        String::from_utf8_lossy(&f.stderr)
    );
    let mut lines = text.lines();
    assert_eq!(
        (lines.next(), lines.next()),
        (Some("kept"), Some("hostpod"))
    );
    let exec_pid: u32 = lines.next().unwrap().parse().unwrap();
    assert!(
        exec_pid > 1 && exec_pid < 100,
        "pid {exec_pid} is not in the container's namespace"
    );
    let copy = StartRequest {
        id: "cp".into(),
        exec_in: Some("c1".into()),
        tool: Some(Tool::TarOut {
            path: "/tmp/marker".into(),
        }),
        ..Default::default()
    };
    let f = run(&agent, copy);
    assert_eq!(f.code, Some(0), "{}", String::from_utf8_lossy(&f.stderr));
    husk_protocol::copy::unpack(&f.stdout[..], &t.path().join("copied")).unwrap();
    assert_eq!(
        std::fs::read_to_string(t.path().join("copied")).unwrap(),
        "kept\n"
    );

    hardening(&agent, &dev.0);

    // The container ends by its signal (SIGKILL: as PID 1 of its
    // namespace, `sleep` ignores SIGTERM); its root and cgroup go with it.
    c1.signal(libc::SIGKILL).unwrap();
    let f = c1.wait(Duration::from_secs(20)).unwrap();
    assert_eq!(f.signal, Some(libc::SIGKILL));
    let f = run(
        &agent,
        sh(
            "m",
            "cat /proc/self/mountinfo; ls /run/husk/containers; ls /sys/fs/cgroup/husk",
        ),
    );
    let seen = String::from_utf8_lossy(&f.stdout);
    assert!(!seen.contains("/run/husk/containers/c1"), "{seen}");
    for c in ["c1", "c2", "c3"] {
        assert!(!seen.lines().any(|l| l == c), "{c} is left: {seen}");
    }

    // Shutdown ends the agent, and with it its namespaces and mounts.
    agent.shutdown().unwrap();
    drop(agent);
    let deadline = Instant::now() + Duration::from_secs(20);
    let status = loop {
        if let Some(s) = agent_proc.0.try_wait().unwrap() {
            break s;
        }
        assert!(Instant::now() < deadline, "the agent did not end");
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(status.success(), "{status}");
    assert!(!socket.exists());
    // The cgroup the agent made in the shared v2 hierarchy is empty; it
    // goes (the host's own mount of cgroup2, where it has one).
    for root in ["/sys/fs/cgroup/unified", "/sys/fs/cgroup"] {
        let husk = Path::new(root).join("husk");
        if husk.join("cgroup.procs").exists() {
            assert!(!husk.join("c1").exists(), "c1's cgroup is left");
            if std::fs::read_to_string(husk.join("cgroup.procs"))
                .unwrap()
                .trim()
                .is_empty()
                && std::fs::read_dir(&husk)
                    .unwrap()
                    .flatten()
                    .all(|e| !e.path().is_dir())
            {
                std::fs::remove_dir(&husk).unwrap();
            }
        }
    }
    drop(dev);
}

/// Reads a running container's output until `until` shows up.
fn output_until(p: &husk_sandbox::vm::agent::Process, until: &str) -> String {
    let mut out = Vec::new();
    while !String::from_utf8_lossy(&out).contains(until) {
        match p.next_event(Duration::from_secs(20)).unwrap() {
            husk_protocol::Event::Output { data, .. } => out.extend(data),
            other => panic!("unexpected {other:?}: {}", String::from_utf8_lossy(&out)),
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Pod sysctls (in the pod's IPC namespace, which its containers share),
/// masked and read-only paths, seccomp (husk's default and a profile that
/// blocks chmod, as critest's) and a PID namespace shared through /pause.
fn hardening(agent: &AgentClient, layer: &str) {
    use husk_protocol::{PodConfig, Security};
    let sysctl = |n: &str, v: &str| (n.to_owned(), v.to_owned());
    // A bad name or value fails naming it, and nothing is half-applied
    // that a later good request would not set.
    for (bad, want) in [
        ("kernel.no_such_knob", "kernel.no_such_knob"),
        ("kernel/../../etc/x", "not a sysctl name"),
    ] {
        let e = agent
            .configure_pod(PodConfig {
                sysctls: vec![sysctl(bad, "1")],
            })
            .unwrap_err()
            .to_string();
        assert!(e.contains(want), "{e}");
    }
    agent
        .configure_pod(PodConfig {
            sysctls: vec![
                sysctl("kernel.shm_rmid_forced", "1"),
                sysctl("fs.mqueue.msg_max", "100"),
            ],
        })
        .unwrap();

    let caps: Vec<String> = husk_protocol::DEFAULT_CAPABILITIES
        .iter()
        .map(|c| c.to_string())
        .collect();
    let rootfs = || Rootfs {
        layers: vec![layer.to_owned()],
        hostname: Some("hostpod".into()),
        pod_pid: true,
        ..Default::default()
    };
    // c3: husk's default seccomp profile, in the pod's PID namespace.
    let mut c = sh(
        "c3",
        "grep Seccomp: /proc/self/status; echo up; exec sleep 601",
    );
    c.rootfs = Some(rootfs());
    c.security = Some(Security {
        capabilities: caps.clone(),
        seccomp: Some(husk_sandbox::pod::seccomp::runtime_default(&caps)),
        ..Default::default()
    });
    let c3 = agent.start(c).unwrap();
    let out = output_until(&c3, "up");
    assert!(out.contains("Seccomp:\t2"), "{out}");

    // c2: critest's chmod-blocking profile, masked and read-only paths.
    let profile = husk_sandbox::pod::seccomp::parse_profile(
        br#"{"defaultAction": "SCMP_ACT_ALLOW",
             "syscalls": [{"names": ["chmod", "fchmodat", "fchmodat2"], "action": "SCMP_ACT_ERRNO"}]}"#,
        &caps,
        "block-chmod.json",
    )
    .unwrap();
    let mut c = sh(
        "c2",
        "echo passwd=$(cat /etc/passwd); echo srv=$(ls /srv); \
         touch /tmp/x; chmod 755 /etc; \
         echo pid1=$(tr -d '\\0' < /proc/1/cmdline); \
         for p in /proc/[0-9]*; do tr '\\0' ' ' < $p/cmdline; echo; done 2>/dev/null | grep -c '[s]leep 601'; \
         cat /proc/sys/kernel/shm_rmid_forced /proc/sys/fs/mqueue/msg_max",
    );
    c.rootfs = Some(rootfs());
    c.security = Some(Security {
        capabilities: caps.clone(),
        masked_paths: vec!["/etc/passwd".into(), "/srv".into(), "/no/such".into()],
        readonly_paths: vec!["/tmp".into()],
        seccomp: Some(profile),
        ..Default::default()
    });
    let f = run(agent, c);
    let (out, err) = (
        String::from_utf8_lossy(&f.stdout).into_owned(),
        String::from_utf8_lossy(&f.stderr).into_owned(),
    );
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(
        lines,
        ["passwd=", "srv=", "pid1=/pause", "1", "1", "100"],
        "stderr: {err}"
    );
    assert!(
        err.contains("touch: /tmp/x: Read-only file system"),
        "{err}"
    );
    assert!(err.contains("Operation not permitted"), "{err}");

    // A container of its own PID namespace is its PID 1, and sees neither
    // the pause nor c3.
    let mut c = sh(
        "c4",
        "echo $$; for p in /proc/[0-9]*; do tr '\\0' ' ' < $p/cmdline; echo; done 2>/dev/null | grep -cE '[s]leep 601|^/[p]ause'",
    );
    c.rootfs = Some(Rootfs {
        layers: vec![layer.to_owned()],
        ..Default::default()
    });
    let f = run(agent, c);
    assert_eq!(
        String::from_utf8_lossy(&f.stdout),
        "1\n0\n",
        "{}",
        String::from_utf8_lossy(&f.stderr)
    );
    c3.signal(libc::SIGKILL).unwrap();
    c3.wait(Duration::from_secs(20)).unwrap();
}

/// Starts `req` and waits for it to end (20 s at most).
fn run(agent: &AgentClient, req: StartRequest) -> husk_sandbox::vm::agent::Finished {
    agent
        .start(req)
        .unwrap()
        .wait(Duration::from_secs(20))
        .unwrap()
}
