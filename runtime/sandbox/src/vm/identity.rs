//! The host identity a VM pod's hypervisor runs as: an unprivileged uid and
//! gid of its own per pod, from a range no login user or package has
//! (2^30 and up, as Firecracker's jailer and Kata pick ids outside the
//! host's users). Two pods never share one: a shared uid could signal,
//! ptrace or read the memory of the other pod's hypervisor. An id is
//! claimed with a file named after it in one host-wide directory,
//! [`HOST_CLAIMS`] (hard-linked from a written draft, so two monitors
//! cannot both win, also across husk roots, and no claim is ever seen
//! half-written), holding the claiming monitor's pid and the VM's run
//! directory. [`VmIdentity`] owns the claim and removes it on drop; a
//! claim whose monitor is gone (kill -9) is taken over, and
//! [`release_claims_under`] removes them when such a pod is removed. QEMU
//! and husk-vmm get their ids here alike.

use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

/// Where every VM's claim is, host-wide (tmpfs: gone at reboot).
pub const HOST_CLAIMS: &str = "/run/husk-vm-ids";

/// The first id husk hands out.
pub const FIRST_ID: u32 = 0x4000_0000;
/// How many ids there are to hand out.
pub const ID_COUNT: u32 = 1 << 20;

#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    #[error("claiming a host uid for the VM in {0}: {1}")]
    Io(PathBuf, std::io::Error),
    #[error("all {ID_COUNT} VM host uids in {0} are claimed; remove stale files there (their content names the pod)")]
    Exhausted(PathBuf),
}

/// One pod's claimed uid and gid (equal); the claim goes with it.
#[derive(Debug)]
pub struct VmIdentity {
    pub uid: u32,
    pub gid: u32,
    claim: PathBuf,
}

impl VmIdentity {
    /// Claims a free id in `dir` for the VM whose run directory is
    /// `owner`, starting from one derived from it.
    pub fn claim(dir: &Path, owner: &Path) -> Result<Self, IdentityError> {
        let io = |e| IdentityError::Io(dir.to_owned(), e);
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(io)?;
        let owner = owner.to_string_lossy();
        let content = format!("{} {owner}", std::process::id());
        // The claim appears whole or not at all (written aside, then
        // hard-linked to its name, which fails if the name is taken): a
        // monitor killed half-way never leaves an empty claim that nobody
        // could tell the owner of.
        collect_stale_drafts(dir);
        let draft = dir.join(format!(
            ".draft-{}-{}",
            std::process::id(),
            nix::unistd::gettid()
        ));
        let written = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&draft)
            .and_then(|mut f| f.write_all(content.as_bytes()));
        if let Err(e) = written {
            let _ = std::fs::remove_file(&draft);
            return Err(io(e));
        }
        let start = fnv1a(owner.as_bytes()) % ID_COUNT;
        let mut result = Err(IdentityError::Exhausted(dir.to_owned()));
        for i in 0..ID_COUNT {
            let id = FIRST_ID + (start + i) % ID_COUNT;
            let claim = dir.join(id.to_string());
            let mut linked = std::fs::hard_link(&draft, &claim);
            if linked
                .as_ref()
                .is_err_and(|e| e.kind() == std::io::ErrorKind::AlreadyExists)
            {
                // Taken over when the monitor that claimed it is gone.
                if !claimer_gone(&claim) || std::fs::remove_file(&claim).is_err() {
                    continue;
                }
                linked = std::fs::hard_link(&draft, &claim);
            }
            match linked {
                Ok(()) => {
                    result = Ok(VmIdentity {
                        uid: id,
                        gid: id,
                        claim,
                    });
                    break;
                }
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
                Err(e) => {
                    result = Err(io(e));
                    break;
                }
            }
        }
        let _ = std::fs::remove_file(&draft);
        result
    }
}

/// Removes the drafts of claimers that are gone (killed between writing
/// a draft and removing it).
fn collect_stale_drafts(dir: &Path) {
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let name = e.file_name();
        let Some(pid) = name
            .to_str()
            .and_then(|n| n.strip_prefix(".draft-"))
            .and_then(|n| n.split('-').next())
            .and_then(|p| p.parse::<i32>().ok())
        else {
            continue;
        };
        if nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), None)
            == Err(nix::errno::Errno::ESRCH)
        {
            let _ = std::fs::remove_file(e.path());
        }
    }
}

impl Drop for VmIdentity {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.claim);
    }
}

/// A claim's `pid owner` content.
fn read_claim(claim: &Path) -> Option<(i32, PathBuf)> {
    let text = std::fs::read_to_string(claim).ok()?;
    let (pid, owner) = text.split_once(' ')?;
    Some((pid.parse().ok()?, PathBuf::from(owner)))
}

fn claimer_gone(claim: &Path) -> bool {
    read_claim(claim).is_some_and(|(pid, _)| {
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), None)
            == Err(nix::errno::Errno::ESRCH)
    })
}

/// Removes the claims in `dir` of VMs whose run directory is under `dir_of_pod`
/// (a monitor killed before it could drop its [`VmIdentity`]).
pub fn release_claims_under(dir: &Path, dir_of_pod: &Path) {
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        if read_claim(&e.path()).is_some_and(|(_, owner)| owner.starts_with(dir_of_pod)) {
            let _ = std::fs::remove_file(e.path());
        }
    }
}

fn fnv1a(bytes: &[u8]) -> u32 {
    bytes.iter().fold(0x811c_9dc5u32, |h, &b| {
        (h ^ u32::from(b)).wrapping_mul(0x0100_0193)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn two_vms_never_share_an_id_and_claims_go_with_their_owner() {
        let dir = tempfile::tempdir().unwrap();
        let ids = dir.path().join("vm-ids");
        let a = VmIdentity::claim(&ids, Path::new("/run/pods/a/vm")).unwrap();
        // The same run directory again (a racing monitor) gets the next id.
        let b = VmIdentity::claim(&ids, Path::new("/run/pods/a/vm")).unwrap();
        assert_ne!(a.uid, b.uid);
        assert!(a.uid >= FIRST_ID && a.uid < FIRST_ID + ID_COUNT);
        assert_eq!(a.uid, a.gid);
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(
            std::fs::metadata(&ids).unwrap().permissions().mode() & 0o777,
            0o700
        );
        let c = VmIdentity::claim(&ids, Path::new("/run/pods/c/vm")).unwrap();
        assert_eq!(std::fs::read_dir(&ids).unwrap().count(), 3);
        drop(a);
        assert_eq!(std::fs::read_dir(&ids).unwrap().count(), 2);
        // A dead monitor's claims: only its pod's go.
        std::mem::forget(b);
        release_claims_under(&ids, Path::new("/run/pods/a"));
        let left: Vec<_> = std::fs::read_dir(&ids)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        assert_eq!(left, [c.uid.to_string()]);
        // A claim whose monitor is gone is taken over.
        let stale = c.uid;
        std::mem::forget(c);
        std::fs::write(ids.join(stale.to_string()), "2147483646 /run/pods/c/vm").unwrap();
        let d = VmIdentity::claim(&ids, Path::new("/run/pods/c/vm")).unwrap();
        assert_eq!(d.uid, stale);
        drop(d);
        assert_eq!(std::fs::read_dir(&ids).unwrap().count(), 0);
    }

    #[test]
    fn an_unwritable_claim_directory_is_named() {
        let e =
            VmIdentity::claim(Path::new("/proc/husk-no-such/ids"), Path::new("/p")).unwrap_err();
        assert!(e.to_string().contains("/proc/husk-no-such/ids"), "{e}");
    }
}
