//! VM pod start (#5): `husk run -d` until the container process runs, p50
//! and p99 over 10, split into host-side work (everything husk does outside
//! the hypervisor process, from the monitor's timing line) and guest boot;
//! host memory per idle VM pod (PSS of monitor + hypervisor); pods per
//! second with 5 starting at once. Uses a busybox image pushed to a
//! docker-registry on loopback, the static agent and kernel B.
//! Run: `cargo run --release -p husk-tests --bin husk-vm-bench` (after
//! tests/run.sh has built the static agent and images).

use husk_tests::{husk_at, run_ok, Registry};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

fn pct(v: &mut [f64], p: f64) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[((v.len() as f64 - 1.0) * p).round() as usize]
}

fn setup_root(dir: &Path, bridge: &str, subnet: &str) {
    let exe = std::env::current_exe().unwrap();
    let agent = exe
        .parent()
        .unwrap()
        .parent()
        .unwrap()
        .join("x86_64-unknown-linux-gnu/release/husk-agent");
    let images = std::env::var_os("HUSK_IMAGES_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(std::env::var_os("HOME").unwrap()).join(".cache/husk-images")
        });
    std::fs::write(
        dir.join("config.toml"),
        format!(
            "[network]\ncni_conf_dir = \"{}\"\nbridge = \"{bridge}\"\nsubnet = \"{subnet}\"\nname = \"{bridge}\"\n\n[vm]\nagent = \"{}\"\nkernel = \"{}\"\n",
            dir.join("net.d").display(),
            agent.display(),
            images.join("kernel-b.bzImage").display()
        ),
    )
    .unwrap();
}

fn manifest(dir: &Path, name: &str, image: &str) -> PathBuf {
    manifest_with(dir, name, image, "")
}

/// A pod with an emptyDir (virtio-fs from the host) and a configMap (a
/// guest tmpfs) mounted.
fn manifest_with_volumes(dir: &Path, name: &str, image: &str) -> PathBuf {
    let cm = format!(
        "apiVersion: v1\nkind: ConfigMap\nmetadata: {{name: cfg-{name}}}\ndata: {{a: b}}\n---\n"
    );
    let p = manifest_with(
        dir,
        name,
        image,
        &format!("    volumeMounts: [{{name: d, mountPath: /d}}, {{name: c, mountPath: /c}}]\n  volumes:\n  - {{name: d, emptyDir: {{}}}}\n  - {{name: c, configMap: {{name: cfg-{name}}}}}\n"),
    );
    let text = std::fs::read_to_string(&p).unwrap();
    std::fs::write(&p, cm + &text).unwrap();
    p
}

fn manifest_with(dir: &Path, name: &str, image: &str, extra: &str) -> PathBuf {
    let p = dir.join(format!("{name}.yaml"));
    std::fs::write(
        &p,
        format!(
            "apiVersion: v1\nkind: Pod\nmetadata: {{name: {name}}}\nspec:\n  runtimeClassName: husk-vm\n  terminationGracePeriodSeconds: 1\n  containers:\n  - name: c\n    image: {image}\n    command: [\"/bin/sh\", \"-c\", \"exec sleep 600\"]\n{extra}"
        ),
    )
    .unwrap();
    p
}

fn inspect(root: &Path, pod: &str) -> serde_json::Value {
    let out = run_ok(husk_at(root).args(["inspect", pod]));
    serde_json::from_slice(&out.stdout).unwrap()
}

fn wait_running(root: &Path, pod: &str) -> serde_json::Value {
    let t0 = Instant::now();
    loop {
        let v = inspect(root, pod);
        if v["status"]["containerStatuses"][0]["state"]["running"].is_object() {
            return v;
        }
        assert!(t0.elapsed() < Duration::from_secs(120), "{v:#}");
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// host_ms and boot_ms from the monitor's timing line.
/// (host work before the guest boots, guest configuration over the agent
/// after it, guest boot), in ms.
fn timing(root: &Path, id: &str) -> (f64, f64, f64) {
    let log = std::fs::read_to_string(root.join("lib/pods").join(id).join("monitor.log"))
        .unwrap_or_default();
    let line = log
        .lines()
        .find(|l| l.contains("vm pod timing"))
        .unwrap_or_default();
    let field = |k: &str| {
        line.split_whitespace()
            .find_map(|w| w.strip_prefix(&format!("{k}=")))
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(f64::NAN)
    };
    let t = (
        field("before_boot_ms"),
        field("after_boot_ms"),
        field("boot_ms"),
    );
    if t.0.is_nan() {
        eprintln!("no timing line in the monitor log of {id}:\n{log}");
    }
    t
}

/// PSS in KiB of a process and its children.
fn pss_kib(pid: u32) -> u64 {
    let own = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("Pss:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .unwrap_or(0);
    let mut total = own;
    if let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) {
        for t in tasks.flatten() {
            let children = std::fs::read_to_string(t.path().join("children")).unwrap_or_default();
            for c in children.split_whitespace().filter_map(|c| c.parse().ok()) {
                total += pss_kib(c);
            }
        }
    }
    total
}

fn main() {
    let reg = Registry::start();
    let image = husk_tests::push_busybox_image(&reg, "bench/busybox:vm");
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    setup_root(root, "huskvmb0", "10.79.0.0/24");
    run_ok(husk_at(root).args(["pull", "-q", &image]));

    let (mut total, mut host, mut boot, mut pss) = (vec![], vec![], vec![], vec![]);
    let mut config = vec![];
    for i in 0..10 {
        let name = format!("v{i}");
        let m = manifest(root, &name, &image);
        let t0 = Instant::now();
        run_ok(husk_at(root).args(["run", "-d", "-f"]).arg(&m));
        let v = wait_running(root, &name);
        total.push(t0.elapsed().as_secs_f64() * 1e3);
        let (h, c, b) = timing(root, v["id"].as_str().unwrap_or_default());
        host.push(h);
        config.push(c);
        boot.push(b);
        // The idle pod's host memory.
        std::thread::sleep(Duration::from_millis(300));
        if let Some(pid) = v["status"]["monitorPid"].as_u64() {
            pss.push(pss_kib(pid as u32) as f64 / 1024.0);
        }
        run_ok(husk_at(root).args(["rm", "-f", &name]));
    }
    println!(
        "VM pod start, `husk run -d` until the container runs (QEMU TCG, kernel B, 10 pods): p50 {:.0} ms p99 {:.0} ms",
        pct(&mut total, 0.5),
        pct(&mut total, 0.99)
    );
    println!(
        "  host-side work before the boot (layers, initramfs, netns + CNI, tap + tc): p50 {:.1} ms p99 {:.1} ms",
        pct(&mut host, 0.5),
        pct(&mut host, 0.99)
    );
    println!(
        "  guest configuration over the agent after the boot (network, /etc files): p50 {:.1} ms p99 {:.1} ms",
        pct(&mut config, 0.5),
        pct(&mut config, 0.99)
    );
    println!(
        "  guest boot to the agent's hello: p50 {:.0} ms p99 {:.0} ms",
        pct(&mut boot, 0.5),
        pct(&mut boot, 0.99)
    );
    println!(
        "host memory per idle VM pod (PSS of monitor + QEMU, 256 MiB guest): p50 {:.1} MiB",
        pct(&mut pss, 0.5)
    );

    let (mut vtotal, mut vhost, mut vconfig, mut vpss) = (vec![], vec![], vec![], vec![]);
    for i in 0..10 {
        let name = format!("w{i}");
        let m = manifest_with_volumes(root, &name, &image);
        let t0 = Instant::now();
        run_ok(husk_at(root).args(["run", "-d", "-f"]).arg(&m));
        let v = wait_running(root, &name);
        vtotal.push(t0.elapsed().as_secs_f64() * 1e3);
        let (h, c, _) = timing(root, v["id"].as_str().unwrap_or_default());
        vhost.push(h);
        vconfig.push(c);
        std::thread::sleep(Duration::from_millis(300));
        if let Some(pid) = v["status"]["monitorPid"].as_u64() {
            vpss.push(pss_kib(pid as u32) as f64 / 1024.0);
        }
        run_ok(husk_at(root).args(["rm", "-f", &name]));
    }
    println!(
        "VM pod start with an emptyDir (virtio-fs) and a configMap (guest tmpfs): p50 {:.0} ms p99 {:.0} ms; host-side before the boot (with virtiofsd) p50 {:.1} ms p99 {:.1} ms; guest configuration p50 {:.1} ms p99 {:.1} ms; idle PSS (with virtiofsd) p50 {:.1} MiB",
        pct(&mut vtotal, 0.5),
        pct(&mut vtotal, 0.99),
        pct(&mut vhost, 0.5),
        pct(&mut vhost, 0.99),
        pct(&mut vconfig, 0.5),
        pct(&mut vconfig, 0.99),
        pct(&mut vpss, 0.5)
    );

    let t0 = Instant::now();
    let handles: Vec<_> = (0..5)
        .map(|i| {
            let root = root.to_owned();
            let m = manifest(&root, &format!("c{i}"), &image);
            std::thread::spawn(move || {
                let name = format!("c{i}");
                run_ok(husk_at(&root).args(["run", "-d", "-f"]).arg(&m));
                wait_running(&root, &name);
            })
        })
        .collect();
    for h in handles {
        h.join().unwrap();
    }
    let took = t0.elapsed();
    println!(
        "5 VM pods started at once: {:.2} s, {:.2} pods/s",
        took.as_secs_f64(),
        5.0 / took.as_secs_f64()
    );
    let names: Vec<String> = (0..5).map(|i| format!("c{i}")).collect();
    run_ok(husk_at(root).args(["rm", "-f"]).args(&names));
    let _ = Command::new("ip")
        .args(["link", "del", "huskvmb0"])
        .output();
}
