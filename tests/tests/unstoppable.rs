//! #22 item 2: a wasm guest must not make its pod unstoppable. Before, a
//! guest that opened files until the monitor's descriptors ran out made
//! `husk stop` and `husk rm -f` fail after 20 s ("cannot reach its monitor:
//! Resource temporarily unavailable"), and a stopped (SIGSTOP) monitor did
//! the same.

mod common;

use common::*;
use std::time::{Duration, Instant};

#[test]
fn a_guest_that_opens_files_without_end_is_capped_and_its_pod_stops() {
    let env = Env::new();
    let data = env.root().join("data");
    std::fs::create_dir(&data).unwrap();
    std::fs::write(data.join("f"), "x").unwrap();
    let vol = format!("{}:/data", data.display());
    let out = env.husk(&[
        "run",
        "-d",
        "--name",
        "fds",
        "-v",
        &vol,
        probe().to_str().unwrap(),
        "openmany",
        "/data/f",
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    // The guest runs into its cap (an open fails or the guest is stopped
    // there), far below the monitor's own limit.
    let t0 = Instant::now();
    let log = loop {
        let log = stdout(&env.husk(&["logs", "fds"]));
        let v = env.inspect("fds");
        let ended = !env.container(&v, "main")["state"]["terminated"].is_null();
        if log.contains("open failed") || ended {
            break log;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(60),
            "the guest never hit a limit: {log}"
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    let last: u64 = log
        .lines()
        .filter_map(|l| l.strip_prefix("open "))
        .filter_map(|n| n.parse().ok())
        .max()
        .unwrap_or(0);
    assert!(last >= 256, "{log}");
    assert!(last <= 4096, "opened {last} files: {log}");
    // The monitor still answers: stop works at once and as usual.
    let t0 = Instant::now();
    let out = env.husk(&["stop", "-t", "1", "fds"]);
    assert!(out.status.success(), "stop: {}", stderr(&out));
    assert!(
        t0.elapsed() < Duration::from_secs(10),
        "stop took {:?}",
        t0.elapsed()
    );
    env.finish();
}

#[test]
fn rm_force_ends_a_monitor_that_does_not_answer() {
    let env = Env::new();
    let out = env.husk(&[
        "run",
        "-d",
        "--name",
        "frozen",
        probe().to_str().unwrap(),
        "stdin",
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    let v = env.inspect("frozen");
    let pid = v["status"]["monitorPid"].as_i64().unwrap() as i32;
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGSTOP,
    )
    .unwrap();
    let out = env.husk(&["rm", "-f", "frozen"]);
    // Whatever happens below, the monitor must not stay stopped.
    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGCONT,
    );
    assert!(out.status.success(), "rm -f: {}", stderr(&out));
    assert!(stderr(&out).contains("does not answer"), "{}", stderr(&out));
    assert!(!husk_sandbox::state::pid_alive(pid as u32));
    assert_eq!(env.pod_dirs(), 0);
    env.finish();
}
