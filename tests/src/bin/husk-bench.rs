//! husk's benchmark: container start to first stdout byte inside a running
//! pod, whole-pod start (netns + CNI + monitor), and pods/s with 100 pods
//! started at once. Run: `cargo run --release -p husk-tests --bin husk-bench`
//! (as root; needs the CNI plugins). Prints p50/p99 figures.

use husk_tests::{husk_at, run_ok};
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

fn pct(v: &mut [Duration], p: f64) -> Duration {
    v.sort();
    let i = ((v.len() as f64 - 1.0) * p).round() as usize;
    v[i]
}

fn ms(d: Duration) -> String {
    format!("{:.3} ms", d.as_secs_f64() * 1e3)
}

fn guests() -> PathBuf {
    PathBuf::from(env!("HUSK_TEST_GUESTS"))
}

fn container_start(n: usize) -> Vec<Duration> {
    let dir = tempfile::tempdir().unwrap();
    let engine = husk_wasm::WasmEngine::new(&dir.path().join("cache")).unwrap();
    let (guest, _) = engine.load(&guests().join("probe.wasm")).unwrap();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let mut out = Vec::new();
    for _ in 0..n {
        let (r, w) = nix::unistd::pipe().unwrap();
        let (er, ew) = nix::unistd::pipe().unwrap();
        drop(er);
        let spec = husk_wasm::GuestSpec {
            args: vec!["probe".into(), "echo".into(), "x".into()],
            env: vec![],
            preopens: vec![],
            cwd: None,
            stdin: None,
            stdout: std::fs::File::from(w),
            stderr: std::fs::File::from(ew),
            memory_limit: Some(64 << 20),
            network: true,
            listen_ports: vec![],
            max_handles: 1024,
        };
        let t0 = Instant::now();
        let reader = std::thread::spawn(move || {
            let mut f = std::fs::File::from(r);
            let mut b = [0u8; 1];
            f.read_exact(&mut b).unwrap();
            let t = t0.elapsed();
            let mut rest = Vec::new();
            let _ = f.read_to_end(&mut rest);
            t
        });
        let kill = husk_wasm::KillSwitch::new();
        let exit = rt.block_on(engine.run(&guest, spec, &kill)).unwrap();
        assert_eq!(exit, husk_wasm::GuestExit::Exited(0));
        out.push(reader.join().unwrap());
    }
    out
}

fn setup_root(dir: &Path, bridge: &str, subnet: &str) {
    std::fs::write(
        dir.join("config.toml"),
        format!(
            "[network]\ncni_conf_dir = \"{}\"\nbridge = \"{bridge}\"\nsubnet = \"{subnet}\"\nname = \"{bridge}\"\n",
            dir.join("net.d").display()
        ),
    )
    .unwrap();
}

/// Runs the probe once in `root`, so the compile cache is warm.
fn warm(root: &Path, probe: &Path) {
    run_ok(
        husk_at(root)
            .args(["run", "--rm"])
            .arg(probe)
            .args(["echo", "x"]),
    );
}

fn whole_pod(n: usize) -> (Vec<Duration>, Vec<Duration>) {
    let dir = tempfile::tempdir().unwrap();
    setup_root(dir.path(), "huskbench0", "10.77.0.0/24");
    let probe = guests().join("probe.wasm");
    // Warm the compile cache.
    warm(dir.path(), &probe);
    let mut start = Vec::new();
    let mut full = Vec::new();
    for i in 0..n {
        let name = format!("b{i}");
        let t0 = Instant::now();
        let out = husk_at(dir.path())
            .args(["run", "-d", "--name", &name])
            .arg(&probe)
            .args(["stdin"])
            .output()
            .unwrap();
        start.push(t0.elapsed());
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        husk_at(dir.path())
            .args(["rm", "-f", &name])
            .output()
            .unwrap();
        let t0 = Instant::now();
        let out = husk_at(dir.path())
            .args(["run", "--rm"])
            .arg(&probe)
            .args(["echo", "x"])
            .output()
            .unwrap();
        full.push(t0.elapsed());
        assert!(out.status.success());
    }
    let _ = Command::new("ip")
        .args(["link", "del", "huskbench0"])
        .output();
    (start, full)
}

fn concurrent(n: usize) -> (Duration, f64) {
    let dir = tempfile::tempdir().unwrap();
    setup_root(dir.path(), "huskbench1", "10.78.0.0/24");
    let probe = guests().join("probe.wasm");
    warm(dir.path(), &probe);
    let root = dir.path().to_owned();
    let t0 = Instant::now();
    let handles: Vec<_> = (0..n)
        .map(|i| {
            let root = root.clone();
            let probe = probe.clone();
            std::thread::spawn(move || {
                run_ok(
                    husk_at(&root)
                        .args(["run", "-d", "--name", &format!("c{i}")])
                        .arg(&probe)
                        .args(["stdin"]),
                );
            })
        })
        .collect();
    for h in handles {
        h.join().unwrap();
    }
    let took = t0.elapsed();
    let names: Vec<String> = (0..n).map(|i| format!("c{i}")).collect();
    husk_at(&root)
        .args(["rm", "-f"])
        .args(&names)
        .output()
        .unwrap();
    let _ = Command::new("ip")
        .args(["link", "del", "huskbench1"])
        .output();
    (took, n as f64 / took.as_secs_f64())
}

fn main() {
    let mut cs = container_start(200);
    println!(
        "container start → first stdout byte (precompiled p1 module, 200 starts): p50 {} p99 {}",
        ms(pct(&mut cs, 0.5)),
        ms(pct(&mut cs, 0.99))
    );
    let (mut start, mut full) = whole_pod(50);
    println!("whole pod start, `husk run -d` until running (netns + CNI + monitor, 50 pods): p50 {} p99 {}", ms(pct(&mut start, 0.5)), ms(pct(&mut start, 0.99)));
    println!("whole pod run to completion, `husk run --rm` (start + run + CNI DEL + removal, 50 pods): p50 {} p99 {}", ms(pct(&mut full, 0.5)), ms(pct(&mut full, 0.99)));
    let (took, rate) = concurrent(100);
    println!(
        "100 pods started concurrently: {} total, {rate:.1} pods/s",
        ms(took)
    );
}
