//! configMap and secret volumes laid out as the kubelet's atomic writer
//! lays them out, so an update is seen whole or not at all: the files live
//! in a timestamped directory `..<time>`, `..data` is a symlink to it, and
//! each top-level name is a symlink through `..data`. An update writes a
//! new directory, swaps `..data` with one rename, fixes the top-level links
//! and removes the old directory. Used by the agent (guest tmpfs) and by
//! the host (wasm pods), so both sides lay volumes out the same way.

use crate::{is_relative_path, File};
use std::io::{self, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

/// The symlink that points at the current files.
pub const DATA: &str = "..data";

/// The size of a tmpfs that holds files of these lengths (a page each at
/// least, 1 MiB at least).
pub fn tmpfs_size(lens: impl Iterator<Item = usize>) -> u64 {
    lens.map(|n| n as u64 + 4096).sum::<u64>().max(1 << 20)
}

/// The size a tmpfs needs while [`write`] swaps in files of these
/// lengths: the old set and the new one are there at once.
pub fn tmpfs_size_for_update(lens: impl Iterator<Item = usize>) -> u64 {
    tmpfs_size(lens) * 2
}

fn invalid(msg: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidInput, msg)
}

/// The top-level name of a file's path.
fn top(path: &str) -> &str {
    path.split('/')
        .find(|c| !c.is_empty() && *c != ".")
        .unwrap_or("")
}

/// Writes `files` into `dir` as the current set, replacing the previous
/// one (if any) in a single rename. `dir` is the volume's root, which
/// holds nothing else.
pub fn write(dir: &Path, files: &[File]) -> io::Result<()> {
    for f in files {
        if !is_relative_path(&f.path) || top(&f.path).starts_with("..") {
            return Err(invalid(format!(
                "{:?} is not a relative path inside the volume",
                f.path
            )));
        }
    }
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    let name = format!("..{}_{:09}", now.as_secs(), now.subsec_nanos());
    let new = dir.join(&name);
    std::fs::DirBuilder::new().mode(0o755).create(&new)?;
    let r = fill(&new, files).and_then(|()| swap(dir, &name, files));
    if r.is_err() {
        let _ = std::fs::remove_dir_all(&new);
    }
    r
}

fn fill(new: &Path, files: &[File]) -> io::Result<()> {
    for f in files {
        let rel: PathBuf = f
            .path
            .split('/')
            .filter(|c| !c.is_empty() && *c != ".")
            .collect();
        let path = new.join(&rel);
        if let Some(parent) = path.parent() {
            // Only directories made here, inside a directory made here.
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o755)
                .create(parent)?;
        }
        let mut out = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .custom_flags(libc::O_NOFOLLOW)
            .mode(f.mode & 0o777)
            .open(&path)
            .map_err(|e| io::Error::new(e.kind(), format!("{:?}: {e}", f.path)))?;
        out.write_all(&f.data)?;
        // The process umask must not change what the pod asked for.
        out.set_permissions(std::fs::Permissions::from_mode(f.mode & 0o777))?;
    }
    Ok(())
}

fn swap(dir: &Path, name: &str, files: &[File]) -> io::Result<()> {
    let data = dir.join(DATA);
    let old = std::fs::read_link(&data).ok();
    let tmp = dir.join("..data_tmp");
    let _ = std::fs::remove_file(&tmp);
    std::os::unix::fs::symlink(name, &tmp)?;
    std::fs::rename(&tmp, &data)?;
    // Top-level links: new ones appear, gone ones go.
    let wanted: std::collections::BTreeSet<&str> = files.iter().map(|f| top(&f.path)).collect();
    for t in &wanted {
        let link = dir.join(t);
        if std::fs::symlink_metadata(&link).is_err() {
            std::os::unix::fs::symlink(Path::new(DATA).join(t), &link)?;
        }
    }
    for e in std::fs::read_dir(dir)?.flatten() {
        let n = e.file_name();
        let n = n.to_string_lossy();
        if n.starts_with("..") || wanted.contains(&*n) {
            continue;
        }
        if e.file_type().is_ok_and(|t| t.is_symlink()) {
            std::fs::remove_file(e.path())?;
        }
    }
    if let Some(old) = old {
        let old_name = old.to_string_lossy();
        if old_name != name && old_name.starts_with("..") && !old_name.contains('/') {
            std::fs::remove_dir_all(dir.join(old))?;
        }
    }
    Ok(())
}

/// `rel` inside an atomic-writer volume at `dir`, with its top-level link
/// and `..data` resolved (both must have the form this module writes):
/// the real path of a subPath, so a mount of it needs no symlink followed.
/// Paths in a volume laid out otherwise come back as they are.
pub fn resolve(dir: &Path, rel: &str) -> String {
    let t = top(rel);
    let Ok(link) = std::fs::read_link(dir.join(t)) else {
        return rel.to_owned();
    };
    let Ok(current) = std::fs::read_link(dir.join(DATA)) else {
        return rel.to_owned();
    };
    let current = current.to_string_lossy().into_owned();
    if link != Path::new(DATA).join(t) || !current.starts_with("..") || current.contains('/') {
        return rel.to_owned();
    }
    let rest = rel.trim_start_matches('/').trim_start_matches("./");
    let rest = rest.strip_prefix(t).unwrap_or(rest);
    format!("{current}/{t}{rest}")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(path: &str, data: &str) -> File {
        File {
            path: path.into(),
            data: data.as_bytes().to_vec(),
            mode: 0o640,
        }
    }

    #[test]
    fn updates_swap_the_whole_set_and_leave_no_old_files() {
        let t = tempfile::tempdir().unwrap();
        let d = t.path();
        write(d, &[file("a", "1"), file("conf/b", "2")]).unwrap();
        assert_eq!(std::fs::read_to_string(d.join("a")).unwrap(), "1");
        assert_eq!(std::fs::read_to_string(d.join("conf/b")).unwrap(), "2");
        let mode = std::fs::metadata(d.join("a")).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o640);
        assert_eq!(
            std::fs::read_link(d.join("a")).unwrap(),
            Path::new("..data/a")
        );
        let sub = resolve(d, "conf/b");
        assert!(sub.starts_with("..1") && sub.ends_with("/conf/b"), "{sub}");
        assert!(!std::fs::symlink_metadata(d.join(&sub))
            .unwrap()
            .file_type()
            .is_symlink());
        // An update: a changed, a new and a gone key.
        std::thread::sleep(std::time::Duration::from_millis(2));
        write(d, &[file("a", "one"), file("c", "3")]).unwrap();
        assert_eq!(std::fs::read_to_string(d.join("a")).unwrap(), "one");
        assert_eq!(std::fs::read_to_string(d.join("c")).unwrap(), "3");
        assert!(std::fs::symlink_metadata(d.join("conf")).is_err());
        let names: Vec<String> = std::fs::read_dir(d)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        assert_eq!(names.len(), 4, "{names:?}"); // a, c, ..data, one ..<time>
        assert_eq!(resolve(d, "plain/x"), "plain/x");
    }

    #[test]
    fn bad_paths_write_nothing() {
        let t = tempfile::tempdir().unwrap();
        for bad in ["../x", "/abs", "..data", "a/../../b", ""] {
            assert!(write(t.path(), &[file(bad, "x")]).is_err(), "{bad}");
        }
        assert_eq!(std::fs::read_dir(t.path()).unwrap().count(), 0);
    }
}
