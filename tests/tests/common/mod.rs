//! Test harness: each test gets its own husk root, its own CNI bridge and
//! /24, drives the real `husk` binary, and at the end checks that nothing is
//! left behind (netns files, mounts, monitor processes, cgroups, veths on its
//! bridge) before deleting the bridge.

#![allow(dead_code)]

pub mod huskd;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

static NEXT: AtomicU32 = AtomicU32::new(0);

pub fn guest(name: &str) -> PathBuf {
    Path::new(env!("HUSK_TEST_GUESTS")).join(name)
}

pub fn probe() -> PathBuf {
    guest("probe.wasm")
}

pub fn probe_p2() -> PathBuf {
    guest("probe.component.wasm")
}

/// The wasi:sockets test guest (a preview2 component).
pub fn netprobe() -> PathBuf {
    guest("netprobe.component.wasm")
}

#[allow(unused_imports)]
pub use husk_tests::{images_dir, static_agent};

/// One output of images/build.sh; it must exist.
pub fn image(name: &str) -> PathBuf {
    let p = images_dir().join(name);
    assert!(
        p.exists(),
        "{} missing: run images/build.sh (tests/run.sh does)",
        p.display()
    );
    p
}

/// Whether /dev/kvm is there for `test`; when not, the test is recorded as
/// skipped (libtest would count it as passed: tests/run.sh counts the
/// lines of $HUSK_SKIP_LOG as skipped in its closing line).
pub fn have_kvm(test: &str) -> bool {
    if Path::new("/dev/kvm").exists() {
        return true;
    }
    println!("SKIPPED: no /dev/kvm ({test})");
    if let Some(log) = std::env::var_os("HUSK_SKIP_LOG") {
        use std::io::Write;
        if let Ok(mut f) = std::fs::OpenOptions::new()
            .append(true)
            .create(true)
            .open(log)
        {
            let _ = writeln!(f, "{test}: no /dev/kvm");
        }
    }
    false
}

pub fn husk_bin() -> PathBuf {
    // target/<profile>/deps/e2e-… → target/<profile>/husk
    let exe = std::env::current_exe().unwrap();
    let bin = exe.parent().unwrap().parent().unwrap().join("husk");
    assert!(
        bin.exists(),
        "{} missing: build the workspace (cargo test --workspace)",
        bin.display()
    );
    bin
}

pub struct Env {
    pub dir: tempfile::TempDir,
    pub bridge: String,
    pub subnet_prefix: String,
    /// The IPv6 /64's prefix (`fd00:…:…:`), in the config only once
    /// [`dual_stack`](Self::dual_stack) made the network dual-stack.
    pub subnet6_prefix: String,
}

impl Env {
    pub fn new() -> Self {
        Self::with_backoff(100)
    }

    pub fn with_backoff(initial_ms: u64) -> Self {
        let n = NEXT.fetch_add(1, Ordering::SeqCst);
        let pid = std::process::id();
        let dir = tempfile::Builder::new()
            .prefix("husk-e2e-")
            .tempdir()
            .unwrap();
        let bridge = format!("hk{}x{n}", pid % 100000);
        let subnet_prefix = format!("10.{}.{}", 90 + (pid % 50), n % 250);
        std::fs::write(
            dir.path().join("config.toml"),
            format!(
                "[network]\ncni_conf_dir = \"{}\"\nbridge = \"{bridge}\"\nsubnet = \"{subnet_prefix}.0/24\"\nname = \"{bridge}\"\n\n[restart]\nbackoff_initial_ms = {initial_ms}\nbackoff_max_ms = {}\n",
                dir.path().join("net.d").display(),
                initial_ms * 4
            ),
        )
        .unwrap();
        Env {
            dir,
            bridge,
            subnet_prefix,
            // Groups without zeros, so that addresses start with it as
            // written (compressed).
            subnet6_prefix: format!("fd00:{:x}:{:x}::", pid % 0xfffe + 1, n % 0xfffe + 1),
        }
    }

    /// Makes husk's default network dual-stack: every pod also gets an
    /// address of `{subnet6_prefix}/64`.
    pub fn dual_stack(self) -> Self {
        let subnet = format!("subnet = \"{}.0/24\"\n", self.subnet_prefix);
        edit_file(
            &self.root().join("config.toml"),
            &subnet,
            &format!("{subnet}subnet6 = \"{}/64\"\n", self.subnet6_prefix),
        );
        self
    }

    pub fn root(&self) -> &Path {
        self.dir.path()
    }

    pub fn cmd(&self) -> Command {
        let mut c = Command::new(husk_bin());
        c.arg("--root").arg(self.root());
        c.env_remove("HUSK_ROOT");
        c
    }

    /// Runs husk with args and returns its output.
    pub fn husk(&self, args: &[&str]) -> Output {
        self.cmd().args(args).output().unwrap()
    }

    /// Runs husk with args, `input` on its stdin (then closed), and
    /// returns its output.
    pub fn husk_with_input(&self, args: &[&str], input: &[u8]) -> Output {
        use std::io::Write;
        let mut child = self
            .cmd()
            .args(args)
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        child.stdin.take().unwrap().write_all(input).unwrap();
        child.wait_with_output().unwrap()
    }

    /// Writes a manifest into the test dir and returns its path.
    pub fn manifest(&self, name: &str, text: &str) -> PathBuf {
        let text = text
            .replace("$NETPROBE", netprobe().to_str().unwrap())
            .replace("$PROBE_P2", probe_p2().to_str().unwrap())
            .replace("$PROBE", probe().to_str().unwrap());
        let p = self.root().join(name);
        std::fs::write(&p, text).unwrap();
        p
    }

    pub fn run_file(&self, file: &Path, extra: &[&str]) -> Output {
        let mut args = vec!["run"];
        args.extend_from_slice(extra);
        args.push("-f");
        args.push(file.to_str().unwrap());
        self.husk(&args)
    }

    pub fn inspect(&self, pod: &str) -> serde_json::Value {
        let out = self.husk(&["inspect", pod]);
        assert!(
            out.status.success(),
            "inspect {pod}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).unwrap()
    }

    pub fn container<'a>(&self, v: &'a serde_json::Value, name: &str) -> &'a serde_json::Value {
        let st = &v["status"];
        st["containerStatuses"]
            .as_array()
            .unwrap()
            .iter()
            .chain(st["initContainerStatuses"].as_array().unwrap().iter())
            .find(|c| c["name"] == name)
            .unwrap_or_else(|| panic!("no container {name} in {v}"))
    }

    /// Polls inspect until `pred` holds.
    pub fn wait_for(
        &self,
        pod: &str,
        what: &str,
        pred: impl Fn(&serde_json::Value) -> bool,
    ) -> serde_json::Value {
        let t0 = Instant::now();
        loop {
            let v = self.inspect(pod);
            if pred(&v) {
                return v;
            }
            assert!(
                t0.elapsed() < Duration::from_secs(30),
                "timed out waiting for {what}: {v:#}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn pod_dirs(&self) -> usize {
        std::fs::read_dir(self.root().join("lib/pods"))
            .map(|r| r.count())
            .unwrap_or(0)
    }

    /// What this test's root still holds on the host.
    pub fn leftovers(&self) -> Vec<String> {
        let mut out = Vec::new();
        if let Ok(rd) = std::fs::read_dir(self.root().join("run/netns")) {
            for e in rd.flatten() {
                out.push(format!("netns {}", e.path().display()));
            }
        }
        let root = self.root().to_str().unwrap().to_owned();
        for l in std::fs::read_to_string("/proc/self/mountinfo")
            .unwrap()
            .lines()
        {
            if let Some(m) = l.split(' ').nth(4) {
                if m.starts_with(&root) {
                    out.push(format!("mount {m}"));
                }
            }
        }
        if let Ok(o) = Command::new("ip")
            .args(["-o", "link", "show", "master", &self.bridge])
            .output()
        {
            for l in String::from_utf8_lossy(&o.stdout).lines() {
                out.push(format!("link {l}"));
            }
        }
        for e in std::fs::read_dir("/proc").unwrap().flatten() {
            let Ok(cmdline) = std::fs::read(e.path().join("cmdline")) else {
                continue;
            };
            let s = String::from_utf8_lossy(&cmdline).replace('\0', " ");
            let ours = s.contains(" monitor ")
                || s.contains("qemu-system")
                || s.contains("virtiofsd")
                || s.contains("husk-vmm");
            if ours && s.contains(&root) {
                out.push(format!("process {} {s}", e.file_name().to_string_lossy()));
            }
        }
        // VM pods' claims on a hypervisor uid (host-wide; each names the
        // VM's run directory).
        for e in std::fs::read_dir(husk_sandbox::vm::identity::HOST_CLAIMS)
            .into_iter()
            .flatten()
            .flatten()
        {
            if std::fs::read_to_string(e.path()).is_ok_and(|c| c.contains(&root)) {
                out.push(format!("vm uid claim {}", e.path().display()));
            }
        }
        // virtiofsd's pid files name the socket, which is under the root.
        let escaped = root.replace('/', ".");
        for e in std::fs::read_dir("/run/virtiofsd")
            .into_iter()
            .flatten()
            .flatten()
        {
            if e.file_name().to_string_lossy().contains(&escaped) {
                out.push(format!("file {}", e.path().display()));
            }
        }
        out
    }

    /// Removes every pod, then asserts nothing is left.
    pub fn finish(self) {
        let ids: Vec<String> = std::fs::read_dir(self.root().join("lib/pods"))
            .map(|r| {
                r.flatten()
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_default();
        for id in &ids {
            let out = self.husk(&["rm", "-f", id]);
            assert!(
                out.status.success(),
                "rm -f {id}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        for id in &ids {
            for h in ["/sys/fs/cgroup/cpu/husk", "/sys/fs/cgroup/husk"] {
                assert!(
                    !Path::new(h).join(id).exists(),
                    "cgroup of pod {id} left in {h}"
                );
            }
        }
        let left = self.leftovers();
        assert!(left.is_empty(), "left behind: {left:#?}");
    }
}

impl Drop for Env {
    fn drop(&mut self) {
        // A test that failed half-way still removes its pods (best effort).
        if let Ok(rd) = std::fs::read_dir(self.root().join("lib/pods")) {
            for e in rd.flatten() {
                let _ = self.cmd().args(["rm", "-f"]).arg(e.file_name()).output();
            }
        }
        let _ = Command::new("ip")
            .args(["link", "del", &self.bridge])
            .output();
    }
}

/// An Env whose config points VM pods at the static agent and kernel B.
pub fn vm_env() -> Env {
    let env = Env::new();
    let cfg = env.root().join("config.toml");
    let mut text = std::fs::read_to_string(&cfg).unwrap();
    text.push_str(&format!(
        "\n[vm]\nagent = \"{}\"\nkernel = \"{}\"\n",
        husk_tests::static_agent().display(),
        image("kernel-b.bzImage").display()
    ));
    std::fs::write(&cfg, text).unwrap();
    env
}

/// Replaces `from` (which must be there) with `to` in the file at `path`.
pub fn edit_file(path: &Path, from: &str, to: &str) {
    let text = std::fs::read_to_string(path).unwrap();
    assert!(
        text.contains(from),
        "{}: no {from:?} in {text}",
        path.display()
    );
    std::fs::write(path, text.replacen(from, to, 1)).unwrap();
}

pub fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// Runs `cmd` inside the netns pinned at `netns`, entering it with nsenter
/// (not `ip netns exec`, which remounts /sys).
pub fn in_netns(netns: &Path, cmd: &[&str]) -> Output {
    Command::new("nsenter")
        .arg(format!("--net={}", netns.display()))
        .args(cmd)
        .output()
        .unwrap()
}

/// A shell script for husk-agent to run: `/bin/sh -c script`, PATH=/bin.
pub fn sh(id: &str, script: &str) -> husk_protocol::StartRequest {
    husk_protocol::StartRequest {
        id: id.into(),
        argv: vec!["/bin/sh".into(), "-c".into(), script.into()],
        env: vec!["PATH=/bin".into()],
        ..Default::default()
    }
}
