//! Pod volumes in the guest. Each volume the host announces is made ready
//! once at `/run/husk/volumes/<name>`: a virtio-fs share of a host
//! directory (emptyDir on disk, hostPath), or a tmpfs in guest memory
//! (emptyDir with `medium: Memory`; configMap and secret, whose files the
//! host sends so that secret bytes never touch the host's disk). Containers
//! then bind-mount a volume, or a subPath of it, into their root, in their
//! own mount namespace, so the mounts end with the container.
//!
//! Paths from the host are checked again here, and no path is followed
//! through a symlink: an image or a volume cannot point a mount elsewhere.

use husk_protocol::{is_relative_path, is_volume_name, Mount, VolumeRequest, VolumeSource};
use std::ffi::CString;
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

pub const VOLUMES: &str = "/run/husk/volumes";

/// Whether `p` is a mount point (a line of /proc/mounts).
pub fn is_mount_point(p: &Path) -> bool {
    std::fs::read_to_string("/proc/mounts").is_ok_and(|m| {
        m.lines()
            .any(|l| l.split_whitespace().nth(1) == Some(&*p.to_string_lossy()))
    })
}

/// Where a volume that is ready is mounted.
pub fn path_of(name: &str) -> Result<PathBuf, String> {
    if !is_volume_name(name) {
        return Err(format!("{name:?} is not a volume name"));
    }
    let dir = Path::new(VOLUMES).join(name);
    if !is_mount_point(&dir) {
        return Err(format!("no volume {name:?}"));
    }
    Ok(dir)
}

/// Makes `req`'s volume ready. On error nothing of it is left.
pub fn add(req: &VolumeRequest) -> Result<(), String> {
    if !is_volume_name(&req.name) {
        return Err(format!("{:?} is not a volume name", req.name));
    }
    let dir = Path::new(VOLUMES).join(&req.name);
    if is_mount_point(&dir) {
        return Err(format!("volume {:?} is already there", req.name));
    }
    std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let result = fill(&dir, &req.source);
    if result.is_err() {
        crate::umount(&dir);
        let _ = std::fs::remove_dir(&dir);
    }
    result
}

fn fill(dir: &Path, source: &VolumeSource) -> Result<(), String> {
    let nosuid = libc::MS_NOSUID | libc::MS_NODEV;
    match source {
        VolumeSource::VirtioFs { tag, read_only } => {
            if !is_volume_name(tag) {
                return Err(format!("{tag:?} is not a virtio-fs tag"));
            }
            let ro = if *read_only { libc::MS_RDONLY } else { 0 };
            crate::mount_checked(tag, dir, "virtiofs", nosuid | ro, "").map_err(|e| e.to_string())
        }
        VolumeSource::Tmpfs {
            size,
            mode,
            files,
            read_only,
            atomic,
        } => {
            let mut opts = format!("mode={:o}", mode & 0o7777);
            if let Some(size) = size {
                opts.push_str(&format!(",size={size}"));
            }
            crate::mount_checked("tmpfs", dir, "tmpfs", nosuid, &opts)
                .map_err(|e| e.to_string())?;
            if *atomic {
                husk_protocol::projected::write(dir, files).map_err(|e| e.to_string())?;
            } else {
                for f in files {
                    write_file(dir, &f.path, &f.data, f.mode)
                        .map_err(|e| format!("file {:?}: {e}", f.path))?;
                }
            }
            // An atomic volume stays writable for its updates (a
            // read-only remount fails while a subPath mount holds a file
            // an update removed); containers only ever mount it read-only.
            if *read_only && !*atomic {
                crate::mount_checked(
                    "tmpfs",
                    dir,
                    "tmpfs",
                    libc::MS_REMOUNT | libc::MS_RDONLY | nosuid,
                    &opts,
                )
                .map_err(|e| e.to_string())?;
            }
            Ok(())
        }
    }
}

/// Replaces the files of an atomic volume (a configMap or secret update):
/// containers see the old set or the new one, never a mix.
pub fn update(name: &str, files: &[husk_protocol::File]) -> Result<(), String> {
    if !is_volume_name(name) {
        return Err(format!("{name:?} is not a volume name"));
    }
    let dir = Path::new(VOLUMES).join(name);
    if !is_mount_point(&dir)
        || std::fs::read_link(dir.join(husk_protocol::projected::DATA)).is_err()
    {
        return Err("not a configMap or secret volume".into());
    }
    // Room for the old set and the new one while they swap.
    let need = husk_protocol::projected::tmpfs_size_for_update(files.iter().map(|f| f.data.len()));
    let have = statfs_bytes(&dir).unwrap_or(0);
    let opts = format!("size={}", need.max(have));
    let nosuid = libc::MS_NOSUID | libc::MS_NODEV;
    crate::mount_checked("tmpfs", &dir, "tmpfs", libc::MS_REMOUNT | nosuid, &opts)
        .map_err(|e| e.to_string())?;
    husk_protocol::projected::write(&dir, files).map_err(|e| e.to_string())
}

/// The size of the file system at `p`.
fn statfs_bytes(p: &Path) -> Option<u64> {
    let c = CString::new(p.to_string_lossy().as_bytes()).ok()?;
    // SAFETY: statfs fills a zeroed struct owned here from a valid path.
    unsafe {
        let mut st: libc::statfs = std::mem::zeroed();
        (libc::statfs(c.as_ptr(), &mut st) == 0).then(|| st.f_blocks as u64 * st.f_bsize as u64)
    }
}

fn invalid(msg: String) -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::InvalidInput, msg)
}

/// Writes a new file below `dir`, creating its directories.
fn write_file(dir: &Path, rel: &str, data: &[u8], mode: u32) -> std::io::Result<()> {
    if !is_relative_path(rel) {
        return Err(invalid(format!("{rel:?} is not a relative path")));
    }
    let (parent, name) = match rel.rsplit_once('/') {
        Some((p, n)) => (walk(dir, p, true)?, n),
        None => (dir.to_owned(), rel),
    };
    if name.is_empty() || name == "." {
        return Err(invalid(format!("{rel:?} names no file")));
    }
    let path = parent.join(name);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .custom_flags(libc::O_NOFOLLOW)
        .mode(mode & 0o777)
        .open(&path)?;
    f.write_all(data)?;
    // The process umask must not change what the pod asked for.
    f.set_permissions(std::fs::Permissions::from_mode(mode & 0o777))
}

/// `base` joined with the relative `rel`, one component at a time: a
/// symlink on the way is refused, missing directories are created when
/// `create` is set.
fn walk(base: &Path, rel: &str, create: bool) -> std::io::Result<PathBuf> {
    let mut p = base.to_owned();
    for c in rel.split('/').filter(|c| !c.is_empty() && *c != ".") {
        if c == ".." {
            return Err(invalid(format!("{rel:?} leaves its root")));
        }
        p.push(c);
        match std::fs::symlink_metadata(&p) {
            Ok(m) if m.file_type().is_symlink() => {
                return Err(invalid(format!(
                    "{rel:?} goes through the symlink {c:?}; mount paths may not"
                )))
            }
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && create => {
                std::fs::DirBuilder::new().mode(0o755).create(&p)?;
            }
            Err(e) => return Err(e),
        }
    }
    Ok(p)
}

/// A bind mount for a container, resolved before it forks.
pub struct Prepared {
    pub source: CString,
    pub target: CString,
    pub read_only: bool,
    /// A file onto a file: its target may have to be made again in the
    /// child, under a mount made there (/dev/termination-log).
    pub file: bool,
}

/// Resolves `mounts` for a container whose root is `root`: each source is
/// a ready volume (or a subPath in it, created when writable), each target
/// a directory (or, for a file subPath, a file) created in the root.
pub fn prepare(root: &Path, mounts: &[Mount]) -> Result<Vec<Prepared>, String> {
    let mut out = Vec::new();
    for m in mounts {
        let what = |e: &dyn std::fmt::Display| {
            format!("mount of volume {:?} at {}: {e}", m.volume, m.path)
        };
        if !is_volume_name(&m.volume) {
            return Err(what(&"not a volume name"));
        }
        let vol = Path::new(VOLUMES).join(&m.volume);
        if !is_mount_point(&vol) {
            return Err(what(&"the volume was not added"));
        }
        let source = match &m.sub_path {
            None => vol,
            Some(sub) if is_relative_path(sub) => {
                // A configMap's or secret's key is a link through
                // `..data`: its real place is mounted (and, as with the
                // kubelet, does not follow later updates).
                let sub = husk_protocol::projected::resolve(&vol, sub);
                walk(&vol, &sub, !m.read_only).map_err(|e| what(&format!("subPath: {e}")))?
            }
            Some(sub) => return Err(what(&format!("subPath {sub:?} is not a relative path"))),
        };
        let rel = m.path.trim_start_matches('/');
        if !m.path.starts_with('/') || rel.is_empty() || !is_relative_path(rel) {
            return Err(what(&"the path must be absolute, not /, and without .."));
        }
        let is_file = std::fs::metadata(&source).map_err(|e| what(&e))?.is_file();
        let target = if is_file {
            let (parent, name) = rel.rsplit_once('/').unwrap_or(("", rel));
            let t = walk(root, parent, true).map_err(|e| what(&e))?.join(name);
            match std::fs::symlink_metadata(&t) {
                Ok(m) if m.is_file() => {}
                Ok(m) if !m.file_type().is_symlink() => {
                    return Err(what(&"a file volume needs a file there"))
                }
                // A symlink (an image's /etc/resolv.conf often is one) is
                // replaced in the container's own writable layer: the mount
                // never follows it.
                _ => {
                    let _ = std::fs::remove_file(&t);
                    std::fs::OpenOptions::new()
                        .write(true)
                        .create_new(true)
                        .custom_flags(libc::O_NOFOLLOW)
                        .open(&t)
                        .map_err(|e| what(&e))?;
                }
            }
            t
        } else {
            walk(root, rel, true).map_err(|e| what(&e))?
        };
        let c = |p: &Path| CString::new(p.to_string_lossy().as_bytes()).map_err(|e| what(&e));
        out.push(Prepared {
            source: c(&source)?,
            target: c(&target)?,
            read_only: m.read_only,
            file: is_file,
        });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn walks_create_directories_and_refuse_symlinks() {
        let t = tempfile::tempdir().unwrap();
        let p = walk(t.path(), "a/b/./c", true).unwrap();
        assert!(p.is_dir() && p.ends_with("a/b/c"));
        std::os::unix::fs::symlink("/etc", t.path().join("a/link")).unwrap();
        let err = walk(t.path(), "a/link/x", true).unwrap_err();
        assert!(err.to_string().contains("symlink"), "{err}");
        assert!(walk(t.path(), "a/../..", true).is_err());
        assert!(walk(t.path(), "missing", false).is_err());
    }

    #[test]
    fn files_get_their_mode_and_stay_inside() {
        let t = tempfile::tempdir().unwrap();
        write_file(t.path(), "dir/key", b"v", 0o400).unwrap();
        let m = std::fs::metadata(t.path().join("dir/key")).unwrap();
        assert_eq!(m.permissions().mode() & 0o777, 0o400);
        assert_eq!(std::fs::read(t.path().join("dir/key")).unwrap(), b"v");
        for bad in ["/etc/passwd", "../x", "dir/", ""] {
            assert!(write_file(t.path(), bad, b"", 0o644).is_err(), "{bad}");
        }
        std::os::unix::fs::symlink("/tmp", t.path().join("l")).unwrap();
        assert!(write_file(t.path(), "l/x", b"", 0o644).is_err());
        // An existing file (or symlink) is never written through.
        assert!(write_file(t.path(), "dir/key", b"again", 0o644).is_err());
    }
}
