//! `husk cp`'s archives, written and read the same way on both sides: a tar
//! whose entries all sit under one top entry, the copied file or
//! directory under its own name. The host reads what a guest wrote, so
//! [`unpack`] trusts nothing in it: only plain files, directories and
//! symlinks, no path that climbs out, nothing that lands outside the
//! destination through a symlink, no set-id bits, no owners.

use std::io::{self, Read, Write};
use std::path::{Component, Path, PathBuf};

fn invalid(msg: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidInput, msg)
}

/// Writes a tar of `path` (a file, a symlink or a directory with all it
/// holds, symlinks kept as links) to `out`, under `path`'s own name.
pub fn pack(path: &Path, out: impl Write) -> io::Result<()> {
    let name = path.file_name().ok_or_else(|| {
        invalid(format!(
            "{}: name a file or a directory, not a root or `..`",
            path.display()
        ))
    })?;
    let meta = std::fs::symlink_metadata(path)
        .map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", path.display())))?;
    let mut b = tar::Builder::new(out);
    b.follow_symlinks(false);
    b.mode(tar::HeaderMode::Complete);
    if meta.is_dir() {
        b.append_dir_all(name, path)?;
    } else {
        b.append_path_with_name(path, name)?;
    }
    b.into_inner()?.flush()
}

/// Reads a tar made by [`pack`] from `input` and puts its top entry at
/// `dest` (as `docker cp` does): into `dest` when that is a directory
/// (merged with what is there), otherwise as `dest` itself, whose parent
/// must exist. Files are owned by whoever unpacks; modes are kept without
/// set-id bits.
pub fn unpack(input: impl Read, dest: &Path) -> io::Result<()> {
    let into_dir = dest.is_dir();
    let (parent, staging) = if into_dir {
        (dest.to_path_buf(), None)
    } else {
        let parent = match dest.parent() {
            Some(p) if p.as_os_str().is_empty() => PathBuf::from("."),
            Some(p) => p.to_path_buf(),
            None => {
                return Err(invalid(format!(
                    "{}: not a place to copy to",
                    dest.display()
                )))
            }
        };
        if dest.file_name().is_none() {
            return Err(invalid(format!(
                "{}: not a place to copy to",
                dest.display()
            )));
        }
        if !parent.is_dir() {
            return Err(invalid(format!(
                "{}: no such directory to copy into",
                parent.display()
            )));
        }
        let staging = parent.join(format!(".husk-cp-{}-{}", std::process::id(), nonce()));
        std::fs::create_dir(&staging)?;
        (parent, Some(staging))
    };
    let r = unpack_entries(input, staging.as_deref().unwrap_or(&parent)).and_then(|top| {
        if let Some(staging) = &staging {
            let top = top.ok_or_else(|| invalid("the archive is empty".into()))?;
            std::fs::rename(staging.join(top), dest)?;
        }
        Ok(())
    });
    if let Some(staging) = &staging {
        let _ = std::fs::remove_dir_all(staging);
    }
    r
}

fn nonce() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    N.fetch_add(1, Ordering::Relaxed)
}

/// Unpacks every entry into `dir`; returns the one top name they share.
fn unpack_entries(input: impl Read, dir: &Path) -> io::Result<Option<PathBuf>> {
    let mut archive = tar::Archive::new(input);
    archive.set_preserve_permissions(false);
    archive.set_preserve_ownerships(false);
    archive.set_unpack_xattrs(false);
    archive.set_overwrite(true);
    let mut top: Option<PathBuf> = None;
    for entry in archive.entries()? {
        let mut entry = entry?;
        let path = entry.path()?.into_owned();
        let mut parts = path.components();
        let first = match parts.next() {
            Some(Component::Normal(f)) => PathBuf::from(f),
            _ => {
                return Err(invalid(format!(
                    "archive entry {}: not a relative path",
                    path.display()
                )))
            }
        };
        if !parts.all(|c| matches!(c, Component::Normal(_))) {
            return Err(invalid(format!(
                "archive entry {}: climbs out",
                path.display()
            )));
        }
        match &top {
            None => top = Some(first),
            Some(t) if *t == first => {}
            Some(t) => {
                return Err(invalid(format!(
                    "archive entry {}: not under {}",
                    path.display(),
                    t.display()
                )))
            }
        }
        use tar::EntryType as T;
        match entry.header().entry_type() {
            T::Regular | T::Continuous | T::Directory | T::Symlink => {}
            other => {
                return Err(invalid(format!(
                    "archive entry {}: {other:?} entries are not copied",
                    path.display()
                )))
            }
        }
        if !entry.unpack_in(dir)? {
            return Err(invalid(format!(
                "archive entry {}: climbs out",
                path.display()
            )));
        }
    }
    Ok(top)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tree(root: &Path) {
        std::fs::create_dir_all(root.join("d/sub")).unwrap();
        std::fs::write(root.join("d/a.txt"), b"alpha").unwrap();
        std::fs::write(root.join("d/sub/b.txt"), b"beta").unwrap();
        std::os::unix::fs::symlink("a.txt", root.join("d/link")).unwrap();
    }

    #[test]
    fn a_directory_lands_at_a_new_name_or_inside_an_existing_directory() {
        let t = tempfile::tempdir().unwrap();
        tree(t.path());
        let mut tar = Vec::new();
        pack(&t.path().join("d"), &mut tar).unwrap();
        // A new name: the directory becomes it.
        unpack(&tar[..], &t.path().join("copy")).unwrap();
        assert_eq!(
            std::fs::read(t.path().join("copy/sub/b.txt")).unwrap(),
            b"beta"
        );
        assert_eq!(
            std::fs::read_link(t.path().join("copy/link")).unwrap(),
            Path::new("a.txt")
        );
        // An existing directory: it goes inside, under its own name.
        std::fs::create_dir(t.path().join("into")).unwrap();
        unpack(&tar[..], &t.path().join("into")).unwrap();
        assert_eq!(
            std::fs::read(t.path().join("into/d/a.txt")).unwrap(),
            b"alpha"
        );
        // Nothing of the staging is left.
        let left: Vec<_> = std::fs::read_dir(t.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .filter(|n| n.starts_with(".husk-cp"))
            .collect();
        assert!(left.is_empty(), "{left:?}");
    }

    #[test]
    fn a_file_keeps_its_mode_without_set_id_bits() {
        use std::os::unix::fs::PermissionsExt;
        let t = tempfile::tempdir().unwrap();
        let f = t.path().join("tool");
        std::fs::write(&f, b"#!/bin/sh\n").unwrap();
        std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o4755)).unwrap();
        let mut tar = Vec::new();
        pack(&f, &mut tar).unwrap();
        unpack(&tar[..], &t.path().join("copied")).unwrap();
        let mode = std::fs::metadata(t.path().join("copied"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o7777, 0o755);
        let e = unpack(&tar[..], &t.path().join("missing/dir/x")).unwrap_err();
        assert!(e.to_string().contains("no such directory"), "{e}");
    }

    fn hostile(entries: &[(&str, tar::EntryType, Option<&str>)]) -> Vec<u8> {
        let mut b = tar::Builder::new(Vec::new());
        for (path, kind, link) in entries {
            let mut h = tar::Header::new_gnu();
            h.set_entry_type(*kind);
            h.set_mode(0o644);
            h.set_size(0);
            // Written raw: the builder itself refuses `..`.
            let name = h.as_old_mut().name.as_mut();
            name[..path.len()].copy_from_slice(path.as_bytes());
            if let Some(l) = link {
                h.set_link_name(l).unwrap();
            }
            h.set_cksum();
            b.append(&h, &[][..]).unwrap();
        }
        b.into_inner().unwrap()
    }

    #[test]
    fn hostile_archives_are_refused_and_write_nothing_outside() {
        let t = tempfile::tempdir().unwrap();
        let dest = t.path().join("dest");
        std::fs::create_dir(&dest).unwrap();
        let outside = t.path().join("outside");
        std::fs::create_dir(&outside).unwrap();
        for (tar, what) in [
            (
                hostile(&[("x/../../escape", tar::EntryType::Regular, None)]),
                "climbs out",
            ),
            (
                hostile(&[("/abs", tar::EntryType::Regular, None)]),
                "not a relative path",
            ),
            (
                hostile(&[("x/dev", tar::EntryType::Char, None)]),
                "not copied",
            ),
            (
                hostile(&[("x/hard", tar::EntryType::Link, Some("/etc/passwd"))]),
                "not copied",
            ),
            (
                hostile(&[
                    ("x/a", tar::EntryType::Regular, None),
                    ("y/b", tar::EntryType::Regular, None),
                ]),
                "not under",
            ),
        ] {
            let e = unpack(&tar[..], &dest).unwrap_err();
            assert!(e.to_string().contains(what), "{e} (wanted {what})");
        }
        // A symlink out, then a file through it: refused.
        let tar = hostile(&[
            ("x", tar::EntryType::Directory, None),
            (
                "x/out",
                tar::EntryType::Symlink,
                Some(outside.to_str().unwrap()),
            ),
            ("x/out/owned", tar::EntryType::Regular, None),
        ]);
        assert!(unpack(&tar[..], &dest).is_err());
        assert_eq!(std::fs::read_dir(&outside).unwrap().count(), 0);
        assert!(!t.path().join("escape").exists());
    }
}
