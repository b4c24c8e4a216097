//! husk-vmm end to end with freestanding test guests (tests/guests/vmm):
//! they run in well under a second even under PVM's instruction emulator.
//! Each test prints one `SKIPPED: no /dev/kvm` line where KVM is missing,
//! and adds a line to $HUSK_SKIP_LOG (tests/run.sh counts those as skipped).

mod common;
use common::*;
use std::path::Path;
use std::process::{Command, Output};

fn vmm_bin() -> std::path::PathBuf {
    husk_bin().with_file_name("husk-vmm")
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
    // 4608 MiB: RAM continues above the 32-bit device gap at 4 GiB.
    for (mem, pit) in [
        ("64", false),
        ("1024", false),
        ("256", true),
        ("4608", false),
    ] {
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
        (&["--kernel", stub, "--mem", "70000"], "more than 64 GiB"),
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

#[test]
fn virtio_fs_serves_a_host_directory_and_refuses_writes_to_a_read_only_one() {
    if !have_kvm("virtio_fs_serves_a_host_directory_and_refuses_writes_to_a_read_only_one") {
        return;
    }
    let fs = guest("fs.elf");
    let mounts = || std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    let mounts_before = mounts();
    let share = || {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("hello.txt"),
            "hello from the host\nline two\n",
        )
        .unwrap();
        std::os::unix::fs::symlink("/etc", dir.path().join("escape")).unwrap();
        dir
    };
    let run = |arg: &str| {
        let out = vmm(&["--kernel", fs.to_str().unwrap(), "--no-rng", "--fs", arg]);
        assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
        stdout(&out)
    };
    let common = |text: &str| {
        assert!(text.starts_with("fs: tag "), "{text}");
        assert!(text.contains("fs: init 7."), "{text}");
        assert!(
            text.contains("fs: hello.txt: hello from the host\n"),
            "{text}"
        );
        // Names with a slash never reach the host: EINVAL (22).
        assert!(text.contains("fs: mkdir ../escaped: error 22\n"), "{text}");
        // ".." at the share's root is the root (node 1), not the host's parent.
        assert!(text.contains("fs: lookup ..: node 1\n"), "{text}");
        // The host symlink to /etc is not followed on the host: ENOTDIR.
        assert!(text.contains("fs: escape/passwd: error 20\n"), "{text}");
        // A malformed request is answered with nothing; the next one works.
        assert!(
            text.contains("fs: bad request: 0\nfs: after: ok\n"),
            "{text}"
        );
    };

    let rw = share();
    let text = run(&format!("tag=pod-volume,path={}", rw.path().display()));
    common(&text);
    assert!(text.starts_with("fs: tag pod-volume\n"), "{text}");
    assert!(text.contains("fs: create: ok\nfs: mkdir: ok\n"), "{text}");
    // husk-vmm refuses device nodes (and has no CAP_MKNOD): none appears
    // on the host (EPERM).
    assert!(text.contains("fs: mknod: error 1\n"), "{text}");
    assert!(!rw.path().join("dev-null").exists());
    assert_eq!(
        std::fs::read_to_string(rw.path().join("new.txt")).unwrap(),
        "written by the guest\n"
    );
    use std::os::unix::fs::PermissionsExt;
    let made = std::fs::metadata(rw.path().join("made-by-guest")).unwrap();
    assert!(made.is_dir());
    assert_eq!(made.permissions().mode() & 0o7777, 0o755);

    // Read-only: the kernel refuses every write with EROFS (30), and the
    // directory is as it was; a device node is refused (EPERM) before
    // the kernel is asked.
    let ro = share();
    let text = run(&format!("tag=ro,path={},ro", ro.path().display()));
    common(&text);
    assert!(
        text.contains("fs: create: error 30\nfs: mkdir: error 30\nfs: mknod: error 1\n"),
        "{text}"
    );
    let mut names: Vec<_> = std::fs::read_dir(ro.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    names.sort();
    assert_eq!(names, ["escape", "hello.txt"]);

    // Nothing was mounted on the host (the share is a detached mount).
    assert_eq!(mounts(), mounts_before);

    // Bad shares: exit 2, naming what is wrong.
    let dir = ro.path().to_str().unwrap();
    let long = format!("tag={},path={dir}", "t".repeat(37));
    let twice = format!("tag=a,path={dir}");
    for (args, want) in [
        (vec!["--fs", &long], "must be 1 to 36 bytes"),
        (vec!["--fs", &twice, "--fs", &twice], "is given twice"),
        (
            vec!["--fs", "tag=a,path=/no/such/dir"],
            "fs /no/such/dir: no such directory",
        ),
        (vec!["--fs", "tag=a"], "give both tag= and path="),
        (
            vec!["--fs", "tag=a,path=/tmp,rw"],
            "use tag=TAG,path=DIR[,ro][,xattr]",
        ),
    ] {
        let mut all = vec!["--kernel", fs.to_str().unwrap()];
        all.extend(args);
        let out = vmm(&all);
        assert_eq!(out.status.code(), Some(2), "{all:?}: {}", stderr(&out));
        assert!(stderr(&out).contains(want), "{all:?}: {}", stderr(&out));
    }
}

/// A netns for one test, deleted on drop.
struct TestNetns(String);

impl TestNetns {
    fn new(name: &str) -> Self {
        let out = Command::new("ip")
            .args(["netns", "add", name])
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", stderr(&out));
        TestNetns(name.to_owned())
    }

    fn path(&self) -> String {
        format!("/run/netns/{}", self.0)
    }
}

impl Drop for TestNetns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).output();
    }
}

/// In `netns`: waits for `tap`, receives one frame of ethertype 0x88b5 on
/// it and answers its sender with `reply`. Returns the frame received.
fn answer_one_frame(netns: String, tap: String, reply: &'static [u8]) -> Vec<u8> {
    let ns = std::fs::File::open(&netns).unwrap();
    nix::sched::setns(&ns, nix::sched::CloneFlags::CLONE_NEWNET).unwrap();
    let cname = std::ffi::CString::new(tap).unwrap();
    let t0 = std::time::Instant::now();
    let ifindex = loop {
        // SAFETY: a valid C string.
        let i = unsafe { libc::if_nametoindex(cname.as_ptr()) };
        if i != 0 {
            break i;
        }
        assert!(t0.elapsed().as_secs() < 20, "the tap never appeared");
        std::thread::sleep(std::time::Duration::from_millis(5));
    };
    let proto = (0x88b5u16).to_be();
    // SAFETY: plain socket(2); the fd is owned right below.
    let fd = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW, i32::from(proto)) };
    assert!(fd >= 0);
    // SAFETY: fd is ours.
    let sock = unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) };
    // SAFETY: sockaddr_ll is plain data.
    let mut addr: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    addr.sll_family = libc::AF_PACKET as u16;
    addr.sll_protocol = proto;
    addr.sll_ifindex = ifindex as i32;
    // SAFETY: addr is a valid sockaddr_ll of the given size.
    let rc = unsafe {
        libc::bind(
            fd,
            (&addr as *const libc::sockaddr_ll).cast(),
            std::mem::size_of::<libc::sockaddr_ll>() as u32,
        )
    };
    assert_eq!(rc, 0);
    let tv = libc::timeval {
        tv_sec: 20,
        tv_usec: 0,
    };
    // SAFETY: tv is a valid timeval.
    unsafe {
        libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_RCVTIMEO,
            (&tv as *const libc::timeval).cast(),
            std::mem::size_of::<libc::timeval>() as u32,
        )
    };
    let mut buf = vec![0u8; 2048];
    // SAFETY: buf is writable for its length.
    let n = unsafe { libc::recv(fd, buf.as_mut_ptr().cast(), buf.len(), 0) };
    assert!(n > 14, "no frame from the guest");
    buf.truncate(n as usize);
    let mut frame = buf[6..12].to_vec();
    frame.extend_from_slice(&[2, 0, 0, 0, 0, 0x99, 0x88, 0xb5]);
    frame.extend_from_slice(reply);
    // SAFETY: frame is readable for its length.
    let sent = unsafe { libc::send(fd, frame.as_ptr().cast(), frame.len(), 0) };
    assert_eq!(sent, frame.len() as isize);
    drop(sock);
    buf
}

/// A thread that answers the guest's first frame on `tap` in `ns`.
fn responder(ns: &TestNetns, tap: &str, reply: &'static [u8]) -> std::thread::JoinHandle<Vec<u8>> {
    let (path, tap) = (ns.path(), tap.to_owned());
    std::thread::spawn(move || answer_one_frame(path, tap, reply))
}

/// `ip -o link` in the namespace.
fn links_in(ns: &TestNetns) -> String {
    let out = Command::new("ip")
        .args(["-n", &ns.0, "-o", "link"])
        .output()
        .unwrap();
    stdout(&out)
}

#[test]
fn virtio_net_carries_frames_to_and_from_a_tap_in_a_netns() {
    if !have_kvm("virtio_net_carries_frames_to_and_from_a_tap_in_a_netns") {
        return;
    }
    let id = std::process::id() % 100000;
    let ns = TestNetns::new(&format!("hkvm{id}"));
    let tap = format!("hkvt{id}");
    let responder = responder(&ns, &tap, b"husk-net pong");
    let net = format!("tap={tap},netns={},mac=02:00:00:aa:bb:cc", ns.path());
    let out = vmm(&[
        "--kernel",
        guest("net.elf").to_str().unwrap(),
        "--no-rng",
        "--net",
        &net,
    ]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert_eq!(stdout(&out), "net: got husk-net pong\n");
    let frame = responder.join().unwrap();
    assert_eq!(&frame[6..12], &[2, 0, 0, 0xaa, 0xbb, 0xcc], "source MAC");
    assert_eq!(&frame[14..], b"husk-net ping from 020000aabbcc");
    // The tap went away with the VM.
    let links = links_in(&ns);
    assert!(!links.contains(&tap), "{links}");
}

/// In the namespace at `netns` (entered by a helper thread): a new tap,
/// up, with or without IFF_VNET_HDR; it lives as long as the returned file.
fn make_tap(netns: &str, name: &str, vnet_hdr: bool) -> std::fs::File {
    let ns = std::fs::File::open(netns).unwrap();
    let name = name.to_owned();
    std::thread::spawn(move || {
        use std::os::fd::AsRawFd;
        nix::sched::setns(&ns, nix::sched::CloneFlags::CLONE_NEWNET).unwrap();
        let tun = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/net/tun")
            .unwrap();
        // SAFETY: ifreq is plain data.
        let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
        for (d, s) in req.ifr_name.iter_mut().zip(name.bytes()) {
            *d = s as libc::c_char;
        }
        let mut flags = libc::IFF_TAP | libc::IFF_NO_PI;
        if vnet_hdr {
            flags |= libc::IFF_VNET_HDR;
        }
        req.ifr_ifru.ifru_flags = flags as i16;
        // SAFETY: TUNSETIFF on the ifreq we own.
        let rc = unsafe { libc::ioctl(tun.as_raw_fd(), 0x4004_54ca, &mut req) };
        assert_eq!(rc, 0, "TUNSETIFF {name}");
        let up = Command::new("ip")
            .args(["link", "set", &name, "up"])
            .output()
            .unwrap();
        assert!(up.status.success(), "{}", stderr(&up));
        tun
    })
    .join()
    .unwrap()
}

/// Runs husk-vmm with `fd` inherited as descriptor 3 (or with descriptor 3
/// surely closed: cargo's jobserver may hand the tests an inheritable one).
fn vmm_with_fd(args: &[&str], fd: Option<&std::fs::File>) -> Output {
    use std::os::fd::AsRawFd;
    use std::os::unix::process::CommandExt;
    let raw = fd.map(|f| f.as_raw_fd());
    let mut cmd = Command::new(vmm_bin());
    cmd.args(args);
    // SAFETY: dup2 is async-signal-safe; `raw` is open in the parent.
    unsafe {
        cmd.pre_exec(move || {
            match raw {
                // dup2 onto itself keeps close-on-exec: clear it then.
                Some(3) if libc::fcntl(3, libc::F_SETFD, 0) < 0 => {
                    return Err(std::io::Error::last_os_error())
                }
                Some(raw) if raw != 3 && libc::dup2(raw, 3) < 0 => {
                    return Err(std::io::Error::last_os_error())
                }
                Some(_) => {}
                None => {
                    libc::close(3);
                }
            }
            Ok(())
        });
    }
    cmd.output().unwrap()
}

#[test]
fn virtio_net_takes_an_inherited_tap_and_leaves_it_to_its_owner() {
    if !have_kvm("virtio_net_takes_an_inherited_tap_and_leaves_it_to_its_owner") {
        return;
    }
    // What a VM pod does: the sandbox makes the tap (next to the pod's
    // veth, mirrored with tc) and hands husk-vmm the open device.
    let id = std::process::id() % 100000;
    let ns = TestNetns::new(&format!("hkvf{id}"));
    let tap = format!("hkvf{id}");
    let held = make_tap(&ns.path(), &tap, true);
    let responder = responder(&ns, &tap, b"fd pong");
    let kernel = guest("net.elf");
    let args = [
        "--kernel",
        kernel.to_str().unwrap(),
        "--no-rng",
        "--net",
        "fd=3,mac=02:00:00:aa:bb:cd",
    ];
    let out = vmm_with_fd(&args, Some(&held));
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert_eq!(stdout(&out), "net: got fd pong\n");
    let frame = responder.join().unwrap();
    assert_eq!(&frame[6..12], &[2, 0, 0, 0xaa, 0xbb, 0xcd], "source MAC");
    assert_eq!(&frame[14..], b"husk-net ping from 020000aabbcd");
    // The tap is its owner's: still there after the VM, gone with the file.
    let links = links_in(&ns);
    assert!(links.contains(&tap), "{links}");
    drop(held);
    let links = links_in(&ns);
    assert!(!links.contains(&tap), "{links}");

    // A tap without the virtio-net header, a descriptor that is no tap,
    // one that is not open: a configuration error naming it, exit 2.
    let plain = make_tap(&ns.path(), &tap, false);
    let out = vmm_with_fd(&args, Some(&plain));
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("net fd 3: the tap must be made with IFF_TAP and IFF_VNET_HDR"),
        "{}",
        stderr(&out)
    );
    drop(plain);
    let not_tap = std::fs::File::open("/dev/null").unwrap();
    let out = vmm_with_fd(&args, Some(&not_tap));
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("net fd 3: not a tap device"),
        "{}",
        stderr(&out)
    );
    let out = vmm_with_fd(&args, None);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("net fd 3: Bad file descriptor"),
        "{}",
        stderr(&out)
    );
    let out = vmm(&[
        "--kernel",
        guest("net.elf").to_str().unwrap(),
        "--net",
        "fd=3,tap=x",
    ]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("either tap (and netns) or fd"),
        "{}",
        stderr(&out)
    );
}

/// Starts husk-vmm, waits for `line` on the console, sends SIGTERM, and
/// returns (exit status, console, stderr, seconds from signal to exit).
fn stop_after(kernel: &str, line: &str, extra: &[&str]) -> (Option<i32>, String, String, f64) {
    use std::io::{BufRead, Read};
    let mut child = Command::new(vmm_bin())
        .args(["--kernel", kernel, "--no-rng"])
        .args(extra)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut out = std::io::BufReader::new(child.stdout.take().unwrap());
    let mut console = String::new();
    while !console.contains(line) {
        let mut l = String::new();
        assert!(
            out.read_line(&mut l).unwrap() > 0,
            "console ended: {console}"
        );
        console.push_str(&l);
    }
    let t0 = std::time::Instant::now();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    let mut rest = String::new();
    out.read_to_string(&mut rest).unwrap();
    console.push_str(&rest);
    let status = child.wait().unwrap();
    let took = t0.elapsed().as_secs_f64();
    let mut err = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut err)
        .unwrap();
    (status.code(), console, err, took)
}

#[test]
fn sigterm_asks_the_guest_and_stops_it_after_the_timeout() {
    if !have_kvm("sigterm_asks_the_guest_and_stops_it_after_the_timeout") {
        return;
    }
    // A guest that listens: ctrl-alt-del arrives on the i8042, it resets.
    let (code, console, err, _) = stop_after(
        guest("waitstop.elf").to_str().unwrap(),
        "waiting for ctrl-alt-del",
        &[],
    );
    assert_eq!(code, Some(0), "{err}");
    assert!(
        console.contains("key 1d\nkey 38\nkey e0\nkey 53\ngot ctrl-alt-del after 4 scancodes"),
        "{console}"
    );
    // A guest that does not: stopped after the timeout, with status 5.
    let (code, console, err, took) = stop_after(
        guest("spin.elf").to_str().unwrap(),
        "spinning",
        &["--stop-timeout", "0.5"],
    );
    assert_eq!(code, Some(5), "{console} {err}");
    assert!(err.contains("\"reason\":\"killed\""), "{err}");
    assert!((0.4..10.0).contains(&took), "stopped after {took} s");
}

#[test]
fn vsock_connections_both_ways_over_unix_sockets() {
    use std::io::{BufRead, BufReader, Read, Write};
    use std::os::unix::net::{UnixListener, UnixStream};
    if !have_kvm("vsock_connections_both_ways_over_unix_sockets") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let uds = dir.path().join("v.sock");
    // husk-vmm runs as this uid in its jail: the socket's directory (bound
    // into the jail) and the sockets it connects to must be its to use,
    // as husk makes them for a pod.
    let jail = 0x6fff_0000 + std::process::id();
    let own = |p: &Path| std::os::unix::fs::chown(p, Some(jail), Some(jail)).unwrap();
    own(dir.path());
    // Guest to host: the guest's connection to port 6000 lands here.
    let listener = UnixListener::bind(format!("{}_6000", uds.display())).unwrap();
    own(Path::new(&format!("{}_6000", uds.display())));
    let host_side = std::thread::spawn(move || {
        let (mut c, _) = listener.accept().unwrap();
        let mut buf = [0u8; 20];
        c.read_exact(&mut buf).unwrap();
        c.write_all(b"hello back").unwrap();
        buf.to_vec()
    });
    let child = Command::new(vmm_bin())
        .args(["--kernel", guest("vsock.elf").to_str().unwrap(), "--no-rng"])
        .arg("--vsock")
        .arg(format!("cid=7,uds={}", uds.display()))
        .args([
            "--jail-uid",
            &jail.to_string(),
            "--jail-gid",
            &jail.to_string(),
        ])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // Host to guest: CONNECT, OK, then data both ways.
    let t0 = std::time::Instant::now();
    while !uds.exists() {
        assert!(t0.elapsed().as_secs() < 20, "no vsock socket");
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    let mut s = UnixStream::connect(&uds).unwrap();
    s.set_read_timeout(Some(std::time::Duration::from_secs(20)))
        .unwrap();
    s.write_all(b"CONNECT 5000\n").unwrap();
    let mut r = BufReader::new(s.try_clone().unwrap());
    let mut ok = String::new();
    r.read_line(&mut ok).unwrap();
    assert!(ok.starts_with("OK ") && ok.ends_with('\n'), "{ok:?}");
    s.write_all(b"ping over vsock").unwrap();
    let mut pong = [0u8; 15];
    r.read_exact(&mut pong).unwrap();
    assert_eq!(&pong, b"pong over vsock");
    drop(r);
    drop(s);
    assert_eq!(host_side.join().unwrap(), b"hello from the guest");
    let out = child.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert_eq!(
        stdout(&out),
        "vsock: cid 7\nvsock: host said hello back\nvsock: got ping over vsock\nvsock: done\n"
    );
    assert!(!uds.exists(), "the vsock socket was left behind");
}

/// `Name:\tvalue` fields of a /proc status file.
fn status_of(path: &str) -> std::collections::HashMap<String, String> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.to_owned(), v.trim().to_owned()))
        .collect()
}

/// A husk-vmm child that is killed if a test fails before it ends.
struct VmChild(Option<std::process::Child>);

impl VmChild {
    fn id(&self) -> u32 {
        self.0.as_ref().map_or(0, |c| c.id())
    }

    fn wait_with_output(mut self) -> Output {
        self.0.take().unwrap().wait_with_output().unwrap()
    }
}

impl Drop for VmChild {
    fn drop(&mut self) {
        if let Some(mut c) = self.0.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// A waiting guest (waitstop) under husk-vmm with `extra` flags, once its
/// console says it waits (with `env`: at once).
fn waiting_vmm(extra: &[&str], env: Option<(&str, &str)>) -> VmChild {
    use std::io::BufRead;
    let mut cmd = Command::new(vmm_bin());
    cmd.args([
        "--kernel",
        guest("waitstop.elf").to_str().unwrap(),
        "--no-rng",
    ])
    .args(extra)
    .stdout(std::process::Stdio::piped())
    .stderr(std::process::Stdio::piped());
    if let Some((k, v)) = env {
        cmd.env(k, v);
    }
    let mut child = cmd.spawn().unwrap();
    if env.is_none() {
        let mut out = std::io::BufReader::new(child.stdout.take().unwrap());
        let mut console = String::new();
        while !console.contains("waiting for ctrl-alt-del") {
            let mut l = String::new();
            assert!(
                out.read_line(&mut l).unwrap() > 0,
                "console ended: {console}"
            );
            console.push_str(&l);
        }
        // Keep draining the console so the guest never blocks on it.
        std::thread::spawn(move || std::io::copy(&mut out, &mut std::io::sink()));
    }
    VmChild(Some(child))
}

/// Ends a waiting guest with SIGTERM; its exit status.
fn stop(mut child: VmChild) -> std::process::ExitStatus {
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    child.0.take().unwrap().wait().unwrap()
}

/// husk-vmm's status once its main thread is under its filter (it
/// installs it after starting the others, so the guest may run first).
fn filtered_status(pid: u32) -> std::collections::HashMap<String, String> {
    let t0 = std::time::Instant::now();
    loop {
        let st = status_of(&format!("/proc/{pid}/status"));
        if st.get("Seccomp").map(String::as_str) == Some("2") || t0.elapsed().as_secs() >= 10 {
            return st;
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
}

/// Names in a directory, sorted.
fn names(dir: &str) -> Vec<String> {
    let mut v: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

/// The jailer: while the guest runs, husk-vmm is the chosen uid and gid
/// with no groups and no capabilities, no_new_privs, every thread under
/// its own seccomp filter, and its root is an empty tmpfs holding only
/// the vsock socket's directory; afterwards nothing is left.
#[test]
fn a_jailed_husk_vmm_runs_unprivileged_filtered_and_sees_only_its_jail() {
    if !have_kvm("a_jailed_husk_vmm_runs_unprivileged_filtered_and_sees_only_its_jail") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let id = 0x6ffe_0000 + std::process::id();
    std::os::unix::fs::chown(dir.path(), Some(id), Some(id)).unwrap();
    let uds = dir.path().join("v.sock");
    let ids = id.to_string();
    let child = waiting_vmm(
        &[
            "--vsock",
            &format!("cid=9,uds={}", uds.display()),
            "--jail-uid",
            &ids,
            "--jail-gid",
            &ids,
        ],
        None,
    );
    let pid = child.id();
    let st = status_of(&format!("/proc/{pid}/status"));
    assert_eq!(st["Uid"], format!("{id}\t{id}\t{id}\t{id}"), "{st:?}");
    assert_eq!(st["Gid"], format!("{id}\t{id}\t{id}\t{id}"), "{st:?}");
    assert_eq!(st["Groups"], "");
    for set in ["CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"] {
        assert_eq!(st[set], "0000000000000000", "{set}: {st:?}");
    }
    assert_eq!(st["NoNewPrivs"], "1");
    // Every thread has its own filter (the guest may be waiting before
    // the last thread has started and installed its one).
    let threads = || {
        let mut kinds = Vec::new();
        for t in names(&format!("/proc/{pid}/task")) {
            let ts = status_of(&format!("/proc/{pid}/task/{t}/status"));
            kinds.push((ts["Name"].clone(), ts["Seccomp"].clone()));
        }
        // KVM's NX huge page recovery worker is listed among the threads
        // too (a kernel task; it runs no code of husk-vmm's).
        kinds.retain(|(k, _)| k != "kvm-nx-lpage-re");
        kinds.sort();
        kinds
    };
    let want: Vec<_> = ["devices", "husk-vmm", "vcpu0", "watcher"]
        .map(|k| (k.to_owned(), "2".to_owned()))
        .into();
    let t0 = std::time::Instant::now();
    while threads() != want && t0.elapsed().as_secs() < 10 {
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    assert_eq!(threads(), want);
    let st = status_of(&format!("/proc/{pid}/status"));
    assert_eq!(st["Seccomp"], "2");
    // Its root: the vsock socket's directory and nothing else; its mounts:
    // that root and that directory.
    assert_eq!(names(&format!("/proc/{pid}/root")), ["vsock"]);
    assert_eq!(names(&format!("/proc/{pid}/root/vsock")), ["v.sock"]);
    let mounts = std::fs::read_to_string(format!("/proc/{pid}/mountinfo")).unwrap();
    let mut points: Vec<_> = mounts.lines().filter_map(|l| l.split(' ').nth(4)).collect();
    points.sort();
    assert_eq!(points, ["/", "/vsock"], "{mounts}");
    let root = mounts.lines().find(|l| l.split(' ').nth(4) == Some("/"));
    assert!(
        root.unwrap().contains(" / ro,nosuid,nodev,noexec"),
        "{mounts}"
    );
    assert_eq!(stop(child).code(), Some(0));
    // The socket is gone (removed from inside the jail), and the jail
    // with the process: no mount of it is left on the host.
    assert_eq!(names(dir.path().to_str().unwrap()), Vec::<String>::new());
    let host_mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    assert!(
        !host_mounts.contains(dir.path().to_str().unwrap()),
        "{host_mounts}"
    );
}

/// A VM with a virtio-fs share keeps uid 0 for the passthrough file
/// system and only its five file capabilities (no CAP_MKNOD, CAP_SETFCAP,
/// CAP_FSETID or CAP_SYS_ADMIN, none in the bounding set either), is
/// filtered all the same, and its root shows only its own fd directory.
#[test]
fn a_jailed_husk_vmm_with_a_share_keeps_only_the_file_capabilities() {
    if !have_kvm("a_jailed_husk_vmm_with_a_share_keeps_only_the_file_capabilities") {
        return;
    }
    let share = tempfile::tempdir().unwrap();
    let child = waiting_vmm(
        &["--fs", &format!("tag=s,path={}", share.path().display())],
        None,
    );
    let pid = child.id();
    let st = filtered_status(pid);
    // CHOWN 0, DAC_OVERRIDE 1, FOWNER 3, SETGID 6, SETUID 7.
    let caps = format!("{:016x}", 1u64 | 1 << 1 | 1 << 3 | 1 << 6 | 1 << 7);
    for set in ["CapPrm", "CapEff", "CapBnd"] {
        assert_eq!(st[set], caps, "{set}: {st:?}");
    }
    assert_eq!(st["CapInh"], "0000000000000000");
    assert_eq!(st["CapAmb"], "0000000000000000");
    assert_eq!(st["Groups"], "");
    assert_eq!(st["NoNewPrivs"], "1");
    assert_eq!(st["Seccomp"], "2");
    assert_eq!(names(&format!("/proc/{pid}/root")), ["proc"]);
    assert_eq!(stop(child).code(), Some(0));
}

/// The test-only hook: once its filter is in, the main thread tries
/// execve, which no filter allows; the process ends by SIGSYS.
#[test]
fn a_system_call_outside_the_filter_kills_husk_vmm_with_sigsys() {
    use std::os::unix::process::ExitStatusExt;
    if !have_kvm("a_system_call_outside_the_filter_kills_husk_vmm_with_sigsys") {
        return;
    }
    let child = waiting_vmm(&[], Some(("HUSK_VMM_TEST_FORBIDDEN_SYSCALL", "1")));
    let out = child.wait_with_output();
    assert_eq!(out.status.signal(), Some(libc::SIGSYS), "{out:?}");
    assert!(
        stderr(&out).contains(r#""event":"running""#),
        "{}",
        stderr(&out)
    );
}

/// The host side of a VM pod under husk-vmm, end to end: husk-sandbox's
/// HuskVmmVm starts husk-vmm from its JSON configuration, reaches the
/// guest's vsock port 1024 through the hybrid socket, and does the agent
/// handshake and shutdown of husk-protocol. The guest is a freestanding
/// stand-in for husk-agent's vsock transport (this host's KVM cannot run
/// the Linux agent); the VM ends by itself and leaves nothing.
#[test]
fn husk_vmm_vm_reaches_the_agent_over_vsock_and_shuts_it_down() {
    use husk_sandbox::vm::husk_vmm::{HuskVmmConfig, HuskVmmVm};
    use husk_sandbox::vm::hypervisor::Vm;
    if !have_kvm("husk_vmm_vm_reaches_the_agent_over_vsock_and_shuts_it_down") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let initrd = dir.path().join("initrd.cpio");
    let mut f = std::fs::File::create(&initrd).unwrap();
    husk_sandbox::vm::initramfs::Initramfs::default()
        .write_to(&mut f)
        .unwrap();
    let cfg = HuskVmmConfig {
        binary: vmm_bin(),
        kernel: guest("vsockagent.elf"),
        initrd,
        cmdline: String::new(),
        mem_mib: 64,
        vcpus: 1,
        disks: vec![],
        shares: vec![],
    };
    let run = dir.path().join("run");
    let mut vm = HuskVmmVm::start(&cfg, &run, None).unwrap();
    let pid = vm.pid().unwrap();
    // Jailed as a uid of its own, claimed for it until it is dropped.
    let id = vm.jail_id();
    let claim = Path::new(husk_sandbox::vm::identity::HOST_CLAIMS).join(id.to_string());
    assert!(claim.exists());
    let agent = vm
        .agent(std::time::Duration::from_secs(30))
        .unwrap_or_else(|e| panic!("{e}\n{}", vm.console()));
    assert_eq!(agent.kernel(), "vsock-stand-in");
    let st = status_of(&format!("/proc/{pid}/status"));
    assert_eq!(st["Uid"], format!("{id}\t{id}\t{id}\t{id}"), "{st:?}");
    assert_eq!(st["CapEff"], "0000000000000000");
    assert_eq!(st["Seccomp"], "2");
    agent.shutdown().unwrap();
    assert!(
        vm.wait(std::time::Duration::from_secs(10)),
        "{}",
        vm.console()
    );
    let console = vm.console();
    assert!(console.contains("vsock: cid 3\n"), "{console}");
    assert!(console.contains("agent: hello\n"), "{console}");
    assert!(console.contains("agent: shutdown\n"), "{console}");
    assert!(console.contains(r#""reason":"reset""#), "{console}");
    drop(agent);
    drop(vm);
    assert!(!run.exists(), "the VM's run directory is left");
    assert!(!claim.exists(), "the jail uid's claim is left");
    assert!(!std::path::Path::new(&format!("/proc/{pid}")).exists());
}

#[test]
fn a_second_vcpu_comes_up_and_reports() {
    if !have_kvm("a_second_vcpu_comes_up_and_reports") {
        return;
    }
    let smp = guest("smp.elf");
    let out = vmm(&[
        "--kernel",
        smp.to_str().unwrap(),
        "--vcpus",
        "2",
        "--no-rng",
    ]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert_eq!(
        stdout(&out),
        "smp: mp table lists 2 cpus\nap: up\nsmp: second vcpu reported\n"
    );
    // With one vCPU the MP table lists one, and the VM still ends cleanly.
    let out = vmm(&[
        "--kernel",
        smp.to_str().unwrap(),
        "--vcpus",
        "1",
        "--no-rng",
    ]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert_eq!(stdout(&out), "smp: mp table lists 1 cpus\n");
    // The null kernel with two vCPUs: the idle AP is stopped with the VM.
    let out = vmm(&[
        "--kernel",
        guest("stub.elf").to_str().unwrap(),
        "--vcpus",
        "2",
    ]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert_eq!(stdout(&out), "husk-vmm: null kernel up\n");
}

/// Kernel B's command line for husk-vmm on any host: on PVM hosts the kernel
/// runs under KVM's instruction emulator, which lacks cmpxchg16b, popcnt,
/// clac/stac and xsave (images/README.md).
const KERNEL_B_CMDLINE: &str = "console=ttyS0 clearcpuid=cx16,popcnt,smap,xsave reboot=k panic=-1";

#[test]
fn kernel_b_bzimage_loads_and_starts_with_its_command_line_and_memory_map() {
    if !have_kvm("kernel_b_bzimage_loads_and_starts_with_its_command_line_and_memory_map") {
        return;
    }
    // The bzImage path (32-bit boot protocol, boot params, e820), as far as
    // the kernel printing its memory map and MP table: a second or two even
    // under the emulator.
    let (_, console, err, _) = stop_after(
        image("kernel-b.bzImage").to_str().unwrap(),
        "Processors: 2",
        &[
            "--initrd",
            image("initramfs-b.cpio.gz").to_str().unwrap(),
            "--cmdline",
            &format!("{KERNEL_B_CMDLINE} earlyprintk=serial"),
            "--mem",
            "1024",
            "--vcpus",
            "2",
            "--stop-timeout",
            "0.2",
        ],
    );
    assert!(console.contains("Linux version 6."), "{console}");
    assert!(
        console.contains(&format!(
            "Command line: {KERNEL_B_CMDLINE} earlyprintk=serial"
        )),
        "{console}"
    );
    assert!(
        console.contains("BIOS-e820: [mem 0x0000000000100000-0x000000003fffffff] usable"),
        "{console}"
    );
    assert!(console.contains("MPTABLE: OEM ID: HUSK"), "{console}");
    assert!(err.contains("\"event\":\"exit\""), "{err}");
}

#[test]
fn kernel_b_boots_to_its_first_system_call() {
    if !have_kvm("kernel_b_boots_to_its_first_system_call") {
        return;
    }
    // The ELF vmlinux through its PVH entry, with an initramfs and a virtio
    // disk and rng. One vCPU: under PVM's emulator a Linux AP never leaves
    // its real-mode trampoline (two vCPUs are tested with kernel B under
    // QEMU, and with the freestanding smp guest here). On PVM hosts the kernel runs under the
    // instruction emulator (about half a minute to `Run /init`) and its user
    // space cannot make system calls: the test init's first syscall faults,
    // the kernel panics and (panic=-1) resets. Elsewhere the test init runs
    // to its end and resets the VM. Either way husk-vmm exits 0.
    let dir = tempfile::tempdir().unwrap();
    let disk = dir.path().join("disk.img");
    let mut data = b"a known line on a virtio-blk disk\n".to_vec();
    data.resize(64 * 1024, 0);
    std::fs::write(&disk, &data).unwrap();
    let mut child = Command::new(vmm_bin())
        .arg("--kernel")
        .arg(image("kernel-b.vmlinux"))
        .arg("--initrd")
        .arg(image("initramfs-b.cpio.gz"))
        .args(["--cmdline", KERNEL_B_CMDLINE, "--mem", "256"])
        .arg("--disk")
        .arg(&disk)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // A guard against a hang: the VM is killed after 10 minutes.
    let pid = child.id() as i32;
    let (done_tx, done_rx) = std::sync::mpsc::channel::<()>();
    let guard = std::thread::spawn(move || {
        if done_rx
            .recv_timeout(std::time::Duration::from_secs(600))
            .is_err()
        {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
    });
    let mut console = String::new();
    let mut err = String::new();
    use std::io::Read;
    child
        .stdout
        .take()
        .unwrap()
        .read_to_string(&mut console)
        .unwrap();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut err)
        .unwrap();
    let status = child.wait().unwrap();
    drop(done_tx);
    guard.join().unwrap();
    assert_eq!(status.code(), Some(0), "{err}\n{console}");
    assert!(err.contains("\"reason\":\"reset\""), "{err}");
    assert!(
        console.contains("[vda] 128 512-byte logical blocks"),
        "{console}"
    );
    assert!(console.contains("Run /init as init process"), "{console}");
    if console.contains("husk-test-init: started") {
        assert!(
            console.contains("husk-test-init: vda says a known line"),
            "{console}"
        );
        assert!(console.contains("husk-test-init: done"), "{console}");
    } else {
        // PVM: the first system call of /init is where the guest stops.
        assert!(console.contains("init[1]: segfault at "), "{console}");
        println!("kernel B ran to its first system call; this host's KVM (PVM) cannot run its user space");
    }
}
