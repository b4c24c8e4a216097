//! husk-vmm end to end with freestanding test guests (tests/guests/vmm):
//! they run in well under a second even under PVM's instruction emulator.
//! Each test prints one `SKIPPED: no /dev/kvm` line where KVM is missing.

mod common;
use common::*;
use std::path::Path;
use std::process::{Command, Output};

fn vmm_bin() -> std::path::PathBuf {
    husk_bin().with_file_name("husk-vmm")
}

fn have_kvm(test: &str) -> bool {
    if Path::new("/dev/kvm").exists() {
        return true;
    }
    println!("SKIPPED: no /dev/kvm ({test})");
    false
}

fn vmm(args: &[&str]) -> Output {
    Command::new(vmm_bin()).args(args).output().unwrap()
}

fn events(o: &Output) -> Vec<serde_json::Value> {
    stderr(o)
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}

#[test]
fn null_kernel_prints_its_marker_and_resets() {
    if !have_kvm("null_kernel_prints_its_marker_and_resets") {
        return;
    }
    let stub = guest("stub.elf");
    for (mem, pit) in [("64", false), ("1024", false), ("256", true)] {
        let mut args = vec!["--kernel", stub.to_str().unwrap(), "--mem", mem];
        if pit {
            args.push("--pit");
        }
        let out = vmm(&args);
        assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
        assert_eq!(stdout(&out), "husk-vmm: null kernel up\n");
        let ev = events(&out);
        assert_eq!(ev[0]["event"], "running");
        assert_eq!(ev[1]["event"], "exit");
        assert_eq!(ev[1]["reason"], "reset");
    }
    // The serial console can go to a file instead; an initramfs and a
    // command line go along.
    let dir = tempfile::tempdir().unwrap();
    let initrd = dir.path().join("initrd.cpio");
    std::fs::write(&initrd, b"070701 an initramfs").unwrap();
    let log = dir.path().join("console");
    let out = vmm(&[
        "--kernel",
        stub.to_str().unwrap(),
        "--initrd",
        initrd.to_str().unwrap(),
        "--cmdline",
        "console=ttyS0",
        "--serial",
        log.to_str().unwrap(),
    ]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert_eq!(stdout(&out), "");
    assert_eq!(
        std::fs::read_to_string(&log).unwrap(),
        "husk-vmm: null kernel up\n"
    );
}

#[test]
fn a_triple_fault_ends_with_its_own_status() {
    if !have_kvm("a_triple_fault_ends_with_its_own_status") {
        return;
    }
    let out = vmm(&["--kernel", guest("triple-fault.elf").to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(3), "{}", stderr(&out));
    assert_eq!(events(&out).last().unwrap()["reason"], "triple-fault");
}

#[test]
fn bad_configuration_exits_2_with_a_clear_message() {
    let dir = tempfile::tempdir().unwrap();
    let junk = dir.path().join("junk");
    std::fs::write(&junk, b"not a kernel").unwrap();
    let cfg = dir.path().join("vm.json");
    std::fs::write(&cfg, br#"{"kernel": "/nowhere", "mem_mib": 64, "typo": 1}"#).unwrap();
    let stub = guest("stub.elf");
    let stub = stub.to_str().unwrap();
    let cases: &[(&[&str], &str)] = &[
        (&[], "no kernel"),
        (&["--kernel", "/nowhere/vmlinux"], "no such file"),
        (
            &["--kernel", junk.to_str().unwrap()],
            "neither an ELF kernel nor a bzImage",
        ),
        (
            &["--kernel", stub, "--initrd", junk.to_str().unwrap()],
            "not a cpio archive",
        ),
        (&["--kernel", stub, "--mem", "0"], "mem_mib 0 is too small"),
        (
            &["--kernel", stub, "--mem", "4096"],
            "reaches the device window",
        ),
        (
            &["--kernel", stub, "--vcpus", "0"],
            "vcpus 0 must be between 1",
        ),
        (
            &["--kernel", stub, "--vcpus", "200"],
            "vcpus 200 must be between 1",
        ),
        (&["--config", cfg.to_str().unwrap()], "unknown field `typo`"),
    ];
    for (args, msg) in cases {
        let out = vmm(args);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {}", stderr(&out));
        assert!(stderr(&out).contains(msg), "{args:?}: {}", stderr(&out));
    }
}

#[test]
fn virtio_rng_hands_the_guest_random_bytes() {
    if !have_kvm("virtio_rng_hands_the_guest_random_bytes") {
        return;
    }
    let rng = guest("rng.elf");
    let run = |extra: &[&str]| {
        let mut args = vec!["--kernel", rng.to_str().unwrap(), "--mem", "64"];
        args.extend_from_slice(extra);
        let out = vmm(&args);
        assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
        stdout(&out)
    };
    let first = run(&[]);
    let second = run(&[]);
    let hex = |s: &str| {
        let line = s
            .strip_prefix("rng: 16 ")
            .unwrap_or_else(|| panic!("{s:?}"));
        line.trim().to_owned()
    };
    let (a, b) = (hex(&first), hex(&second));
    assert_eq!(a.len(), 32);
    assert!(a.chars().all(|c| c.is_ascii_hexdigit()));
    assert_ne!(a, "0".repeat(32));
    assert_ne!(a, b, "two VMs got the same bytes");
    // Without the device the guest finds nothing at its address.
    assert_eq!(run(&["--no-rng"]), "rng: no virtio-rng device\n");
}

#[test]
fn virtio_blk_reads_writes_flushes_and_honours_read_only() {
    if !have_kvm("virtio_blk_reads_writes_flushes_and_honours_read_only") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let make_disk = |name: &str| {
        let p = dir.path().join(name);
        let mut bytes = b"HUSK DISK MARKER line one\nsecond line\n".to_vec();
        bytes.resize(1 << 20, 0);
        std::fs::write(&p, bytes).unwrap();
        p
    };
    let blk = guest("blk.elf");
    let rw = make_disk("rw.img");
    let out = vmm(&[
        "--kernel",
        blk.to_str().unwrap(),
        "--no-rng",
        "--disk",
        rw.to_str().unwrap(),
    ]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert_eq!(
        stdout(&out),
        "blk: capacity 2048\nblk: sector 0: HUSK DISK MARKER line one\nblk: write ok\nblk: flush ok\nblk: read back ok\nblk: past the end: status 1\n"
    );
    let after = std::fs::read(&rw).unwrap();
    let expect: Vec<u8> = (0..512).map(|i| b'a' + (i % 26) as u8).collect();
    assert_eq!(&after[512..1024], &expect[..], "sector 1 on the host file");

    let ro = make_disk("ro.img");
    let before = std::fs::read(&ro).unwrap();
    let arg = format!("{},ro", ro.display());
    let out = vmm(&["--kernel", blk.to_str().unwrap(), "--disk", &arg]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let text = stdout(&out);
    assert!(text.contains("blk: write refused (status 1)"), "{text}");
    assert!(text.contains("blk: read back differs"), "{text}");
    assert_eq!(
        std::fs::read(&ro).unwrap(),
        before,
        "a read-only disk changed"
    );
}
