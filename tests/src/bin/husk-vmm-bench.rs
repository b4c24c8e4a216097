//! VMM-only cost with the null kernel (tests/guests/vmm/stub.S): time from
//! process start to the marker on the serial output and to process exit
//! (p50 over 30 runs), peak RSS, and 20 VMs started at once; husk-vmm
//! (also with a virtio-fs share) and QEMU microvm in the same run.
//! Run: `cargo run --release -p husk-tests --bin husk-vmm-bench` (needs
//! /dev/kvm; QEMU from qemu-system-x86 for the comparison).

use std::io::Read;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const MARKER: &[u8] = b"null kernel up";
const RUNS: usize = 30;
const BURST: usize = 20;

struct Run {
    marker: Duration,
    exit: Duration,
    rss_kib: i64,
}

/// Starts `cmd`, reads stdout until the marker, waits for the exit and
/// the child's peak RSS.
// The child is reaped by wait4 (which also reports its peak RSS).
#[allow(clippy::zombie_processes)]
fn one(cmd: &mut Command) -> Run {
    let t0 = Instant::now();
    let mut child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut out = child.stdout.take().unwrap();
    let mut seen = Vec::new();
    let mut buf = [0u8; 256];
    let marker = loop {
        let n = out.read(&mut buf).unwrap();
        assert!(n > 0, "no marker: {}", String::from_utf8_lossy(&seen));
        seen.extend_from_slice(&buf[..n]);
        if seen.windows(MARKER.len()).any(|w| w == MARKER) {
            break t0.elapsed();
        }
    };
    let mut status = 0;
    // SAFETY: rusage is plain data filled by the kernel; the pid is our child.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: as above.
    let pid = unsafe { libc::wait4(child.id() as i32, &mut status, 0, &mut usage) };
    assert_eq!(pid, child.id() as i32);
    Run {
        marker,
        exit: t0.elapsed(),
        rss_kib: usage.ru_maxrss,
    }
}

fn p50(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn report(name: &str, make: &dyn Fn() -> Command) {
    let runs: Vec<Run> = (0..RUNS).map(|_| one(&mut make())).collect();
    let rss = runs.iter().map(|r| r.rss_kib).max().unwrap_or(0);
    let marker = p50(runs.iter().map(|r| r.marker).collect());
    let exit = p50(runs.iter().map(|r| r.exit).collect());
    let t0 = Instant::now();
    let children: Vec<_> = (0..BURST)
        .map(|_| {
            make()
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .unwrap()
        })
        .collect();
    for mut c in children {
        assert!(c.wait().unwrap().success());
    }
    let burst = t0.elapsed();
    println!(
        "{name}: marker p50 {:.2} ms, exit p50 {:.2} ms, peak RSS {:.1} MiB, {BURST} VMs at once in {:.1} ms ({:.0} VMs/s)",
        marker.as_secs_f64() * 1e3,
        exit.as_secs_f64() * 1e3,
        rss as f64 / 1024.0,
        burst.as_secs_f64() * 1e3,
        BURST as f64 / burst.as_secs_f64()
    );
}

fn main() {
    let guests = std::path::PathBuf::from(env!("HUSK_TEST_GUESTS"));
    let stub = guests.join("stub.elf");
    let vmm = std::env::current_exe().unwrap().with_file_name("husk-vmm");
    report("husk-vmm", &|| {
        let mut c = Command::new(&vmm);
        c.arg("--kernel").arg(&stub).args(["--mem", "256"]);
        c
    });
    // The same with a virtio-fs share (fuse-backend-rs inside husk-vmm):
    // what a VM pod's volume adds to the VMM.
    let share = std::env::temp_dir().join(format!("husk-vmm-bench-{}", std::process::id()));
    std::fs::create_dir_all(&share).unwrap();
    let fs = format!("tag=bench,path={}", share.display());
    report("husk-vmm with a virtio-fs share", &|| {
        let mut c = Command::new(&vmm);
        c.arg("--kernel")
            .arg(&stub)
            .args(["--mem", "256", "--fs", &fs]);
        c
    });
    let _ = std::fs::remove_dir(&share);
    if Command::new("qemu-system-x86_64")
        .arg("--version")
        .output()
        .is_ok()
    {
        report("qemu microvm", &|| {
            let mut c = Command::new("qemu-system-x86_64");
            c.args([
                "-M",
                "microvm",
                "-enable-kvm",
                "-cpu",
                "host,-arch-capabilities",
                "-m",
                "256",
                "-nodefaults",
                "-display",
                "none",
                "-serial",
                "stdio",
                "-device",
                "i8042",
                "-no-reboot",
                "-kernel",
            ])
            .arg(&stub);
            c
        });
    } else {
        println!("qemu microvm: not installed (apt-get install qemu-system-x86)");
    }
}
