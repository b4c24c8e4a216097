//! A container's user and privileges: the user and group looked up in the
//! container's own /etc/passwd and /etc/group (read before the fork, never
//! through a symlink), runAsNonRoot checked against the result, and, in
//! the child, the capability bounding set cut to what the container keeps,
//! the groups, gid and uid set, and no_new_privs.

use husk_protocol::{Security, CAPABILITIES};
use std::path::Path;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Resolved {
    pub uid: u32,
    pub gid: u32,
    pub groups: Vec<libc::gid_t>,
    pub home: String,
    /// Bit n: keep capability n.
    pub keep: u64,
    pub no_new_privs: bool,
    /// Seccomp filters to install ([`crate::seccomp::compile`]).
    pub seccomp: Vec<seccompiler::BpfProgram>,
}

/// A file of the container's /etc, or "" when it has none; a symlink is
/// not followed.
fn read_etc(root: &Path, name: &str) -> String {
    let etc = root.join("etc");
    if std::fs::symlink_metadata(&etc).map_or(true, |m| !m.is_dir()) {
        return String::new();
    }
    use std::io::Read;
    use std::os::unix::fs::OpenOptionsExt;
    let mut s = String::new();
    let _ = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW)
        .open(etc.join(name))
        .and_then(|mut f| f.read_to_string(&mut s));
    s
}

/// `name:x:uid:gid:…:home:shell` entries.
fn passwd_entry<'a>(passwd: &'a str, key: &str, by_id: bool) -> Option<Vec<&'a str>> {
    passwd
        .lines()
        .map(|l| l.split(':').collect::<Vec<_>>())
        .find(|f| f.len() >= 4 && if by_id { f[2] == key } else { f[0] == key })
}

pub fn resolve(root: &Path, s: &Security) -> Result<Resolved, String> {
    let (passwd, group) = (read_etc(root, "passwd"), read_etc(root, "group"));
    let (user, grp) = match s.user.as_deref() {
        None | Some("") => ("0", None),
        Some(u) => match u.split_once(':') {
            Some((u, g)) => (u, Some(g)),
            None => (u, None),
        },
    };
    let numeric = |x: &str| x.parse::<u32>().ok();
    let (uid, name, mut gid, home) = match numeric(user) {
        Some(uid) => match passwd_entry(&passwd, user, true) {
            Some(f) => (
                uid,
                Some(f[0]),
                numeric(f[3]).unwrap_or(0),
                f.get(5).copied(),
            ),
            None => (uid, None, 0, None),
        },
        None => {
            let f = passwd_entry(&passwd, user, false).ok_or_else(|| {
                format!("unable to find user {user}: no matching entries in the container's /etc/passwd")
            })?;
            let uid = numeric(f[2]).ok_or_else(|| format!("user {user}: bad uid {:?}", f[2]))?;
            (
                uid,
                Some(f[0]),
                numeric(f[3]).unwrap_or(0),
                f.get(5).copied(),
            )
        }
    };
    if let Some(g) = grp {
        gid = match numeric(g) {
            Some(n) => n,
            None => group
                .lines()
                .map(|l| l.split(':').collect::<Vec<_>>())
                .find(|f| f.len() >= 3 && f[0] == g)
                .and_then(|f| numeric(f[2]))
                .ok_or_else(|| {
                    format!("unable to find group {g}: no matching entries in the container's /etc/group")
                })?,
        };
    }
    if s.run_as_non_root && uid == 0 {
        return Err(
            "the container would run as root (uid 0), and runAsNonRoot is set; set runAsUser or use an image with a non-root User".into(),
        );
    }
    let mut groups: Vec<libc::gid_t> = s.supplemental_groups.clone();
    if let Some(name) = name.filter(|_| !s.strict_groups) {
        for f in group.lines().map(|l| l.split(':').collect::<Vec<_>>()) {
            if f.len() >= 4 && f[3].split(',').any(|m| m == name) {
                if let Some(g) = numeric(f[2]) {
                    if !groups.contains(&g) {
                        groups.push(g);
                    }
                }
            }
        }
    }
    let mut keep = 0u64;
    for c in &s.capabilities {
        let n = CAPABILITIES
            .iter()
            .position(|x| x == c)
            .ok_or_else(|| format!("unknown capability {c:?}"))?;
        keep |= 1 << n;
    }
    Ok(Resolved {
        uid,
        gid,
        groups,
        home: home.filter(|h| !h.is_empty()).unwrap_or("/").to_owned(),
        keep,
        no_new_privs: s.no_new_privs,
        seccomp: match &s.seccomp {
            Some(f) => crate::seccomp::compile(f)?,
            None => Vec::new(),
        },
    })
}

impl Resolved {
    /// The identity as reported to the host: the primary group among the
    /// supplementary ones, sorted, as containerd reports them.
    pub fn report(&self) -> husk_protocol::ProcessUser {
        let mut groups: Vec<u32> = self.groups.clone();
        groups.push(self.gid);
        groups.sort_unstable();
        groups.dedup();
        husk_protocol::ProcessUser {
            uid: self.uid,
            gid: self.gid,
            groups,
        }
    }
}

/// Between fork and exec, in the container: applies `r`. Only
/// async-signal-safe calls (prctl, setgroups, setgid, setuid).
///
/// # Safety
/// Only between fork and exec.
pub unsafe fn apply(r: &Resolved) -> std::io::Result<()> {
    let check = |ok: bool| {
        if ok {
            Ok(())
        } else {
            Err(std::io::Error::last_os_error())
        }
    };
    // SAFETY: plain system calls on values prepared before the fork.
    unsafe {
        for cap in 0..CAPABILITIES.len() {
            if r.keep & (1 << cap) == 0 {
                // Capabilities this kernel lacks are already out of the set.
                let _ = libc::prctl(libc::PR_CAPBSET_DROP, cap as libc::c_ulong, 0, 0, 0);
            }
        }
        // Installing a filter takes CAP_SYS_ADMIN or no_new_privs. Without
        // no_new_privs it goes in while the process still has its
        // capabilities, before the user changes (runc's order); the filter
        // then also sees the calls below.
        if !r.no_new_privs {
            crate::seccomp::install(&r.seccomp)?;
        }
        check(libc::setgroups(r.groups.len(), r.groups.as_ptr()) == 0)?;
        check(libc::setgid(r.gid) == 0)?;
        check(libc::setuid(r.uid) == 0)?;
        if r.no_new_privs {
            check(libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) == 0)?;
            crate::seccomp::install(&r.seccomp)?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn root() -> tempfile::TempDir {
        let t = tempfile::tempdir().unwrap();
        std::fs::create_dir(t.path().join("etc")).unwrap();
        std::fs::write(
            t.path().join("etc/passwd"),
            "root:x:0:0:root:/root:/bin/sh\napp:x:1000:1000:app:/home/app:/bin/sh\n",
        )
        .unwrap();
        std::fs::write(
            t.path().join("etc/group"),
            "root:x:0:\napp:x:1000:\nstaff:x:50:app,other\nwheel:x:10:root\n",
        )
        .unwrap();
        t
    }

    fn sec(user: Option<&str>) -> Security {
        Security {
            user: user.map(str::to_owned),
            capabilities: vec!["CHOWN".into(), "KILL".into()],
            ..Default::default()
        }
    }

    #[test]
    fn a_strict_policy_keeps_only_the_given_groups() {
        let t = root();
        let mut s = sec(Some("app"));
        s.supplemental_groups = vec![1234];
        let r = resolve(t.path(), &s).unwrap();
        assert_eq!(r.groups, vec![1234, 50]);
        assert_eq!(r.report().groups, vec![50, 1000, 1234]);
        s.strict_groups = true;
        let r = resolve(t.path(), &s).unwrap();
        assert_eq!(r.groups, vec![1234]);
        assert_eq!(
            r.report(),
            husk_protocol::ProcessUser {
                uid: 1000,
                gid: 1000,
                groups: vec![1000, 1234]
            }
        );
    }

    #[test]
    fn users_and_groups_come_from_the_containers_files() {
        let t = root();
        let r = resolve(t.path(), &sec(Some("app"))).unwrap();
        assert_eq!((r.uid, r.gid, r.home.as_str()), (1000, 1000, "/home/app"));
        assert_eq!(r.groups, vec![50]);
        assert_eq!(r.keep, 1 << 0 | 1 << 5);
        let r = resolve(t.path(), &sec(Some("1000:staff"))).unwrap();
        assert_eq!((r.uid, r.gid), (1000, 50));
        // A uid the image does not know: gid 0, home /.
        let r = resolve(t.path(), &sec(Some("4242"))).unwrap();
        assert_eq!((r.uid, r.gid, r.home.as_str()), (4242, 0, "/"));
        let r = resolve(t.path(), &sec(None)).unwrap();
        assert_eq!((r.uid, r.gid), (0, 0));
        assert!(resolve(t.path(), &sec(Some("nobody")))
            .unwrap_err()
            .contains("unable to find user nobody"));
        assert!(resolve(t.path(), &sec(Some("app:nogroup")))
            .unwrap_err()
            .contains("unable to find group nogroup"));
        let mut s = sec(Some("0"));
        s.run_as_non_root = true;
        assert!(resolve(t.path(), &s).unwrap_err().contains("runAsNonRoot"));
        s.capabilities = vec!["NOT_A_CAP".into()];
        s.run_as_non_root = false;
        assert!(resolve(t.path(), &s).is_err());
    }

    #[test]
    fn a_symlinked_passwd_is_not_followed() {
        let t = root();
        std::fs::remove_file(t.path().join("etc/passwd")).unwrap();
        std::os::unix::fs::symlink("/etc/passwd", t.path().join("etc/passwd")).unwrap();
        assert!(resolve(t.path(), &sec(Some("root"))).is_err());
    }
}
