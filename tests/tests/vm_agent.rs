//! husk-agent as PID 1 of a microVM, driven over husk-protocol: the guest
//! kernels from images/build.sh boot under QEMU (TCG, as VM pods run on
//! this PVM host) with an initramfs that husk packs from the static agent
//! and busybox; the host runs processes in the guest through the agent and
//! shuts the VM down. tests/run.sh builds the static agent
//! (`--target x86_64-unknown-linux-gnu` with crt-static).

mod common;
use common::*;
use husk_protocol::StartRequest;
use husk_sandbox::vm::agent::{AgentClient, Finished};
use husk_sandbox::vm::hypervisor::Vm;
use husk_sandbox::vm::initramfs::Initramfs;
use husk_sandbox::vm::qemu::{Accel, QemuConfig, QemuVm};
use std::path::{Path, PathBuf};
use std::time::Duration;

/// The agent as /init, busybox as /bin/sh, and kernel A's modules when
/// `modules` is given.
fn initramfs(dir: &Path, modules: Option<&Path>) -> PathBuf {
    let mut a = Initramfs::default();
    a.copy("init", &static_agent()).unwrap();
    a.dir("bin")
        .copy("bin/busybox", Path::new("/bin/busybox"))
        .expect("/bin/busybox (tests/run.sh installs busybox-static)");
    a.symlink("bin/sh", "busybox");
    if let Some(m) = modules {
        a.dir("lib").dir("lib/modules");
        for e in std::fs::read_dir(m).unwrap() {
            let e = e.unwrap();
            let name = e.file_name().into_string().unwrap();
            a.copy(&format!("lib/modules/{name}"), &e.path()).unwrap();
        }
    }
    let path = dir.join("initramfs.cpio");
    a.write_to(&mut std::fs::File::create(&path).unwrap())
        .unwrap();
    path
}

/// A 256 MiB, 1-vCPU TCG guest of `kernel` with the agent's initramfs
/// (and kernel A's modules, which also need ACPI), and read-only `disks`.
fn tcg_config(kernel: &str, modules: Option<&Path>, dir: &Path, disks: &[PathBuf]) -> QemuConfig {
    QemuConfig {
        kernel: image(kernel),
        initrd: initramfs(dir, modules),
        cmdline: String::new(),
        mem_mib: 256,
        vcpus: 1,
        accel: Accel::Tcg,
        acpi: modules.is_some(),
        disks: disks.iter().map(|d| (d.clone(), true)).collect(),
        shares: vec![],
        extra_args: vec![],
        // An unprivileged uid no one else uses, as VM pods get.
        run_as: Some((0x4000_0000 + 0xf_ff00, 0x4000_0000 + 0xf_ff00)),
    }
}

fn boot(kernel: &str, modules: Option<&Path>, dir: &Path, disk: Option<&Path>) -> QemuVm {
    let disks: Vec<PathBuf> = disk.map(Path::to_owned).into_iter().collect();
    QemuVm::start(&tcg_config(kernel, modules, dir, &disks), &dir.join("run")).unwrap()
}

/// Runs a shell script in the guest to its end.
fn run(agent: &AgentClient, id: &str, script: &str) -> Finished {
    agent
        .start(sh(id, script))
        .unwrap()
        .wait(Duration::from_secs(60))
        .unwrap()
}

#[test]
fn the_agent_runs_processes_in_kernel_b_and_powers_the_vm_off() {
    let dir = tempfile::tempdir().unwrap();
    let disk = dir.path().join("disk.img");
    let mut data = b"a known line on a virtio-blk disk\n".to_vec();
    data.resize(64 * 1024, 0);
    std::fs::write(&disk, &data).unwrap();
    // The guest's RTC says 2001: the agent takes the host's time instead.
    let mut cfg = tcg_config(
        "kernel-b.bzImage",
        None,
        dir.path(),
        std::slice::from_ref(&disk),
    );
    cfg.extra_args = vec!["-rtc".into(), "base=2001-01-01T00:00:00".into()];
    let mut vm = QemuVm::start(&cfg, &dir.path().join("run")).unwrap();
    let agent = vm
        .agent(Duration::from_secs(60))
        .unwrap_or_else(|e| panic!("{e}\n{}", vm.console()));
    assert!(agent.kernel().starts_with("6."), "{}", agent.kernel());
    let guest_now: u64 = String::from_utf8_lossy(&run(&agent, "clock", "date +%s").stdout)
        .trim()
        .parse()
        .unwrap();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    assert!(
        now.abs_diff(guest_now) < 30,
        "guest {guest_now}, host {now}\n{}",
        vm.console()
    );

    // Output, exit code, stdin and an environment of exactly what was given.
    let p = agent
        .start(StartRequest {
            stdin: true,
            env: vec!["PATH=/bin".into(), "GREETING=hello".into()],
            ..sh(
                "greet",
                "cat; echo; echo $GREETING ${HOME:-no-home}; echo oops >&2; exit 7",
            )
        })
        .unwrap();
    p.write_stdin(b"from ", false).unwrap();
    p.write_stdin(b"the host", true).unwrap();
    let r = p.wait(Duration::from_secs(60)).unwrap();
    assert_eq!(
        String::from_utf8_lossy(&r.stdout),
        "from the host\nhello no-home\n"
    );
    assert_eq!(r.stderr, b"oops\n");
    assert_eq!(r.code, Some(7));

    // The guest the agent set up: PID 1, its mounts, the disk.
    let r = run(
        &agent,
        "look",
        "echo pid1=$(cat /proc/1/comm); grep -c cgroup2 /proc/mounts; head -c 33 /dev/vda",
    );
    assert_eq!(
        String::from_utf8_lossy(&r.stdout),
        "pid1=init\n1\na known line on a virtio-blk disk"
    );

    // Two processes at once: a server that streams until signalled, while
    // another runs to its end.
    let server = agent
        .start(sh(
            "ticker",
            "trap 'echo bye; exit 0' TERM; echo up; while :; do sleep 0.05; done",
        ))
        .unwrap();
    match server.next_event(Duration::from_secs(30)).unwrap() {
        husk_protocol::Event::Output { data, .. } => assert_eq!(data, b"up\n"),
        other => panic!("{other:?}"),
    }
    assert_eq!(run(&agent, "meanwhile", "echo done").stdout, b"done\n");
    server.signal(15).unwrap();
    let r = server.wait(Duration::from_secs(30)).unwrap();
    assert_eq!((r.code, r.stdout), (Some(0), b"bye\n".to_vec()));

    // A process killed by a signal, and errors that name what was wrong.
    let r = run(&agent, "killed", "kill -9 $$");
    assert_eq!((r.code, r.signal), (None, Some(9)));
    let e = agent
        .start(StartRequest {
            id: "missing".into(),
            argv: vec!["/bin/nonexistent".into()],
            ..Default::default()
        })
        .err()
        .unwrap();
    assert!(e.to_string().contains("/bin/nonexistent"), "{e}");

    agent.shutdown().unwrap();
    assert!(vm.wait(Duration::from_secs(30)), "{}", vm.console());
    drop(vm);
    assert!(
        !dir.path().join("run").exists(),
        "the run directory is removed"
    );
}

#[test]
fn the_agent_loads_kernel_a_modules_before_it_needs_its_port() {
    // Kernel A's virtio_console is a module: the agent must load it (from
    // the initramfs, in modules.load order) before its port appears.
    let dir = tempfile::tempdir().unwrap();
    let mut vm = boot(
        "kernel-a.bzImage",
        Some(&image("kernel-a.modules")),
        dir.path(),
        None,
    );
    let agent = vm
        .agent(Duration::from_secs(60))
        .unwrap_or_else(|e| panic!("{e}\n{}", vm.console()));
    assert!(agent.kernel().contains("cloud-amd64"), "{}", agent.kernel());
    let r = run(
        &agent,
        "mods",
        "grep -c '^virtio' /proc/modules; ls /sys/bus/virtio/drivers",
    );
    let out = String::from_utf8_lossy(&r.stdout);
    assert!(out.contains("virtio_console"), "{out}");
    assert!(out.contains("virtio_rng"), "{out}");
    agent.shutdown().unwrap();
    assert!(vm.wait(Duration::from_secs(30)), "{}", vm.console());
}

#[test]
fn a_vm_that_cannot_start_leaves_nothing_behind() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = QemuConfig {
        kernel: dir.path().join("no-such-kernel"),
        initrd: dir.path().join("no-such-initrd"),
        cmdline: String::new(),
        mem_mib: 256,
        vcpus: 1,
        accel: Accel::Tcg,
        acpi: false,
        disks: vec![],
        shares: vec![],
        extra_args: vec![],
        run_as: None,
    };
    let err = QemuVm::start(&cfg, &dir.path().join("run")).err().unwrap();
    assert!(err.to_string().contains("no-such-kernel"), "{err}");
    assert!(!dir.path().join("run").exists());
    // A kernel that is not one: QEMU ends, and the error carries its words.
    std::fs::write(dir.path().join("bad"), b"not a kernel").unwrap();
    let mut vm = QemuVm::start(
        &QemuConfig {
            kernel: dir.path().join("bad"),
            initrd: dir.path().join("bad"),
            ..cfg
        },
        &dir.path().join("run"),
    )
    .unwrap();
    let err = vm.agent(Duration::from_secs(20)).err().unwrap();
    assert!(err.to_string().contains("VM ended"), "{err}");
    drop(vm);
    assert!(!dir.path().join("run").exists());
}

#[test]
fn containers_run_on_an_image_pulled_from_a_registry() {
    // A two-layer Linux image: busybox and two files, then a layer that
    // adds a file and deletes one (an overlay whiteout, end to end).
    let reg = husk_tests::Registry::start();
    let reference = husk_tests::push_busybox_image(&reg, "tests/busybox:vm");

    // husk pulls and unpacks it; each layer becomes an ext4 image.
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("husk");
    let husk = |args: &[&str]| {
        let mut c = std::process::Command::new(husk_bin());
        husk_tests::run_ok(c.arg("--root").arg(&root).args(args))
    };
    husk(&["pull", &reference]);
    let out = husk(&["unpack", &reference]);
    let snapshots: Vec<PathBuf> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(PathBuf::from)
        .collect();
    assert_eq!(snapshots.len(), 2, "{snapshots:?}");
    let images: Vec<PathBuf> = snapshots
        .iter()
        .enumerate()
        .map(|(i, s)| {
            let img = dir.path().join(format!("layer{i}.ext4"));
            husk_sandbox::vm::rootfs::ext4_image(s, &img).unwrap();
            img
        })
        .collect();

    let cfg = tcg_config("kernel-b.bzImage", None, dir.path(), &images);
    let mut vm = QemuVm::start(&cfg, &dir.path().join("run")).unwrap();
    let agent = vm
        .agent(Duration::from_secs(60))
        .unwrap_or_else(|e| panic!("{e}\n{}", vm.console()));
    let container = |id: &str, script: &str| StartRequest {
        rootfs: Some(husk_protocol::Rootfs {
            layers: vec!["/dev/vda".into(), "/dev/vdb".into()],
            hostname: Some(format!("{id}-host")),
            ..Default::default()
        }),
        cwd: Some("/etc".into()),
        ..sh(id, script)
    };
    let r = agent
        .start(container(
            "web",
            "cat greeting keep; test -e motd && echo motd-present || echo motd-gone; \
             hostname; echo written > /tmp/w; cat /tmp/w; \
             test -e /init && echo sees-the-agent || echo isolated; \
             test -d /proc/self && echo proc; test -c /dev/null && echo dev; pwd",
        ))
        .unwrap()
        .wait(Duration::from_secs(60))
        .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&r.stdout),
        "from the top layer\nkept\nmotd-gone\nweb-host\nwritten\nisolated\nproc\ndev\n/etc\n",
        "{}",
        String::from_utf8_lossy(&r.stderr)
    );
    assert_eq!(r.code, Some(0));
    // A second container on the same layers: its own writable layer.
    let r = agent
        .start(container(
            "other",
            "test -e /tmp/w && echo shared || echo separate; hostname",
        ))
        .unwrap()
        .wait(Duration::from_secs(60))
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&r.stdout), "separate\nother-host\n");
    // Both roots are gone from the guest once their processes ended; the
    // agent's own host name never changed.
    let r = run(
        &agent,
        "check",
        "grep -c /run/husk/containers /proc/mounts; ls /run/husk/containers | wc -l; hostname",
    );
    assert_eq!(String::from_utf8_lossy(&r.stdout), "0\n0\n(none)\n");
    // A layer that is not a device path is refused by name.
    let e = agent
        .start(StartRequest {
            rootfs: Some(husk_protocol::Rootfs {
                layers: vec!["../etc".into()],
                hostname: None,
                ..Default::default()
            }),
            ..sh("bad", "true")
        })
        .err()
        .unwrap();
    assert!(e.to_string().contains("not a /dev path"), "{e}");
    agent.shutdown().unwrap();
    assert!(vm.wait(Duration::from_secs(30)), "{}", vm.console());
}

/// A network namespace shaped the way CNI leaves a pod's: eth0 with the
/// pod IP, its veth peer on the host with the gateway address. Removed
/// (with both veth ends) on drop.
struct PodNet {
    name: String,
    host_if: String,
    subnet: u8,
}

impl PodNet {
    fn new() -> Self {
        let id = std::process::id();
        let subnet = (id % 200) as u8 + 20;
        let net = PodNet {
            name: format!("husk-vmnet-{id}"),
            host_if: format!("hvm{}", id % 100_000),
            subnet,
        };
        let ip = |args: &[&str]| {
            let out = std::process::Command::new("ip")
                .args(args)
                .output()
                .unwrap();
            assert!(out.status.success(), "ip {args:?}: {}", stderr(&out));
        };
        ip(&["netns", "add", &net.name]);
        ip(&[
            "link",
            "add",
            &net.host_if,
            "type",
            "veth",
            "peer",
            "name",
            "eth0",
            "netns",
            &net.name,
        ]);
        ip(&[
            "addr",
            "add",
            &format!("{}/24", net.gateway()),
            "dev",
            &net.host_if,
        ]);
        ip(&["link", "set", &net.host_if, "up"]);
        ip(&[
            "-n",
            &net.name,
            "addr",
            "add",
            &format!("{}/24", net.pod_ip()),
            "dev",
            "eth0",
        ]);
        ip(&["-n", &net.name, "link", "set", "eth0", "up"]);
        ip(&["-n", &net.name, "link", "set", "lo", "up"]);
        net
    }

    fn path(&self) -> PathBuf {
        PathBuf::from("/run/netns").join(&self.name)
    }

    fn gateway(&self) -> String {
        format!("10.231.{}.1", self.subnet)
    }

    fn pod_ip(&self) -> String {
        format!("10.231.{}.2", self.subnet)
    }
}

impl Drop for PodNet {
    fn drop(&mut self) {
        let _ = std::process::Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}

#[test]
fn the_guest_holds_the_pod_ip_through_tc_mirroring() {
    use std::io::{Read, Write};
    let net = PodNet::new();
    let nic = husk_sandbox::vm::nic::attach(&net.path(), "eth0", "tap0", false).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let cfg = tcg_config("kernel-b.bzImage", None, dir.path(), &[]);
    let mut vm = QemuVm::start_with_nic(&cfg, &dir.path().join("run"), Some(&nic)).unwrap();
    let mac = nic.mac.clone();
    drop(nic); // QEMU holds the tap now.
    let agent = vm
        .agent(Duration::from_secs(60))
        .unwrap_or_else(|e| panic!("{e}\n{}", vm.console()));
    let iface = agent
        .configure_network(husk_protocol::NetworkConfig {
            mac: mac.clone(),
            addresses: vec![husk_protocol::IpConfig {
                address: format!("{}/24", net.pod_ip()),
                gateway: Some(net.gateway()),
            }],
        })
        .unwrap();
    assert_eq!(iface, "eth0");
    let r = run(&agent, "addr", "cat /sys/class/net/eth0/address");
    assert_eq!(String::from_utf8_lossy(&r.stdout).trim(), mac);

    // The host reaches the guest at the pod IP.
    let ping = std::process::Command::new("ping")
        .args(["-c", "1", "-W", "10", &net.pod_ip()])
        .output()
        .unwrap();
    assert!(ping.status.success(), "{}{}", stdout(&ping), vm.console());

    // The guest connects out to a server on the host side.
    let listener = std::net::TcpListener::bind((net.gateway().as_str(), 0)).unwrap();
    let port = listener.local_addr().unwrap().port();
    let client = agent
        .start(sh(
            "client",
            &format!("echo hello-from-the-vm | nc {} {port}", net.gateway()),
        ))
        .unwrap();
    let (mut conn, _) = listener.accept().unwrap();
    let mut got = String::new();
    conn.read_to_string(&mut got).unwrap();
    assert_eq!(got, "hello-from-the-vm\n");
    drop(conn); // nc waits for the other side to close
    assert_eq!(client.wait(Duration::from_secs(30)).unwrap().code, Some(0));

    // A server in the guest answers a host connection to the pod IP.
    let server = agent
        .start(sh("server", "echo served-by-the-vm | nc -l -p 8080"))
        .unwrap();
    let t0 = std::time::Instant::now();
    let mut conn = loop {
        match std::net::TcpStream::connect((net.pod_ip().as_str(), 8080)) {
            Ok(c) => break c,
            Err(e) if t0.elapsed() < Duration::from_secs(20) => {
                let _ = e;
                std::thread::sleep(Duration::from_millis(100));
            }
            Err(e) => panic!("{e}"),
        }
    };
    conn.write_all(b"hi\n").unwrap();
    conn.shutdown(std::net::Shutdown::Write).unwrap();
    let mut got = String::new();
    conn.read_to_string(&mut got).unwrap();
    assert_eq!(got, "served-by-the-vm\n");
    let r = server.wait(Duration::from_secs(30)).unwrap();
    assert_eq!(r.stdout, b"hi\n");

    agent.shutdown().unwrap();
    assert!(vm.wait(Duration::from_secs(30)), "{}", vm.console());
    drop(vm);
    // The tap went with QEMU.
    let links = std::process::Command::new("ip")
        .args(["-n", &net.name, "-o", "link"])
        .output()
        .unwrap();
    assert!(!stdout(&links).contains("tap0"), "{}", stdout(&links));
}

/// Under KVM QEMU must open /dev/kvm (root's) before it can drop: it
/// starts as root and gives up root with -runas once the machine is made;
/// from then on it has the pod's uid, no capabilities, no_new_privs and
/// its seccomp filter. (On this PVM host a guest kernel does not get far
/// under KVM; QEMU's own confinement is what is checked.)
#[test]
fn qemu_under_kvm_gives_up_root_once_it_has_opened_dev_kvm() {
    if !have_kvm("qemu_under_kvm_gives_up_root_once_it_has_opened_dev_kvm") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = tcg_config("kernel-b.bzImage", None, dir.path(), &[]);
    cfg.accel = Accel::Kvm;
    let (uid, _) = cfg.run_as.unwrap();
    let vm = QemuVm::start(&cfg, &dir.path().join("run")).unwrap();
    let pid = vm.pid().unwrap();
    let status = || std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let field = |st: &str, name: &str| {
        st.lines()
            .find_map(|l| {
                l.strip_prefix(&format!("{name}:"))
                    .map(|v| v.trim().to_owned())
            })
            .unwrap_or_default()
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    let st = loop {
        let st = status();
        if field(&st, "Uid").starts_with(&uid.to_string()) {
            break st;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "QEMU still root: {st}\n{}",
            vm.console()
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(field(&st, "Uid"), format!("{uid}\t{uid}\t{uid}\t{uid}"));
    assert_eq!(field(&st, "CapEff"), "0000000000000000");
    assert_eq!(field(&st, "CapPrm"), "0000000000000000");
    assert_eq!(field(&st, "NoNewPrivs"), "1");
    assert_eq!(field(&st, "Seccomp"), "2");
    drop(vm);
    assert!(!dir.path().join("run").exists());
}
