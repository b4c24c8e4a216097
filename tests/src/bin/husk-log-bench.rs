//! Log streaming benchmark (#22 item 3): a wasm pod prints GiB lines of
//! 100 bytes; measured are foreground `husk run … > /dev/null` against the
//! same pod detached (the producer's own time), and `husk logs POD >
//! /dev/null` on the finished log against `cat` of that log (page cache
//! warm for both). Run: `cargo run --release -p husk-tests --bin
//! husk-log-bench [MIB]` (as root; needs the CNI plugins; default 1024).

use husk_tests::{husk_at, run_ok};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const LINE: u64 = 100;

fn secs(d: Duration) -> String {
    format!("{:.2} s", d.as_secs_f64())
}

/// Wall time of `cmd` with its stdout on /dev/null.
fn timed(cmd: &mut Command) -> Duration {
    let t0 = Instant::now();
    let st = cmd
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .status()
        .unwrap();
    assert!(st.success(), "{cmd:?}: {st}");
    t0.elapsed()
}

fn wait_finished(root: &Path, name: &str) {
    loop {
        let out = run_ok(husk_at(root).args(["inspect", name]));
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        if v["status"]["finished"] == true {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn main() {
    let mib: u64 = std::env::args()
        .nth(1)
        .map(|a| a.parse().expect("MIB: a number"))
        .unwrap_or(1024);
    let lines = (mib << 20) / LINE;
    let probe = PathBuf::from(env!("HUSK_TEST_GUESTS")).join("probe.wasm");
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let bridge = format!("hklb{}", std::process::id() % 10000);
    std::fs::write(
        root.join("config.toml"),
        format!(
            "[network]\ncni_conf_dir = \"{}\"\nbridge = \"{bridge}\"\nsubnet = \"10.77.9.0/24\"\nname = \"{bridge}\"\n\n[logs]\ncontainer_log_max_size = \"0\"\n",
            root.join("net.d").display()
        ),
    )
    .unwrap();
    let args = |name: &str, detach: bool| {
        let mut v: Vec<String> = vec!["run".into()];
        if detach {
            v.push("-d".into());
        }
        v.extend(["--name".into(), name.into()]);
        v.push(probe.to_str().unwrap().into());
        v.extend(["lines".into(), lines.to_string(), LINE.to_string()]);
        v
    };
    println!("{mib} MiB of output: {lines} lines of {LINE} bytes");

    // The producer alone: the pod detached, until it finished.
    let t0 = Instant::now();
    run_ok(husk_at(root).args(args("detached", true)));
    wait_finished(root, "detached");
    let detached = t0.elapsed();
    // The same pod in the foreground, its output streamed to /dev/null.
    let foreground = timed(husk_at(root).args(args("fg", false)));

    let out = run_ok(husk_at(root).args(["inspect", "detached"]));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let id = v["id"].as_str().unwrap();
    let log = root.join(format!("lib/pods/{id}/logs/main/0.log"));
    let log_len = std::fs::metadata(&log).unwrap().len();
    // Written back (writeback would slow whichever runs during it), the
    // page cache warm; then the best of five of each.
    timed(&mut Command::new("sync"));
    timed(Command::new("cat").arg(&log));
    let best = |f: &mut dyn FnMut() -> Duration| (0..5).map(|_| f()).min().unwrap();
    let cat = best(&mut || timed(Command::new("cat").arg(&log)));
    let logs = best(&mut || timed(husk_at(root).args(["logs", "detached"])));

    println!(
        "pod detached, start to finished (the producer): {}",
        secs(detached)
    );
    println!(
        "husk run in the foreground > /dev/null: {} ({:.2}x the detached pod)",
        secs(foreground),
        foreground.as_secs_f64() / detached.as_secs_f64()
    );
    println!(
        "log file: {:.0} MiB; cat > /dev/null: {}; husk logs > /dev/null: {} ({:.2}x cat, {:.0} MiB/s of output)",
        log_len as f64 / (1 << 20) as f64,
        secs(cat),
        secs(logs),
        logs.as_secs_f64() / cat.as_secs_f64(),
        mib as f64 / logs.as_secs_f64()
    );
    for name in ["detached", "fg"] {
        run_ok(husk_at(root).args(["rm", "-f", name]));
    }
    let _ = Command::new("ip").args(["link", "del", &bridge]).status();
}
