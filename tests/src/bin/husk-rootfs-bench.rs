//! How a VM pod's image layers should reach the guest: a read-only ext4
//! image on virtio-blk (what husk does) or the unpacked layer directory
//! over virtio-fs (virtiofsd). Boots kernel B under QEMU (TCG on this host)
//! with the agent and busybox, with the same synthetic layer both ways
//! (1,000 files of 8 KiB in 10 directories, and 4 files of 2 MiB), and
//! times, from the host, over the agent: making the file system available
//! (mount, or the virtio-fs volume request), listing every entry, and
//! reading every byte (first read, then again from the page cache).
//! Three boots; the median of each figure.
//!
//! `cargo run --release -p husk-tests --bin husk-rootfs-bench`

use husk_protocol::{StartRequest, VolumeRequest, VolumeSource};
use husk_sandbox::vm::agent::AgentClient;
use husk_sandbox::vm::hypervisor::Vm;
use husk_sandbox::vm::initramfs::Initramfs;
use husk_sandbox::vm::qemu::{Accel, QemuConfig, QemuVm};
use husk_sandbox::vm::share::{FsShares, DEFAULT_VIRTIOFSD};
use husk_tests::{images_dir, static_agent};
use std::path::Path;
use std::time::{Duration, Instant};

fn make_layer(dir: &Path) {
    for d in 0..10 {
        let sub = dir.join(format!("d{d}"));
        std::fs::create_dir_all(&sub).unwrap();
        for f in 0..100 {
            let data: Vec<u8> = (0..8192u32).map(|i| (i * 31 + f * 7 + d) as u8).collect();
            std::fs::write(sub.join(format!("f{f}")), data).unwrap();
        }
    }
    for b in 0..4u8 {
        std::fs::write(dir.join(format!("big{b}")), vec![b; 2 << 20]).unwrap();
    }
}

/// Runs `script` and returns how long it took, host-side, in ms.
fn timed(agent: &AgentClient, id: &str, script: &str) -> f64 {
    let t0 = Instant::now();
    let r = agent
        .start(StartRequest {
            id: id.into(),
            argv: vec!["/bin/sh".into(), "-c".into(), script.into()],
            env: vec!["PATH=/bin".into()],
            ..Default::default()
        })
        .unwrap()
        .wait(Duration::from_secs(600))
        .unwrap();
    assert_eq!(
        r.code,
        Some(0),
        "{script}: {}{}",
        String::from_utf8_lossy(&r.stdout),
        String::from_utf8_lossy(&r.stderr)
    );
    t0.elapsed().as_secs_f64() * 1e3
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

fn main() {
    let dir = tempfile::tempdir().unwrap();
    let layer = dir.path().join("layer");
    make_layer(&layer);
    let img = dir.path().join("layer.ext4");
    husk_sandbox::vm::rootfs::ext4_image(&layer, &img).unwrap();

    let mut a = Initramfs::default();
    a.copy("init", &static_agent()).unwrap();
    a.dir("bin")
        .copy("bin/busybox", Path::new("/bin/busybox"))
        .unwrap();
    a.symlink("bin/sh", "busybox");
    let initrd = dir.path().join("initramfs.cpio");
    a.write_to(&mut std::fs::File::create(&initrd).unwrap())
        .unwrap();

    // [mount, list, first read, cached read] for blk and fs; what starting
    // a shell costs (taken off every shell-timed figure).
    let mut blk: [Vec<f64>; 4] = Default::default();
    let mut fs: [Vec<f64>; 4] = Default::default();
    let mut noop = Vec::new();
    for round in 0..3 {
        let mut shares = FsShares::new(dir.path().join(format!("fs{round}")));
        shares
            .add(Path::new(DEFAULT_VIRTIOFSD), "v0", &layer, true)
            .unwrap();
        let cfg = QemuConfig {
            kernel: images_dir().join("kernel-b.bzImage"),
            initrd: initrd.clone(),
            cmdline: String::new(),
            mem_mib: 256,
            vcpus: 1,
            accel: Accel::Tcg,
            acpi: false,
            disks: vec![(img.clone(), true)],
            shares: shares.shares().to_vec(),
            extra_args: vec![],
            run_as: None,
        };
        let mut vm = QemuVm::start(&cfg, &dir.path().join(format!("run{round}"))).unwrap();
        let agent = vm
            .agent(Duration::from_secs(120))
            .unwrap_or_else(|e| panic!("{e}\n{}", vm.console()));

        let base = median(
            &mut (0..5)
                .map(|_| timed(&agent, "noop", "true"))
                .collect::<Vec<_>>(),
        );
        noop.push(base);
        blk[0].push(
            timed(
                &agent,
                "mount-blk",
                "mkdir -p /blk && mount -t ext4 -o ro /dev/vda /blk",
            ) - base,
        );
        let t0 = Instant::now();
        agent
            .add_volumes(vec![VolumeRequest {
                name: "rootfs".into(),
                source: VolumeSource::VirtioFs {
                    tag: "v0".into(),
                    read_only: true,
                },
            }])
            .unwrap();
        fs[0].push(t0.elapsed().as_secs_f64() * 1e3);
        for (m, at) in [(&mut blk, "/blk"), (&mut fs, "/run/husk/volumes/rootfs")] {
            m[1].push(timed(&agent, "list", &format!("find {at} | wc -l")) - base);
            let read = format!("find {at} -type f -exec cat {{}} + | wc -c");
            m[2].push(timed(&agent, "read", &read) - base);
            m[3].push(timed(&agent, "reread", &read) - base);
        }
        let _ = agent.shutdown();
        vm.wait(Duration::from_secs(30));
    }
    println!(
        "layer: 1,000 files of 8 KiB in 10 dirs + 4 files of 2 MiB (16 MiB), kernel B, QEMU TCG, median of 3 boots;"
    );
    println!(
        "shell-timed figures less a shell's own start ({:.1} ms); the virtio-fs mount is the agent's volume request",
        median(&mut noop)
    );
    println!(
        "{:<24} {:>10} {:>10} {:>12} {:>12}",
        "", "mount", "list all", "read all", "read again"
    );
    for (name, m) in [
        ("virtio-blk + ext4 (ro)", &mut blk),
        ("virtio-fs (virtiofsd)", &mut fs),
    ] {
        println!(
            "{:<24} {:>8.1}ms {:>8.1}ms {:>10.1}ms {:>10.1}ms",
            name,
            median(&mut m[0]),
            median(&mut m[1]),
            median(&mut m[2]),
            median(&mut m[3])
        );
    }
}
