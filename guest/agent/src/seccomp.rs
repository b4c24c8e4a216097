//! Seccomp in the guest: a [`Seccomp`] from the host compiled to BPF with
//! rust-vmm's seccompiler, syscall names resolved for this architecture
//! (names it lacks are skipped, as runc skips them), and installed in the
//! child between fork and exec.
//!
//! seccompiler builds filters with one action on match and one on
//! mismatch, while a profile gives each rule its own action. So a profile
//! becomes a stack of filters, which the kernel runs all of, taking the
//! most restrictive answer: one filter answers the default action for
//! every syscall no rule names (and allows the rest), and one filter per
//! other action answers it for that action's rules (and allows the rest).

use husk_protocol::{Seccomp, SeccompAction, SeccompOp, SeccompRule};
use seccompiler::{
    BpfProgram, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter, TargetArch,
};
use std::collections::BTreeMap;
use std::str::FromStr;

#[cfg(target_arch = "x86_64")]
const ARCH: TargetArch = TargetArch::x86_64;
#[cfg(target_arch = "aarch64")]
const ARCH: TargetArch = TargetArch::aarch64;

fn action(a: SeccompAction) -> seccompiler::SeccompAction {
    match a {
        SeccompAction::Allow => seccompiler::SeccompAction::Allow,
        SeccompAction::Errno(e) => seccompiler::SeccompAction::Errno(e.into()),
        SeccompAction::KillThread => seccompiler::SeccompAction::KillThread,
        SeccompAction::KillProcess => seccompiler::SeccompAction::KillProcess,
        SeccompAction::Trap => seccompiler::SeccompAction::Trap,
        SeccompAction::Log => seccompiler::SeccompAction::Log,
    }
}

/// One profile rule's argument tests as seccompiler rules: all of them
/// (AND), or, when every test is on the same argument, any of them (OR),
/// as runc reads such rules.
fn conditions(r: &SeccompRule) -> Result<Vec<seccompiler::SeccompRule>, String> {
    let cond = |a: &husk_protocol::SeccompArg| {
        let (op, value) = match a.op {
            SeccompOp::Eq => (SeccompCmpOp::Eq, a.value),
            SeccompOp::Ne => (SeccompCmpOp::Ne, a.value),
            SeccompOp::Lt => (SeccompCmpOp::Lt, a.value),
            SeccompOp::Le => (SeccompCmpOp::Le, a.value),
            SeccompOp::Gt => (SeccompCmpOp::Gt, a.value),
            SeccompOp::Ge => (SeccompCmpOp::Ge, a.value),
            SeccompOp::MaskedEq => (SeccompCmpOp::MaskedEq(a.value), a.value_two),
        };
        SeccompCondition::new(a.index, SeccompCmpArgLen::Qword, op, value)
            .map_err(|e| format!("seccomp: rule for {:?}: {e}", r.names))
    };
    let rule = |c: Vec<SeccompCondition>| {
        seccompiler::SeccompRule::new(c)
            .map_err(|e| format!("seccomp: rule for {:?}: {e}", r.names))
    };
    let same_index = r.args.len() > 1 && r.args.iter().all(|a| a.index == r.args[0].index);
    if same_index {
        r.args.iter().map(|a| rule(vec![cond(a)?])).collect()
    } else {
        Ok(vec![rule(
            r.args.iter().map(cond).collect::<Result<_, _>>()?,
        )?])
    }
}

/// A filter answering `matched` for the syscalls `rules` name (and the
/// argument tests they make) and `mismatch` for every other.
fn filter(
    rules: &[&SeccompRule],
    mismatch: SeccompAction,
    matched: SeccompAction,
) -> Result<BpfProgram, String> {
    // A syscall named without argument tests matches whatever else is
    // said about it: seccompiler's empty rule list.
    let mut map: BTreeMap<i64, Option<Vec<seccompiler::SeccompRule>>> = BTreeMap::new();
    for r in rules {
        for name in &r.names {
            let Ok(nr) = syscalls::Sysno::from_str(name) else {
                continue;
            };
            let entry = map
                .entry(nr.id() as i64)
                .or_insert_with(|| Some(Vec::new()));
            match (entry.as_mut(), r.args.is_empty()) {
                (_, true) => *entry = None,
                (Some(list), false) => list.extend(conditions(r)?),
                (None, false) => {}
            }
        }
    }
    let map = map
        .into_iter()
        .map(|(nr, rules)| (nr, rules.unwrap_or_default()))
        .collect();
    let f = SeccompFilter::new(map, action(mismatch), action(matched), ARCH)
        .map_err(|e| format!("seccomp: {e}"))?;
    BpfProgram::try_from(f).map_err(|e| format!("seccomp: {e}"))
}

/// The filters that together apply `s`, in the order to install them.
pub fn compile(s: &Seccomp) -> Result<Vec<BpfProgram>, String> {
    s.check()?;
    let default = s.default_action;
    let mut progs = Vec::new();
    // Rules whose action is the default's say nothing.
    let named: Vec<&SeccompRule> = s.rules.iter().filter(|r| r.action != default).collect();
    if default != SeccompAction::Allow {
        progs.push(filter(&named, default, SeccompAction::Allow)?);
    }
    let mut by_action: BTreeMap<SeccompAction, Vec<&SeccompRule>> = BTreeMap::new();
    for r in named.iter().filter(|r| r.action != SeccompAction::Allow) {
        by_action.entry(r.action).or_default().push(r);
    }
    for (act, rules) in by_action {
        progs.push(filter(&rules, SeccompAction::Allow, act)?);
    }
    Ok(progs)
}

/// Installs `progs` in the calling thread, without setting no_new_privs
/// (which the container's securityContext decides): the caller must have
/// CAP_SYS_ADMIN or have set it.
///
/// # Safety
/// Only async-signal-safe calls: for use between fork and exec.
pub unsafe fn install(progs: &[BpfProgram]) -> std::io::Result<()> {
    for p in progs {
        let prog = libc::sock_fprog {
            len: p.len() as u16,
            filter: p.as_ptr() as *mut libc::sock_filter,
        };
        // SAFETY: the kernel copies the program from this valid sock_fprog,
        // whose filter points into `p` (seccompiler's sock_filter has
        // libc's layout).
        let r = unsafe {
            libc::syscall(
                libc::SYS_seccomp,
                libc::SECCOMP_SET_MODE_FILTER,
                0 as libc::c_ulong,
                &prog as *const libc::sock_fprog,
            )
        };
        if r != 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use husk_protocol::SeccompArg;

    fn rule(names: &[&str], action: SeccompAction, args: Vec<SeccompArg>) -> SeccompRule {
        SeccompRule {
            names: names.iter().map(|s| s.to_string()).collect(),
            action,
            args,
        }
    }

    /// Runs `f` in a forked child under `s`; returns what the child
    /// reported (its exit code).
    fn in_child(s: &Seccomp, f: fn() -> i32) -> i32 {
        let progs = compile(s).unwrap();
        // SAFETY: the child makes raw syscalls only, then _exit.
        unsafe {
            let pid = libc::fork();
            assert!(pid >= 0);
            if pid == 0 {
                libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0);
                if install(&progs).is_err() {
                    libc::_exit(100);
                }
                libc::_exit(f());
            }
            let mut status = 0;
            libc::waitpid(pid, &mut status, 0);
            assert!(libc::WIFEXITED(status), "child status {status:#x}");
            libc::WEXITSTATUS(status)
        }
    }

    fn errno() -> i32 {
        std::io::Error::last_os_error().raw_os_error().unwrap_or(0)
    }

    fn chmod_tmp() -> i32 {
        // SAFETY: a NUL-terminated path.
        let r = unsafe { libc::syscall(libc::SYS_chmod, c"/".as_ptr(), 0o755) };
        if r == 0 {
            0
        } else {
            errno()
        }
    }

    fn getppid_and_uname() -> i32 {
        // SAFETY: plain syscalls.
        unsafe {
            let ok = libc::syscall(libc::SYS_getppid) > 0;
            let mut u: libc::utsname = std::mem::zeroed();
            let r = libc::syscall(libc::SYS_uname, &mut u);
            match (ok, r) {
                (true, 0) => 0,
                (false, _) => 1,
                _ => errno(),
            }
        }
    }

    #[test]
    fn a_deny_rule_fails_just_those_syscalls_with_its_errno() {
        let s = Seccomp {
            default_action: SeccompAction::Allow,
            rules: vec![rule(
                &["chmod", "fchmodat", "fchmodat2", "no_such_syscall"],
                SeccompAction::Errno(libc::EPERM as u16),
                vec![],
            )],
        };
        assert_eq!(in_child(&s, chmod_tmp), libc::EPERM);
        assert_eq!(in_child(&s, getppid_and_uname), 0);
    }

    #[test]
    fn a_default_deny_profile_allows_only_its_rules() {
        // Enough to run the test's child: exit and the calls it makes.
        let base = ["exit", "exit_group", "getppid", "chmod"];
        let s = Seccomp {
            default_action: SeccompAction::Errno(libc::ENOSYS as u16),
            rules: vec![rule(&base, SeccompAction::Allow, vec![])],
        };
        assert_eq!(
            in_child(&s, getppid_and_uname),
            libc::ENOSYS,
            "uname is not allowed"
        );
        // chmod of / as root succeeds (or EPERM as non-root): not ENOSYS.
        assert_ne!(in_child(&s, chmod_tmp), libc::ENOSYS);
    }

    #[test]
    fn argument_tests_pick_calls_and_stacked_actions_take_the_strictest() {
        // personality(0xffffffff) queries; deny every other value, then
        // refuse getppid in a second, stricter group.
        let s = Seccomp {
            default_action: SeccompAction::Allow,
            rules: vec![
                rule(
                    &["personality"],
                    SeccompAction::Errno(libc::EACCES as u16),
                    vec![SeccompArg {
                        index: 0,
                        op: SeccompOp::Ne,
                        value: 0xffff_ffff,
                        value_two: 0,
                    }],
                ),
                rule(
                    &["getppid"],
                    SeccompAction::Errno(libc::EPERM as u16),
                    vec![],
                ),
                rule(&["getppid"], SeccompAction::Allow, vec![]),
            ],
        };
        fn personality() -> i32 {
            // SAFETY: personality takes a plain value.
            unsafe {
                if libc::syscall(libc::SYS_personality, 0xffff_ffffu64) < 0 {
                    return 1;
                }
                if libc::syscall(libc::SYS_personality, 0u64) >= 0 {
                    return 2;
                }
                if errno() != libc::EACCES {
                    return 3;
                }
                if libc::syscall(libc::SYS_getppid) >= 0 {
                    return 4;
                }
                errno()
            }
        }
        assert_eq!(in_child(&s, personality), libc::EPERM);
    }
}
