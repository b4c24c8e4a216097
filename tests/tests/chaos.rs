//! #22 item 1: a pod monitor killed with -9 at any point of its start leaves
//! nothing that `husk rm` cannot release. Before, a kill in the first
//! milliseconds (wasm) or during the boot (VM) left the netns, veth, IP
//! lease, cgroup and hostPort DNAT chain behind, and `husk run` deleted the
//! pod's directories, so the pod was gone from `husk ps`, `husk rm` said it
//! did not exist, and the error named a monitor.log that was just deleted.
//!
//! Each try kills the monitor at a random point of its start (the seed is
//! printed; `HUSK_CHAOS_SEED` replays it), then `husk rm -f` must remove the
//! pod and a leak scan must find nothing: netns, links on the test's
//! bridge, mounts, processes, cgroups, IP leases, iptables rules, VM uid
//! claims, virtiofsd pid files.

mod common;

use common::*;
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

/// xorshift64*: enough to spread kill points; replayable from its seed.
pub struct Rng(u64);

impl Rng {
    pub fn new(test: &str) -> Self {
        let seed = std::env::var("HUSK_CHAOS_SEED")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| {
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .unwrap()
                    .as_nanos() as u64
                    | 1
            });
        println!("{test}: HUSK_CHAOS_SEED={seed}");
        Rng(seed)
    }

    pub fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d) % n.max(1)
    }
}

/// The children of `pid` whose command line has `word`.
fn children_with(pid: u32, word: &str) -> Vec<(i32, String)> {
    let list =
        std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children")).unwrap_or_default();
    list.split_whitespace()
        .filter_map(|c| c.parse::<i32>().ok())
        .filter_map(|c| {
            let cmd = std::fs::read(format!("/proc/{c}/cmdline")).ok()?;
            let args: Vec<String> = cmd
                .split(|b| *b == 0)
                .map(|a| String::from_utf8_lossy(a).into_owned())
                .collect();
            let at = args.iter().position(|a| a == word)?;
            let id = args
                .iter()
                .skip(at)
                .skip_while(|a| *a != "--id")
                .nth(1)?
                .clone();
            Some((c, id))
        })
        .collect()
}

/// Runs `husk run -d ARGS`, kills the pod's monitor with SIGKILL `delay`
/// after it appears, and returns what `husk run` printed and the pod's id.
fn run_killing_monitor(env: &Env, args: &[&str], delay: Duration) -> (Output, String) {
    let child = env
        .cmd()
        .arg("run")
        .arg("-d")
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let t0 = Instant::now();
    let (monitor, id) = loop {
        if let Some(m) = children_with(child.id(), "monitor").into_iter().next() {
            break m;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(30),
            "no monitor appeared"
        );
        std::thread::sleep(Duration::from_micros(200));
    };
    std::thread::sleep(delay);
    // SAFETY: kill(2) of the monitor this test's `husk run` started.
    unsafe { libc::kill(monitor, libc::SIGKILL) };
    (child.wait_with_output().unwrap(), id)
}

/// How long `husk run -d ARGS` takes from its monitor's appearance until
/// it returns (the start's length on this machine, now), and until the
/// pod's container `main` runs; the pod is removed again.
fn start_length(env: &Env, args: &[&str], name: &str) -> (Duration, Duration) {
    let child = env
        .cmd()
        .arg("run")
        .arg("-d")
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    while children_with(child.id(), "monitor").is_empty() {
        std::thread::sleep(Duration::from_micros(200));
    }
    let t0 = Instant::now();
    let out = child.wait_with_output().unwrap();
    let ready = t0.elapsed();
    assert!(out.status.success(), "{}", stderr(&out));
    env.wait_for(name, "the container to run", |v| {
        env.container(v, "main")["state"]["running"].is_object()
    });
    let running = t0.elapsed();
    assert!(env.husk(&["rm", "-f", name]).status.success());
    (ready, running)
}

/// Kill points for `tries` tries over `0..span`: one in each of as many
/// equal slices, at a random place in it.
fn kill_points(rng: &mut Rng, span: Duration, tries: u32) -> Vec<Duration> {
    let slice = span / tries;
    (0..tries)
        .map(|i| slice * i + Duration::from_micros(rng.below(slice.as_micros() as u64)))
        .collect()
}

/// What the pod `id` of `env` still holds anywhere on the host.
pub fn leaks(env: &Env, id: &str) -> Vec<String> {
    let mut out = env.leftovers();
    for h in ["/sys/fs/cgroup/husk", "/sys/fs/cgroup/cpu/husk"] {
        if Path::new(h).join(id).exists() {
            out.push(format!("cgroup {h}/{id}"));
        }
    }
    // host-local's leases: one file per address, holding the container id.
    let ipam = env.root().join("lib/cni/ipam");
    for net in std::fs::read_dir(&ipam).into_iter().flatten().flatten() {
        for f in std::fs::read_dir(net.path())
            .into_iter()
            .flatten()
            .flatten()
        {
            if std::fs::read_to_string(f.path()).is_ok_and(|c| c.contains(id)) {
                out.push(format!("IP lease {}", f.path().display()));
            }
        }
    }
    // portmap's DNAT chains and rules carry the container id in comments.
    for save in ["iptables-save", "ip6tables-save"] {
        let o = Command::new(save).output().unwrap();
        for l in String::from_utf8_lossy(&o.stdout).lines() {
            if l.contains(id) {
                out.push(format!("{save}: {l}"));
            }
        }
    }
    if env.root().join("lib/pods").join(id).exists()
        || env.root().join("run/pods").join(id).exists()
    {
        out.push(format!("pod directory of {id}"));
    }
    out
}

/// After a kill: a failed start names a log that exists; the pod is known
/// to husk (`ps`), `husk rm -f` removes it, and nothing of it is left.
fn assert_removable_and_released(env: &Env, name: &str, id: &str, run: &Output, what: &str) {
    let err = stderr(run);
    if !run.status.success() {
        for word in err.split_whitespace() {
            let word = word.trim_end_matches([';', ',', ')', '.']);
            if word.ends_with(".log") {
                assert!(
                    Path::new(word).exists(),
                    "{what}: the failed start names {word}, which is gone: {err}"
                );
            }
        }
    }
    let ps = stdout(&env.husk(&["ps"]));
    assert!(
        ps.contains(name),
        "{what}: the pod is not in husk ps ({}): {ps}",
        err.trim()
    );
    let rm = env.husk(&["rm", "-f", name]);
    assert!(
        rm.status.success(),
        "{what}: husk rm -f {name}: {} (run said: {})",
        stderr(&rm),
        err.trim()
    );
    let left = leaks(env, id);
    assert!(left.is_empty(), "{what}: left behind: {left:#?}");
}

fn wasm_manifest(env: &Env, name: &str, host_port: u16) -> std::path::PathBuf {
    env.manifest(
        &format!("{name}.yaml"),
        &format!(
            r#"apiVersion: v1
kind: Pod
metadata:
  name: {name}
spec:
  containers:
  - name: main
    image: $PROBE
    args: ["sleep", "30"]
    resources:
      limits: {{cpu: 500m}}
    ports:
    - {{containerPort: 8080, hostPort: {host_port}}}
    volumeMounts:
    - {{name: scratch, mountPath: /scratch}}
  volumes:
  - {{name: scratch, emptyDir: {{}}}}
"#
        ),
    )
}

#[test]
fn a_wasm_monitor_killed_at_any_point_of_its_start_leaves_nothing_rm_cannot_release() {
    let env = Env::new();
    let mut rng = Rng::new("wasm start kills");
    let host_port = 30000 + (std::process::id() % 10000) as u16;
    let m = wasm_manifest(&env, "victim", host_port);
    let args = ["-f", m.to_str().unwrap()];
    // The start (CNI ADD of bridge, host-local and portmap, the cgroup,
    // the volumes, the guest's compile or cache load) as it runs now; the
    // kills spread over it and a little past it.
    // Twice: the first compiles the guest, the tries load it from the
    // cache.
    start_length(&env, &args, "victim");
    let (ready, _) = start_length(&env, &args, "victim");
    let points = kill_points(&mut rng, ready * 5 / 4, 24);
    let mut during_start = 0;
    for (i, delay) in points.into_iter().enumerate() {
        let (run, id) = run_killing_monitor(&env, &args, delay);
        during_start += usize::from(!run.status.success());
        let what = format!("try {i}, kill after {delay:?}");
        assert_removable_and_released(&env, "victim", &id, &run, &what);
    }
    println!("start {ready:?}: {during_start} of 24 kills landed before husk run returned");
    // The tries must have hit the start, not only the running pod.
    assert!(during_start > 0, "no kill landed during the start");
    env.finish();
}

#[test]
fn a_vm_monitor_killed_at_any_point_of_its_boot_leaves_nothing_rm_cannot_release() {
    if !have_kvm("a_vm_monitor_killed_at_any_point_of_its_boot_leaves_nothing_rm_cannot_release") {
        return;
    }
    let reg = husk_tests::Registry::start();
    let reference = husk_tests::push_busybox_image(&reg, "tests/busybox:chaos");
    let env = vm_env();
    let mut rng = Rng::new("vm start kills");
    let host_port = 40000 + (std::process::id() % 10000) as u16;
    let m = env.manifest(
        "vm.yaml",
        &format!(
            r#"apiVersion: v1
kind: Pod
metadata:
  name: vmvictim
spec:
  runtimeClassName: husk-vm
  containers:
  - name: main
    image: {reference}
    command: ["/bin/sh", "-c", "sleep 30"]
    ports:
    - {{containerPort: 8080, hostPort: {host_port}}}
    volumeMounts:
    - {{name: scratch, mountPath: /scratch}}
  volumes:
  - {{name: scratch, emptyDir: {{}}}}
"#
        ),
    );
    let args = ["-f", m.to_str().unwrap()];
    // Once to pull the image (the tries kill the boot, not the pull), then
    // the kills spread over the boot as it runs now: until `husk run`
    // returns (the VM is made and its agent answers) and on until the
    // container runs.
    start_length(&env, &args, "vmvictim");
    let (ready, running) = start_length(&env, &args, "vmvictim");
    let points = kill_points(&mut rng, running, 8);
    let mut during_start = 0;
    for (i, delay) in points.into_iter().enumerate() {
        let (run, id) = run_killing_monitor(&env, &args, delay);
        during_start += usize::from(!run.status.success());
        let what = format!("try {i}, kill after {delay:?}");
        assert_removable_and_released(&env, "vmvictim", &id, &run, &what);
    }
    println!(
        "start {ready:?}, running {running:?}: {during_start} of 8 kills landed before husk run returned"
    );
    assert!(during_start > 0, "no kill landed before husk run returned");
    env.finish();
}
