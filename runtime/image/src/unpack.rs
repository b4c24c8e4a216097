//! Linux layers unpacked into read-only per-layer snapshots
//! (`snapshots/<layer hex>/`), shared by every image and pod that uses the
//! layer, in the form overlayfs stacks: OCI whiteouts (`.wh.NAME`) become
//! overlay whiteouts (a 0/0 character device NAME) and opaque markers
//! (`.wh..wh..opq`) become the `trusted.overlay.opaque` xattr, as
//! containerd's overlay snapshotter does.
//!
//! Archives are hostile until proven otherwise. Every entry is created
//! through a cap-std directory handle rooted at the snapshot, so nothing is
//! ever written outside it:
//! - `..` components: the layer is refused; a leading `/` is dropped
//!   (absolute names are relative to the image root, as in Docker);
//! - symlinks are stored as they are (they are the image's content) but never
//!   followed while unpacking: an entry below a symlink that leaves the
//!   snapshot is refused;
//! - hardlinks must name an entry inside the snapshot;
//! - device nodes and fifos are skipped (a VM guest's /dev comes from its
//!   kernel), and counted;
//! - setuid/setgid bits and owners are kept (the VM guest needs them), so
//!   the snapshots directory is 0700: no other host user reaches them.
//!
//! A snapshot is built in a temporary directory and renamed into place, so
//! a crash never leaves a half-unpacked layer that counts.

use crate::store::Store;
use crate::{store_err, ImageError, ImageRecord};
use cap_std::fs::Dir;
use std::io::Read;
use std::os::fd::AsFd;
use std::os::unix::fs::PermissionsExt;
use std::path::{Component, Path, PathBuf};

/// What unpacking one layer did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct UnpackStats {
    pub files: u64,
    pub whiteouts: u64,
    pub skipped_devices: u64,
}

fn hostile(layer: &str, msg: String) -> ImageError {
    ImageError::Hostile {
        layer: layer.to_owned(),
        msg,
    }
}

/// The entry's path relative to the snapshot root, or an error for `..`.
fn clean(layer: &str, raw: &Path) -> Result<PathBuf, ImageError> {
    let mut out = PathBuf::new();
    for c in raw.components() {
        match c {
            Component::Normal(p) => out.push(p),
            Component::RootDir | Component::CurDir => {}
            Component::ParentDir | Component::Prefix(_) => {
                return Err(hostile(
                    layer,
                    format!("entry {:?} climbs out of the root with '..'", raw),
                ))
            }
        }
    }
    Ok(out)
}

fn io_hostile(layer: &str, what: &Path) -> impl FnOnce(std::io::Error) -> ImageError {
    let (layer, what) = (layer.to_owned(), what.to_owned());
    move |e| hostile(&layer, format!("entry {what:?}: {e}"))
}

/// Unpacks one layer archive (tar, optionally gzip) into `root`.
pub fn unpack_into(
    layer: &str,
    reader: impl Read,
    media_type: &str,
    root: &Path,
) -> Result<UnpackStats, ImageError> {
    let reader: Box<dyn Read> = if media_type.ends_with("gzip") || media_type.ends_with(".gzip") {
        Box::new(flate2::read::GzDecoder::new(reader))
    } else if media_type.ends_with("zstd") {
        return Err(hostile(layer, "zstd layers are not supported yet".into()));
    } else {
        Box::new(reader)
    };
    let dir = Dir::open_ambient_dir(root, cap_std::ambient_authority()).map_err(store_err(root))?;
    let mut archive = tar::Archive::new(reader);
    let mut stats = UnpackStats::default();
    let entries = archive
        .entries()
        .map_err(|e| hostile(layer, format!("not a tar archive: {e}")))?;
    for entry in entries {
        let mut entry = entry.map_err(|e| hostile(layer, format!("corrupt archive: {e}")))?;
        let raw = entry
            .path()
            .map_err(|e| hostile(layer, format!("bad entry name: {e}")))?
            .into_owned();
        let path = clean(layer, &raw)?;
        if path.as_os_str().is_empty() {
            continue;
        }
        let name = path
            .file_name()
            .unwrap_or_default()
            .to_string_lossy()
            .into_owned();
        let parent = path.parent().unwrap_or(Path::new("")).to_owned();
        if !parent.as_os_str().is_empty() {
            dir.create_dir_all(&parent)
                .map_err(io_hostile(layer, &raw))?;
        }
        let pdir = if parent.as_os_str().is_empty() {
            dir.try_clone().map_err(store_err(root))?
        } else {
            dir.open_dir(&parent).map_err(io_hostile(layer, &raw))?
        };
        if name == ".wh..wh..opq" {
            set_opaque(&pdir).map_err(io_hostile(layer, &raw))?;
            stats.whiteouts += 1;
            continue;
        }
        if let Some(hidden) = name.strip_prefix(".wh.") {
            if hidden.is_empty() || hidden == "." || hidden == ".." {
                return Err(hostile(layer, format!("bad whiteout {raw:?}")));
            }
            let _ = pdir.remove_file(hidden);
            let _ = pdir.remove_dir_all(hidden);
            nix::sys::stat::mknodat(
                Some(std::os::fd::AsRawFd::as_raw_fd(&pdir.as_fd())),
                hidden,
                nix::sys::stat::SFlag::S_IFCHR,
                nix::sys::stat::Mode::empty(),
                0,
            )
            .map_err(|e| io_hostile(layer, &raw)(e.into()))?;
            stats.whiteouts += 1;
            continue;
        }
        let header = entry.header();
        let mode = header.mode().unwrap_or(0o644) & 0o7777;
        let (uid, gid) = (
            header.uid().unwrap_or(0) as u32,
            header.gid().unwrap_or(0) as u32,
        );
        let kind = header.entry_type();
        // A later entry replaces an earlier one of the same name.
        if kind != tar::EntryType::Directory {
            let _ = pdir.remove_file(&name);
        }
        match kind {
            tar::EntryType::Directory => {
                pdir.create_dir_all(&name)
                    .map_err(io_hostile(layer, &raw))?;
                let d = pdir.open_dir(&name).map_err(io_hostile(layer, &raw))?;
                let f = d.open(".").map_err(io_hostile(layer, &raw))?.into_std();
                std::os::unix::fs::fchown(&f, Some(uid), Some(gid))
                    .map_err(io_hostile(layer, &raw))?;
                f.set_permissions(std::fs::Permissions::from_mode(mode))
                    .map_err(io_hostile(layer, &raw))?;
            }
            tar::EntryType::Regular | tar::EntryType::Continuous => {
                let mut f = pdir
                    .create(&name)
                    .map_err(io_hostile(layer, &raw))?
                    .into_std();
                std::io::copy(&mut entry, &mut f).map_err(io_hostile(layer, &raw))?;
                std::os::unix::fs::fchown(&f, Some(uid), Some(gid))
                    .map_err(io_hostile(layer, &raw))?;
                // chown clears setuid; the mode goes on afterwards.
                f.set_permissions(std::fs::Permissions::from_mode(mode))
                    .map_err(io_hostile(layer, &raw))?;
                stats.files += 1;
            }
            tar::EntryType::Symlink => {
                let target = entry
                    .link_name()
                    .ok()
                    .flatten()
                    .ok_or_else(|| hostile(layer, format!("symlink {raw:?} has no target")))?
                    .into_owned();
                // symlinkat in the parent's handle: the link is one name in
                // that directory and its target is never resolved (cap-std
                // refuses absolute targets, which images are full of).
                nix::unistd::symlinkat(
                    target.as_path(),
                    Some(std::os::fd::AsRawFd::as_raw_fd(&pdir.as_fd())),
                    name.as_str(),
                )
                .map_err(|e| io_hostile(layer, &raw)(e.into()))?;
            }
            tar::EntryType::Link => {
                let target = entry
                    .link_name()
                    .ok()
                    .flatten()
                    .ok_or_else(|| hostile(layer, format!("hardlink {raw:?} has no target")))?
                    .into_owned();
                let target = clean(layer, &target)?;
                dir.hard_link(&target, &pdir, &name)
                    .map_err(io_hostile(layer, &raw))?;
                stats.files += 1;
            }
            tar::EntryType::Char | tar::EntryType::Block | tar::EntryType::Fifo => {
                stats.skipped_devices += 1;
            }
            _ => {}
        }
    }
    Ok(stats)
}

fn set_opaque(d: &Dir) -> std::io::Result<()> {
    let f = d.open(".")?.into_std();
    // SAFETY: the fd is open for the call; name and value are valid
    // NUL-terminated / sized buffers.
    let rc = unsafe {
        libc::fsetxattr(
            std::os::fd::AsRawFd::as_raw_fd(&f),
            c"trusted.overlay.opaque".as_ptr(),
            b"y".as_ptr().cast(),
            1,
            0,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// Where a VM pod keeps the read-only file-system image of the layer
/// unpacked at `snapshot` (`<snapshot>.ext4`, beside it in the store, so that
/// the store removes it with the layer).
pub fn layer_image_path(snapshot: &Path) -> PathBuf {
    let mut p = snapshot.as_os_str().to_owned();
    p.push(".ext4");
    PathBuf::from(p)
}

impl Store {
    fn snapshots(&self) -> PathBuf {
        self.root().join("snapshots")
    }

    /// Directory of a layer's snapshot (exists once unpacked).
    pub fn snapshot_path(&self, layer_digest: &str) -> PathBuf {
        self.snapshots()
            .join(layer_digest.strip_prefix("sha256:").unwrap_or(layer_digest))
    }

    /// Unpacks every layer of `rec` that has no snapshot yet; returns the
    /// snapshot directories, lowest layer first.
    pub fn unpack(&self, rec: &ImageRecord) -> Result<Vec<PathBuf>, ImageError> {
        let snaps = self.snapshots();
        std::fs::create_dir_all(&snaps).map_err(store_err(&snaps))?;
        std::fs::set_permissions(&snaps, std::fs::Permissions::from_mode(0o700))
            .map_err(store_err(&snaps))?;
        let mut out = Vec::new();
        for l in &rec.layers {
            let dest = self.snapshot_path(&l.digest);
            if !dest.is_dir() {
                let tmp = snaps.join(format!(
                    ".tmp-{}-{:016x}",
                    std::process::id(),
                    rand::random::<u64>()
                ));
                std::fs::create_dir(&tmp).map_err(store_err(&tmp))?;
                let result = std::fs::File::open(self.blob_path(&l.digest))
                    .map_err(store_err(self.blob_path(&l.digest)))
                    .and_then(|f| unpack_into(&l.digest, f, &l.media_type, &tmp));
                match result {
                    Ok(_) => install_snapshot(&tmp, &dest)?,
                    Err(e) => {
                        let _ = std::fs::remove_dir_all(&tmp);
                        return Err(e);
                    }
                }
            }
            out.push(dest);
        }
        Ok(out)
    }
}

/// Renames a freshly unpacked layer into place. Pods that start at once
/// may unpack the same layer side by side: whoever renames second finds the
/// snapshot there (the same digest, so the same content), drops its own copy
/// and uses the one in place.
fn install_snapshot(tmp: &Path, dest: &Path) -> Result<(), ImageError> {
    match std::fs::rename(tmp, dest) {
        Ok(()) => Ok(()),
        Err(e)
            if matches!(e.raw_os_error(), Some(libc::ENOTEMPTY) | Some(libc::EEXIST))
                && dest.is_dir() =>
        {
            let _ = std::fs::remove_dir_all(tmp);
            Ok(())
        }
        Err(e) => {
            let _ = std::fs::remove_dir_all(tmp);
            Err(store_err(dest)(e))
        }
    }
}

/// What an image's config says to run (`config` of the OCI image config).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RunConfig {
    pub entrypoint: Vec<String>,
    pub cmd: Vec<String>,
    /// `NAME=value` pairs.
    pub env: Vec<String>,
    pub working_dir: Option<String>,
    /// `user`, `uid`, `user:group` or `uid:gid`, as the image says.
    pub user: Option<String>,
}

impl Store {
    /// The run configuration of an image (empty where its config says
    /// nothing, or cannot be read).
    pub fn run_config(&self, rec: &ImageRecord) -> RunConfig {
        let cfg: serde_json::Value = std::fs::read(self.blob_path(&rec.config.digest))
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or_default();
        let c = cfg.get("config");
        let list = |k: &str| -> Vec<String> {
            c.and_then(|c| c.get(k))
                .and_then(|v| v.as_array())
                .map(|a| {
                    a.iter()
                        .filter_map(|s| s.as_str().map(str::to_owned))
                        .collect()
                })
                .unwrap_or_default()
        };
        RunConfig {
            entrypoint: list("Entrypoint"),
            cmd: list("Cmd"),
            env: list("Env"),
            working_dir: c
                .and_then(|c| c.get("WorkingDir"))
                .and_then(|w| w.as_str())
                .filter(|w| !w.is_empty())
                .map(str::to_owned),
            user: c
                .and_then(|c| c.get("User"))
                .and_then(|w| w.as_str())
                .filter(|w| !w.is_empty())
                .map(str::to_owned),
        }
    }

    /// The wasm module or component an image runs: its wasm layer (a wasm
    /// artifact), or else the `.wasm` file its config's entrypoint (or cmd)
    /// names, found in the unpacked layers, topmost first. `None` when the
    /// image is neither.
    pub fn wasm_file(&self, rec: &ImageRecord) -> Result<Option<PathBuf>, ImageError> {
        if let Some(l) = rec.wasm_layer() {
            return Ok(Some(self.blob_path(&l.digest)));
        }
        let cfg: serde_json::Value = std::fs::read(self.blob_path(&rec.config.digest))
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or_default();
        let first = |k: &str| {
            cfg.get("config")
                .and_then(|c| c.get(k))
                .and_then(|e| e.as_array())
                .and_then(|a| a.first())
                .and_then(|s| s.as_str())
                .map(str::to_owned)
        };
        let Some(entry) = first("Entrypoint").or_else(|| first("Cmd")) else {
            return Ok(None);
        };
        if !entry.ends_with(".wasm") {
            return Ok(None);
        }
        let rel = clean(&rec.name, Path::new(&entry))?;
        for snap in self.unpack(rec)?.iter().rev() {
            let p = snap.join(&rel);
            match std::fs::symlink_metadata(&p) {
                Ok(m) if m.file_type().is_file() => return Ok(Some(p)),
                // A whiteout (or anything else) in a higher layer hides it.
                Ok(_) => return Ok(None),
                Err(_) => continue,
            }
        }
        Ok(None)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::os::unix::fs::{FileTypeExt, MetadataExt};

    /// A tar entry written with a raw name, so hostile names get through.
    fn entry(
        b: &mut tar::Builder<Vec<u8>>,
        name: &str,
        kind: tar::EntryType,
        mode: u32,
        link: &str,
        data: &[u8],
    ) {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(kind);
        h.set_mode(mode);
        h.set_size(data.len() as u64);
        h.set_uid(0);
        h.set_gid(0);
        {
            let old = h.as_old_mut();
            old.name[..name.len()].copy_from_slice(name.as_bytes());
            old.linkname[..link.len()].copy_from_slice(link.as_bytes());
        }
        h.set_cksum();
        b.append(&h, data).unwrap();
    }

    fn tar_of(f: impl FnOnce(&mut tar::Builder<Vec<u8>>)) -> Vec<u8> {
        let mut b = tar::Builder::new(Vec::new());
        f(&mut b);
        b.into_inner().unwrap()
    }

    const TAR: &str = "application/vnd.oci.image.layer.v1.tar";
    use tar::EntryType as E;

    #[test]
    fn dotdot_is_refused_and_nothing_leaves_the_root() {
        let outside = tempfile::tempdir().unwrap();
        let root = outside.path().join("root");
        std::fs::create_dir(&root).unwrap();
        let t = tar_of(|b| entry(b, "../escaped", E::Regular, 0o644, "", b"x"));
        let err = unpack_into("l", &t[..], TAR, &root).unwrap_err();
        assert!(err.to_string().contains("'..'"), "{err}");
        assert!(!outside.path().join("escaped").exists());
    }

    #[test]
    fn absolute_names_stay_inside() {
        let root = tempfile::tempdir().unwrap();
        let t = tar_of(|b| entry(b, "/etc/husk-owned", E::Regular, 0o644, "", b"inside"));
        unpack_into("l", &t[..], TAR, root.path()).unwrap();
        assert_eq!(
            std::fs::read(root.path().join("etc/husk-owned")).unwrap(),
            b"inside"
        );
    }

    #[test]
    fn writing_through_a_symlink_out_of_the_root_is_refused() {
        let outside = tempfile::tempdir().unwrap();
        let root = tempfile::tempdir().unwrap();
        let target = outside.path().to_str().unwrap().to_owned();
        let t = tar_of(|b| {
            entry(b, "evil", E::Symlink, 0o777, &target, b"");
            entry(b, "evil/planted", E::Regular, 0o644, "", b"x");
        });
        assert!(unpack_into("l", &t[..], TAR, root.path()).is_err());
        assert_eq!(std::fs::read_dir(outside.path()).unwrap().count(), 0);
        // The symlink itself is content and stays as written.
        assert_eq!(
            std::fs::read_link(root.path().join("evil")).unwrap(),
            outside.path()
        );
        // Relative escapes are refused the same way.
        let root2 = tempfile::tempdir().unwrap();
        let t = tar_of(|b| {
            entry(b, "up", E::Symlink, 0o777, "../../../../../../tmp", b"");
            entry(b, "up/planted-by-husk-test", E::Regular, 0o644, "", b"x");
        });
        assert!(unpack_into("l", &t[..], TAR, root2.path()).is_err());
        assert!(!Path::new("/tmp/planted-by-husk-test").exists());
    }

    #[test]
    fn hardlinks_must_stay_inside() {
        let root = tempfile::tempdir().unwrap();
        let t = tar_of(|b| entry(b, "h", E::Link, 0o644, "../../etc/passwd", b""));
        assert!(unpack_into("l", &t[..], TAR, root.path()).is_err());
        // An absolute target means the image's own /etc/passwd, absent here.
        let t = tar_of(|b| entry(b, "h", E::Link, 0o644, "/etc/passwd", b""));
        assert!(unpack_into("l", &t[..], TAR, root.path()).is_err());
        assert!(!root.path().join("h").exists());
        let t = tar_of(|b| {
            entry(b, "a", E::Regular, 0o644, "", b"same");
            entry(b, "b", E::Link, 0o644, "a", b"");
        });
        unpack_into("l", &t[..], TAR, root.path()).unwrap();
        let (a, b) = (
            std::fs::metadata(root.path().join("a")).unwrap(),
            std::fs::metadata(root.path().join("b")).unwrap(),
        );
        assert_eq!(a.ino(), b.ino());
    }

    #[test]
    fn devices_are_skipped_setuid_kept_whiteouts_converted() {
        let root = tempfile::tempdir().unwrap();
        let t = tar_of(|b| {
            entry(b, "dev/sda", E::Block, 0o660, "", b"");
            entry(b, "dev/mem", E::Char, 0o660, "", b"");
            entry(b, "bin/su", E::Regular, 0o4755, "", b"#!");
            entry(b, "etc/.wh.removed", E::Regular, 0o644, "", b"");
            entry(b, "opaque/.wh..wh..opq", E::Regular, 0o644, "", b"");
        });
        let stats = unpack_into("l", &t[..], TAR, root.path()).unwrap();
        assert_eq!(stats.skipped_devices, 2);
        assert_eq!(stats.whiteouts, 2);
        assert!(!root.path().join("dev/sda").exists());
        let su = std::fs::metadata(root.path().join("bin/su")).unwrap();
        assert_eq!(su.mode() & 0o7777, 0o4755);
        let wh = std::fs::symlink_metadata(root.path().join("etc/removed")).unwrap();
        assert!(wh.file_type().is_char_device());
        assert_eq!(wh.rdev(), 0);
        let mut buf = [0u8; 4];
        let p = std::ffi::CString::new(root.path().join("opaque").to_str().unwrap()).unwrap();
        // SAFETY: valid C strings and a buffer of the given size.
        let n = unsafe {
            libc::getxattr(
                p.as_ptr(),
                c"trusted.overlay.opaque".as_ptr(),
                buf.as_mut_ptr().cast(),
                buf.len(),
            )
        };
        assert_eq!(n, 1, "opaque xattr");
        assert_eq!(buf[0], b'y');
    }

    #[test]
    fn store_unpacks_gzip_layers_once_into_private_snapshots() {
        let tmp = tempfile::tempdir().unwrap();
        let store = Store::open(tmp.path()).unwrap();
        let t = tar_of(|b| entry(b, "hello.txt", E::Regular, 0o644, "", b"hi"));
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        gz.write_all(&t).unwrap();
        let gz = gz.finish().unwrap();
        let digest = format!(
            "sha256:{}",
            hex::encode(<sha2::Sha256 as sha2::Digest>::digest(&gz))
        );
        store.write_blob_bytes("t", &digest, &gz).unwrap();
        let rec = ImageRecord {
            name: "t".into(),
            digest: digest.clone(),
            media_type: "m".into(),
            config: crate::Descriptor {
                media_type: "c".into(),
                digest: digest.clone(),
                size: 0,
            },
            layers: vec![crate::Descriptor {
                media_type: "application/vnd.oci.image.layer.v1.tar+gzip".into(),
                digest: digest.clone(),
                size: gz.len() as u64,
            }],
            platform: None,
            created: None,
            pulled_at: chrono::Utc::now(),
        };
        let snaps = store.unpack(&rec).unwrap();
        assert_eq!(std::fs::read(snaps[0].join("hello.txt")).unwrap(), b"hi");
        let mode = std::fs::metadata(tmp.path().join("snapshots"))
            .unwrap()
            .mode();
        assert_eq!(mode & 0o777, 0o700);
        // Unpacked once: a second call finds the snapshot.
        std::fs::write(snaps[0].join("marker"), b"").unwrap();
        assert!(store.unpack(&rec).unwrap()[0].join("marker").exists());
    }

    #[test]
    fn a_second_unpacker_of_the_same_layer_uses_the_snapshot_in_place() {
        let tmp = tempfile::tempdir().unwrap();
        let dest = tmp.path().join("layer");
        std::fs::create_dir(&dest).unwrap();
        std::fs::write(dest.join("first"), b"1").unwrap();
        let mine = tmp.path().join(".tmp-mine");
        std::fs::create_dir(&mine).unwrap();
        std::fs::write(mine.join("second"), b"2").unwrap();
        install_snapshot(&mine, &dest).unwrap();
        assert!(dest.join("first").exists(), "the snapshot in place is kept");
        assert!(!mine.exists(), "the second copy is removed");
        // Any other failure is an error, and the copy is still removed.
        let other = tmp.path().join(".tmp-other");
        std::fs::create_dir(&other).unwrap();
        let err = install_snapshot(&other, &tmp.path().join("missing/dir")).unwrap_err();
        assert!(err.to_string().contains("missing/dir"), "{err}");
        assert!(!other.exists());
    }
}
