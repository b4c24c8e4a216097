//! The host identity a VM pod's hypervisor runs as: an unprivileged uid and
//! gid of its own per pod, from a range no login user or package has
//! (2^30 and up, as Firecracker's jailer and Kata pick ids outside the
//! host's users). Two pods never share one: a shared uid could signal,
//! ptrace or read the memory of the other pod's hypervisor. An id is
//! claimed with a file named after it in one directory under husk's run
//! root (`create_new`, so two monitors cannot both win), holding the pod's
//! id; [`VmIdentity`] owns the claim and removes it on drop, and
//! [`release_claims_of`] removes a dead monitor's.

use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

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
    /// Claims a free id in `dir` for the pod `owner`, starting from one
    /// derived from the pod's id (so a pod's id is stable across tries).
    pub fn claim(dir: &Path, owner: &str) -> Result<Self, IdentityError> {
        let io = |e| IdentityError::Io(dir.to_owned(), e);
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(io)?;
        let start = fnv1a(owner.as_bytes()) % ID_COUNT;
        for i in 0..ID_COUNT {
            let id = FIRST_ID + (start + i) % ID_COUNT;
            let claim = dir.join(id.to_string());
            match std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&claim)
            {
                Ok(mut f) => {
                    if let Err(e) = f.write_all(owner.as_bytes()) {
                        let _ = std::fs::remove_file(&claim);
                        return Err(io(e));
                    }
                    return Ok(VmIdentity {
                        uid: id,
                        gid: id,
                        claim,
                    });
                }
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
                Err(e) => return Err(io(e)),
            }
        }
        Err(IdentityError::Exhausted(dir.to_owned()))
    }
}

impl Drop for VmIdentity {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.claim);
    }
}

/// Removes the claims in `dir` that name `owner` (a monitor killed before
/// it could drop its [`VmIdentity`]).
pub fn release_claims_of(dir: &Path, owner: &str) {
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        if std::fs::read(e.path()).is_ok_and(|b| b == owner.as_bytes()) {
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
    fn two_pods_never_share_an_id_and_claims_go_with_their_owner() {
        let dir = tempfile::tempdir().unwrap();
        let ids = dir.path().join("vm-ids");
        let a = VmIdentity::claim(&ids, "pod-a").unwrap();
        // The same pod id again (a second VM of a racing monitor) gets the
        // next id, not the same one.
        let b = VmIdentity::claim(&ids, "pod-a").unwrap();
        assert_ne!(a.uid, b.uid);
        assert!(a.uid >= FIRST_ID && a.uid < FIRST_ID + ID_COUNT);
        assert_eq!(a.uid, a.gid);
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(
            std::fs::metadata(&ids).unwrap().permissions().mode() & 0o777,
            0o700
        );
        let c = VmIdentity::claim(&ids, "pod-c").unwrap();
        assert_eq!(std::fs::read_dir(&ids).unwrap().count(), 3);
        drop(a);
        assert_eq!(std::fs::read_dir(&ids).unwrap().count(), 2);
        // A dead monitor's claims: only its own go.
        std::mem::forget(b);
        release_claims_of(&ids, "pod-a");
        let left: Vec<_> = std::fs::read_dir(&ids)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        assert_eq!(left, [c.uid.to_string()]);
        drop(c);
        assert_eq!(std::fs::read_dir(&ids).unwrap().count(), 0);
    }

    #[test]
    fn an_unwritable_claim_directory_is_named() {
        let e = VmIdentity::claim(Path::new("/proc/husk-no-such/ids"), "p").unwrap_err();
        assert!(e.to_string().contains("/proc/husk-no-such/ids"), "{e}");
    }
}
