//! The guest kernels and the test initramfs that images/build.sh makes
//! (tests/run.sh runs it first): each kernel boots to the tiny test init
//! under QEMU's software emulator, which runs real Linux user space on any
//! host, and the init reports what the kernel gave it. This checks that the
//! recipe's output is a working guest: kernel A's module set loads and binds
//! every virtio device, kernel B has them built in and brings up both vCPUs.

mod common;
use common::*;
use std::process::Command;

/// Boots `kernel` with the initramfs under `qemu -M microvm -accel tcg`,
/// with a virtio disk, rng, net and console, and returns the console.
fn boot_in_qemu(kernel: &str, initramfs: &str, microvm: &str, smp: &str) -> String {
    let dir = tempfile::tempdir().unwrap();
    let disk = dir.path().join("disk.img");
    let mut data = b"a known line on a virtio-blk disk\n".to_vec();
    data.resize(64 * 1024, 0);
    std::fs::write(&disk, &data).unwrap();
    let out = Command::new("timeout")
        .args(["120", "qemu-system-x86_64", "-M", microvm])
        .args(["-accel", "tcg", "-cpu", "max", "-m", "256", "-smp", smp])
        .args(["-nodefaults", "-no-user-config", "-display", "none"])
        .args(["-serial", "stdio", "-no-reboot", "-device", "i8042"])
        .arg("-kernel")
        .arg(image(kernel))
        .arg("-initrd")
        .arg(image(initramfs))
        // The TSC frequency: see husk_sandbox::vm::qemu::host_tsc_khz.
        .arg("-append")
        .arg(format!(
            "console=ttyS0 reboot=k panic=-1 tsc_early_khz={}",
            husk_sandbox::vm::qemu::host_tsc_khz().unwrap_or(2_000_000)
        ))
        .arg("-drive")
        .arg(format!("id=d0,file={},format=raw,if=none", disk.display()))
        .args(["-device", "virtio-blk-device,drive=d0"])
        .args(["-device", "virtio-rng-device"])
        // A NIC without a backend that reaches anything: the guest only
        // has to bind its driver.
        .args(["-netdev", "hubport,id=n0,hubid=0"])
        .args(["-device", "virtio-net-device,netdev=n0"])
        .args(["-device", "virtio-serial-device"])
        .output()
        .expect("qemu-system-x86_64 (tests/run.sh installs qemu-system-x86)");
    let console = stdout(&out);
    assert!(
        console.contains("husk-test-init: done"),
        "{kernel} did not reach the end of the test init ({:?}):\n{console}\n{}",
        out.status,
        stderr(&out)
    );
    console
}

/// The virtio drivers the test init found bound, sorted.
fn drivers(console: &str) -> Vec<String> {
    let mut d: Vec<String> = console
        .lines()
        .filter_map(|l| l.strip_prefix("husk-test-init: virtio virtio"))
        .filter_map(|l| l.split_once(' ').map(|(_, drv)| drv.trim().to_string()))
        .collect();
    d.sort();
    d
}

#[test]
fn kernel_a_loads_its_virtio_modules_and_binds_every_device() {
    let console = boot_in_qemu("kernel-a.bzImage", "initramfs-a.cpio.gz", "microvm", "1");
    let load = std::fs::read_to_string(image("kernel-a.modules").join("modules.load")).unwrap();
    let n = load.lines().count();
    assert!(n >= 10, "{load}");
    assert!(
        console.contains(&format!("husk-test-init: modules loaded {n} of {n}")),
        "{console}"
    );
    assert!(console.contains("on Linux 6."), "{console}");
    assert_eq!(
        drivers(&console),
        ["virtio_blk", "virtio_console", "virtio_net", "virtio_rng"],
        "{console}"
    );
    assert!(
        console.contains("husk-test-init: vda says a known line on a virtio-blk disk"),
        "{console}"
    );
}

#[test]
fn kernel_b_has_its_drivers_built_in_and_brings_up_every_vcpu() {
    // Kernel B has no ACPI: QEMU describes the devices on the command line
    // and the CPUs in an MP table, as husk-vmm does.
    let console = boot_in_qemu(
        "kernel-b.bzImage",
        "initramfs-b.cpio.gz",
        "microvm,acpi=off",
        "2",
    );
    assert!(!console.contains("modules loaded"), "{console}");
    assert!(
        console.contains("husk-test-init: cpus online 0-1"),
        "{console}"
    );
    assert_eq!(
        drivers(&console),
        ["virtio_blk", "virtio_console", "virtio_net", "virtio_rng"],
        "{console}"
    );
    assert!(
        console.contains("husk-test-init: vda says a known line on a virtio-blk disk"),
        "{console}"
    );
    let config = std::fs::read_to_string(image("kernel-b.config")).unwrap();
    for want in [
        "CONFIG_VIRTIO_MMIO=y",
        "CONFIG_VIRTIO_VSOCKETS=y",
        "CONFIG_VIRTIO_FS=y",
        "CONFIG_OVERLAY_FS=y",
        "CONFIG_EROFS_FS=y",
        "CONFIG_EXT4_FS=y",
        "CONFIG_SECCOMP_FILTER=y",
        "CONFIG_PVH=y",
    ] {
        assert!(config.lines().any(|l| l == want), "kernel B lacks {want}");
    }
    assert!(
        !config.lines().any(|l| l == "CONFIG_MODULES=y"),
        "kernel B must have no modules"
    );
}
