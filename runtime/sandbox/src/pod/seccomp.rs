//! Seccomp profiles for a container: the runtime's default (Kubernetes'
//! `RuntimeDefault`) and profile files in the OCI/Docker JSON format
//! (`Localhost`), read into the filter model the guest agent installs
//! ([`husk_protocol::Seccomp`]).

use husk_protocol::{Seccomp, SeccompAction, SeccompArg, SeccompOp, SeccompRule};
use serde::{Deserialize, Serialize};

/// A container's seccomp choice; no choice is unconfined.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum SeccompPlan {
    /// husk's default profile ([`runtime_default`]), fitted to the
    /// container's capabilities when it starts.
    RuntimeDefault,
    /// A profile read from a file when the container was created.
    Profile(Seccomp),
}

const EPERM: u16 = libc::EPERM as u16;

/// Namespace flags of clone(2) that only CAP_SYS_ADMIN may pass.
const CLONE_NAMESPACES: [u64; 7] = [
    libc::CLONE_NEWNS as u64,
    libc::CLONE_NEWCGROUP as u64,
    libc::CLONE_NEWUTS as u64,
    libc::CLONE_NEWIPC as u64,
    libc::CLONE_NEWUSER as u64,
    libc::CLONE_NEWPID as u64,
    libc::CLONE_NEWNET as u64,
];

/// husk's `RuntimeDefault`: every syscall is allowed but those that reach
/// past a container into the kernel's or other containers' business, which
/// fail with EPERM unless the container holds the capability that
/// would let it make them (the calls Docker's and containerd's default
/// profiles leave out, and give back with the same capabilities). clone3
/// fails with ENOSYS, so that C libraries fall back to clone, whose
/// namespace flags the filter can see.
pub fn runtime_default(capabilities: &[String]) -> Seccomp {
    let has = |c: &str| capabilities.iter().any(|k| k == c);
    let mut deny: Vec<&str> = vec![
        "kexec_load",
        "kexec_file_load",
        "lookup_dcookie",
        "nfsservctl",
        "sysfs",
        "_sysctl",
        "uselib",
        "userfaultfd",
        "ustat",
        "vm86",
        "vm86old",
        "io_uring_setup",
        "io_uring_enter",
        "io_uring_register",
        "add_key",
        "keyctl",
        "request_key",
        "swapon",
        "swapoff",
        "get_kernel_syms",
        "create_module",
        "query_module",
    ];
    let unlocked: [(&str, &[&str]); 11] = [
        (
            "SYS_ADMIN",
            &[
                "mount",
                "umount",
                "umount2",
                "pivot_root",
                "unshare",
                "setns",
                "quotactl",
                "quotactl_fd",
                "fanotify_init",
                "fsopen",
                "fsconfig",
                "fsmount",
                "fspick",
                "open_tree",
                "move_mount",
                "mount_setattr",
                "setdomainname",
                "sethostname",
            ],
        ),
        ("SYS_BOOT", &["reboot"]),
        (
            "SYS_MODULE",
            &["init_module", "finit_module", "delete_module"],
        ),
        ("SYS_PACCT", &["acct"]),
        (
            "SYS_TIME",
            &["settimeofday", "stime", "clock_settime", "clock_adjtime"],
        ),
        (
            "SYS_NICE",
            &["mbind", "set_mempolicy", "get_mempolicy", "move_pages"],
        ),
        ("SYS_RAWIO", &["iopl", "ioperm"]),
        ("DAC_READ_SEARCH", &["open_by_handle_at"]),
        ("SYSLOG", &["syslog"]),
        ("BPF", &["bpf"]),
        ("PERFMON", &["perf_event_open"]),
    ];
    for (cap, calls) in unlocked {
        let held = has(cap)
            // CAP_SYS_ADMIN also covers what BPF, PERFMON and SYSLOG split off.
            || (matches!(cap, "BPF" | "PERFMON" | "SYSLOG") && has("SYS_ADMIN"));
        if !held {
            deny.extend_from_slice(calls);
        }
    }
    let mut rules = vec![SeccompRule {
        names: deny.iter().map(|s| s.to_string()).collect(),
        action: SeccompAction::Errno(EPERM),
        args: vec![],
    }];
    if !has("SYS_ADMIN") {
        rules.push(SeccompRule {
            names: vec!["clone3".into()],
            action: SeccompAction::Errno(libc::ENOSYS as u16),
            args: vec![],
        });
        // One rule per flag: any of them set fails the call.
        for flag in CLONE_NAMESPACES {
            rules.push(SeccompRule {
                names: vec!["clone".into()],
                action: SeccompAction::Errno(EPERM),
                args: vec![SeccompArg {
                    index: 0,
                    op: SeccompOp::MaskedEq,
                    value: flag,
                    value_two: flag,
                }],
            });
        }
    }
    Seccomp {
        default_action: SeccompAction::Allow,
        rules,
    }
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct OciProfile {
    default_action: String,
    #[serde(default)]
    default_errno_ret: Option<u16>,
    #[serde(default)]
    syscalls: Vec<OciSyscall>,
    // Docker's profiles also carry these; the guest's architecture is the
    // host's, and flags and listener settings do not apply.
    #[serde(default)]
    #[allow(dead_code)]
    architectures: Vec<String>,
    #[serde(default)]
    #[allow(dead_code)]
    arch_map: serde_json::Value,
    #[serde(default)]
    #[allow(dead_code)]
    flags: serde_json::Value,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct OciSyscall {
    #[serde(default)]
    names: Vec<String>,
    /// Docker's older profiles name one syscall per entry.
    #[serde(default)]
    name: Option<String>,
    action: String,
    #[serde(default)]
    errno_ret: Option<u16>,
    #[serde(default)]
    args: Option<Vec<OciArg>>,
    #[serde(default)]
    includes: Option<Filter>,
    #[serde(default)]
    excludes: Option<Filter>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct OciArg {
    index: u8,
    value: u64,
    #[serde(default)]
    value_two: u64,
    op: String,
}

/// Docker's conditions on a rule: capabilities held, architectures.
#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase")]
struct Filter {
    #[serde(default)]
    caps: Vec<String>,
    #[serde(default)]
    arches: Vec<String>,
    #[serde(default)]
    #[allow(dead_code)]
    min_kernel: Option<String>,
}

fn oci_action(a: &str, errno: Option<u16>, what: &str) -> Result<SeccompAction, String> {
    Ok(match a {
        "SCMP_ACT_ALLOW" => SeccompAction::Allow,
        "SCMP_ACT_ERRNO" => SeccompAction::Errno(errno.unwrap_or(EPERM)),
        "SCMP_ACT_KILL" | "SCMP_ACT_KILL_THREAD" => SeccompAction::KillThread,
        "SCMP_ACT_KILL_PROCESS" => SeccompAction::KillProcess,
        "SCMP_ACT_TRAP" => SeccompAction::Trap,
        "SCMP_ACT_LOG" => SeccompAction::Log,
        other => {
            return Err(format!(
                "{what}: action {other:?} is not supported (SCMP_ACT_ALLOW, SCMP_ACT_ERRNO, SCMP_ACT_KILL, SCMP_ACT_KILL_PROCESS, SCMP_ACT_TRAP, SCMP_ACT_LOG)"
            ))
        }
    })
}

fn oci_op(op: &str, what: &str) -> Result<SeccompOp, String> {
    Ok(match op {
        "SCMP_CMP_EQ" => SeccompOp::Eq,
        "SCMP_CMP_NE" => SeccompOp::Ne,
        "SCMP_CMP_LT" => SeccompOp::Lt,
        "SCMP_CMP_LE" => SeccompOp::Le,
        "SCMP_CMP_GT" => SeccompOp::Gt,
        "SCMP_CMP_GE" => SeccompOp::Ge,
        "SCMP_CMP_MASKED_EQ" => SeccompOp::MaskedEq,
        other => {
            return Err(format!(
                "{what}: operator {other:?} is not a SCMP_CMP_ operator"
            ))
        }
    })
}

/// The host's architecture as Docker's profiles name it.
fn arch_matches(arches: &[String]) -> bool {
    let ours: &[&str] = if cfg!(target_arch = "x86_64") {
        &["amd64", "x86_64", "SCMP_ARCH_X86_64"]
    } else {
        &["arm64", "aarch64", "SCMP_ARCH_AARCH64"]
    };
    arches.is_empty() || arches.iter().any(|a| ours.contains(&a.as_str()))
}

/// Reads a profile file in the OCI/Docker JSON format. Rules that Docker
/// conditions on capabilities the container lacks (`includes.caps`,
/// `excludes.caps`) or on another architecture are left out, as Docker
/// does; `what` names the file in errors.
pub fn parse_profile(json: &[u8], capabilities: &[String], what: &str) -> Result<Seccomp, String> {
    let p: OciProfile = serde_json::from_slice(json).map_err(|e| {
        format!("{what}: not a seccomp profile (OCI JSON with defaultAction and syscalls): {e}")
    })?;
    let default_action = oci_action(&p.default_action, p.default_errno_ret, what)?;
    let held = |c: &String| {
        let c = c.trim_start_matches("CAP_");
        capabilities.iter().any(|k| k == c)
    };
    let mut rules = Vec::new();
    for (i, s) in p.syscalls.into_iter().enumerate() {
        let at = format!("{what}: syscalls[{i}]");
        let inc = s.includes.unwrap_or_default();
        let exc = s.excludes.unwrap_or_default();
        if !inc.caps.iter().all(held)
            || !arch_matches(&inc.arches)
            || exc.caps.iter().any(held)
            || (!exc.arches.is_empty() && arch_matches(&exc.arches))
        {
            continue;
        }
        let mut names = s.names;
        names.extend(s.name);
        if names.is_empty() {
            return Err(format!("{at}: names no syscall"));
        }
        let args = s
            .args
            .unwrap_or_default()
            .into_iter()
            .map(|a| {
                Ok(SeccompArg {
                    index: a.index,
                    op: oci_op(&a.op, &at)?,
                    value: a.value,
                    value_two: a.value_two,
                })
            })
            .collect::<Result<Vec<_>, String>>()?;
        rules.push(SeccompRule {
            names,
            action: oci_action(&s.action, s.errno_ret, &at)?,
            args,
        });
    }
    let s = Seccomp {
        default_action,
        rules,
    };
    s.check().map_err(|e| format!("{what}: {e}"))?;
    Ok(s)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn critest_and_docker_style_profiles_are_read() {
        let p = br#"{"defaultAction": "SCMP_ACT_ALLOW",
            "syscalls": [{"names": ["chmod", "fchmodat"], "action": "SCMP_ACT_ERRNO"}]}"#;
        let s = parse_profile(p, &[], "block-chmod.json").unwrap();
        assert_eq!(s.default_action, SeccompAction::Allow);
        assert_eq!(s.rules.len(), 1);
        assert_eq!(s.rules[0].action, SeccompAction::Errno(EPERM));
        assert_eq!(s.rules[0].names, ["chmod", "fchmodat"]);

        let docker = br#"{"defaultAction": "SCMP_ACT_ERRNO", "defaultErrnoRet": 1,
            "architectures": ["SCMP_ARCH_X86_64"],
            "syscalls": [
              {"names": ["read", "write"], "action": "SCMP_ACT_ALLOW"},
              {"names": ["mount"], "action": "SCMP_ACT_ALLOW", "includes": {"caps": ["CAP_SYS_ADMIN"]}},
              {"names": ["arm_fadvise64_64"], "action": "SCMP_ACT_ALLOW", "includes": {"arches": ["arm"]}},
              {"names": ["personality"], "action": "SCMP_ACT_ALLOW",
               "args": [{"index": 0, "value": 8, "op": "SCMP_CMP_EQ"}]},
              {"name": "clone", "action": "SCMP_ACT_ERRNO", "errnoRet": 38, "excludes": {"caps": ["CAP_SYS_ADMIN"]}}
            ]}"#;
        let s = parse_profile(docker, &[], "docker.json").unwrap();
        assert_eq!(s.default_action, SeccompAction::Errno(1));
        let names: Vec<&str> = s
            .rules
            .iter()
            .flat_map(|r| r.names.iter().map(String::as_str))
            .collect();
        assert_eq!(names, ["read", "write", "personality", "clone"]);
        assert_eq!(s.rules[1].args[0].op, SeccompOp::Eq);
        assert_eq!(s.rules[2].action, SeccompAction::Errno(38));
        let admin = parse_profile(docker, &["SYS_ADMIN".into()], "docker.json").unwrap();
        let names: Vec<&str> = admin
            .rules
            .iter()
            .flat_map(|r| r.names.iter().map(String::as_str))
            .collect();
        assert_eq!(names, ["read", "write", "mount", "personality"]);
    }

    #[test]
    fn bad_profiles_are_refused_naming_the_file_and_the_rule() {
        let e = parse_profile(b"{}", &[], "p.json").unwrap_err();
        assert!(e.contains("p.json") && e.contains("defaultAction"), "{e}");
        let e = parse_profile(
            br#"{"defaultAction": "SCMP_ACT_ALLOW", "syscalls": [{"names": ["x"], "action": "SCMP_ACT_NOTIFY"}]}"#,
            &[],
            "p.json",
        )
        .unwrap_err();
        assert!(
            e.contains("p.json: syscalls[0]") && e.contains("SCMP_ACT_NOTIFY"),
            "{e}"
        );
        let e = parse_profile(
            br#"{"defaultAction": "SCMP_ACT_ALLOW", "syscalls": [{"names": ["x"], "action": "SCMP_ACT_ERRNO",
                "args": [{"index": 0, "value": 1, "op": "SCMP_CMP_ALMOST"}]}]}"#,
            &[],
            "p.json",
        )
        .unwrap_err();
        assert!(e.contains("SCMP_CMP_ALMOST"), "{e}");
        let e = parse_profile(
            br#"{"defaultAction": "SCMP_ACT_ALLOW", "syscalls": [{"names": ["x"], "action": "SCMP_ACT_ERRNO",
                "args": [{"index": 9, "value": 1, "op": "SCMP_CMP_EQ"}]}]}"#,
            &[],
            "p.json",
        )
        .unwrap_err();
        assert!(e.contains("argument 9"), "{e}");
    }

    #[test]
    fn the_default_profile_gives_calls_back_with_their_capabilities() {
        let denied = |caps: &[&str]| -> Vec<String> {
            let caps: Vec<String> = caps.iter().map(|s| s.to_string()).collect();
            runtime_default(&caps).rules[0].names.clone()
        };
        let plain = denied(&[]);
        for call in [
            "mount",
            "unshare",
            "setns",
            "reboot",
            "init_module",
            "bpf",
            "keyctl",
        ] {
            assert!(plain.iter().any(|n| n == call), "{call}");
        }
        let admin = denied(&["SYS_ADMIN"]);
        for call in [
            "mount",
            "unshare",
            "setns",
            "bpf",
            "perf_event_open",
            "syslog",
        ] {
            assert!(!admin.iter().any(|n| n == call), "{call}");
        }
        assert!(admin.iter().any(|n| n == "reboot"));
        assert!(admin.iter().any(|n| n == "keyctl"));
        // clone's namespace flags are refused without SYS_ADMIN only.
        let clone_rules = |caps: &[String]| {
            runtime_default(caps)
                .rules
                .iter()
                .filter(|r| r.names == ["clone"])
                .count()
        };
        assert_eq!(clone_rules(&[]), 7);
        assert_eq!(clone_rules(&["SYS_ADMIN".into()]), 0);
    }
}
