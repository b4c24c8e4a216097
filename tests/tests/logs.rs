//! Container logs of CLI pods (#22 items 3 and 4): rotated by size as the
//! kubelet rotates them, `--tail` read from the end, and followed (`husk
//! logs`, foreground `husk run`) in bounded memory, also when the pod
//! floods its output.

mod common;

use common::*;
use std::io::Read;
use std::process::Stdio;
use std::time::Duration;

/// Sets `[logs]` in the test root's config.
fn log_config(env: &Env, max_size: &str, max_files: u32) {
    let cfg = env.root().join("config.toml");
    let mut text = std::fs::read_to_string(&cfg).unwrap();
    text.push_str(&format!(
        "\n[logs]\ncontainer_log_max_size = \"{max_size}\"\ncontainer_log_max_files = {max_files}\n"
    ));
    std::fs::write(&cfg, text).unwrap();
}

/// The line `probe lines` prints as number `i` (LEN bytes and a newline).
fn probe_line(i: u64, len: usize) -> String {
    format!("{:08} {}\n", i, "x".repeat(len - 9))
}

fn run_to_end(env: &Env, name: &str, args: &[&str]) {
    let probe = probe();
    let mut argv = vec!["run", "-d", "--name", name, probe.to_str().unwrap()];
    argv.extend_from_slice(args);
    let out = env.husk(&argv);
    assert!(out.status.success(), "{}", stderr(&out));
    env.wait_for(name, "the pod to finish", |v| {
        v["status"]["finished"] == true
    });
}

/// Spawns husk, collects its stdout on a thread and returns that with the
/// child's exit code and its own peak resident memory (KiB, VmHWM sampled
/// while it runs: wait4's figure would include the pod monitor it spawns).
fn husk_rusage(env: &Env, args: &[&str]) -> (Vec<u8>, i32, i64) {
    let mut child = env
        .cmd()
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut out = child.stdout.take().unwrap();
    let reader = std::thread::spawn(move || {
        let mut v = Vec::new();
        out.read_to_end(&mut v).unwrap();
        v
    });
    let status = format!("/proc/{}/status", child.id());
    let mut hwm = 0;
    let code = loop {
        if let Ok(text) = std::fs::read_to_string(&status) {
            if let Some(l) = text.lines().find(|l| l.starts_with("VmHWM:")) {
                let kib: i64 = l.split_whitespace().nth(1).unwrap().parse().unwrap();
                hwm = hwm.max(kib);
            }
        }
        if let Some(s) = child.try_wait().unwrap() {
            break s.code().unwrap_or(-1);
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    (reader.join().unwrap(), code, hwm)
}

#[test]
fn logs_rotate_by_size_and_tail_reads_from_the_end() {
    let env = Env::new();
    log_config(&env, "64Ki", 3);
    // 20000 lines of 60 bytes: ~1.9 MiB of log, far past 3 files of 64 KiB.
    run_to_end(&env, "rot", &["lines", "20000", "60"]);
    let v = env.inspect("rot");
    let id = v["id"].as_str().unwrap().to_owned();
    let dir = env.root().join(format!("lib/pods/{id}/logs/main"));
    let mut files: Vec<String> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    files.sort();
    assert_eq!(
        files,
        ["0.log", "0.log.1", "0.log.2"],
        "in {}",
        dir.display()
    );
    for f in &files {
        let len = std::fs::metadata(dir.join(f)).unwrap().len();
        assert!(len <= 64 * 1024, "{f} is {len} bytes");
    }
    // `husk logs` gives what the kept files hold: the newest lines, in
    // order, ending with the last one.
    let all = stdout(&env.husk(&["logs", "rot"]));
    let lines: Vec<&str> = all.lines().collect();
    assert!(lines.len() > 1000 && lines.len() < 20000, "{}", lines.len());
    let first: u64 = lines[0][..8].parse().unwrap();
    let want: String = (first..20000).map(|i| probe_line(i, 60)).collect();
    assert!(all == want, "logs are not the newest lines in order");
    // --tail from the end, also reaching into a rotated file.
    let tail = stdout(&env.husk(&["logs", "rot", "--tail", "2"]));
    assert_eq!(tail, probe_line(19998, 60) + &probe_line(19999, 60));
    let current = std::fs::read_to_string(dir.join("0.log"))
        .unwrap()
        .lines()
        .count() as u64;
    let n = current + 5;
    let tail = stdout(&env.husk(&["logs", "rot", "--tail", &n.to_string()]));
    let want: String = (20000 - n..20000).map(|i| probe_line(i, 60)).collect();
    assert!(tail == want, "--tail {n} across files");
    env.finish();
}

#[test]
fn a_bad_log_config_is_refused() {
    let env = Env::new();
    log_config(&env, "10Mi", 1);
    let out = env.husk(&["run", "--name", "c", probe().to_str().unwrap(), "echo", "x"]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("container_log_max_files"),
        "{}",
        stderr(&out)
    );
    assert_eq!(env.pod_dirs(), 0);
    env.finish();
}

/// 400000 lines of 80 bytes: 30.5 MiB of output, a 45 MiB log.
const FLOOD_LINES: u64 = 400_000;

/// More than this, and the follower holds the log, not a window of it.
const MAX_RSS_KIB: i64 = 40 * 1024;

#[test]
fn logs_and_foreground_run_follow_a_flood_in_bounded_memory() {
    let env = Env::new();
    log_config(&env, "0", 2);
    let n = FLOOD_LINES.to_string();
    run_to_end(&env, "flood", &["lines", &n, "80"]);
    let (out, code, rss) = husk_rusage(&env, &["logs", "flood"]);
    assert_eq!(code, 0);
    assert_eq!(out.len() as u64, FLOOD_LINES * 81);
    assert!(out.ends_with(probe_line(FLOOD_LINES - 1, 80).as_bytes()));
    assert!(rss < MAX_RSS_KIB, "husk logs peaked at {rss} KiB");

    // The same in the foreground: everything arrives, in bounded memory.
    let probe = probe();
    let (out, code, rss) = husk_rusage(
        &env,
        &[
            "run",
            "--name",
            "flood-fg",
            probe.to_str().unwrap(),
            "lines",
            &n,
            "80",
        ],
    );
    assert_eq!(code, 0);
    assert_eq!(out.len() as u64, FLOOD_LINES * 81);
    assert!(rss < MAX_RSS_KIB, "husk run peaked at {rss} KiB");
    env.finish();
}

#[test]
fn sigterm_stops_a_foreground_run_that_floods_its_output() {
    let env = Env::new();
    let mut child = env
        .cmd()
        .args(["run", "--name", "endless", probe().to_str().unwrap()])
        .args(["lines", "0", "200"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut out = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut buf = vec![0u8; 1 << 16];
        let mut total = 0u64;
        let mut told = false;
        while let Ok(n) = out.read(&mut buf) {
            if n == 0 {
                break;
            }
            total += n as u64;
            if total > 8 << 20 && !told {
                let _ = tx.send(());
                told = true;
            }
        }
    });
    rx.recv_timeout(Duration::from_secs(60))
        .expect("8 MiB of output");
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    let t0 = std::time::Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if t0.elapsed() > Duration::from_secs(60) {
            let _ = child.kill();
            panic!("husk run did not end after SIGTERM");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    // The guest was stopped (a wasm guest's SIGTERM ends it at once).
    assert!(!status.success());
    let v = env.inspect("endless");
    assert_eq!(v["status"]["finished"], true, "{v:#}");
    env.finish();
}

/// #22 item 5: the state disk fills up under a running pod (its log, on
/// the same filesystem as monitor.log and the pod's status). Before, the
/// monitor panicked on its first log line (tracing's writer failed) and
/// died holding the pod's network; now the pod stops as any other, its
/// status says so and nothing is left.
#[test]
fn a_full_state_disk_neither_panics_the_monitor_nor_keeps_its_resources() {
    let env = Env::new();
    let root = env.root().to_owned();
    let cfg = std::fs::read_to_string(root.join("config.toml")).unwrap();
    let mounted = std::process::Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=12m", "tmpfs"])
        .arg(&root)
        .status()
        .unwrap();
    assert!(mounted.success());
    struct Unmount(std::path::PathBuf);
    impl Drop for Unmount {
        fn drop(&mut self) {
            let _ = std::process::Command::new("umount")
                .arg("-l")
                .arg(&self.0)
                .status();
        }
    }
    let guard = Unmount(root.clone());
    std::fs::write(root.join("config.toml"), cfg).unwrap();
    log_config(&env, "0", 2);
    let out = env.husk(&[
        "run",
        "-d",
        "--name",
        "full",
        probe().to_str().unwrap(),
        "lines",
        "0",
        "100",
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    // Until the disk is full.
    let t0 = std::time::Instant::now();
    loop {
        let st = nix::sys::statvfs::statvfs(&root).unwrap();
        if st.blocks_available() == 0 {
            break;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(60),
            "the disk never filled"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    // The pod keeps running (its output is dropped, not blocked on).
    std::thread::sleep(Duration::from_millis(500));
    let pid: i32 = {
        let v = env.inspect("full");
        assert_eq!(v["status"]["phase"], "Running", "{v:#}");
        v["status"]["monitorPid"].as_i64().unwrap() as i32
    };
    let stop = env.husk(&["stop", "-t", "1", "full"]);
    assert!(stop.status.success(), "stop: {}", stderr(&stop));
    // The monitor ended on its own, not by a panic (exit 101 would leave
    // its netns and veth behind: env.finish() below checks).
    let t0 = std::time::Instant::now();
    while husk_sandbox::state::pid_alive(pid as u32) {
        assert!(t0.elapsed() < Duration::from_secs(30), "monitor still runs");
        std::thread::sleep(Duration::from_millis(20));
    }
    let left = env.leftovers();
    assert!(
        left.iter().all(|l| l.starts_with("mount ")),
        "after stop on a full disk: {left:#?}"
    );
    let rm = env.husk(&["rm", "full"]);
    assert!(rm.status.success(), "rm: {}", stderr(&rm));
    drop(guard);
    env.finish();
}
