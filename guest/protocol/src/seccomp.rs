//! Seccomp filters as the host hands them to the agent: a default action
//! and rules of syscall names with optional argument tests, the model of
//! OCI's `linux.seccomp` (which Docker's and the kubelet's profile files
//! use). The host reads and checks profiles; the agent resolves the names
//! for its architecture, compiles the filter to BPF and installs it in the
//! process just before it runs.

use serde::{Deserialize, Serialize};

/// What a filter does with a syscall.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum SeccompAction {
    Allow,
    /// Fail with this errno (EPERM when a profile names none).
    Errno(u16),
    KillThread,
    KillProcess,
    /// Send SIGSYS.
    Trap,
    /// Allow and log.
    Log,
}

/// An argument test: `args[index] <op> value`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum SeccompOp {
    Eq,
    Ne,
    Lt,
    Le,
    Gt,
    Ge,
    /// `args[index] & value == value_two`.
    MaskedEq,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SeccompArg {
    /// 0 to 5.
    pub index: u8,
    pub op: SeccompOp,
    pub value: u64,
    #[serde(default)]
    pub value_two: u64,
}

/// Syscalls by name, with the action for them; when `args` are given,
/// only calls whose arguments pass every test match.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SeccompRule {
    pub names: Vec<String>,
    pub action: SeccompAction,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub args: Vec<SeccompArg>,
}

/// A whole filter: `default_action` for every syscall no rule matches.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Seccomp {
    pub default_action: SeccompAction,
    pub rules: Vec<SeccompRule>,
}

/// The most rules and names a filter may carry (Docker's default profile
/// has about 400 names): a hostile peer cannot make the other side build
/// a filter without end.
pub const MAX_NAMES: usize = 4096;

impl Seccomp {
    /// Checks what a peer sent: argument indexes, sizes and name syntax.
    pub fn check(&self) -> Result<(), String> {
        let names: usize = self.rules.iter().map(|r| r.names.len()).sum();
        if names > MAX_NAMES {
            return Err(format!(
                "seccomp: {names} syscall names, more than {MAX_NAMES}"
            ));
        }
        for r in &self.rules {
            if r.names.is_empty() {
                return Err("seccomp: a rule names no syscall".into());
            }
            for n in &r.names {
                if n.is_empty()
                    || n.len() > 64
                    || !n
                        .bytes()
                        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
                {
                    return Err(format!("seccomp: {n:?} is not a syscall name"));
                }
            }
            if r.args.len() > 6 {
                return Err(format!(
                    "seccomp: rule for {:?} tests more than 6 arguments",
                    r.names
                ));
            }
            if let Some(a) = r.args.iter().find(|a| a.index > 5) {
                return Err(format!(
                    "seccomp: rule for {:?} tests argument {}; syscalls have 6 (0 to 5)",
                    r.names, a.index
                ));
            }
        }
        Ok(())
    }
}

/// The /proc/sys path (relative) of sysctl `name`: `a.b.c` or `a/b/c`.
/// Refuses names that could leave /proc/sys or are not sysctl names.
pub fn sysctl_path(name: &str) -> Result<String, String> {
    let path = if name.contains('/') {
        name.to_owned()
    } else {
        name.replace('.', "/")
    };
    let ok = !path.is_empty()
        && path.len() <= 256
        && path.split('/').all(|c| {
            !c.is_empty()
                && c != "."
                && c != ".."
                && c.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"_-.:".contains(&b))
        });
    if ok {
        Ok(path)
    } else {
        Err(format!("{name:?} is not a sysctl name"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sysctl_names_become_paths_under_proc_sys() {
        assert_eq!(
            sysctl_path("kernel.shm_rmid_forced").unwrap(),
            "kernel/shm_rmid_forced"
        );
        assert_eq!(
            sysctl_path("net/ipv4/conf/eth0.100/forwarding").unwrap(),
            "net/ipv4/conf/eth0.100/forwarding"
        );
        for bad in [
            "",
            "kernel..x",
            "../etc/passwd",
            "net/../../x",
            "a/./b",
            "x y",
            "a/b\n",
        ] {
            assert!(sysctl_path(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn hostile_filters_are_refused() {
        let rule = |names: &[&str], args: Vec<SeccompArg>| SeccompRule {
            names: names.iter().map(|s| s.to_string()).collect(),
            action: SeccompAction::Errno(1),
            args,
        };
        let f = |rules| Seccomp {
            default_action: SeccompAction::Allow,
            rules,
        };
        assert!(f(vec![rule(&["chmod", "fchmodat"], vec![])])
            .check()
            .is_ok());
        assert!(f(vec![rule(&[], vec![])]).check().is_err());
        assert!(f(vec![rule(&["../x"], vec![])]).check().is_err());
        let arg = SeccompArg {
            index: 6,
            op: SeccompOp::Eq,
            value: 0,
            value_two: 0,
        };
        assert!(f(vec![rule(&["clone"], vec![arg])]).check().is_err());
        let many: Vec<String> = (0..=MAX_NAMES).map(|i| format!("s{i}")).collect();
        let many: Vec<&str> = many.iter().map(String::as_str).collect();
        assert!(f(vec![rule(&many, vec![])]).check().is_err());
    }
}
