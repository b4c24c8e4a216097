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

/// Spawns `husk run -d ARGS` and waits for the pod's monitor to appear;
/// the `husk run` process, and the monitor's pid and pod id.
// The child is handed to the caller, which waits for it.
#[allow(clippy::zombie_processes)]
fn run_until_monitor(env: &Env, args: &[&str]) -> (std::process::Child, i32, String) {
    let mut child = env
        .cmd()
        .arg("run")
        .arg("-d")
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let t0 = Instant::now();
    loop {
        if let Some((monitor, id)) = children_with(child.id(), "monitor").into_iter().next() {
            return (child, monitor, id);
        }
        if t0.elapsed() > Duration::from_secs(30) {
            let _ = child.kill();
            let out = child.wait_with_output().unwrap();
            panic!("no monitor appeared: {}", stderr(&out));
        }
        std::thread::sleep(Duration::from_micros(200));
    }
}

/// Runs `husk run -d ARGS`, kills the pod's monitor with SIGKILL `delay`
/// after it appears, and returns what `husk run` printed and the pod's id.
fn run_killing_monitor(env: &Env, args: &[&str], delay: Duration) -> (Output, String) {
    let (child, monitor, id) = run_until_monitor(env, args);
    std::thread::sleep(delay);
    // SAFETY: kill(2) of the monitor this test's `husk run` started.
    unsafe { libc::kill(monitor, libc::SIGKILL) };
    (child.wait_with_output().unwrap(), id)
}

/// How long `husk run -d ARGS` takes from its monitor's appearance until
/// it returns (the start's length on this machine, now), and until the
/// pod's container `main` runs; the pod is removed again.
fn start_length(env: &Env, args: &[&str], name: &str) -> (Duration, Duration) {
    let (child, _, _) = run_until_monitor(env, args);
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
  # A wasm guest's SIGTERM is EOF on stdin, which `sleep` ignores: the
  # grace period runs out, then it is killed.
  terminationGracePeriodSeconds: 1
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

/// Where a lifecycle is cut short by a kill -9.
#[derive(Debug, Clone, Copy)]
enum Cut {
    MonitorAtStart,
    CliAtStart,
    MonitorRunning,
    CliAtStop,
    MonitorAtStop,
    CliAtRm,
    Nowhere,
}

const CUTS: [Cut; 7] = [
    Cut::MonitorAtStart,
    Cut::CliAtStart,
    Cut::MonitorRunning,
    Cut::CliAtStop,
    Cut::MonitorAtStop,
    Cut::CliAtRm,
    Cut::Nowhere,
];

/// Spawns `husk ARGS` and kills it with SIGKILL after `delay` (if it
/// has not ended by then); waits for it.
fn husk_killed_after(env: &Env, args: &[&str], delay: Duration) -> Output {
    let mut child = env
        .cmd()
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(delay);
    let _ = child.kill();
    child.wait_with_output().unwrap()
}

/// The ids of the pods `env` has state of (after `husk ps`, which
/// collects what killed processes left half-made: no other entry may be
/// there then).
fn pod_ids(env: &Env) -> Vec<String> {
    assert!(env.husk(&["ps"]).status.success());
    let ids: Vec<String> = std::fs::read_dir(env.root().join("lib/pods"))
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    for id in &ids {
        assert!(
            env.root()
                .join("lib/pods")
                .join(id)
                .join("pod.json")
                .is_file(),
            "lib/pods/{id} holds no pod record"
        );
    }
    ids
}

/// One pod lifecycle through the CLI (`husk run -d ARGS`, stop, rm), cut
/// by `cut` at a random point within `span`, then `husk rm -f` of whatever
/// is left must succeed and leave nothing. Returns whether the pod's
/// container was seen running.
fn cli_lifecycle(
    env: &Env,
    rng: &mut Rng,
    args: &[&str],
    name: &str,
    span: Duration,
    cut: Cut,
) -> bool {
    let delay = Duration::from_micros(rng.below(span.as_micros() as u64));
    let what = format!("{name}: {cut:?} after {delay:?}");
    let mut ids = Vec::new();
    let mut ran = false;
    let run: Vec<&str> = ["run", "-d"]
        .iter()
        .copied()
        .chain(args.iter().copied())
        .collect();
    match cut {
        Cut::MonitorAtStart => {
            let (_, id) = run_killing_monitor(env, args, delay);
            ids.push(id);
        }
        Cut::CliAtStart => {
            husk_killed_after(env, &run, delay);
        }
        _ => {
            let out = env.husk(&run);
            assert!(out.status.success(), "{what}: {}", stderr(&out));
            let v = env.wait_for(name, "the container to run", |v| {
                env.container(v, "main")["state"]["running"].is_object()
            });
            ran = true;
            let monitor = v["status"]["monitorPid"].as_i64().unwrap() as i32;
            let kill_monitor = || {
                // SAFETY: kill(2) of the monitor of this test's pod.
                unsafe { libc::kill(monitor, libc::SIGKILL) };
            };
            match cut {
                Cut::MonitorRunning => kill_monitor(),
                Cut::CliAtStop => {
                    husk_killed_after(env, &["stop", name], delay);
                }
                Cut::MonitorAtStop => {
                    let stop = env
                        .cmd()
                        .args(["stop", name])
                        .stdout(Stdio::null())
                        .stderr(Stdio::null())
                        .spawn();
                    std::thread::sleep(delay);
                    kill_monitor();
                    let _ = stop.unwrap().wait();
                }
                Cut::CliAtRm => {
                    husk_killed_after(env, &["rm", "-f", name], delay);
                }
                _ => {
                    let out = env.husk(&["stop", name]);
                    assert!(out.status.success(), "{what}: {}", stderr(&out));
                }
            }
        }
    }
    for id in pod_ids(env) {
        let rm = env.husk(&["rm", "-f", &id]);
        assert!(
            rm.status.success(),
            "{what}: husk rm -f {id}: {}",
            stderr(&rm)
        );
        ids.push(id);
    }
    for id in &ids {
        let left = leaks(env, id);
        assert!(left.is_empty(), "{what}: left behind: {left:#?}");
    }
    let left = env.leftovers();
    assert!(left.is_empty(), "{what}: left behind: {left:#?}");
    ran
}

/// One pod sandbox lifecycle through huskd (RunPodSandbox, CreateContainer,
/// StartContainer, StopPodSandbox, RemovePodSandbox), with huskd or the
/// sandbox's monitor killed -9 at a random point within `span` of a random
/// call. After a huskd kill it is started again and, as the kubelet's
/// garbage collection does, stops and removes every sandbox it lists.
/// Nothing of any sandbox may be left.
fn cri_lifecycle(
    env: &Env,
    huskd: &mut common::huskd::Huskd,
    rng: &mut Rng,
    image: &str,
    data: &Path,
    n: u64,
    span: Duration,
) {
    use k8s_cri::v1 as cri;
    use k8s_cri::v1::runtime_service_client::RuntimeServiceClient;
    let at = rng.below(4); // 0 run, 1 create+start, 2 stop, 3 nowhere
    let kill_huskd = rng.below(2) == 0;
    let delay = Duration::from_micros(rng.below(span.as_micros() as u64));
    let what = format!(
        "cri {n}: kill {} at call {at} after {delay:?}",
        if kill_huskd { "huskd" } else { "the monitor" }
    );
    let name = format!("chaos-{n}");
    let config = cri::PodSandboxConfig {
        metadata: Some(cri::PodSandboxMetadata {
            name: name.clone(),
            uid: format!("uid-{name}"),
            namespace: "default".into(),
            attempt: 0,
        }),
        log_directory: env
            .root()
            .join("kubelet-logs")
            .join(&name)
            .display()
            .to_string(),
        ..Default::default()
    };
    let socket = huskd.socket.clone();
    let roots = husk_sandbox::state::Roots::new(Some(env.root()));
    let rt = husk_tests::rt();
    let killed = rt.block_on(async {
        let mut rs = RuntimeServiceClient::new(husk_tests::cri_channel(&socket).await);
        // Each step: the call, and whether the kill lands during it.
        let mut id = String::new();
        for step in 0..3u64 {
            let mut rs2 = rs.clone();
            let config = config.clone();
            let id2 = id.clone();
            let image = image.to_owned();
            let data = data.display().to_string();
            let call = tokio::spawn(async move {
                match step {
                    0 => rs2
                        .run_pod_sandbox(cri::RunPodSandboxRequest {
                            config: Some(config),
                            runtime_handler: "husk-wasm".into(),
                        })
                        .await
                        .map(|r| r.into_inner().pod_sandbox_id),
                    1 => {
                        let c = rs2
                            .create_container(cri::CreateContainerRequest {
                                pod_sandbox_id: id2.clone(),
                                config: Some(cri::ContainerConfig {
                                    metadata: Some(cri::ContainerMetadata {
                                        name: "main".into(),
                                        attempt: 0,
                                    }),
                                    image: Some(cri::ImageSpec {
                                        image,
                                        ..Default::default()
                                    }),
                                    args: vec!["sleep".into(), "30".into()],
                                    mounts: vec![cri::Mount {
                                        container_path: "/data".into(),
                                        host_path: data,
                                        ..Default::default()
                                    }],
                                    log_path: "main_0.log".into(),
                                    ..Default::default()
                                }),
                                sandbox_config: Some(config),
                            })
                            .await?
                            .into_inner()
                            .container_id;
                        rs2.start_container(cri::StartContainerRequest {
                            container_id: c.clone(),
                        })
                        .await
                        .map(|_| c)
                    }
                    _ => rs2
                        .stop_pod_sandbox(cri::StopPodSandboxRequest {
                            pod_sandbox_id: id2,
                        })
                        .await
                        .map(|_| String::new()),
                }
            });
            if step == at {
                tokio::time::sleep(delay).await;
                if kill_huskd {
                    huskd.kill9();
                } else if let Some(pid) = pod_ids(env)
                    .iter()
                    .find_map(|i| husk_sandbox::state::live_monitor(&roots.pod(i)))
                {
                    // SAFETY: kill(2) of the monitor of this test's sandbox.
                    unsafe { libc::kill(pid as i32, libc::SIGKILL) };
                }
                let _ = call.await;
                return true;
            }
            let r = call
                .await
                .unwrap()
                .unwrap_or_else(|e| panic!("{what}: step {step}: {e}"));
            if step == 0 {
                id = r;
            }
        }
        rs.remove_pod_sandbox(cri::RemovePodSandboxRequest { pod_sandbox_id: id })
            .await
            .unwrap_or_else(|e| panic!("{what}: remove: {e}"));
        false
    });
    let seen = pod_ids(env);
    if killed {
        if kill_huskd {
            *huskd = common::huskd::Huskd::start(env);
        }
        // The kubelet's garbage collection: every sandbox huskd lists is
        // stopped and removed.
        rt.block_on(async {
            let mut rs = RuntimeServiceClient::new(husk_tests::cri_channel(&huskd.socket).await);
            let items = rs
                .list_pod_sandbox(cri::ListPodSandboxRequest { filter: None })
                .await
                .unwrap_or_else(|e| panic!("{what}: list: {e}"))
                .into_inner()
                .items;
            for sb in items {
                rs.stop_pod_sandbox(cri::StopPodSandboxRequest {
                    pod_sandbox_id: sb.id.clone(),
                })
                .await
                .unwrap_or_else(|e| panic!("{what}: stop {}: {e}", sb.id));
                rs.remove_pod_sandbox(cri::RemovePodSandboxRequest {
                    pod_sandbox_id: sb.id.clone(),
                })
                .await
                .unwrap_or_else(|e| panic!("{what}: remove {}: {e}", sb.id));
            }
        });
    }
    let ids = pod_ids(env);
    assert!(
        ids.is_empty(),
        "{what}: sandboxes left after removal: {ids:?}"
    );
    for id in &seen {
        let left = leaks(env, id);
        assert!(left.is_empty(), "{what}: left behind: {left:#?}");
    }
    let left = env.leftovers();
    assert!(left.is_empty(), "{what}: left behind: {left:#?}");
}

/// The chaos test of #22: 200 pod lifecycles, wasm and VM, through the CLI
/// and through huskd, each cut by a kill -9 of the monitor, the CLI or
/// huskd at a random point (or not cut), each followed by a leak scan;
/// the hostPath every pod mounts loses no byte.
#[test]
fn two_hundred_lifecycles_cut_by_kill_9_leak_nothing_and_lose_no_volume_byte() {
    let reg = husk_tests::Registry::start();
    let vm = have_kvm("two_hundred_lifecycles_cut_by_kill_9 (its 30 VM lifecycles)");
    let env = if vm { vm_env() } else { Env::new() };
    let mut rng = Rng::new("chaos");
    // The user's data: a hostPath every pod mounts read-write.
    let data = env.root().join("data");
    std::fs::create_dir(&data).unwrap();
    let precious: Vec<u8> = (0..1 << 20).map(|_| rng.below(256) as u8).collect();
    std::fs::write(data.join("precious"), &precious).unwrap();
    let wasm = wasm_manifest(&env, "wasmpod", 30000 + (std::process::id() % 10000) as u16);
    edit_file(
        &wasm,
        "  volumes:\n",
        &format!(
            "    - {{name: data, mountPath: /data}}\n  volumes:\n  - {{name: data, hostPath: {{path: {}}}}}\n",
            data.display()
        ),
    );
    let wasm_args = ["-f", wasm.to_str().unwrap()];
    start_length(&env, &wasm_args, "wasmpod");
    let (wasm_span, _) = start_length(&env, &wasm_args, "wasmpod");
    let mut ran = 0;
    let mut cuts = std::collections::BTreeMap::<String, u32>::new();
    let t0 = Instant::now();
    let mut slowest = (Duration::ZERO, String::new());
    let mut note = |what: String, t: Instant| {
        if t.elapsed() > slowest.0 {
            slowest = (t.elapsed(), what);
        }
    };
    for _ in 0..120 {
        let t = Instant::now();
        let cut = CUTS[rng.below(CUTS.len() as u64) as usize];
        *cuts.entry(format!("wasm {cut:?}")).or_default() += 1;
        ran += usize::from(cli_lifecycle(
            &env,
            &mut rng,
            &wasm_args,
            "wasmpod",
            wasm_span * 5 / 4,
            cut,
        ));
        note(format!("wasm {cut:?}"), t);
    }
    println!("120 wasm lifecycles: {:?}", t0.elapsed());
    let t0 = Instant::now();
    if vm {
        let reference = husk_tests::push_busybox_image(&reg, "tests/busybox:chaos");
        let m = env.manifest(
            "vm.yaml",
            &format!(
                r#"apiVersion: v1
kind: Pod
metadata:
  name: vmpod
spec:
  runtimeClassName: husk-vm
  terminationGracePeriodSeconds: 2
  containers:
  - name: main
    image: {reference}
    command: ["/bin/sh", "-c", "trap 'exit 0' TERM; sleep 30 & wait"]
    volumeMounts:
    - {{name: data, mountPath: /data}}
  volumes:
  - {{name: data, hostPath: {{path: {}}}}}
"#,
                data.display()
            ),
        );
        let args = ["-f", m.to_str().unwrap()];
        start_length(&env, &args, "vmpod");
        let (_, vm_span) = start_length(&env, &args, "vmpod");
        for _ in 0..30 {
            let t = Instant::now();
            let cut = CUTS[rng.below(CUTS.len() as u64) as usize];
            *cuts.entry(format!("vm {cut:?}")).or_default() += 1;
            ran += usize::from(cli_lifecycle(&env, &mut rng, &args, "vmpod", vm_span, cut));
            note(format!("vm {cut:?}"), t);
        }
        println!("30 VM lifecycles: {:?}", t0.elapsed());
    }
    let image = husk_tests::push_wasm(&reg, "tests/probe:chaos", &probe());
    let mut huskd = common::huskd::Huskd::start(&env);
    rt_pull(&huskd, &image);
    let t0 = Instant::now();
    for n in 0..50 {
        let t = Instant::now();
        cri_lifecycle(
            &env,
            &mut huskd,
            &mut rng,
            &image,
            &data,
            n,
            Duration::from_millis(400),
        );
        note(format!("cri {n}"), t);
    }
    println!("50 CRI lifecycles: {:?}", t0.elapsed());
    println!(
        "cuts: {cuts:?}; {ran} CLI pods ran before their cut; the slowest lifecycle: {slowest:?}"
    );
    assert_eq!(
        std::fs::read(data.join("precious")).unwrap(),
        precious,
        "the hostPath's file changed"
    );
    drop(huskd);
    env.finish();
}

/// Pulls `image` through huskd's image service.
fn rt_pull(huskd: &common::huskd::Huskd, image: &str) {
    use k8s_cri::v1 as cri;
    husk_tests::rt().block_on(async {
        let mut is =
            k8s_cri::v1::image_service_client::ImageServiceClient::new(huskd.channel().await);
        is.pull_image(cri::PullImageRequest {
            image: Some(cri::ImageSpec {
                image: image.into(),
                ..Default::default()
            }),
            ..Default::default()
        })
        .await
        .unwrap();
    });
}

/// A CNI DEL that fails when a pod ends normally: its network record and
/// the pod are kept, `husk rm` says what failed and retries the DEL, and
/// succeeds once the plugin does (#22: the monitor removed its run dir,
/// network record and all, so nothing ever retried).
#[test]
fn a_failed_cni_del_at_a_pods_end_is_retried_by_rm() {
    let env = Env::new();
    let bin = env.root().join("cni-bin");
    std::fs::create_dir_all(&bin).unwrap();
    let fail = env.root().join("del-fails");
    let released = env.root().join("del-released");
    // A chained plugin: tuning does the work (it passes the previous
    // result through); DEL fails while `fail` exists.
    let plugin = bin.join("husk-test-faildel");
    std::fs::write(
        &plugin,
        format!(
            "#!/bin/sh\nif [ \"$CNI_COMMAND\" = DEL ]; then\n  if [ -e {f} ]; then\n    echo '{{\"cniVersion\":\"1.0.0\",\"code\":11,\"msg\":\"test plugin: DEL refused\"}}'\n    exit 1\n  fi\n  touch {r}\nfi\nexec /usr/lib/cni/tuning\n",
            f = fail.display(),
            r = released.display()
        ),
    )
    .unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&plugin, std::fs::Permissions::from_mode(0o755)).unwrap();
    let netd = env.root().join("net.d");
    std::fs::create_dir_all(&netd).unwrap();
    std::fs::write(
        netd.join("10-faildel.conflist"),
        serde_json::json!({
            "cniVersion": "1.0.0",
            "name": env.bridge,
            "plugins": [
                {
                    "type": "bridge",
                    "bridge": env.bridge,
                    "isGateway": true,
                    "ipam": {
                        "type": "host-local",
                        "ranges": [[{ "subnet": format!("{}.0/24", env.subnet_prefix) }]],
                        "dataDir": env.root().join("ipam"),
                    }
                },
                { "type": "husk-test-faildel" }
            ]
        })
        .to_string(),
    )
    .unwrap();
    edit_file(
        &env.root().join("config.toml"),
        "[network]\n",
        &format!(
            "[network]\ncni_bin_dirs = [\"{}\", \"/usr/lib/cni\"]\n",
            bin.display()
        ),
    );

    std::fs::write(&fail, b"").unwrap();
    let m = env.manifest(
        "faildel.yaml",
        "apiVersion: v1\nkind: Pod\nmetadata: {name: faildel}\nspec:\n  restartPolicy: Never\n  containers:\n  - {name: a, image: $PROBE, args: [exit, \"0\"]}\n",
    );
    let run = env.run_file(&m, &[]);
    assert!(run.status.success(), "husk run: {}", stderr(&run));
    let ids: Vec<String> = std::fs::read_dir(env.root().join("lib/pods"))
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| !n.starts_with('.'))
        .collect();
    assert_eq!(ids.len(), 1, "one pod: {ids:?}");
    let id = &ids[0];
    assert!(!released.exists(), "the DEL was refused");

    let rm = env.husk(&["rm", "faildel"]);
    assert!(
        !rm.status.success(),
        "husk rm must fail while the DEL does (and keep the pod to retry)"
    );
    assert!(
        stderr(&rm).contains("DEL refused"),
        "the error says what failed: {}",
        stderr(&rm)
    );
    assert!(stdout(&env.husk(&["ps"])).contains("faildel"));

    std::fs::remove_file(&fail).unwrap();
    let rm = env.husk(&["rm", "faildel"]);
    assert!(rm.status.success(), "husk rm: {}", stderr(&rm));
    assert!(released.exists(), "husk rm retried the DEL");
    let left = leaks(&env, id);
    assert!(left.is_empty(), "left behind: {left:#?}");
}
