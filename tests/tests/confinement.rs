//! Confinement (#21), tried as an attacker would: root in a VM pod's
//! container plants device nodes and set-id files through its shares,
//! escapes its chroot towards its siblings, and a local user on the host
//! reads husk's state. None of it may work; the hypervisor and virtiofsd
//! run confined. VM pods run under QEMU TCG here (see vm_pods.rs).

mod common;
use common::*;
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;

const NOBODY: u32 = 65534;

/// The consoles of the test's VMs (kernel and agent messages), for failures.
fn consoles(env: &Env) -> String {
    let mut out = String::new();
    for e in std::fs::read_dir(env.root().join("run/pods"))
        .into_iter()
        .flatten()
        .flatten()
    {
        out += &std::fs::read_to_string(e.path().join("vm/console.log")).unwrap_or_default();
    }
    out
}

/// `args` run as the host's `nobody`, with no supplementary groups.
fn as_nobody(args: &[&str]) -> std::process::Output {
    Command::new("setpriv")
        .args([
            &format!("--reuid={NOBODY}"),
            &format!("--regid={NOBODY}"),
            "--clear-groups",
            "--",
        ])
        .args(args)
        .output()
        .expect("setpriv (util-linux)")
}

/// Every file under `dir` with a set-id bit, and every device node.
fn set_id_or_devices(dir: &Path) -> Vec<String> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let (p, t) = (e.path(), e.file_type().unwrap());
        let mode = e.metadata().map(|m| m.permissions().mode()).unwrap_or(0);
        if t.is_dir() {
            out.extend(set_id_or_devices(&p));
        } else if t.is_block_device() || t.is_char_device() {
            out.push(format!("device {}", p.display()));
        } else if t.is_file() && mode & 0o6000 != 0 {
            out.push(format!("set-id {:o} {}", mode, p.display()));
        }
    }
    out
}

/// The `/proc/PID/status` fields of every process whose command line
/// holds `needle` and `also`.
fn statuses(needle: &str, also: &str) -> Vec<(u32, String)> {
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(cmdline) = std::fs::read(e.path().join("cmdline")) else {
            continue;
        };
        let s = String::from_utf8_lossy(&cmdline).replace('\0', " ");
        if s.contains(needle) && s.contains(also) {
            if let Ok(st) = std::fs::read_to_string(e.path().join("status")) {
                out.push((pid, st));
            }
        }
    }
    out
}

fn field<'a>(status: &'a str, name: &str) -> &'a str {
    status
        .lines()
        .find_map(|l| l.strip_prefix(name).and_then(|r| r.strip_prefix(':')))
        .unwrap_or_else(|| panic!("no {name} in {status}"))
        .trim()
}

#[test]
fn a_vm_guest_plants_no_device_node_or_set_id_file_and_its_hypervisor_is_confined() {
    let reg = husk_tests::Registry::start();
    let reference = husk_tests::push_busybox_image(&reg, "tests/busybox:confine");
    let env = vm_env();
    // The test's root is a private temp dir: open it up, so that only
    // husk's own modes stand between `nobody` and its state.
    std::fs::set_permissions(env.root(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let host = env.root().join("host-rw");
    std::fs::create_dir(&host).unwrap();
    std::fs::set_permissions(&host, std::fs::Permissions::from_mode(0o777)).unwrap();
    // What root in the guest tries on each share.
    let attack = |d: &str| {
        format!(
            "mknod {d}/blk b 7 0 && echo {d}-blk-made || echo {d}-blk-refused; \
             mknod {d}/chr c 1 3 && echo {d}-chr-made || echo {d}-chr-refused; \
             mkdir -p {d}/bin && cp /bin/busybox {d}/bin/busybox; \
             chmod 4755 {d}/bin/busybox && echo {d}-suid-set || echo {d}-suid-refused; \
             touch {d}/g && chmod 2755 {d}/g && echo {d}-sgid-set || echo {d}-sgid-refused; \
             mkfifo {d}/fifo && echo {d}-fifo-made"
        )
    };
    let script = format!(
        "{}; {}; echo attacked; sleep 3600",
        attack("/e"),
        attack("/h")
    );
    let manifest = env.manifest(
        "confine.yaml",
        &format!(
            r#"apiVersion: v1
kind: Pod
metadata: {{name: confine}}
spec:
  runtimeClassName: husk-vm
  restartPolicy: Never
  volumes:
  - {{name: e, emptyDir: {{}}}}
  - {{name: h, hostPath: {{path: {host}}}}}
  containers:
  - name: attacker
    image: {reference}
    command: ["/bin/sh", "-c", {script:?}]
    volumeMounts: [{{name: e, mountPath: /e}}, {{name: h, mountPath: /h}}]
"#,
            host = host.display()
        ),
    );
    let out = env.run_file(&manifest, &["-d"]);
    assert!(out.status.success(), "{}{}", stdout(&out), stderr(&out));
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(240);
    let logs = loop {
        let logs = stdout(&env.husk(&["logs", "confine"]));
        if logs.contains("attacked") {
            break logs;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no attack finished: {logs}"
        );
        std::thread::sleep(std::time::Duration::from_millis(500));
    };
    for d in ["/e", "/h"] {
        for refused in ["blk-refused", "chr-refused", "suid-refused", "sgid-refused"] {
            assert!(logs.contains(&format!("{d}-{refused}")), "{logs}");
        }
        // What is no threat still works.
        assert!(logs.contains(&format!("{d}-fifo-made")), "{logs}");
    }

    // On the host: no device node and no set-id bit anywhere the guest
    // wrote, and `nobody` gets nothing from what it made.
    // (The image store is husk's own unpacking, whiteouts included.)
    let mut planted_anywhere = set_id_or_devices(&env.root().join("lib/pods"));
    planted_anywhere.extend(set_id_or_devices(&host));
    assert_eq!(planted_anywhere, Vec::<String>::new());
    let planted = host.join("bin/busybox");
    assert!(planted.is_file(), "the guest's copy is on the host");
    let id = as_nobody(&[planted.to_str().unwrap(), "id", "-u"]);
    assert_eq!(stdout(&id).trim(), NOBODY.to_string(), "{}", stderr(&id));

    // husk's state: `nobody` reaches nothing below the two roots.
    let (run, lib) = (env.root().join("run"), env.root().join("lib"));
    for root in [&run, &lib] {
        let mode = std::fs::metadata(root).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o700, "{}", root.display());
    }
    let found = as_nobody(&["find", run.to_str().unwrap(), lib.to_str().unwrap()]);
    assert_eq!(
        stdout(&found).lines().collect::<Vec<_>>(),
        [run.to_str().unwrap(), lib.to_str().unwrap()],
        "nobody listed husk's state"
    );
    let pods: Vec<PathBuf> = std::fs::read_dir(lib.join("pods"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert_eq!(pods.len(), 1);
    let log = pods[0].join("monitor.log");
    assert!(log.is_file());
    let container_log = pods[0].join("logs/attacker/0.log");
    for l in [&log, &container_log] {
        let mode = std::fs::metadata(l).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600, "{}", l.display());
    }
    let cat = as_nobody(&["cat", log.to_str().unwrap()]);
    assert!(!cat.status.success() && stdout(&cat).is_empty());

    // QEMU: never root, no capabilities, no_new_privs, its seccomp filter.
    let root = env.root().to_str().unwrap();
    let qemu = statuses("qemu-system", root);
    assert_eq!(qemu.len(), 1, "{qemu:?}");
    let st = &qemu[0].1;
    let uids: Vec<u32> = field(st, "Uid")
        .split_whitespace()
        .map(|u| u.parse().unwrap())
        .collect();
    assert!(
        uids.iter().all(|&u| u >= 0x4000_0000 && u == uids[0]),
        "{uids:?}"
    );
    assert_eq!(
        field(st, "Gid").split_whitespace().next().unwrap(),
        uids[0].to_string()
    );
    assert_eq!(field(st, "Groups"), "");
    assert_eq!(field(st, "CapEff"), "0000000000000000");
    assert_eq!(field(st, "CapPrm"), "0000000000000000");
    assert_eq!(field(st, "NoNewPrivs"), "1");
    assert_eq!(field(st, "Seccomp"), "2");
    // virtiofsd: under its own filter and husk's, without CAP_MKNOD (27)
    // or CAP_SETFCAP (31).
    let fsd = statuses("virtiofsd", root);
    assert!(!fsd.is_empty());
    for (pid, st) in &fsd {
        assert_eq!(field(st, "Seccomp"), "2", "virtiofsd {pid}");
        let eff = u64::from_str_radix(field(st, "CapEff"), 16).unwrap();
        assert_eq!(eff & (1 << 27 | 1 << 31), 0, "virtiofsd {pid}: {eff:x}");
    }

    assert!(env.husk(&["rm", "-f", "confine"]).status.success());
    assert!(!env
        .root()
        .join("run/vm-ids")
        .read_dir()
        .is_ok_and(|mut d| d.next().is_some()));
    // The hostPath's contents are the user's: kept.
    assert!(planted.is_file() && host.join("fifo").exists());
    env.finish();
}

#[test]
fn a_container_that_escapes_its_chroot_finds_neither_its_siblings_nor_their_secrets() {
    let reg = husk_tests::Registry::start();
    let reference = husk_tests::push_busybox_image(&reg, "tests/busybox:escape");
    let env = vm_env();
    const SECRET: &str = "neighbour-secret-7c2e";
    let manifest = env.manifest(
        "escape.yaml",
        &format!(
            r#"apiVersion: v1
kind: Secret
metadata: {{name: keys}}
stringData: {{key: {SECRET}}}
---
apiVersion: v1
kind: Pod
metadata: {{name: escape}}
spec:
  runtimeClassName: husk-vm
  volumes: [{{name: keys, secret: {{secretName: keys}}}}]
  containers:
  - name: victim
    image: {reference}
    command: ["/bin/sh", "-c", "sleep 3600"]
    volumeMounts: [{{name: keys, mountPath: /keys}}]
  - name: attacker
    image: {reference}
    command: ["/bin/sh", "-c", "echo ready; exec sleep 3600"]
"#
        ),
    );
    let out = env.run_file(&manifest, &["-d"]);
    assert!(out.status.success(), "{}{}", stdout(&out), stderr(&out));
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(240);
    while !stdout(&env.husk(&["logs", "escape", "-c", "attacker"])).contains("ready") {
        assert!(std::time::Instant::now() < deadline, "{}", consoles(&env));
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
    let program = guest("linux/chroot-escape");
    let out = env.husk(&[
        "cp",
        "-c",
        "attacker",
        program.to_str().unwrap(),
        "escape:/tmp/escape",
    ]);
    assert!(out.status.success(), "{}{}", stderr(&out), consoles(&env));
    let out = env.husk(&[
        "exec",
        "escape",
        "-c",
        "attacker",
        "--",
        "/tmp/escape",
        "/run/husk/containers",
        "/run/husk/volumes",
        "/run/husk/volumes/keys",
        "/keys",
    ]);
    let text = stdout(&out);
    assert!(
        out.status.success(),
        "{text}{}{}",
        stderr(&out),
        consoles(&env)
    );
    for path in [
        "/run/husk/containers",
        "/run/husk/volumes",
        "/run/husk/volumes/keys",
        "/keys",
    ] {
        assert!(text.contains(&format!("absent {path}\n")), "{text}");
    }
    // The victim still has its secret; the attacker never saw it.
    let out = env.husk(&[
        "exec",
        "escape",
        "-c",
        "victim",
        "--",
        "/bin/sh",
        "-c",
        "read -r k < /keys/key; echo -n $k",
    ]);
    assert_eq!(stdout(&out), SECRET);
    assert!(!text.contains(SECRET));
    assert!(env.husk(&["rm", "-f", "escape"]).status.success());
    env.finish();
}
