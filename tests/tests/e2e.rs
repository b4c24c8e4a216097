//! End-to-end tests: real manifests, the real `husk` binary, real wasmtime,
//! real CNI plugins, real mounts and cgroups. Each test checks that nothing
//! is left behind.

mod common;
use common::*;
use std::time::{Duration, Instant};

#[test]
fn p1_module_args_env_configmap_and_exit_code() {
    let env = Env::new();
    let m = env.manifest(
        "pod.yaml",
        r#"
apiVersion: v1
kind: ConfigMap
metadata: {name: settings}
data: {colour: blue, greeting: hello}
---
apiVersion: v1
kind: Pod
metadata: {name: one, labels: {app: probe}}
spec:
  restartPolicy: Never
  containers:
  - name: main
    image: $PROBE
    args: ["env", "COLOUR", "GREETING", "PREFIXED_colour", "EXPANDED"]
    env:
    - {name: COLOUR, valueFrom: {configMapKeyRef: {name: settings, key: colour}}}
    - {name: EXPANDED, value: "sky is $(COLOUR)"}
    envFrom:
    - {prefix: PREFIXED_, configMapRef: {name: settings}}
"#,
    );
    let out = env.run_file(&m, &[]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert_eq!(
        stdout(&out),
        "COLOUR=blue\nGREETING=<unset>\nPREFIXED_colour=blue\nEXPANDED=sky is blue\n"
    );
    let v = env.inspect("one");
    assert_eq!(v["status"]["phase"], "Succeeded");
    assert_eq!(v["metadata"]["labels"]["app"], "probe");
    let c = env.container(&v, "main");
    assert_eq!(c["state"]["terminated"]["reason"], "Completed");
    assert_eq!(c["guestKind"], "wasi-p1-module");

    // A failing container's exit code is husk's exit code.
    let m2 = env.manifest(
        "fail.yaml",
        "apiVersion: v1\nkind: Pod\nmetadata: {name: fail}\nspec:\n  restartPolicy: Never\n  containers:\n  - {name: a, image: $PROBE, args: [exit, \"7\"]}\n",
    );
    let out = env.run_file(&m2, &[]);
    assert_eq!(out.status.code(), Some(7));
    let v = env.inspect("fail");
    assert_eq!(v["status"]["phase"], "Failed");
    assert_eq!(env.container(&v, "a")["state"]["terminated"]["exitCode"], 7);
    assert_eq!(
        env.container(&v, "a")["state"]["terminated"]["reason"],
        "Error"
    );
    env.finish();
}

#[test]
fn p2_component_runs_with_args_and_stdio() {
    let env = Env::new();
    let out = env.husk(&[
        "run",
        "--rm",
        probe_p2().to_str().unwrap(),
        "echo",
        "from",
        "a",
        "component",
    ]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert_eq!(stdout(&out), "from a component\n");
    let out = env.husk(&[
        "run",
        "--rm",
        probe_p2().to_str().unwrap(),
        "stderr",
        "to-stderr",
    ]);
    assert_eq!(stdout(&out), "");
    assert_eq!(stderr(&out), "to-stderr\n");
    assert_eq!(env.pod_dirs(), 0, "--rm removes the pod");
    env.finish();
}

#[test]
fn volumes_readonly_secret_escape_and_subpath() {
    let env = Env::new();
    let host = env.root().join("hostdir");
    std::fs::create_dir_all(host.join("sub")).unwrap();
    std::fs::write(host.join("sub/note"), "in subdir\n").unwrap();
    std::os::unix::fs::symlink("/etc/passwd", host.join("passwd-link")).unwrap();
    std::os::unix::fs::symlink("/etc", host.join("etc-link")).unwrap();
    let m = env.manifest(
        "pod.yaml",
        &format!(
            r#"
apiVersion: v1
kind: Secret
metadata: {{name: creds}}
data: {{password: c2VjcmV0LXZhbHVl}}
stringData: {{user: admin}}
---
apiVersion: v1
kind: Pod
metadata: {{name: vols}}
spec:
  restartPolicy: Never
  initContainers:
  - {{name: ro-write, image: $PROBE, args: [write, /ro/x, data], volumeMounts: [{{name: host, mountPath: /ro, readOnly: true}}]}}
  containers:
  - {{name: secret, image: $PROBE_P2, args: [cat, /creds/password], volumeMounts: [{{name: creds, mountPath: /creds}}]}}
  - {{name: secret-env, image: $PROBE, args: [env, USER_NAME], env: [{{name: USER_NAME, valueFrom: {{secretKeyRef: {{name: creds, key: user}}}}}}]}}
  - {{name: rw-write, image: $PROBE, args: [write, /rw/written, ok], volumeMounts: [{{name: host, mountPath: /rw}}]}}
  - {{name: passwd, image: $PROBE, args: [cat, /etc/passwd], volumeMounts: [{{name: host, mountPath: /rw}}]}}
  - {{name: dotdot, image: $PROBE, args: [cat, /rw/../../../etc/passwd], volumeMounts: [{{name: host, mountPath: /rw}}]}}
  - {{name: symlink, image: $PROBE, args: [cat, /rw/passwd-link], volumeMounts: [{{name: host, mountPath: /rw}}]}}
  - {{name: dirlink, image: $PROBE, args: [cat, /rw/etc-link/hostname], volumeMounts: [{{name: host, mountPath: /rw}}]}}
  - {{name: subpath, image: $PROBE, args: [cat, /s/note], volumeMounts: [{{name: host, mountPath: /s, subPath: sub}}]}}
  - {{name: subpath-escape, image: $PROBE, args: [cat, /s/passwd], volumeMounts: [{{name: host, mountPath: /s, subPath: etc-link}}]}}
  volumes:
  - {{name: host, hostPath: {{path: {host}}}}}
  - {{name: creds, secret: {{secretName: creds}}}}
"#,
            host = host.display()
        ),
    );
    let out = env.run_file(&m, &["-d"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let v = env.wait_for("vols", "pod end", |v| v["status"]["finished"] == true);
    let code = |n: &str| env.container(&v, n)["state"]["terminated"]["exitCode"].as_i64();
    // readOnly is enforced: the init container fails, and with Never the pod fails.
    assert_eq!(code("ro-write"), Some(1));
    assert!(!host.join("x").exists());
    assert_eq!(v["status"]["phase"], "Failed");
    assert!(env.container(&v, "secret")["state"]["waiting"].is_object());

    // Again without the failing init container.
    let text = std::fs::read_to_string(&m).unwrap();
    let text = text
        .replace(
            "  initContainers:\n  - {name: ro-write, image: ",
            "  initContainers:\n  - {name: ro-read, args: [cat, /ro/sub/note], image: ",
        )
        .replace("args: [write, /ro/x, data], ", "");
    let m2 = env.manifest("pod2.yaml", &text.replace("name: vols", "name: vols2"));
    let out = env.run_file(&m2, &["-d"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let v = env.wait_for("vols2", "pod end", |v| v["status"]["finished"] == true);
    let code = |n: &str| env.container(&v, n)["state"]["terminated"]["exitCode"].as_i64();
    let logs = |n: &str| {
        (
            stdout(&env.husk(&["logs", "vols2", "-c", n])),
            stderr(&env.husk(&["logs", "vols2", "-c", n])),
        )
    };
    let _ = logs;
    assert_eq!(code("ro-read"), Some(0));
    assert_eq!(code("secret"), Some(0));
    assert_eq!(logs("secret").0, "secret-value");
    assert_eq!(logs("secret-env").0, "USER_NAME=admin\n");
    assert_eq!(code("rw-write"), Some(0));
    assert_eq!(std::fs::read_to_string(host.join("written")).unwrap(), "ok");
    for escape in ["passwd", "dotdot", "symlink", "dirlink", "subpath-escape"] {
        assert!(
            matches!(code(escape), Some(c) if c != 0),
            "{escape} must not reach outside its mounts: {:?}",
            logs(escape)
        );
        assert!(
            !logs(escape).0.contains("root:"),
            "{escape} leaked /etc/passwd"
        );
    }
    assert!(
        logs("subpath-escape").1.contains("subPath"),
        "the escape is refused by husk before the guest runs"
    );
    assert_eq!(code("subpath"), Some(0));
    assert_eq!(logs("subpath").0, "in subdir\n");
    // Secrets never reach the disk: not in the pod record, not in inspect.
    let record = std::fs::read_to_string(
        env.root()
            .join("lib/pods")
            .read_dir()
            .unwrap()
            .next()
            .unwrap()
            .unwrap()
            .path()
            .join("pod.json"),
    )
    .unwrap();
    assert!(!record.contains("admin"));
    let all = std::fs::read_dir(env.root().join("lib/pods"))
        .unwrap()
        .flatten()
        .map(|e| std::fs::read_to_string(e.path().join("pod.json")).unwrap())
        .collect::<String>();
    assert!(!all.contains("admin") && !all.contains("secret-value"));
    env.finish();
}

#[test]
fn secret_and_memory_volumes_are_tmpfs_and_removed_with_the_pod() {
    let env = Env::new();
    let m = env.manifest(
        "pod.yaml",
        r#"
apiVersion: v1
kind: Secret
metadata: {name: s}
stringData: {k: v}
---
apiVersion: v1
kind: Pod
metadata: {name: tmpfs}
spec:
  containers:
  - {name: waiter, image: $PROBE, args: [stdin], volumeMounts: [{name: s, mountPath: /s}, {name: mem, mountPath: /mem}, {name: disk, mountPath: /disk}]}
  volumes:
  - {name: s, secret: {secretName: s}}
  - {name: mem, emptyDir: {medium: Memory}}
  - {name: disk, emptyDir: {}}
"#,
    );
    let out = env.run_file(&m, &["-d"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let id = stdout(&out).trim().to_owned();
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    let fstype = |dir: &str| {
        mounts
            .lines()
            .find(|l| {
                l.split(' ')
                    .nth(4)
                    .is_some_and(|m| m.ends_with(dir) && m.contains(&id))
            })
            .and_then(|l| l.split(" - ").nth(1))
            .and_then(|r| r.split(' ').next())
            .map(str::to_owned)
    };
    assert_eq!(fstype("/volumes/s").as_deref(), Some("tmpfs"));
    assert_eq!(fstype("/volumes/mem").as_deref(), Some("tmpfs"));
    assert_eq!(
        fstype("/volumes/disk"),
        None,
        "a disk emptyDir is a plain directory"
    );
    let disk = env.root().join("lib/pods").join(&id).join("volumes/disk");
    assert!(disk.is_dir());
    // Graceful stop: stdin closes and the guest exits cleanly within its
    // grace period. (A stop that comes before the guest runs never starts
    // it: wait until it runs.)
    env.wait_for("tmpfs", "the guest to run", |v| {
        env.container(v, "waiter")["state"]["running"].is_object()
    });
    let t0 = Instant::now();
    let out = env.husk(&["stop", "-t", "20", "tmpfs"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(t0.elapsed() < Duration::from_secs(10));
    let v = env.inspect("tmpfs");
    assert_eq!(
        env.container(&v, "waiter")["state"]["terminated"]["exitCode"],
        0
    );
    assert_eq!(
        stdout(&env.husk(&["logs", "tmpfs"])),
        "waiting for stdin to close\nstdin closed, exiting cleanly\n"
    );
    assert!(!disk.exists(), "emptyDir is deleted with the pod sandbox");
    env.finish();
}

#[test]
fn emptydir_shared_survives_restarts_and_backoff_is_recorded() {
    let env = Env::with_backoff(200);
    let m = env.manifest(
        "pod.yaml",
        r#"
apiVersion: v1
kind: Pod
metadata: {name: restarts}
spec:
  restartPolicy: OnFailure
  initContainers:
  - {name: init, image: $PROBE, args: [write, /shared/from-init, "init was here"], volumeMounts: [{name: shared, mountPath: /shared}]}
  containers:
  - {name: counter, image: $PROBE, args: [count, /shared/runs, "3"], volumeMounts: [{name: shared, mountPath: /shared}]}
  - {name: reader, image: $PROBE_P2, args: [cat, /data/from-init], volumeMounts: [{name: shared, mountPath: /data}]}
  volumes:
  - {name: shared, emptyDir: {}}
"#,
    );
    let t0 = Instant::now();
    let out = env.run_file(&m, &[]);
    let took = t0.elapsed();
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let text = stdout(&out);
    assert!(text.contains("reader | init was here"), "{text}");
    assert!(
        text.contains("counter | runs so far: 1") && text.contains("counter | runs so far: 3"),
        "{text}"
    );
    // Back-off: 200 ms then 400 ms before the two restarts.
    assert!(
        took >= Duration::from_millis(600),
        "restarted too fast: {took:?}"
    );
    let v = env.inspect("restarts");
    let c = env.container(&v, "counter");
    assert_eq!(c["restartCount"], 2);
    assert_eq!(c["state"]["terminated"]["reason"], "Completed");
    assert_eq!(c["lastState"]["terminated"]["exitCode"], 1);
    assert_eq!(c["lastState"]["terminated"]["reason"], "Error");
    assert!(c["lastState"]["terminated"]["finishedAt"].is_string());
    assert_eq!(v["status"]["phase"], "Succeeded");
    // Each instance has its own CRI log; --previous shows the one before.
    let prev = stdout(&env.husk(&["logs", "restarts", "-c", "counter", "--previous"]));
    assert_eq!(prev, "runs so far: 2\n");
    env.finish();
}

#[test]
fn restart_always_and_never() {
    let env = Env::with_backoff(50);
    let m = env.manifest(
        "pod.yaml",
        "apiVersion: v1\nkind: Pod\nmetadata: {name: always}\nspec:\n  restartPolicy: Always\n  containers:\n  - {name: c, image: $PROBE, args: [exit, \"0\"]}\n",
    );
    assert!(env.run_file(&m, &["-d"]).status.success());
    let v = env.wait_for("always", "restarts", |v| {
        env.container(v, "c")["restartCount"].as_u64() >= Some(2)
    });
    assert_ne!(v["status"]["finished"], true);
    let out = env.husk(&["rm", "always"]);
    assert_eq!(out.status.code(), Some(1), "rm refuses a running pod");
    assert!(stderr(&out).contains("rm -f"));
    let out = env.husk(&["rm", "-f", "always"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(env.pod_dirs(), 0);
    env.finish();
}

#[test]
fn memory_limit_oomkills_and_cpu_loop_can_be_stopped() {
    let env = Env::new();
    let out = env.husk(&[
        "run",
        "--name",
        "oom",
        "--memory",
        "16m",
        probe().to_str().unwrap(),
        "grow",
        "64",
    ]);
    assert_eq!(out.status.code(), Some(137), "{}", stderr(&out));
    let v = env.inspect("oom");
    let t = &env.container(&v, "main")["state"]["terminated"];
    assert_eq!(t["reason"], "OOMKilled");
    assert_eq!(t["exitCode"], 137);
    // Under the limit it works.
    let out = env.husk(&[
        "run",
        "--rm",
        "--memory",
        "64m",
        probe().to_str().unwrap(),
        "grow",
        "16",
    ]);
    assert_eq!(out.status.code(), Some(0), "{}", stdout(&out));

    let out = env.husk(&[
        "run",
        "-d",
        "--name",
        "spin",
        probe().to_str().unwrap(),
        "spin",
    ]);
    assert!(out.status.success());
    env.wait_for("spin", "running", |v| {
        env.container(v, "main")["state"]["running"].is_object()
    });
    // A wasm container has no processes to exec beside it: said clearly.
    let out = env.husk(&["stats", "spin"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains("stats are not supported in husk-wasm pods"),
        "{}",
        stderr(&out)
    );
    let out = env.husk(&["exec", "spin", "--", "sh"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains("exec is not supported in husk-wasm pods"),
        "{}",
        stderr(&out)
    );
    let t0 = Instant::now();
    let out = env.husk(&["stop", "-t", "0", "spin"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(t0.elapsed() < Duration::from_secs(5));
    let v = env.inspect("spin");
    assert_eq!(
        env.container(&v, "main")["state"]["terminated"]["exitCode"],
        137
    );
    // A guest that ignores stop gets its grace period, then is killed.
    let out = env.husk(&[
        "run",
        "-d",
        "--name",
        "spin2",
        probe().to_str().unwrap(),
        "spin",
    ]);
    assert!(out.status.success());
    let t0 = Instant::now();
    assert!(env.husk(&["stop", "-t", "1", "spin2"]).status.success());
    let took = t0.elapsed();
    assert!(
        took >= Duration::from_secs(1) && took < Duration::from_secs(6),
        "{took:?}"
    );
    env.finish();
}

#[test]
fn cpu_limit_is_a_pod_cgroup_quota() {
    let env = Env::new();
    let out = env.husk(&[
        "run",
        "-d",
        "--name",
        "cpu",
        "--cpus",
        "0.1",
        probe().to_str().unwrap(),
        "spin",
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    let id = stdout(&out).trim().to_owned();
    let v = env.wait_for("cpu", "running", |v| {
        env.container(v, "main")["state"]["running"].is_object()
    });
    let cg = std::path::PathBuf::from(v["status"]["cgroup"].as_str().expect("pod cgroup"));
    assert!(cg.ends_with(&id));
    let pid = v["status"]["monitorPid"].as_u64().unwrap().to_string();
    let procs = std::fs::read_to_string(cg.join("cgroup.procs")).unwrap();
    assert!(procs.lines().any(|l| l == pid), "monitor in the pod cgroup");
    std::thread::sleep(Duration::from_millis(1500));
    if cg.join("cpu.cfs_quota_us").exists() {
        assert_eq!(
            std::fs::read_to_string(cg.join("cpu.cfs_quota_us"))
                .unwrap()
                .trim(),
            "10000"
        );
    } else {
        assert_eq!(
            std::fs::read_to_string(cg.join("cpu.max")).unwrap().trim(),
            "10000 100000"
        );
    }
    let stat = std::fs::read_to_string(cg.join("cpu.stat")).unwrap();
    let throttled: u64 = stat
        .lines()
        .find_map(|l| l.strip_prefix("nr_throttled "))
        .unwrap()
        .parse()
        .unwrap();
    assert!(
        throttled > 0,
        "a spinning guest under 100m must be throttled: {stat}"
    );
    assert!(env.husk(&["rm", "-f", "cpu"]).status.success());
    assert!(!cg.exists(), "cgroup removed with the pod");
    env.finish();
}

#[test]
fn compile_cache_second_start_does_not_recompile() {
    let env = Env::new();
    let img = env.root().join("copy.wasm");
    // A private copy with a unique custom section, so no other test warmed it.
    let mut bytes = std::fs::read(probe()).unwrap();
    let tag = env.root().to_str().unwrap().as_bytes().to_vec();
    bytes.push(0);
    bytes.push((4 + tag.len()) as u8);
    bytes.push(3);
    bytes.extend_from_slice(b"tag");
    bytes.extend_from_slice(&tag);
    std::fs::write(&img, &bytes).unwrap();
    assert!(env
        .husk(&["run", "--name", "first", img.to_str().unwrap(), "echo", "x"])
        .status
        .success());
    assert!(env
        .husk(&[
            "run",
            "--name",
            "second",
            img.to_str().unwrap(),
            "echo",
            "x"
        ])
        .status
        .success());
    assert_eq!(
        env.container(&env.inspect("first"), "main")["compileCache"],
        "compiled"
    );
    assert_eq!(
        env.container(&env.inspect("second"), "main")["compileCache"],
        "hit"
    );
    let cached: Vec<_> = std::fs::read_dir(env.root().join("lib/cache/wasm"))
        .unwrap()
        .flatten()
        .filter(|e| e.path().extension().is_some_and(|x| x == "cwasm"))
        .collect();
    assert_eq!(cached.len(), 1);
    env.finish();
}

#[test]
fn networking_pod_ips_netns_and_cni_del() {
    let env = Env::new();
    let mut ids = Vec::new();
    for name in ["net-a", "net-b"] {
        let out = env.husk(&[
            "run",
            "-d",
            "--name",
            name,
            probe().to_str().unwrap(),
            "stdin",
        ]);
        assert!(out.status.success(), "{}", stderr(&out));
        ids.push(stdout(&out).trim().to_owned());
    }
    let ps: serde_json::Value =
        serde_json::from_slice(&env.husk(&["ps", "--format", "json"]).stdout).unwrap();
    let ips: Vec<String> = ps
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["ip"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(ips.len(), 2);
    assert_ne!(ips[0], ips[1]);
    for ip in &ips {
        assert!(
            ip.starts_with(&env.subnet_prefix),
            "{ip} in {}",
            env.subnet_prefix
        );
    }
    let table = stdout(&env.husk(&["ps"]));
    assert!(
        table.contains(&ips[0]) && table.contains("husk-wasm"),
        "{table}"
    );
    // The pod netns has eth0 with the pod IP and lo up; pods reach each other.
    let netns_a = env.root().join("run/netns").join(&ids[0]);
    let addr = stdout(&in_netns(&netns_a, &["ip", "-o", "addr"]));
    assert!(addr.contains(&format!("{}/24", ips[0])), "{addr}");
    assert!(addr.contains("127.0.0.1"), "lo is up: {addr}");
    let ping = in_netns(&netns_a, &["ping", "-c", "1", "-W", "2", &ips[1]]);
    assert!(
        ping.status.success(),
        "pod a reaches pod b: {}",
        stdout(&ping)
    );
    // The monitor's threads live in the pod netns.
    let v = env.inspect("net-a");
    let pid = v["status"]["monitorPid"].as_u64().unwrap();
    let ns_of = |p: String| std::fs::read_link(p).unwrap();
    let threads: Vec<_> = std::fs::read_dir(format!("/proc/{pid}/task"))
        .unwrap()
        .flatten()
        .collect();
    let pod_ns = ns_of(format!(
        "/proc/{pid}/task/{}/ns/net",
        threads[0].file_name().to_string_lossy()
    ));
    assert_ne!(pod_ns, ns_of("/proc/self/ns/net".into()));
    for t in &threads {
        assert_eq!(
            ns_of(format!(
                "/proc/{pid}/task/{}/ns/net",
                t.file_name().to_string_lossy()
            )),
            pod_ns
        );
    }
    assert_eq!(
        std::fs::read_dir(env.root().join("lib/cni/ipam"))
            .unwrap()
            .flatten()
            .next()
            .map(|d| std::fs::read_dir(d.path()).unwrap().count() >= 2),
        Some(true)
    );
    assert!(env.husk(&["rm", "-f", "net-a", "net-b"]).status.success());
    // CNI DEL released the IPs.
    let ipam = env.root().join("lib/cni/ipam").join(&env.bridge);
    let left: Vec<_> = std::fs::read_dir(&ipam)
        .unwrap()
        .flatten()
        .map(|e| e.file_name())
        .filter(|n| n.to_string_lossy().starts_with("10."))
        .collect();
    assert!(left.is_empty(), "IP allocations leaked: {left:?}");
    env.finish();
}

#[test]
fn killed_monitor_is_cleaned_up_by_rm() {
    let env = Env::new();
    let out = env.husk(&[
        "run",
        "-d",
        "--name",
        "crash",
        probe().to_str().unwrap(),
        "stdin",
    ]);
    assert!(out.status.success());
    let v = env.inspect("crash");
    let pid = v["status"]["monitorPid"].as_u64().unwrap() as i32;
    // SAFETY: kill(2) on the monitor this test started.
    unsafe { libc_kill(pid) };
    std::thread::sleep(Duration::from_millis(200));
    assert!(
        !env.leftovers().is_empty(),
        "a killed monitor leaves its netns"
    );
    let ps = stdout(&env.husk(&["ps"]));
    assert!(ps.contains("Unknown"), "{ps}");
    // Its container is not shown Running: nobody knows (#22 item 8).
    assert!(
        ps.contains("ContainerStatusUnknown") && !ps.contains("Running"),
        "{ps}"
    );
    let v = env.inspect("crash");
    assert_eq!(
        env.container(&v, "main")["state"]["waiting"]["reason"],
        "ContainerStatusUnknown",
        "{v:#}"
    );
    // Nothing stopped it: `husk stop` says so (exit 1), and points at rm.
    let out = env.husk(&["stop", "crash"]);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("its monitor is gone") && stderr(&out).contains("husk rm crash"),
        "{}",
        stderr(&out)
    );
    let out = env.husk(&["rm", "crash"]);
    assert!(out.status.success(), "{}", stderr(&out));
    env.finish();
}

unsafe fn libc_kill(pid: i32) {
    std::process::Command::new("kill")
        .args(["-9", &pid.to_string()])
        .status()
        .unwrap();
}

#[test]
fn working_dir_and_docker_style_flags() {
    let env = Env::new();
    let host = env.root().join("work");
    std::fs::create_dir_all(host.join("inner")).unwrap();
    std::fs::write(host.join("inner/rel.txt"), "relative ok\n").unwrap();
    let out = env.husk(&[
        "run",
        "--rm",
        "-e",
        "A=1",
        "-v",
        &format!("{}:/w:ro", host.display()),
        "-w",
        "/w/inner",
        probe_p2().to_str().unwrap(),
        "cat",
        "rel.txt",
    ]);
    assert_eq!(stdout(&out), "relative ok\n", "{}", stderr(&out));
    let out = env.husk(&[
        "run",
        "--rm",
        "-v",
        &format!("{}:/w:ro", host.display()),
        "-w",
        "/w/inner",
        probe().to_str().unwrap(),
        "cat",
        "rel.txt",
    ]);
    assert_eq!(stdout(&out), "relative ok\n", "p1: {}", stderr(&out));
    env.finish();
}

#[test]
fn logs_are_cri_formatted_and_tail_works() {
    let env = Env::new();
    let out = env.husk(&[
        "run",
        "--name",
        "lg",
        probe().to_str().unwrap(),
        "echo",
        "one",
    ]);
    assert!(out.status.success());
    let v = env.inspect("lg");
    let path = env.container(&v, "main")["logPath"]
        .as_str()
        .unwrap()
        .to_owned();
    let text = std::fs::read_to_string(path).unwrap();
    let line = text.lines().next().unwrap();
    let parts: Vec<&str> = line.splitn(4, ' ').collect();
    assert_eq!(&parts[1..], ["stdout", "F", "one"]);
    assert!(
        parts[0].ends_with('Z') && parts[0].contains('T') && parts[0].len() >= 30,
        "RFC3339Nano: {}",
        parts[0]
    );
    let m = env.manifest("multi.yaml", "apiVersion: v1\nkind: Pod\nmetadata: {name: multi}\nspec:\n  restartPolicy: Never\n  containers:\n  - {name: a, image: $PROBE, args: [echo, l1]}\n  - {name: b, image: $PROBE, args: [echo, l2]}\n");
    assert!(env.run_file(&m, &["-d"]).status.success());
    env.wait_for("multi", "end", |v| v["status"]["finished"] == true);
    assert_eq!(stdout(&env.husk(&["logs", "multi", "-c", "b"])), "l2\n");
    assert_eq!(
        stdout(&env.husk(&["logs", "multi", "-c", "a", "--tail", "1"])),
        "l1\n"
    );
    let out = env.husk(&["logs", "multi", "-c", "zzz"]);
    assert_eq!(out.status.code(), Some(2));
    env.finish();
}

#[test]
fn bad_input_exits_2_names_the_field_and_creates_nothing() {
    let env = Env::new();
    std::fs::write(env.root().join("not.wasm"), "#!/bin/sh\necho hi\n").unwrap();
    // A module cut short: the header is right, the rest is missing.
    let probe = std::fs::read(probe()).unwrap();
    std::fs::write(env.root().join("cut.wasm"), &probe[..probe.len() / 3]).unwrap();
    let pod =
        |spec: &str| format!("apiVersion: v1\nkind: Pod\nmetadata: {{name: bad}}\nspec:\n{spec}");
    let c = "  containers:\n  - {name: a, image: $PROBE}\n";
    let cases: Vec<(&str, String, &str)> = vec![
        ("malformed", "apiVersion: v1\nkind: Pod\nmetadata: {name: [oops\n".into(), "malformed YAML"),
        ("kind", "apiVersion: v1\nkind: Deployment\nmetadata: {name: x}\n".into(), "kind: unknown kind \"Deployment\""),
        ("api", "apiVersion: v2\nkind: Pod\nmetadata: {name: x}\nspec: {}\n".into(), "apiVersion"),
        ("runtime", pod(&format!("  runtimeClassName: runc\n{c}")), "spec.runtimeClassName: unknown runtime class \"runc\""),
        ("vm-file", pod(&format!("  runtimeClassName: husk-vm\n{c}")), "is a file; husk-vm pods run Linux images by registry reference"),
        ("vm-volume", pod("  runtimeClassName: husk-vm\n  volumes: [{name: v, emptyDir: {}}]\n  containers:\n  - {name: a, image: busybox, volumeMounts: [{name: v, mountPath: /}]}\n"), "spec.containers[0].volumeMounts[0].mountPath: a husk-vm container cannot mount a volume over its root"),
        ("hypervisor", format!("apiVersion: v1\nkind: Pod\nmetadata: {{name: bad, annotations: {{husk.io/hypervisor: firecracker}}}}\nspec:\n  runtimeClassName: husk-vm\n{c}"), "metadata.annotations[\"husk.io/hypervisor\"]: unknown hypervisor \"firecracker\"; use one of auto, qemu-tcg, qemu-kvm, husk-vmm"),
        ("hypervisor-wasm", format!("apiVersion: v1\nkind: Pod\nmetadata: {{name: bad, annotations: {{husk.io/hypervisor: qemu-tcg}}}}\nspec:\n{c}"), "only husk-vm pods have a hypervisor"),
        ("privileged", pod("  containers:\n  - {name: a, image: $PROBE, securityContext: {privileged: true}}\n"), "spec.containers[0].securityContext.privileged: privileged containers are not supported"),
        ("capability", pod("  containers:\n  - {name: a, image: $PROBE, securityContext: {capabilities: {add: [FLY]}}}\n"), "spec.containers[0].securityContext.capabilities.add[0]: unknown capability \"FLY\""),
        ("dns-policy", pod(&format!("  dnsPolicy: Weird\n{c}")), "spec.dnsPolicy: unknown policy \"Weird\""),
        ("dns-none", pod(&format!("  dnsPolicy: None\n{c}")), "spec.dnsConfig.nameservers: dnsPolicy None needs at least one nameserver"),
        ("host-alias", pod(&format!("  hostAliases: [{{ip: 300.1.1.1, hostnames: [x]}}]\n{c}")), "spec.hostAliases[0].ip: \"300.1.1.1\" is not an IP address"),
        ("missing-image", pod("  containers:\n  - {name: a, image: nowhere.wasm}\n"), "spec.containers[0].image"),
        ("not-wasm", pod(&format!("  containers:\n  - {{name: a, image: {}}}\n", env.root().join("not.wasm").display())), "not a WebAssembly module"),
        ("cut-wasm", pod(&format!("  containers:\n  - {{name: a, image: {}}}\n", env.root().join("cut.wasm").display())), "cut.wasm: invalid WebAssembly"),
        ("dup-port", pod("  containers:\n  - {name: a, image: $PROBE, ports: [{containerPort: 80}]}\n  - {name: b, image: $PROBE, ports: [{containerPort: 80}]}\n"), "spec.containers[1].ports[0].containerPort: 80/TCP is already declared by container \"a\""),
        ("no-volume", pod("  containers:\n  - {name: a, image: $PROBE}\n  - {name: b, image: $PROBE, volumeMounts: [{name: cache, mountPath: /c}]}\n"), "spec.containers[1].volumeMounts[0].name: no volume named \"cache\""),
        ("dup", pod("  containers:\n  - {name: a, image: $PROBE}\n  - {name: a, image: $PROBE}\n"), "spec.containers[1].name: duplicate container name"),
        ("cm-key", format!("apiVersion: v1\nkind: ConfigMap\nmetadata: {{name: cm}}\ndata: {{a: b}}\n---\n{}", pod("  containers:\n  - {name: a, image: $PROBE, env: [{name: X, valueFrom: {configMapKeyRef: {name: cm, key: nope}}}]}\n")), "spec.containers[0].env[0].valueFrom.configMapKeyRef.key: ConfigMap \"cm\" has no key \"nope\""),
        ("quantity", pod("  containers:\n  - {name: a, image: $PROBE, resources: {limits: {memory: 12Zi}}}\n"), "spec.containers[0].resources.limits.memory: invalid quantity \"12Zi\""),
        ("type", pod("  containers:\n  - {name: a, image: $PROBE, ports: [{containerPort: lots}]}\n"), "spec.containers[0].ports[0].containerPort"),
        ("no-pod", "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: cm}\n".into(), "no kind: Pod"),
        // Unknown fields, as kubectl apply --validate=strict: a typo must
        // not leave a hostPath writable or drop a limit without a word.
        ("readonly", pod("  volumes: [{name: h, hostPath: {path: /tmp}}]\n  containers:\n  - {name: a, image: $PROBE, volumeMounts: [{name: h, mountPath: /h, readonly: true}]}\n"), "spec.containers[0].volumeMounts[0].readonly: unknown field \"readonly\"; did you mean \"readOnly\"?"),
        ("limit", pod("  containers:\n  - {name: a, image: $PROBE, resources: {limit: {memory: 64Mi}}}\n"), "spec.containers[0].resources.limit: unknown field \"limit\"; did you mean \"limits\"?"),
        ("numeric-name", "apiVersion: v1\nkind: Pod\nmetadata: {name: 12345}\nspec:\n  containers:\n  - {name: a, image: x.wasm}\n".into(), "metadata.name: must be a string"),
        // Each variable twice the one before: 2^39 bytes if expanded.
        ("doubling", pod(&format!("  containers:\n  - name: a\n    image: $PROBE\n    env:\n    - {{name: V0, value: xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx}}\n{}", (1..40).map(|i| format!("    - {{name: V{i}, value: \"$(V{})$(V{})\"}}\n", i - 1, i - 1)).collect::<String>())), "spec.containers[0].env[13].value: expands to more than 131072 bytes"),
        ("doubling-args", pod("  containers:\n  - name: a\n    image: $PROBE\n    env: [{name: A, value: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa}]\n    args: [\"x\", \"$(A)$(A)$(A)$(A)$(A)$(A)$(A)$(A)$(A)$(A)$(A)$(A)$(A)$(A)$(A)$(A)$(A)$(A)$(A)$(A)$(A)$(A)$(A)$(A)$(A)$(A)$(A)$(A)$(A)$(A)$(A)$(A)$(A)$(A)$(A)$(A)$(A)$(A)$(A)$(A)$(A)$(A)$(A)$(A)$(A)$(A)$(A)$(A)$(A)$(A)$(A)$(A)$(A)$(A)$(A)$(A)$(A)$(A)$(A)$(A)$(A)$(A)$(A)$(A)$(A)$(A)$(A)$(A)$(A)$(A)$(A)$(A)$(A)$(A)$(A)$(A)$(A)$(A)$(A)$(A)$(A)$(A)$(A)$(A)$(A)$(A)$(A)$(A)$(A)$(A)$(A)$(A)$(A)$(A)$(A)$(A)$(A)$(A)$(A)$(A)\"]\n".replace("$(A)$(A)$(A)$(A)$(A)$(A)$(A)$(A)$(A)$(A)", &"$(A)".repeat(400)).as_str()), "spec.containers[0].args[1]: expands to more than 131072 bytes"),
    ];
    for (name, text, expect) in cases {
        let m = env.manifest(&format!("{name}.yaml"), &text);
        let out = env.run_file(&m, &[]);
        assert_eq!(out.status.code(), Some(2), "{name}: {}", stderr(&out));
        let err = stderr(&out);
        assert!(
            err.contains(expect),
            "{name}: expected {expect:?} in {err:?}"
        );
        assert!(
            err.contains(&format!("{name}.yaml")),
            "{name}: the error names the file: {err}"
        );
        assert_eq!(env.pod_dirs(), 0, "{name} created a pod");
        assert!(env.leftovers().is_empty(), "{name}: {:?}", env.leftovers());
    }
    assert!(
        !env.root().join("run/netns").exists()
            || std::fs::read_dir(env.root().join("run/netns"))
                .unwrap()
                .count()
                == 0
    );
    // A closed pipe on stdout (`husk ps | head -0`) ends husk by SIGPIPE,
    // as other tools end, not by a panic.
    let mut child = env
        .cmd()
        .arg("ps")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    drop(child.stdout.take());
    let out = child.wait_with_output().unwrap();
    assert!(!stderr(&out).contains("panicked"), "{}", stderr(&out));
    use std::os::unix::process::ExitStatusExt;
    assert_eq!(out.status.signal(), Some(libc::SIGPIPE), "{out:?}");
    // A pod that does not exist: the hint names a command that exists.
    let err = stderr(&env.husk(&["rm", "ghost"]));
    assert!(
        err.contains("no pod named \"ghost\"; see `husk ps`"),
        "{err}"
    );
    // Usage errors exit 2 too.
    assert_eq!(env.husk(&["run"]).status.code(), Some(2));
    assert_eq!(
        env.husk(&["run", "--restart", "sometimes", "x.wasm"])
            .status
            .code(),
        Some(2)
    );
    env.finish();
}

/// Waits for a child process with a deadline.
fn wait_child(child: &mut std::process::Child, what: &str) -> std::process::ExitStatus {
    let t0 = std::time::Instant::now();
    loop {
        if let Some(s) = child.try_wait().unwrap() {
            return s;
        }
        if t0.elapsed() > std::time::Duration::from_secs(20) {
            let _ = child.kill();
            panic!("{what} did not end");
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

/// Reads a child's stdout line by line on a thread.
fn line_reader(out: std::process::ChildStdout) -> std::sync::mpsc::Receiver<String> {
    use std::io::BufRead;
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(out).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    rx
}

#[test]
fn foreground_ctrl_c_stops_the_pod_gracefully() {
    let env = Env::new();
    let mut child = env
        .cmd()
        .args(["run", "--name", "fg", probe().to_str().unwrap(), "stdin"])
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let lines = line_reader(child.stdout.take().unwrap());
    let first = lines
        .recv_timeout(std::time::Duration::from_secs(20))
        .expect("the container's first line");
    assert_eq!(first, "waiting for stdin to close");
    // Ctrl-C on a terminal sends SIGINT to the foreground process.
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGINT,
    )
    .unwrap();
    let status = wait_child(&mut child, "husk run after SIGINT");
    let rest: Vec<String> = lines.iter().collect();
    assert_eq!(rest, ["stdin closed, exiting cleanly"]);
    // The guest ended on its stop request, so the run succeeded.
    assert_eq!(status.code(), Some(0));
    let v = env.inspect("fg");
    assert_eq!(v["status"]["finished"], true);
    let t = &env.container(&v, "main")["state"]["terminated"];
    assert_eq!(t["exitCode"], 0, "{v:#}");
    assert_eq!(t["reason"], "Completed");
    env.finish();
}

#[test]
fn logs_follow_streams_until_the_pod_ends() {
    let env = Env::new();
    let out = env.husk(&[
        "run",
        "-d",
        "--name",
        "lf",
        probe().to_str().unwrap(),
        "stdin",
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    let mut child = env
        .cmd()
        .args(["logs", "-f", "lf"])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let lines = line_reader(child.stdout.take().unwrap());
    assert_eq!(
        lines
            .recv_timeout(std::time::Duration::from_secs(20))
            .expect("a first line"),
        "waiting for stdin to close"
    );
    // Still following: nothing more until the pod stops.
    assert!(lines
        .recv_timeout(std::time::Duration::from_millis(300))
        .is_err());
    assert!(child.try_wait().unwrap().is_none(), "logs -f ended early");
    assert!(env.husk(&["stop", "lf"]).status.success());
    let status = wait_child(&mut child, "logs -f after the pod stopped");
    assert!(status.success());
    let rest: Vec<String> = lines.iter().collect();
    assert_eq!(rest, ["stdin closed, exiting cleanly"]);
    env.finish();
}

#[test]
fn attach_joins_a_running_wasm_guest() {
    let env = Env::new();
    let m = env.manifest(
        "chat.yaml",
        "apiVersion: v1\nkind: Pod\nmetadata: {name: chat}\nspec:\n  restartPolicy: Never\n  containers:\n  - {name: talk, image: $PROBE, args: [chat], stdin: true, stdinOnce: true}\n  - {name: quiet, image: $PROBE, args: [stdin]}\n",
    );
    let out = env.run_file(&m, &["-d"]);
    assert!(out.status.success(), "{}", stderr(&out));
    env.wait_for("chat", "the guests to run", |v| {
        ["talk", "quiet"]
            .iter()
            .all(|c| env.container(v, c)["state"]["running"].is_object())
    });
    // Stdin needs a container that keeps one; a container must exist.
    for (args, code) in [
        (vec!["attach", "-i", "-c", "quiet", "chat"], 2),
        (vec!["attach", "-c", "nosuch", "chat"], 2),
        (vec!["attach", "nosuch"], 1),
    ] {
        let out = env.husk(&args);
        assert_eq!(out.status.code(), Some(code), "{args:?}: {}", stderr(&out));
        assert!(!stderr(&out).is_empty(), "{args:?}");
    }
    // The line reaches the guest; what it prints comes back on husk's
    // stdout and stderr, and its exit code is husk's.
    let out = env.husk_with_input(&["attach", "-i", "chat"], b"hi\n");
    assert_eq!(stdout(&out), "got hi\n", "{}", stderr(&out));
    assert_eq!(stderr(&out), "to-stderr\n");
    assert_eq!(out.status.code(), Some(4));
    // It was the guest's own output: its log has it too.
    let logs = env.husk(&["logs", "-c", "talk", "chat"]);
    assert_eq!(stdout(&logs), "got hi\n");
    // Attaching to a guest that has ended is refused.
    let out = env.husk(&["attach", "chat"]);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert!(stderr(&out).contains("not running"), "{}", stderr(&out));
    assert!(env.husk(&["rm", "-f", "chat"]).status.success());
    env.finish();
}

#[test]
fn hostpath_files_reach_a_wasm_guest_as_a_directory_of_their_own() {
    let env = Env::new();
    let host = env.root().join("host");
    std::fs::create_dir_all(&host).unwrap();
    std::fs::write(host.join("app.conf"), "app-config\n").unwrap();
    std::fs::write(host.join("beside"), "not for the guest\n").unwrap();
    let m = env.manifest(
        "files.yaml",
        &format!(
            "apiVersion: v1\nkind: Pod\nmetadata: {{name: files}}\nspec:\n  restartPolicy: Never\n  volumes:\n  - {{name: conf, hostPath: {{path: {h}/app.conf, type: File}}}}\n  - {{name: trace, hostPath: {{path: {h}/trace.log, type: FileOrCreate}}}}\n  containers:\n  - {{name: read, image: $PROBE, args: [cat, /etc/app.conf], volumeMounts: [{{name: conf, mountPath: /etc/app.conf, readOnly: true}}]}}\n  - {{name: write, image: $PROBE, args: [write, /out/trace.log, traced], volumeMounts: [{{name: trace, mountPath: /out/trace.log}}]}}\n  - {{name: sibling, image: $PROBE, args: [cat, /etc/beside], volumeMounts: [{{name: conf, mountPath: /etc/app.conf, readOnly: true}}]}}\n  - {{name: create, image: $PROBE, args: [write, /out/other, x], volumeMounts: [{{name: trace, mountPath: /out/trace.log}}]}}\n",
            h = host.display()
        ),
    );
    let out = env.run_file(&m, &[]);
    let v = env.inspect("files");
    let code = |c: &str| env.container(&v, c)["state"]["terminated"]["exitCode"].clone();
    assert_eq!(code("read"), 0, "{v:#}");
    assert_eq!(code("write"), 0, "{v:#}");
    // Only the mounted file is there, and nothing can be made beside it.
    assert_ne!(code("sibling"), 0, "{v:#}");
    assert_ne!(code("create"), 0, "{v:#}");
    assert!(!out.status.success());
    assert_eq!(
        stdout(&env.husk(&["logs", "files", "-c", "read"])),
        "app-config\n"
    );
    assert_eq!(
        std::fs::read_to_string(host.join("trace.log")).unwrap(),
        "traced"
    );
    assert!(!host.join("other").exists());
    assert!(env.husk(&["rm", "files"]).status.success());
    // The user's files stay.
    assert_eq!(
        std::fs::read_to_string(host.join("app.conf")).unwrap(),
        "app-config\n"
    );
    // A file the pod needs that is not there is a usage error naming it.
    let bad = env.manifest(
        "bad.yaml",
        &format!(
            "apiVersion: v1\nkind: Pod\nmetadata: {{name: bad}}\nspec:\n  volumes:\n  - {{name: conf, hostPath: {{path: {h}/missing.conf, type: File}}}}\n  containers:\n  - {{name: a, image: $PROBE, volumeMounts: [{{name: conf, mountPath: /etc/missing.conf}}]}}\n",
            h = host.display()
        ),
    );
    let out = env.run_file(&bad, &[]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("spec.volumes[0].hostPath.path")
            && stderr(&out).contains("FileOrCreate"),
        "{}",
        stderr(&out)
    );
    env.finish();
}
