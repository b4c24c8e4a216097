//! Image layers as block devices for a VM pod: an unpacked layer snapshot
//! (overlay whiteouts included) becomes a read-only ext4 file system image
//! with e2fsprogs' `mkfs.ext4 -d`, which copies owners, modes, device
//! nodes and xattrs without mounting anything on the host. The guest agent
//! stacks such layers under each container's writable layer. It only reads
//! the snapshot, and writes only the image it is asked for (through a
//! temporary file renamed into place).

use std::path::{Path, PathBuf};
use std::process::Command;

#[derive(Debug, thiserror::Error)]
pub enum RootfsError {
    #[error("layer snapshot {0}: {1}")]
    Snapshot(PathBuf, std::io::Error),
    #[error("layer image {0}: {1}")]
    Image(PathBuf, std::io::Error),
    #[error("cannot run mkfs.ext4 ({0}); install e2fsprogs")]
    Mkfs(std::io::Error),
    #[error("mkfs.ext4 -d {dir} failed: {stderr}")]
    MkfsFailed { dir: PathBuf, stderr: String },
}

/// Bytes and entries under `dir` (not following symlinks).
fn usage(dir: &Path) -> std::io::Result<(u64, u64)> {
    let (mut bytes, mut entries) = (0u64, 1u64);
    for e in std::fs::read_dir(dir)? {
        let e = e?;
        let meta = e.path().symlink_metadata()?;
        entries += 1;
        if meta.is_dir() {
            let (b, n) = usage(&e.path())?;
            bytes += b;
            entries += n;
        } else {
            bytes += meta.len();
        }
    }
    Ok((bytes, entries))
}

/// Writes an ext4 image of `dir` to `out`, sized to fit with room for the
/// file system's own structures.
pub fn ext4_image(dir: &Path, out: &Path) -> Result<(), RootfsError> {
    let (bytes, entries) = usage(dir).map_err(|e| RootfsError::Snapshot(dir.to_owned(), e))?;
    // Data rounded up per file, inodes, and a floor for the metadata.
    let size_kib = (bytes / 1024) * 5 / 4 + entries * 4 + 8 * 1024;
    let inodes = entries + entries / 4 + 64;
    // Unique per writer: two pods may build the same layer's image at once.
    let tmp = {
        let mut t = out.as_os_str().to_owned();
        t.push(format!(
            ".tmp-{}-{:08x}",
            std::process::id(),
            rand::random::<u32>()
        ));
        PathBuf::from(t)
    };
    let result = Command::new("mkfs.ext4")
        .args(["-q", "-F", "-O", "^has_journal", "-L", "husk-layer"])
        .arg("-N")
        .arg(inodes.to_string())
        .arg("-d")
        .arg(dir)
        .arg(&tmp)
        .arg(format!("{size_kib}k"))
        .output()
        .map_err(RootfsError::Mkfs);
    let output = match result {
        Ok(o) => o,
        Err(e) => {
            let _ = std::fs::remove_file(&tmp);
            return Err(e);
        }
    };
    if !output.status.success() {
        let _ = std::fs::remove_file(&tmp);
        return Err(RootfsError::MkfsFailed {
            dir: dir.to_owned(),
            stderr: String::from_utf8_lossy(&output.stderr).trim().to_owned(),
        });
    }
    std::fs::rename(&tmp, out).map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        RootfsError::Image(out.to_owned(), e)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_image_is_made_from_a_tree_and_failures_leave_no_file() {
        let t = tempfile::tempdir().unwrap();
        let tree = t.path().join("tree");
        std::fs::create_dir_all(tree.join("etc")).unwrap();
        std::fs::write(tree.join("etc/motd"), b"hello").unwrap();
        let img = t.path().join("layer.ext4");
        ext4_image(&tree, &img).unwrap();
        // An ext4 superblock: magic 0xEF53 at offset 1024 + 56.
        let bytes = std::fs::read(&img).unwrap();
        assert_eq!(&bytes[1024 + 56..1024 + 58], &[0x53, 0xef]);
        // The file is in it (debugfs reads the image without mounting).
        let cat = Command::new("debugfs")
            .args(["-R", "cat /etc/motd"])
            .arg(&img)
            .output()
            .unwrap();
        assert_eq!(cat.stdout, b"hello");
        let err = ext4_image(&t.path().join("missing"), &t.path().join("x.ext4")).unwrap_err();
        assert!(err.to_string().contains("missing"), "{err}");
        assert!(!t.path().join("x.ext4").exists());
        assert_eq!(
            std::fs::read_dir(t.path()).unwrap().count(),
            2,
            "no temp file left"
        );
    }
}
