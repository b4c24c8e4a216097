//! VM pods (`runtimeClassName: husk-vm`) through the real husk binary: a
//! Linux image pushed to a registry on loopback, pulled by husk, each of
//! its layers an ext4 disk of the pod's microVM (QEMU TCG on this PVM
//! host), the containers run by husk-agent inside it, with the pod IP from
//! CNI on the guest's NIC. Nothing may be left behind.

mod common;
use common::*;

/// A registry on loopback holding the busybox test image as
/// `tests/busybox:<tag>` (keep it alive while pods pull), its reference,
/// and a VM-pod Env.
fn vm_setup(tag: &str) -> (husk_tests::Registry, String, Env) {
    let reg = husk_tests::Registry::start();
    let reference = husk_tests::push_busybox_image(&reg, &format!("tests/busybox:{tag}"));
    (reg, reference, vm_env())
}

/// `husk run -d -f manifest`, which must succeed.
fn run_detached(env: &Env, manifest: &std::path::Path) {
    let out = env.run_file(manifest, &["-d"]);
    assert!(out.status.success(), "{}{}", stdout(&out), stderr(&out));
}

#[test]
fn a_vm_pod_runs_a_linux_image_with_the_pod_ip_and_leaves_nothing() {
    let (_reg, reference, env) = vm_setup("pod");
    let info = env.husk(&["info", "--format", "json"]);
    let info: serde_json::Value = serde_json::from_slice(&info.stdout).unwrap();
    assert_eq!(info["vm"]["ready"], true, "{info:#}");
    if std::path::Path::new("/sys/module/kvm_pvm").exists() {
        assert_eq!(info["vm"]["hypervisor"], "qemu-tcg", "{info:#}");
    }
    let manifest = env.manifest(
        "vm.yaml",
        &format!(
            r#"apiVersion: v1
kind: Pod
metadata:
  name: vmpod
spec:
  runtimeClassName: husk-vm
  restartPolicy: Never
  initContainers:
  - name: setup
    image: {reference}
    command: ["/bin/sh", "-c", "echo init ran"]
  containers:
  - name: main
    image: {reference}
    args: ["/bin/sh", "-c", "echo host=$(hostname); cat /etc/greeting; echo $GREETING; ip=$(ip -4 -o addr show eth0 | awk '{{print $4}}'); echo ip=${{ip%/*}}; echo kernel=$(uname -r); echo procs=$(ls -d /proc/[0-9]* | wc -l); echo pid=$$$$; echo time=$(date +%s); exit 3"]
    env:
    - name: GREETING
      value: from-the-pod
"#
        ),
    );
    run_detached(&env, &manifest);
    let v = env.wait_for("vmpod", "the pod to end", |v| {
        v["status"]["phase"] == "Failed" || v["status"]["phase"] == "Succeeded"
    });
    let pod_ip = v["status"]["podIP"].as_str().unwrap_or_default().to_owned();
    assert!(pod_ip.starts_with(&env.subnet_prefix), "{v:#}");
    let main = env.container(&v, "main");
    assert_eq!(main["state"]["terminated"]["exitCode"], 3, "{v:#}");
    assert_eq!(main["guestKind"], "linux", "{v:#}");
    let logs = stdout(&env.husk(&["logs", "vmpod", "-c", "main"]));
    let lines: Vec<&str> = logs.lines().collect();
    assert_eq!(
        lines[..4],
        [
            "host=vmpod",
            "from the top layer",
            "from-the-pod",
            &format!("ip={pod_ip}")
        ],
        "{logs}"
    );
    // Isolation: the guest's own kernel, and none of the host's processes
    // (the guest has its agent, its kernel threads and this shell).
    let host_kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap();
    let kernel = lines[4].strip_prefix("kernel=").unwrap();
    assert!(kernel.starts_with("6.1."), "{logs}");
    assert_ne!(kernel, host_kernel.trim());
    let procs: usize = lines[5].strip_prefix("procs=").unwrap().parse().unwrap();
    let host_procs = std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().parse::<u32>().is_ok())
        .count();
    // Its own PID namespace, where it is PID 1: only itself and what it
    // started (ls, the subshell).
    assert!(
        procs <= 4 && procs < host_procs,
        "{procs} processes seen in the container: {logs}"
    );
    assert_eq!(lines[6], "pid=1", "{logs}");
    // The guest's clock is the host's.
    let guest_time: i64 = lines[7].strip_prefix("time=").unwrap().parse().unwrap();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    assert!(
        (now - guest_time).abs() < 60,
        "guest time {guest_time}, host {now}"
    );
    let init_logs = env.husk(&["logs", "vmpod", "-c", "setup"]);
    assert_eq!(stdout(&init_logs), "init ran\n");
    // The monitor powers the guest off and releases everything, then ends.
    env.wait_for("vmpod", "the monitor to finish", |v| {
        v["status"]["finished"] == true
    });
    let rm = env.husk(&["rm", "vmpod"]);
    assert!(rm.status.success(), "{}", stderr(&rm));
    // Each layer's file-system image is kept beside the layer in the store
    // (made once, shared by pods) and goes with the image.
    let snapshots = env.root().join("lib/images/snapshots");
    let ext4 = |dir: &std::path::Path| {
        std::fs::read_dir(dir)
            .map(|r| {
                r.flatten()
                    .filter(|e| e.file_name().to_string_lossy().ends_with(".ext4"))
                    .count()
            })
            .unwrap_or(0)
    };
    assert_eq!(ext4(&snapshots), 2);
    let rmi = env.husk(&["rmi", &reference]);
    assert!(rmi.status.success(), "{}", stderr(&rmi));
    assert_eq!(ext4(&snapshots), 0);
    env.finish();
}

/// Connects to `addr`, retrying while the server comes up, and returns
/// the first line it sends.
fn first_line(addr: &str) -> String {
    use std::io::{BufRead, BufReader};
    let t0 = std::time::Instant::now();
    loop {
        let got = std::net::TcpStream::connect(addr).and_then(|c| {
            c.set_read_timeout(Some(std::time::Duration::from_secs(5)))?;
            let mut line = String::new();
            BufReader::new(c).read_line(&mut line)?;
            Ok(line)
        });
        match got {
            Ok(line) if !line.is_empty() => return line,
            other => {
                assert!(
                    t0.elapsed() < std::time::Duration::from_secs(30),
                    "{addr}: {other:?}"
                );
                std::thread::sleep(std::time::Duration::from_millis(100));
            }
        }
    }
}

#[test]
fn a_vm_pod_serves_on_its_pod_ip_and_host_port_and_stops_gracefully() {
    let (_reg, reference, env) = vm_setup("web");
    let host_port = 20000 + (std::process::id() % 20000) as u16 + 1;
    let manifest = env.manifest(
        "web.yaml",
        &format!(
            r#"apiVersion: v1
kind: Pod
metadata:
  name: vmweb
spec:
  runtimeClassName: husk-vm
  terminationGracePeriodSeconds: 20
  containers:
  - name: web
    image: {reference}
    command: ["/bin/sh", "-c"]
    args: ["echo ready > /tmp/ready; trap 'echo got TERM; exit 0' TERM; while true; do echo served-by-the-vm | nc -l -p 8080; done & wait"]
    ports:
    - containerPort: 8080
      hostPort: {host_port}
"#
        ),
    );
    run_detached(&env, &manifest);
    let v = env.wait_for("vmweb", "the server to run", |v| {
        env.container(v, "web")["state"]["running"].is_object()
    });
    let pod_ip = v["status"]["podIP"].as_str().unwrap().to_owned();
    // From the host to the pod IP (the guest holds it), and through
    // portmap's hostPort on the bridge's gateway address.
    assert_eq!(first_line(&format!("{pod_ip}:8080")), "served-by-the-vm\n");
    assert_eq!(
        first_line(&format!("{}.1:{host_port}", env.subnet_prefix)),
        "served-by-the-vm\n"
    );
    // husk exec runs beside the container: its root (what it wrote), its
    // host name and cgroup, its exit code and both streams.
    let exec = env.husk(&[
        "exec",
        "vmweb",
        "--",
        "sh",
        "-c",
        "cat /tmp/ready /etc/hostname /proc/self/cgroup; head -c 7 /proc/1/cmdline; echo; echo err >&2; exit 7",
    ]);
    assert_eq!(exec.status.code(), Some(7), "{}", stderr(&exec));
    // Its PID 1 is the container's.
    assert_eq!(stdout(&exec), "ready\nvmweb\n0::/\n/bin/sh\n");
    assert_eq!(stderr(&exec), "err\n");
    let exec = env.husk(&["exec", "vmweb", "-c", "nope", "--", "true"]);
    assert_eq!(exec.status.code(), Some(2));
    assert!(
        stderr(&exec).contains("no container \"nope\""),
        "{}",
        stderr(&exec)
    );
    let exec = env.husk(&["exec", "vmweb", "--", "/no/such/program"]);
    assert_eq!(exec.status.code(), Some(1));
    assert!(
        stderr(&exec).contains("/no/such/program"),
        "{}",
        stderr(&exec)
    );
    // husk exec -i: stdin streams in, output and the exit code come back.
    let mut child = env
        .cmd()
        .args([
            "exec",
            "-i",
            "vmweb",
            "--",
            "sh",
            "-c",
            "cat > /tmp/in; wc -l < /tmp/in; echo done >&2; exit 3",
        ])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    {
        use std::io::Write;
        let mut stdin = child.stdin.take().unwrap();
        stdin.write_all(b"hello\n").unwrap();
        std::thread::sleep(std::time::Duration::from_millis(100));
        stdin.write_all(b"world\n").unwrap();
    }
    let out = child.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(3), "{}", stderr(&out));
    assert_eq!(
        (stdout(&out).as_str(), stderr(&out).as_str()),
        ("2\n", "done\n")
    );
    let exec = env.husk(&["exec", "vmweb", "--", "sh", "-c", "cat /tmp/in"]);
    assert_eq!(stdout(&exec), "hello\nworld\n");
    // An exec that runs past its timeout is killed, and reaped by husk's
    // parent outside the PID namespace: the container's PID 1 never adopts
    // it (a shell's `wait` would then miss its SIGTERM below).
    let gone = |pidfile: &str| {
        let o = env.husk(&["exec", "vmweb", "--", "sh", "-c", &format!("grep -q '^State:.*[RS]' /proc/$(cat {pidfile})/status 2>/dev/null && echo alive || echo gone")]);
        stdout(&o).trim() == "gone"
    };
    let t = env.husk(&[
        "exec",
        "--timeout",
        "2",
        "vmweb",
        "--",
        "sh",
        "-c",
        "echo $$ > /tmp/spin; while :; do :; done",
    ]);
    assert_eq!(t.status.code(), Some(1));
    assert!(stderr(&t).contains("timed out after 2 s"), "{}", stderr(&t));
    let t0 = std::time::Instant::now();
    while !gone("/tmp/spin") {
        assert!(
            t0.elapsed() < std::time::Duration::from_secs(10),
            "the timed-out exec still runs"
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    // A caller of exec -i that goes away takes its command along.
    let mut child = env
        .cmd()
        .args([
            "exec",
            "-i",
            "vmweb",
            "--",
            "sh",
            "-c",
            "echo $$ > /tmp/ipid; echo started; read x",
        ])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    {
        use std::io::BufRead;
        let mut line = String::new();
        std::io::BufReader::new(child.stdout.as_mut().unwrap())
            .read_line(&mut line)
            .unwrap();
        assert_eq!(line, "started\n");
    }
    assert!(!gone("/tmp/ipid"));
    child.kill().unwrap();
    let _ = child.wait();
    let t0 = std::time::Instant::now();
    while !gone("/tmp/ipid") {
        assert!(
            t0.elapsed() < std::time::Duration::from_secs(10),
            "the exec'd shell still runs: {}",
            std::fs::read_to_string(
                env.root()
                    .join("lib/pods")
                    .join(v["id"].as_str().unwrap())
                    .join("monitor.log")
            )
            .unwrap_or_default()
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    // husk update: new limits on the running container's cgroup.
    let up = env.husk(&["update", "--memory", "48Mi", "--cpus", "0.5", "vmweb"]);
    assert!(up.status.success(), "{}", stderr(&up));
    let exec = env.husk(&[
        "exec",
        "vmweb",
        "--",
        "sh",
        "-c",
        "cat /sys/fs/cgroup/memory.max /sys/fs/cgroup/cpu.max",
    ]);
    assert_eq!(
        stdout(&exec),
        "50331648\n50000 100000\n",
        "{}",
        stderr(&exec)
    );
    let up = env.husk(&["update", "--memory", "1Gi", "vmweb"]);
    assert_eq!(up.status.code(), Some(1));
    assert!(
        stderr(&up).contains("does not fit the pod's VM"),
        "{}",
        stderr(&up)
    );
    assert_eq!(env.husk(&["update", "vmweb"]).status.code(), Some(2));
    // husk stats: the container's cgroup and the whole guest.
    let st = env.husk(&["stats", "--format", "json", "vmweb"]);
    assert!(st.status.success(), "{}", stderr(&st));
    let st: serde_json::Value = serde_json::from_slice(&st.stdout).unwrap();
    let rows = st.as_array().unwrap();
    assert_eq!(rows.len(), 2, "{st:#}");
    assert_eq!(rows[0]["container"], "web", "{st:#}");
    // sh, the nc loop's subshell and nc, and the process husk tracks.
    assert!(rows[0]["pids"].as_u64().unwrap() >= 3, "{st:#}");
    let mem = rows[0]["memoryBytes"].as_u64().unwrap();
    assert!(mem > 0 && mem < 64 << 20, "{st:#}");
    assert!(rows[1]["container"].is_null(), "{st:#}");
    let total = rows[1]["memoryLimitBytes"].as_u64().unwrap();
    assert!(total > 200 << 20 && total <= 256 << 20, "{st:#}");
    let table = stdout(&env.husk(&["stats", "vmweb"]));
    assert!(
        table.starts_with("POD") && table.contains("vmweb"),
        "{table}"
    );
    // husk stop: SIGTERM reaches the container in the guest.
    let stop = env.husk(&["stop", "vmweb"]);
    assert!(stop.status.success(), "{}", stderr(&stop));
    let v = env.wait_for("vmweb", "the monitor to finish", |v| {
        v["status"]["finished"] == true
    });
    let web = env.container(&v, "web");
    assert_eq!(web["state"]["terminated"]["exitCode"], 0, "{v:#}");
    assert_eq!(web["restartCount"], 0, "{v:#}");
    assert!(stdout(&env.husk(&["logs", "vmweb"])).contains("got TERM"));
    let exec = env.husk(&["exec", "vmweb", "--", "true"]);
    assert_eq!(exec.status.code(), Some(1));
    assert!(
        stderr(&exec).contains("is not running"),
        "{}",
        stderr(&exec)
    );
    assert!(env.husk(&["rm", "vmweb"]).status.success());
    env.finish();
}

#[test]
fn a_vm_pod_without_a_usable_agent_fails_clearly_and_leaves_nothing() {
    let reg = husk_tests::Registry::start();
    let reference = husk_tests::push_busybox_image(&reg, "tests/busybox:noagent");
    let env = Env::new();
    // The agent next to husk is the ordinary (dynamic) build.
    let cfg = env.root().join("config.toml");
    let mut text = std::fs::read_to_string(&cfg).unwrap();
    text.push_str(&format!(
        "\n[vm]\nagent = \"{}\"\nkernel = \"{}\"\n",
        husk_bin().with_file_name("husk-agent").display(),
        image("kernel-b.bzImage").display()
    ));
    std::fs::write(&cfg, text).unwrap();
    let info = stdout(&env.husk(&["info"]));
    assert!(info.contains("not a static executable"), "{info}");
    let manifest = env.manifest(
        "vm.yaml",
        &format!(
            "apiVersion: v1\nkind: Pod\nmetadata: {{name: noagent}}\nspec:\n  runtimeClassName: husk-vm\n  containers:\n  - {{name: a, image: {reference}}}\n"
        ),
    );
    let out = env.run_file(&manifest, &["-d"]);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("is not a static executable"),
        "{}",
        stderr(&out)
    );
    assert!(env.leftovers().is_empty(), "{:?}", env.leftovers());
    env.finish();
}

/// husk-vmm as the pod's hypervisor, chosen by annotation. This host's
/// KVM (kvm-pvm) cannot run a Linux guest's user space, so the agent never
/// answers here: the test checks everything husk does on the host (the
/// VMM's configuration, the tap it inherits, its virtio-fs shares, the
/// agent's vsock address), the clear error when the boot timeout passes,
/// and that nothing is left. On a host whose KVM runs Linux the pod runs.
#[test]
fn a_vm_pod_under_husk_vmm_gets_its_devices_and_a_failed_boot_leaves_nothing() {
    let (_reg, reference, env) = vm_setup("huskvmm");
    let cfg = env.root().join("config.toml");
    let mut text = std::fs::read_to_string(&cfg).unwrap();
    text.push_str("boot_timeout_secs = 10\n");
    std::fs::write(&cfg, text).unwrap();
    let host_ro = env.root().join("host-ro");
    std::fs::create_dir_all(&host_ro).unwrap();
    std::fs::write(host_ro.join("keep.txt"), "the user's file\n").unwrap();
    let manifest = env.manifest(
        "vmm.yaml",
        &format!(
            r#"apiVersion: v1
kind: Pod
metadata:
  name: vmm
  annotations: {{husk.io/hypervisor: husk-vmm}}
spec:
  runtimeClassName: husk-vm
  containers:
  - name: a
    image: {reference}
    command: [sleep, "60"]
    volumeMounts:
    - {{name: scratch, mountPath: /scratch}}
    - {{name: host, mountPath: /host, readOnly: true}}
  volumes:
  - {{name: scratch, emptyDir: {{}}}}
  - {{name: host, hostPath: {{path: {}}}}}
"#,
            host_ro.display()
        ),
    );
    let run = env
        .cmd()
        .args(["run", "-d", "-f"])
        .arg(&manifest)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // husk-vmm comes up with the pod's configuration.
    let root = env.root().to_str().unwrap().to_owned();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    let (pid, config) = loop {
        let found = std::fs::read_dir("/proc").unwrap().flatten().find_map(|e| {
            let args = std::fs::read(e.path().join("cmdline")).ok()?;
            let args: Vec<String> = args
                .split(|b| *b == 0)
                .map(|a| String::from_utf8_lossy(a).into_owned())
                .collect();
            let ours =
                args.first()?.ends_with("husk-vmm") && args.iter().any(|a| a.starts_with(&root));
            ours.then(|| {
                (
                    e.file_name().to_string_lossy().into_owned(),
                    args[2].clone(),
                )
            })
        });
        if let Some(f) = found {
            break f;
        }
        assert!(std::time::Instant::now() < deadline, "no husk-vmm started");
        std::thread::sleep(std::time::Duration::from_millis(50));
    };
    let vm: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&config).unwrap()).unwrap();
    assert!(
        vm["cmdline"]
            .as_str()
            .unwrap()
            .contains("husk.agent=vsock:1024"),
        "{vm:#}"
    );
    assert_eq!(vm["vsock"]["cid"], 3, "{vm:#}");
    assert_eq!(vm["net"]["fd"], 3, "{vm:#}");
    assert!(vm["net"]["mac"].as_str().unwrap().len() == 17, "{vm:#}");
    let fs = vm["fs"].as_array().unwrap();
    assert_eq!(fs.len(), 2, "{vm:#}");
    let host = fs
        .iter()
        .find(|f| f["path"] == host_ro.to_str().unwrap())
        .unwrap_or_else(|| panic!("{vm:#}"));
    assert_eq!(host["read_only"], true, "{vm:#}");
    assert!(fs.iter().any(|f| f["read_only"] == false), "{vm:#}");
    // busybox's layers, each a read-only disk.
    let disks = vm["disks"].as_array().unwrap();
    assert!(!disks.is_empty(), "{vm:#}");
    assert!(disks.iter().all(|d| d["read_only"] == true), "{vm:#}");
    // The tap it inherited as descriptor 3, and no virtiofsd beside it.
    assert_eq!(
        std::fs::read_link(format!("/proc/{pid}/fd/3")).unwrap(),
        std::path::Path::new("/dev/net/tun")
    );
    let out = run.wait_with_output().unwrap();
    let err = stderr(&out);
    println!("husk run said:\n{err}");
    assert_eq!(out.status.code(), Some(1), "{err}");
    if std::path::Path::new("/sys/module/kvm_pvm").exists() {
        assert!(
            err.contains("did not answer within 10 s under husk-vmm")
                && err.contains("use husk.io/hypervisor: qemu-tcg"),
            "{err}"
        );
    }
    assert!(
        !std::path::Path::new(&format!("/proc/{pid}")).exists(),
        "husk-vmm {pid} still runs"
    );
    assert!(env.leftovers().is_empty(), "{:?}", env.leftovers());
    assert_eq!(
        std::fs::read_to_string(host_ro.join("keep.txt")).unwrap(),
        "the user's file\n"
    );
    env.finish();
}

/// `husk info --probe`: the probe-boot behind `auto` on a host whose KVM
/// is not kvm-pvm, run here on demand. It boots the real kernel and agent
/// under husk-vmm; on this kvm-pvm host the agent never answers, so the
/// probe fails with the reason, the answer is cached per files, and
/// nothing of the probe is left behind.
#[test]
fn the_husk_vmm_probe_boot_is_reported_cached_and_leaves_nothing() {
    let env = vm_env();
    let cfg = env.root().join("config.toml");
    let mut text = std::fs::read_to_string(&cfg).unwrap();
    text.push_str("boot_timeout_secs = 5\n");
    std::fs::write(&cfg, text).unwrap();
    let info = || {
        let out = env.husk(&["info", "--probe", "--format", "json"]);
        assert!(out.status.success(), "{}", stderr(&out));
        let v: serde_json::Value = serde_json::from_str(&stdout(&out)).unwrap();
        v["vm"].clone()
    };
    let pvm = std::path::Path::new("/sys/module/kvm_pvm").exists();
    let first = info();
    let probe = &first["probe"];
    assert_eq!(probe["cached"], false, "{first:#}");
    if pvm {
        assert_eq!(first["hypervisor"], "qemu-tcg", "{first:#}");
        assert_eq!(probe["ok"], false, "{first:#}");
        let detail = probe["detail"].as_str().unwrap();
        assert!(
            detail.starts_with(
                "husk-vmm's probe-boot failed: the guest agent did not answer within 5 s"
            ),
            "{detail}"
        );
    }
    // The second time the cache answers, the same.
    let second = info();
    assert_eq!(second["probe"]["cached"], true, "{second:#}");
    assert_eq!(second["probe"]["detail"], probe["detail"]);
    assert_eq!(second["probe"]["ok"], probe["ok"]);
    // A cache made with other files is not believed.
    let cache = env.root().join("lib/hypervisor-probe.json");
    let mut c: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&cache).unwrap()).unwrap();
    c["key"] = serde_json::json!([]);
    std::fs::write(&cache, c.to_string()).unwrap();
    assert_eq!(info()["probe"]["cached"], false);
    let left: Vec<_> = std::fs::read_dir(env.root().join("lib"))
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("probe-boot."))
        .collect();
    assert!(left.is_empty(), "{left:?}");
    env.finish();
}

#[test]
fn a_guest_kernel_crash_ends_only_its_own_pod() {
    let (_reg, reference, env) = vm_setup("crash");
    let pod = |name: &str, script: &str| {
        env.manifest(
            &format!("{name}.yaml"),
            &format!(
                "apiVersion: v1\nkind: Pod\nmetadata: {{name: {name}}}\nspec:\n  runtimeClassName: husk-vm\n  terminationGracePeriodSeconds: 1\n  containers:\n  - name: c\n    image: {reference}\n    command: [\"/bin/sh\", \"-c\", \"{script}\"]\n"
            ),
        )
    };
    let calm = pod("calm", "echo up; exec sleep 600");
    assert!(env.run_file(&calm, &["-d"]).status.success());
    env.wait_for("calm", "calm to run", |v| {
        env.container(v, "c")["state"]["running"].is_object()
    });
    // The guest kernel of this pod crashes on purpose (sysrq c).
    let crash = pod(
        "crash",
        "echo crashing; sleep 0.2; echo c > /proc/sysrq-trigger; sleep 600",
    );
    assert!(env.run_file(&crash, &["-d"]).status.success());
    let v = env.wait_for("crash", "the crashed pod to end", |v| {
        v["status"]["finished"] == true
    });
    assert_eq!(v["status"]["phase"], "Failed", "{v:#}");
    assert_eq!(v["status"]["reason"], "VMExited", "{v:#}");
    assert!(
        v["status"]["message"]
            .as_str()
            .unwrap_or_default()
            .contains("VM ended"),
        "{v:#}"
    );
    assert_eq!(env.container(&v, "c")["restartCount"], 0, "{v:#}");
    // The other pod never noticed.
    let v = env.inspect("calm");
    assert_eq!(v["status"]["phase"], "Running", "{v:#}");
    assert!(env.container(&v, "c")["state"]["running"].is_object());
    assert!(env.husk(&["rm", "-f", "calm"]).status.success());
    assert!(env.husk(&["rm", "crash"]).status.success());
    env.finish();
}

#[test]
fn rm_f_ends_running_vm_pods_started_at_once() {
    let (_reg, reference, env) = vm_setup("rmf");
    let names: Vec<String> = (0..3).map(|i| format!("r{i}")).collect();
    let handles: Vec<_> = names
        .iter()
        .map(|name| {
            let m = env.manifest(
                &format!("{name}.yaml"),
                &format!(
                    "apiVersion: v1\nkind: Pod\nmetadata: {{name: {name}}}\nspec:\n  runtimeClassName: husk-vm\n  terminationGracePeriodSeconds: 1\n  containers:\n  - name: c\n    image: {reference}\n    command: [\"/bin/sh\", \"-c\", \"exec sleep 600\"]\n"
                ),
            );
            let mut cmd = env.cmd();
            cmd.args(["run", "-d", "-f"]).arg(m);
            std::thread::spawn(move || cmd.output().unwrap())
        })
        .collect();
    for h in handles {
        let out = h.join().unwrap();
        assert!(out.status.success(), "{}", stderr(&out));
    }
    for name in &names {
        env.wait_for(name, "the container to run", |v| {
            env.container(v, "c")["state"]["running"].is_object()
        });
    }
    let mut args = vec!["rm", "-f"];
    args.extend(names.iter().map(String::as_str));
    let out = env.husk(&args);
    assert!(out.status.success(), "{}", stderr(&out));
    // finish() checks that no monitor (and so no QEMU, its child) is left.
    env.finish();
}

#[test]
fn a_vm_pod_mounts_every_kind_of_volume_and_keeps_secrets_off_the_host_disk() {
    let (_reg, reference, env) = vm_setup("vol");
    let host_rw = env.root().join("host-rw");
    let host_ro = env.root().join("host-ro");
    std::fs::create_dir_all(&host_rw).unwrap();
    std::fs::create_dir_all(&host_ro).unwrap();
    std::fs::write(host_rw.join("in.txt"), "from-the-host\n").unwrap();
    std::fs::write(host_ro.join("ro.txt"), "read-only-host\n").unwrap();
    const SECRET: &str = "s3cr3t-VALUE-5f1d";
    let script = [
        "cat /data/note /sub/f",
        "cat /host/in.txt; echo from-guest > /host/out.txt",
        "cat /hostro/ro.txt",
        // Root in the guest may remount its view read-write: the host
        // still serves the share read-only.
        "mount -o remount,rw /hostro 2>/dev/null; (echo x > /hostro/w) 2>/dev/null && echo ro-writable || echo ro-refused",
        "dd if=/dev/zero of=/scratch/big bs=1024 count=2048 2>/dev/null && echo scratch-unlimited || echo scratch-limited",
        "cat /etc/cfg/greeting; echo",
        // Printed changed: the log is on the host's disk.
        "tr a-z A-Z < /secret/token; echo; stat -L -c %a /secret/token; readlink /secret/token",
        "(echo x > /etc/cfg/new) 2>/dev/null && echo cfg-writable || echo cfg-refused",
        "grep -c virtiofs /proc/mounts",
        // What the kubelet writes for every container.
        "hostname; cat /etc/hostname; grep -c vol-host /etc/hosts; grep db /etc/hosts; cat /etc/resolv.conf",
    ]
    .join("; ");
    let manifest = env.manifest(
        "vol.yaml",
        &format!(
            r#"apiVersion: v1
kind: ConfigMap
metadata: {{name: settings}}
data: {{greeting: hello-config}}
---
apiVersion: v1
kind: Secret
metadata: {{name: creds}}
stringData: {{token: {SECRET}}}
---
apiVersion: v1
kind: Pod
metadata:
  name: vmvol
spec:
  runtimeClassName: husk-vm
  restartPolicy: Never
  hostname: vol-host
  hostAliases: [{{ip: 192.0.2.7, hostnames: [db]}}]
  dnsPolicy: None
  dnsConfig:
    nameservers: [192.0.2.53]
    searches: [svc.example]
    options: [{{name: ndots, value: "2"}}]
  volumes:
  - {{name: shared, emptyDir: {{}}}}
  - {{name: scratch, emptyDir: {{medium: Memory, sizeLimit: 1Mi}}}}
  - {{name: host, hostPath: {{path: {host_rw}}}}}
  - {{name: hostro, hostPath: {{path: {host_ro}}}}}
  - {{name: cfg, configMap: {{name: settings}}}}
  - {{name: sec, secret: {{secretName: creds, defaultMode: 0400}}}}
  initContainers:
  - name: writer
    image: {reference}
    command: ["/bin/sh", "-c", "echo from-init > /shared/note && mkdir /shared/sub && echo in-sub > /shared/sub/f"]
    volumeMounts: [{{name: shared, mountPath: /shared}}]
  containers:
  - name: reader
    image: {reference}
    command: ["/bin/sh", "-c", {script:?}]
    volumeMounts:
    - {{name: shared, mountPath: /data}}
    - {{name: shared, mountPath: /sub, subPath: sub}}
    - {{name: scratch, mountPath: /scratch}}
    - {{name: host, mountPath: /host}}
    - {{name: hostro, mountPath: /hostro, readOnly: true}}
    - {{name: cfg, mountPath: /etc/cfg}}
    - {{name: sec, mountPath: /secret}}
"#,
            host_rw = host_rw.display(),
            host_ro = host_ro.display(),
        ),
    );
    run_detached(&env, &manifest);
    let v = env.wait_for("vmvol", "the monitor to finish", |v| {
        v["status"]["finished"] == true
    });
    let logs = stdout(&env.husk(&["logs", "vmvol", "-c", "reader"]));
    assert_eq!(
        env.container(&v, "reader")["state"]["terminated"]["exitCode"],
        0,
        "{v:#}\n{logs}"
    );
    assert_eq!(
        logs.lines().collect::<Vec<_>>(),
        [
            "from-init",
            "in-sub",
            "from-the-host",
            "read-only-host",
            "ro-refused",
            "scratch-limited",
            "hello-config",
            SECRET.to_uppercase().as_str(),
            "400",
            // Laid out as the kubelet's atomic writer does.
            "..data/token",
            "cfg-refused",
            // shared (twice: /data and /sub), host and hostro come from
            // the host.
            "4",
            "vol-host",
            "vol-host",
            "1",
            "192.0.2.7\tdb",
            "nameserver 192.0.2.53",
            "search svc.example",
            "options ndots:2",
        ],
        "{logs}"
    );
    assert_eq!(
        std::fs::read_to_string(host_rw.join("out.txt")).unwrap(),
        "from-guest\n"
    );
    assert!(!host_ro.join("w").exists());
    // The secret reached the guest in the protocol only: no file under
    // husk's root (state, logs, volumes) holds its bytes.
    fn holds(dir: &std::path::Path, needle: &[u8]) -> Vec<std::path::PathBuf> {
        let mut hits = Vec::new();
        for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
            let (p, t) = (e.path(), e.file_type().unwrap());
            if t.is_dir() {
                hits.extend(holds(&p, needle));
            } else if t.is_file()
                && std::fs::read(&p).is_ok_and(|b| b.windows(needle.len()).any(|w| w == needle))
                && !p.ends_with("vol.yaml")
            {
                hits.push(p);
            }
        }
        hits
    }
    assert_eq!(
        holds(env.root(), SECRET.as_bytes()),
        Vec::<std::path::PathBuf>::new()
    );
    assert!(env.husk(&["rm", "vmvol"]).status.success());
    // hostPath contents are the user's: kept.
    assert!(host_rw.join("in.txt").exists() && host_rw.join("out.txt").exists());
    assert!(host_ro.join("ro.txt").exists());
    env.finish();
}

#[test]
fn a_vm_pod_enforces_limits_in_the_guest_and_reports_oom_kills() {
    let (_reg, reference, env) = vm_setup("oom");
    let manifest = env.manifest(
        "oom.yaml",
        &format!(
            r#"apiVersion: v1
kind: Pod
metadata:
  name: vmoom
  annotations: {{husk.io/hypervisor: qemu-tcg}}
spec:
  runtimeClassName: husk-vm
  restartPolicy: Never
  containers:
  - name: hog
    image: {reference}
    command: ["/bin/sh", "-c"]
    args:
    - |
      cat /sys/fs/cgroup/memory.max /sys/fs/cgroup/cpu.max /proc/self/cgroup
      awk '/MemTotal/ {{ print ($2 > 262144) ? "vm-sized" : "vm-base" }}' /proc/meminfo
      dd if=/dev/zero of=/dev/null bs=64M count=1; echo survived
    resources:
      limits: {{memory: 32Mi, cpu: 250m}}
"#
        ),
    );
    run_detached(&env, &manifest);
    let v = env.wait_for("vmoom", "the monitor to finish", |v| {
        v["status"]["finished"] == true
    });
    let logs = stdout(&env.husk(&["logs", "vmoom"]));
    let hog = env.container(&v, "hog");
    assert_eq!(
        hog["state"]["terminated"]["reason"], "OOMKilled",
        "{v:#}\n{logs}"
    );
    assert_eq!(hog["state"]["terminated"]["exitCode"], 137, "{v:#}");
    // The limits are the container's cgroup's, seen through its own
    // cgroup namespace; the VM has room for them above its base memory.
    assert_eq!(
        logs.lines().collect::<Vec<_>>(),
        ["33554432", "25000 100000", "0::/", "vm-sized"],
        "{logs}"
    );
    // The pod's annotation chose its hypervisor.
    let id = v["id"].as_str().unwrap();
    let log =
        std::fs::read_to_string(env.root().join("lib/pods").join(id).join("monitor.log")).unwrap();
    assert!(
        log.contains("the pod's annotation husk.io/hypervisor: qemu-tcg"),
        "{log}"
    );
    assert!(env.husk(&["rm", "vmoom"]).status.success());
    env.finish();
}

#[test]
fn a_vm_pod_and_a_wasm_pod_reach_each_other_by_pod_ip() {
    // On a dual-stack network: each pod has an IPv4 and an IPv6 address.
    let (_reg, reference, env) = vm_setup("mix");
    let env = env.dual_stack();
    // Wasm servers (wasi:sockets) on IPv4 and on IPv6, and a VM server
    // (busybox nc, on both), each answering one connection.
    for (name, verb, port) in [("wsrv", "serve", "8090"), ("wsrv6", "serve6", "8092")] {
        let out = env.husk(&[
            "run",
            "-d",
            "--name",
            name,
            netprobe().to_str().unwrap(),
            verb,
            port,
            "1",
        ]);
        assert!(out.status.success(), "{}", stderr(&out));
    }
    let vm = env.manifest(
        "vsrv.yaml",
        &format!(
            r#"apiVersion: v1
kind: Pod
metadata: {{name: vsrv}}
spec:
  runtimeClassName: husk-vm
  restartPolicy: Never
  containers:
  - name: srv
    image: {reference}
    command: ["/bin/sh", "-c", "echo from-the-vm | nc -l -p 8091; echo from-the-vm-v6 | nc -l -p 8091"]
"#
        ),
    );
    run_detached(&env, &vm);
    // podIP is the IPv4 address; podIPs has both, IPv4 first.
    let ips = |pod: &str, container: &str| {
        let v = env.wait_for(pod, "the server to run", |v| {
            env.container(v, container)["state"]["running"].is_object()
        });
        let ip = v["status"]["podIP"].as_str().unwrap().to_owned();
        let all: Vec<&str> = v["status"]["podIPs"]
            .as_array()
            .unwrap_or_else(|| panic!("{pod}: no podIPs: {v:#}"))
            .iter()
            .map(|i| i["ip"].as_str().unwrap())
            .collect();
        assert_eq!(all.len(), 2, "{pod}: {v:#}");
        assert_eq!(all[0], ip, "{v:#}");
        assert!(ip.starts_with(&env.subnet_prefix), "{v:#}");
        assert!(all[1].starts_with(&env.subnet6_prefix), "{v:#}");
        (ip, all[1].to_owned())
    };
    let (wasm_ip, _) = ips("wsrv", "main");
    let (_, wasm6_ip) = ips("wsrv6", "main");
    let (vm_ip, vm_ip6) = ips("vsrv", "srv");
    assert_ne!(wasm_ip, vm_ip);
    // From inside the VM to the wasm pod, and from a wasm pod into the VM.
    let client = env.manifest(
        "vcli.yaml",
        &format!(
            r#"apiVersion: v1
kind: Pod
metadata: {{name: vcli}}
spec:
  runtimeClassName: husk-vm
  restartPolicy: Never
  containers:
  - name: cli
    image: {reference}
    command: ["/bin/sh", "-c", "echo from-the-vm-pod | nc -w 10 {wasm_ip} 8090; echo over-ipv6 | nc -w 10 {wasm6_ip} 8092; grep -c vcli /etc/hosts"]
"#
        ),
    );
    let out = env.run_file(&client, &[]);
    assert!(out.status.success(), "{}{}", stdout(&out), stderr(&out));
    // Both of the pod's addresses are in its /etc/hosts.
    assert_eq!(stdout(&out), "pong from-the-vm-pod\npong over-ipv6\n2\n");
    for (ip, reply) in [(&vm_ip, "from-the-vm\n"), (&vm_ip6, "from-the-vm-v6\n")] {
        let out = env.husk(&[
            "run",
            "--rm",
            netprobe().to_str().unwrap(),
            "connect",
            ip,
            "8091",
            "hello-vm",
        ]);
        assert!(out.status.success(), "{}{}", stdout(&out), stderr(&out));
        assert!(stdout(&out).ends_with(reply), "{ip}: {}", stdout(&out));
    }
    for p in ["wsrv", "wsrv6", "vsrv", "vcli"] {
        let rm = env.husk(&["rm", "-f", p]);
        assert!(rm.status.success(), "rm -f {p}: {}", stderr(&rm));
    }
    env.finish();
}

#[test]
fn a_vm_pod_applies_security_contexts() {
    let (_reg, reference, env) = vm_setup("sec");
    let manifest = env.manifest(
        "sec.yaml",
        &format!(
            r#"apiVersion: v1
kind: Pod
metadata: {{name: vmsec}}
spec:
  runtimeClassName: husk-vm
  restartPolicy: Never
  shareProcessNamespace: true
  securityContext:
    supplementalGroups: [50]
    sysctls: [{{name: kernel.shm_rmid_forced, value: "1"}}]
  volumes: [{{name: data, emptyDir: {{medium: Memory}}}}]
  containers:
  - name: user
    image: {reference}
    command: ["/bin/sh", "-c", "id -u; id -g; id -G; echo $HOME; grep CapEff /proc/self/status; cat /proc/sys/kernel/shm_rmid_forced; tr -d '\\0' < /proc/1/cmdline; echo; grep Seccomp: /proc/self/status"]
    securityContext: {{runAsUser: 1000, runAsGroup: 1001}}
  - name: locked
    image: {reference}
    command: ["/bin/sh", "-c", "id -u; (touch /new) 2>/dev/null && echo root-writable || echo root-read-only; touch /data/x && echo volume-writable; grep -E 'CapEff|NoNewPrivs|Seccomp:' /proc/self/status"]
    volumeMounts: [{{name: data, mountPath: /data}}]
    securityContext:
      seccompProfile: {{type: RuntimeDefault}}
      readOnlyRootFilesystem: true
      allowPrivilegeEscalation: false
      capabilities: {{drop: [NET_RAW], add: [SYS_TIME]}}
  - name: nonroot
    image: {reference}
    command: ["/bin/true"]
    securityContext: {{runAsNonRoot: true}}
"#
        ),
    );
    run_detached(&env, &manifest);
    let v = env.wait_for("vmsec", "the monitor to finish", |v| {
        v["status"]["finished"] == true
    });
    let logs = |c: &str| stdout(&env.husk(&["logs", "vmsec", "-c", c]));
    // A non-root user has no capabilities; the busybox image's /etc/group
    // lists no groups for uid 1000, so only the pod's supplemental one.
    // The pod's sysctl is set, its PID 1 is the pause of the shared PID
    // namespace, and seccomp is unconfined unless asked for.
    assert_eq!(
        logs("user"),
        "1000\n1001\n1001 50\n/\nCapEff:\t0000000000000000\n1\n/pause\nSeccomp:\t0\n",
        "{v:#}"
    );
    // Root keeps the default set, less NET_RAW (bit 13), plus SYS_TIME
    // (bit 25): Docker's a80425fb - 0x2000 + 0x2000000.
    assert_eq!(
        logs("locked"),
        "0\nroot-read-only\nvolume-writable\nCapEff:\t00000000aa0405fb\nNoNewPrivs:\t1\nSeccomp:\t2\n",
        "{v:#}"
    );
    let nonroot = env.container(&v, "nonroot");
    assert_eq!(
        nonroot["state"]["terminated"]["reason"], "StartError",
        "{v:#}"
    );
    let msg = nonroot["state"]["terminated"]["message"]
        .as_str()
        .unwrap_or_default();
    assert!(msg.contains("runAsNonRoot"), "{msg}");
    assert!(env.husk(&["rm", "vmsec"]).status.success());
    env.finish();
}

#[test]
fn a_killed_vm_pod_monitor_takes_its_hypervisor_along_and_rm_cleans_up() {
    let (_reg, reference, env) = vm_setup("kill");
    let manifest = env.manifest(
        "k.yaml",
        &format!(
            r#"apiVersion: v1
kind: Pod
metadata: {{name: vmkill}}
spec:
  runtimeClassName: husk-vm
  volumes: [{{name: d, emptyDir: {{}}}}]
  containers:
  - name: c
    image: {reference}
    command: ["/bin/sh", "-c", "exec sleep 600"]
    volumeMounts: [{{name: d, mountPath: /d}}]
"#
        ),
    );
    run_detached(&env, &manifest);
    let v = env.wait_for("vmkill", "the container to run", |v| {
        env.container(v, "c")["state"]["running"].is_object()
    });
    let pid = v["status"]["monitorPid"].as_u64().unwrap();
    let children = |_monitor: u64| -> Vec<String> {
        let root = env.root().to_string_lossy().into_owned();
        std::fs::read_dir("/proc")
            .unwrap()
            .flatten()
            .filter_map(|e| std::fs::read(e.path().join("cmdline")).ok())
            .map(|c| String::from_utf8_lossy(&c).replace('\0', " "))
            .filter(|c| c.contains(&root) && (c.contains("qemu-system") || c.contains("virtiofsd")))
            .collect()
    };
    // QEMU, and virtiofsd (two processes: it forks into its namespaces).
    assert_eq!(children(pid).len(), 3, "{:?}", children(pid));
    let kill = std::process::Command::new("kill")
        .args(["-9", &pid.to_string()])
        .status()
        .unwrap();
    assert!(kill.success());
    // They go with it.
    let t0 = std::time::Instant::now();
    while !children(pid).is_empty() {
        assert!(
            t0.elapsed() < std::time::Duration::from_secs(10),
            "left running: {:?}",
            children(pid)
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let ps = stdout(&env.husk(&["ps"]));
    assert!(ps.contains("Unknown"), "{ps}");
    let rm = env.husk(&["rm", "vmkill"]);
    assert!(rm.status.success(), "{}", stderr(&rm));
    env.finish();
}

#[test]
fn the_vm_pod_example_runs() {
    let (_reg, reference, env) = vm_setup("example");
    let text = std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../images/examples/vm-pod.yaml"),
    )
    .unwrap()
    .replace("image: IMAGE", &format!("image: {reference}"));
    let manifest = env.manifest("vm-pod.yaml", &text);
    let out = env.run_file(&manifest, &["--rm"]);
    assert!(out.status.success(), "{}{}", stdout(&out), stderr(&out));
    let text = stdout(&out);
    for line in [
        "reader | written by the init container",
        "reader | hello from a configMap",
        "reader | kernel 6.1",
        "as uid 1000",
        "secret-user | the secret has 6 bytes",
    ] {
        assert!(text.contains(line), "{line:?} missing from:\n{text}");
    }
    env.finish();
}

/// A pty pair for a process that must see a real terminal: (master, slave).
fn pty(rows: u16, cols: u16) -> (std::fs::File, std::fs::File) {
    use std::os::fd::FromRawFd;
    let (mut m, mut s) = (-1, -1);
    let ws = libc::winsize {
        ws_row: rows,
        ws_col: cols,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: openpty fills two descriptors, owned by the Files below.
    unsafe {
        assert_eq!(
            libc::openpty(&mut m, &mut s, std::ptr::null_mut(), std::ptr::null(), &ws),
            0
        );
        (std::fs::File::from_raw_fd(m), std::fs::File::from_raw_fd(s))
    }
}

#[test]
fn exec_with_a_terminal_follows_its_size_and_cp_copies_both_ways() {
    use std::io::{Read, Write};
    use std::os::fd::AsRawFd;
    let (_reg, reference, env) = vm_setup("tty");
    let manifest = env.manifest(
        "tty.yaml",
        &format!(
            r#"apiVersion: v1
kind: Pod
metadata: {{name: vmtty}}
spec:
  runtimeClassName: husk-vm
  terminationGracePeriodSeconds: 1
  containers:
  - name: box
    image: {reference}
    command: ["/bin/sh", "-c", "mkdir -p /srv/tree/sub; echo deep > /srv/tree/sub/f; ln -s sub/f /srv/tree/link; echo ready; exec sleep 600"]
    volumeMounts: [{{name: data, mountPath: /data}}]
  volumes: [{{name: data, emptyDir: {{}}}}]
"#
        ),
    );
    run_detached(&env, &manifest);
    env.wait_for("vmtty", "the container to run", |_| {
        stdout(&env.husk(&["logs", "vmtty"])).contains("ready")
    });

    // exec -it from a real terminal: the command gets a terminal of the
    // caller's size, keys pass through raw, and a resize (SIGWINCH to
    // husk) reaches it.
    let (master, slave) = pty(30, 100);
    let mut child = env
        .cmd()
        .args([
            "exec",
            "-it",
            "vmtty",
            "--",
            "sh",
            "-c",
            "test -t 0 && test -t 1 && test -t 2 && echo is-a-tty; while read x; do busybox stty size; [ \"$x\" = q ] && exit 5; done",
        ])
        .stdin(slave.try_clone().unwrap())
        .stdout(slave.try_clone().unwrap())
        .stderr(slave)
        .spawn()
        .unwrap();
    let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::<u8>::new()));
    {
        let (seen, mut m) = (seen.clone(), master.try_clone().unwrap());
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok(n) = m.read(&mut buf) {
                if n == 0 {
                    break;
                }
                seen.lock().unwrap().extend_from_slice(&buf[..n]);
            }
        });
    }
    let text = || String::from_utf8_lossy(&seen.lock().unwrap()).into_owned();
    let mut master_w = master.try_clone().unwrap();
    // Press Enter until the size shows (the first keys may come before
    // the shell reads).
    let until = |master_w: &mut std::fs::File, want: &str| {
        for _ in 0..600 {
            if text().contains(want) {
                return;
            }
            master_w.write_all(b"\r").unwrap();
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
        panic!("{want:?} never came: {:?}", text());
    };
    until(&mut master_w, "30 100");
    assert!(text().contains("is-a-tty"), "{:?}", text());
    let ws = libc::winsize {
        ws_row: 41,
        ws_col: 132,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: TIOCSWINSZ reads a winsize that outlives the call.
    let r = unsafe { libc::ioctl(master.as_raw_fd(), libc::TIOCSWINSZ, &ws) };
    assert_eq!(r, 0);
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGWINCH,
    )
    .unwrap();
    until(&mut master_w, "41 132");
    master_w.write_all(b"q\r").unwrap();
    let status = child.wait().unwrap();
    assert_eq!(status.code(), Some(5), "{:?}", text());
    // husk left the caller's terminal as it found it (not raw).
    // SAFETY: a zeroed termios is valid; tcgetattr fills one owned here.
    let (t, r) = unsafe {
        let mut t: libc::termios = std::mem::zeroed();
        let r = libc::tcgetattr(master.as_raw_fd(), &mut t);
        (t, r)
    };
    assert_eq!(r, 0);
    assert_ne!(t.c_lflag & libc::ICANON, 0, "the terminal was left raw");

    // cp out: a directory (with its symlink) to a new local name, a file
    // into an existing local directory; no tar in the container is used.
    let local = tempfile::tempdir().unwrap();
    let tree = local.path().join("tree");
    let out = env.husk(&["cp", "vmtty:/srv/tree", tree.to_str().unwrap()]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(
        std::fs::read_to_string(tree.join("sub/f")).unwrap(),
        "deep\n"
    );
    assert_eq!(
        std::fs::read_link(tree.join("link")).unwrap(),
        std::path::Path::new("sub/f")
    );
    let out = env.husk(&["cp", "vmtty:/etc/hostname", local.path().to_str().unwrap()]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(
        std::fs::read_to_string(local.path().join("hostname")).unwrap(),
        "vmtty\n"
    );
    // cp in: a local directory into the emptyDir, a file to a new name;
    // the container sees them (as root-owned files, as docker cp makes).
    std::fs::create_dir(local.path().join("up")).unwrap();
    std::fs::write(local.path().join("up/a.txt"), "from the host\n").unwrap();
    let out = env.husk(&[
        "cp",
        local.path().join("up").to_str().unwrap(),
        "vmtty:/data",
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    let out = env.husk(&[
        "cp",
        local.path().join("up/a.txt").to_str().unwrap(),
        "vmtty:/tmp/renamed.txt",
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    let exec = env.husk(&[
        "exec",
        "vmtty",
        "--",
        "sh",
        "-c",
        "cat /data/up/a.txt /tmp/renamed.txt; busybox stat -c %u /tmp/renamed.txt",
    ]);
    assert_eq!(
        stdout(&exec),
        "from the host\nfrom the host\n0\n",
        "{}",
        stderr(&exec)
    );
    // Errors name what is wrong, and leave nothing half-copied behind.
    let out = env.husk(&["cp", "vmtty:/no/such", local.path().to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("/no/such"), "{}", stderr(&out));
    let out = env.husk(&[
        "cp",
        local.path().join("up").to_str().unwrap(),
        "vmtty:/no/dir/x",
    ]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains("no such directory"),
        "{}",
        stderr(&out)
    );
    let out = env.husk(&["cp", "a", "b"]);
    assert_eq!(out.status.code(), Some(2));
    let out = env.husk(&["cp", "vmtty:/etc/hostname", "/no/such/dir/x"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains("no such directory"),
        "{}",
        stderr(&out)
    );
    let names: Vec<String> = std::fs::read_dir(local.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    assert!(
        !names.iter().any(|n| n.starts_with(".husk-cp")),
        "{names:?}"
    );
    assert!(env.husk(&["rm", "-f", "vmtty"]).status.success());
    env.finish();
}

#[test]
fn husk_apply_updates_configmaps_and_secrets_in_running_vm_and_wasm_pods() {
    let (_reg, reference, env) = vm_setup("apply");
    let objects = |greeting: &str, extra: &str, token: &str| {
        format!(
            "apiVersion: v1\nkind: ConfigMap\nmetadata: {{name: conf}}\ndata: {{greeting: {greeting}{extra}}}\n---\napiVersion: v1\nkind: Secret\nmetadata: {{name: token}}\nstringData: {{value: {token}}}\n"
        )
    };
    let vm = env.manifest(
        "vm.yaml",
        &format!(
            r#"{}---
apiVersion: v1
kind: Pod
metadata: {{name: vmapply}}
spec:
  runtimeClassName: husk-vm
  terminationGracePeriodSeconds: 1
  containers:
  - name: box
    image: {reference}
    command: ["/bin/sh", "-c", "echo ready; exec sleep 600"]
    volumeMounts:
    - {{name: cfg, mountPath: /cfg}}
    - {{name: cfg, mountPath: /sub/greeting, subPath: greeting}}
    - {{name: sec, mountPath: /sec}}
  volumes:
  - {{name: cfg, configMap: {{name: conf}}}}
  - {{name: sec, secret: {{secretName: token}}}}
"#,
            objects("v1", ", old: gone-soon", "s1")
        ),
    );
    let wasm = env.manifest(
        "wasm.yaml",
        &format!(
            "{}---\napiVersion: v1\nkind: Pod\nmetadata: {{name: wasmapply}}\nspec:\n  restartPolicy: Never\n  containers:\n  - name: w\n    image: $PROBE\n    args: [watch, /cfg/greeting, v2]\n    volumeMounts: [{{name: cfg, mountPath: /cfg}}]\n  volumes: [{{name: cfg, configMap: {{name: conf}}}}]\n",
            objects("v1", "", "s1")
        ),
    );
    run_detached(&env, &vm);
    run_detached(&env, &wasm);
    env.wait_for("vmapply", "the container to run", |_| {
        stdout(&env.husk(&["logs", "vmapply"])).contains("ready")
    });
    let show = "cat /cfg/greeting /sub/greeting /sec/value; ls /cfg";
    let exec = env.husk(&["exec", "vmapply", "--", "sh", "-c", show]);
    assert_eq!(stdout(&exec), "v1v1s1greeting\nold\n", "{}", stderr(&exec));

    // The update: a changed key, a new one, a gone one, a new secret.
    let update = env.manifest("update.yaml", &objects("v2", ", new: here", "s2"));
    let out = env.husk(&["apply", "-f", update.to_str().unwrap()]);
    assert!(out.status.success(), "{}", stderr(&out));
    for line in [
        "pod vmapply: volume cfg updated",
        "pod vmapply: volume sec updated",
        "pod wasmapply: volume cfg updated",
    ] {
        assert!(stdout(&out).contains(line), "{line:?}: {}", stdout(&out));
    }
    // Seen at once in the guest; a subPath keeps what it had, as with
    // the kubelet.
    let exec = env.husk(&["exec", "vmapply", "--", "sh", "-c", show]);
    assert_eq!(stdout(&exec), "v2v1s2greeting\nnew\n", "{}", stderr(&exec));
    // The pod's record on disk follows: the configMap's new files, the
    // secret's new keys without their bytes.
    let id = env.inspect("vmapply")["id"].as_str().unwrap().to_owned();
    let rec_path = env.root().join("lib/pods").join(&id).join("pod.json");
    let rec_text = std::fs::read_to_string(&rec_path).unwrap();
    let rec: serde_json::Value = serde_json::from_str(&rec_text).unwrap();
    let files = |vol: &str| -> Vec<(String, String)> {
        rec["plan"]["volumes"]
            .as_array()
            .unwrap()
            .iter()
            .find(|v| v["name"] == vol)
            .unwrap_or_else(|| panic!("no volume {vol}: {rec:#}"))["source"]["files"]
            .as_array()
            .unwrap()
            .iter()
            .map(|f| {
                let data: Vec<u8> = f["data"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|b| b.as_u64().unwrap() as u8)
                    .collect();
                (
                    f["path"].as_str().unwrap().to_owned(),
                    String::from_utf8(data).unwrap(),
                )
            })
            .collect()
    };
    let cfg = files("cfg");
    assert!(cfg.contains(&("greeting".into(), "v2".into())), "{cfg:?}");
    assert!(cfg.iter().any(|(p, _)| p == "new"), "{cfg:?}");
    assert_eq!(files("sec"), [("value".to_owned(), String::new())]);
    // The wasm guest, waiting for the new value, saw it and ended.
    let v = env.wait_for("wasmapply", "the wasm pod to end", |v| {
        v["status"]["finished"] == true
    });
    assert_eq!(
        env.container(&v, "w")["state"]["terminated"]["exitCode"],
        0,
        "{v:#}"
    );
    assert_eq!(stdout(&env.husk(&["logs", "wasmapply"])), "v2");

    // Bad input: a Pod, or nothing to apply, is a usage error.
    let out = env.husk(&["apply", "-f", vm.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(stderr(&out).contains("husk run"), "{}", stderr(&out));
    let empty = env.manifest("empty.yaml", "# nothing\n");
    let out = env.husk(&["apply", "-f", empty.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("no kind: ConfigMap"),
        "{}",
        stderr(&out)
    );
    assert!(env
        .husk(&["rm", "-f", "vmapply", "wasmapply"])
        .status
        .success());
    env.finish();
}

/// A running `husk port-forward`: the local port it printed, killed (as
/// Ctrl-C would end it) on drop.
struct PortForward {
    child: std::process::Child,
    local: u16,
}

impl PortForward {
    fn start(env: &Env, pod: &str, mapping: &str) -> Self {
        use std::io::BufRead;
        let mut child = env
            .cmd()
            .args(["port-forward", pod, mapping])
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let mut line = String::new();
        std::io::BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        // "Forwarding from 127.0.0.1:PORT -> REMOTE", as kubectl prints it.
        let local = line
            .strip_prefix("Forwarding from 127.0.0.1:")
            .and_then(|r| r.split_once(" -> "))
            .and_then(|(p, _)| p.parse().ok());
        let Some(local) = local else {
            let _ = child.kill();
            let out = child.wait_with_output().unwrap();
            panic!("port-forward printed {line:?}; stderr {}", stderr(&out))
        };
        PortForward { child, local }
    }

    /// Sends `text`, half-closes, and reads the reply to its end; empty
    /// when the forwarder dropped the connection (nothing listened).
    fn exchange(&self, text: &str) -> String {
        use std::io::{Read, Write};
        let mut s = std::net::TcpStream::connect(("127.0.0.1", self.local)).unwrap();
        s.set_read_timeout(Some(std::time::Duration::from_secs(60)))
            .unwrap();
        s.write_all(text.as_bytes()).unwrap();
        s.shutdown(std::net::Shutdown::Write).unwrap();
        let mut got = String::new();
        match s.read_to_string(&mut got) {
            Ok(_) => got,
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => String::new(),
            Err(e) => panic!("reading the forwarded reply: {e}"),
        }
    }
}

impl Drop for PortForward {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn port_forward_reaches_the_localhost_of_vm_and_wasm_pods() {
    let (_reg, reference, env) = vm_setup("pf");
    // The attached container also reads a hostPath file (type: File,
    // read-only) and appends to one that FileOrCreate makes.
    let host = env.root().join("host");
    std::fs::create_dir_all(&host).unwrap();
    std::fs::write(host.join("app.conf"), "app-config\n").unwrap();
    let vm = env.manifest(
        "vpf.yaml",
        &format!(
            r#"apiVersion: v1
kind: Pod
metadata: {{name: vpf}}
spec:
  runtimeClassName: husk-vm
  restartPolicy: Never
  containers:
  - name: srv
    image: {reference}
    command: ["/bin/sh", "-c", "while true; do nc -l -p 8080 -e /bin/sh -c 'read l; echo vm got $l'; done"]
  - name: chat
    image: {reference}
    command: ["/bin/sh", "-c", "read l; echo got $l; cat /etc/app.conf; (echo x >> /etc/app.conf) 2>/dev/null || echo conf-refused; echo traced >> /var/log/trace.log; echo to-stderr >&2; exit 4"]
    stdin: true
    volumeMounts:
    - {{name: conf, mountPath: /etc/app.conf, readOnly: true}}
    - {{name: trace, mountPath: /var/log/trace.log}}
  volumes:
  - {{name: conf, hostPath: {{path: {host}/app.conf, type: File}}}}
  - {{name: trace, hostPath: {{path: {host}/trace.log, type: FileOrCreate}}}}
"#,
            host = host.display()
        ),
    );
    run_detached(&env, &vm);
    let out = env.husk(&[
        "run",
        "-d",
        "--name",
        "wpf",
        netprobe().to_str().unwrap(),
        "serve",
        "8090",
        "1",
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    for (pod, c) in [("vpf", "srv"), ("vpf", "chat"), ("wpf", "main")] {
        env.wait_for(pod, "the server to run", |v| {
            env.container(v, c)["state"]["running"].is_object()
        });
    }
    // Into the VM, through the agent: two connections, one after the
    // other (the server's loop answers each with the line it read).
    let vpf = PortForward::start(&env, "vpf", ":8080");
    for _ in 0..2 {
        let mut got = String::new();
        let t0 = std::time::Instant::now();
        // nc may be between two listens.
        while got.is_empty() && t0.elapsed() < std::time::Duration::from_secs(30) {
            got = vpf.exchange("hello-from-the-host\n");
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
        assert_eq!(got, "vm got hello-from-the-host\n");
    }
    // Into the wasm pod's network namespace (wasi:sockets server).
    let wpf = PortForward::start(&env, "wpf", "0:8090");
    assert_eq!(wpf.exchange("ping\n"), "pong ping\n");
    // husk attach -i: the line reaches the container's own shell, its
    // output comes back, its exit code is husk's.
    let out = env.husk_with_input(&["attach", "-i", "-c", "chat", "vpf"], b"hi\n");
    assert_eq!(
        stdout(&out),
        "got hi\napp-config\nconf-refused\n",
        "{}",
        stderr(&out)
    );
    assert_eq!(stderr(&out), "to-stderr\n");
    assert_eq!(out.status.code(), Some(4));
    assert_eq!(
        std::fs::read_to_string(host.join("trace.log")).unwrap(),
        "traced\n"
    );
    assert_eq!(
        std::fs::read_to_string(host.join("app.conf")).unwrap(),
        "app-config\n"
    );
    // Bad mappings are usage errors; a pod that is not there is a failure.
    for (args, code) in [
        (vec!["port-forward", "vpf", "0"], 2),
        (vec!["port-forward", "vpf", "80:x"], 2),
        (vec!["port-forward", "--address", "nowhere", "vpf", "80"], 2),
        (vec!["port-forward", "nosuch", "80"], 1),
    ] {
        let out = env.husk(&args);
        assert_eq!(out.status.code(), Some(code), "{args:?}: {}", stderr(&out));
        assert!(!stderr(&out).is_empty(), "{args:?}");
    }
    // The forwarders end by themselves with their pods.
    for p in ["vpf", "wpf"] {
        let rm = env.husk(&["rm", "-f", p]);
        assert!(rm.status.success(), "rm -f {p}: {}", stderr(&rm));
    }
    for mut pf in [vpf, wpf] {
        let t0 = std::time::Instant::now();
        loop {
            if let Some(st) = pf.child.try_wait().unwrap() {
                assert_eq!(st.code(), Some(1));
                break;
            }
            assert!(
                t0.elapsed() < std::time::Duration::from_secs(10),
                "port-forward outlived its pod"
            );
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
    }
    env.finish();
}

#[test]
fn images_and_volumes_beyond_the_vms_virtio_slots_go_over_one_share() {
    // busybox and seven more layers: more than microvm's virtio slots
    // (8 without ACPI) hold as disks beside the VM's own devices.
    let reg = husk_tests::Registry::start();
    let busybox = std::fs::read("/bin/busybox").expect("/bin/busybox (busybox-static)");
    let mut layers = vec![husk_tests::layer_tar(&[
        ("bin/busybox", 0o755, Ok(&busybox)),
        ("bin/sh", 0o777, Err("busybox")),
    ])];
    let texts: Vec<String> = (1..=7).map(|i| format!("layer {i}\n")).collect();
    for (i, t) in texts.iter().enumerate() {
        let name = format!("etc/l{}", i + 1);
        layers.push(husk_tests::layer_tar(&[(
            name.as_str(),
            0o644,
            Ok(t.as_bytes()),
        )]));
    }
    let reference = husk_tests::push_linux_image(
        &reg,
        "tests/layered:v1",
        layers,
        serde_json::json!({"Env": ["PATH=/bin"], "Cmd": ["/bin/sh", "-c", "cat /etc/l1 /etc/l4 /etc/l7"]}),
    );
    let env = vm_env();
    let manifest = env.manifest(
        "layered.yaml",
        &format!(
            "apiVersion: v1\nkind: Pod\nmetadata: {{name: layered}}\nspec:\n  runtimeClassName: husk-vm\n  restartPolicy: Never\n  containers:\n  - {{name: main, image: {reference}}}\n"
        ),
    );
    let out = env.run_file(&manifest, &[]);
    assert!(out.status.success(), "{}{}", stdout(&out), stderr(&out));
    assert_eq!(stdout(&out), "layer 1\nlayer 4\nlayer 7\n");
    assert!(env.husk(&["rm", "layered"]).status.success());
    // Host volumes take a slot each, and five hostPaths leave no room for
    // the layers' share beside them: they go through that share too. Each
    // keeps its own place and its read-only flag.
    let hosts: Vec<std::path::PathBuf> = (0..5).map(|i| env.root().join(format!("h{i}"))).collect();
    for (i, h) in hosts.iter().enumerate() {
        std::fs::create_dir_all(h).unwrap();
        std::fs::write(h.join("name"), format!("h{i}\n")).unwrap();
    }
    let vols: String = hosts
        .iter()
        .enumerate()
        .map(|(i, h)| format!("  - {{name: h{i}, hostPath: {{path: {}}}}}\n", h.display()))
        .collect();
    let mounts: String = (0..5)
        .map(|i| {
            format!(
                "    - {{name: h{i}, mountPath: /h{i}, readOnly: {}}}\n",
                i == 1
            )
        })
        .collect();
    let script = "cat /h0/name /h4/name; echo from-guest > /h0/out; (echo x > /h1/out) 2>/dev/null && echo ro-writable || echo ro-refused; cat /etc/l7";
    let manifest = env.manifest(
        "crowded.yaml",
        &format!(
            "apiVersion: v1\nkind: Pod\nmetadata: {{name: crowded}}\nspec:\n  runtimeClassName: husk-vm\n  restartPolicy: Never\n  volumes:\n{vols}  containers:\n  - name: main\n    image: {reference}\n    command: [/bin/sh, -c, {script:?}]\n    volumeMounts:\n{mounts}"
        ),
    );
    let out = env.run_file(&manifest, &[]);
    assert!(out.status.success(), "{}{}", stdout(&out), stderr(&out));
    assert_eq!(stdout(&out), "h0\nh4\nro-refused\nlayer 7\n");
    assert_eq!(
        std::fs::read_to_string(hosts[0].join("out")).unwrap(),
        "from-guest\n"
    );
    assert!(!hosts[1].join("out").exists());
    assert!(env.husk(&["rm", "crowded"]).status.success());
    // The user's files stay.
    assert!(hosts.iter().all(|h| h.join("name").exists()));
    env.finish();
}
