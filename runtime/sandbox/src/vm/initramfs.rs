//! Writes initramfs archives: cpio "newc", uncompressed (the kernel reads
//! it as is), with fixed owners and times so that the same inputs give the
//! same bytes. It only ever reads the host files it is given.

use std::io::Write;
use std::path::Path;

/// One archive being built; entries are written in the order added, and a
/// directory must be added before what it holds.
#[derive(Default)]
pub struct Initramfs {
    entries: Vec<(String, u32, Vec<u8>)>,
}

const S_IFDIR: u32 = 0o040000;
const S_IFREG: u32 = 0o100000;
const S_IFLNK: u32 = 0o120000;

impl Initramfs {
    pub fn dir(&mut self, path: &str) -> &mut Self {
        self.entries.push((
            path.trim_matches('/').to_owned(),
            S_IFDIR | 0o755,
            Vec::new(),
        ));
        self
    }

    pub fn file(&mut self, path: &str, mode: u32, data: Vec<u8>) -> &mut Self {
        self.entries.push((
            path.trim_matches('/').to_owned(),
            S_IFREG | (mode & 0o7777),
            data,
        ));
        self
    }

    /// A copy of a host file, keeping its permission bits.
    pub fn copy(&mut self, path: &str, from: &Path) -> std::io::Result<&mut Self> {
        use std::os::unix::fs::PermissionsExt;
        let data = std::fs::read(from)?;
        let mode = std::fs::metadata(from)?.permissions().mode();
        Ok(self.file(path, mode, data))
    }

    pub fn symlink(&mut self, path: &str, target: &str) -> &mut Self {
        self.entries.push((
            path.trim_matches('/').to_owned(),
            S_IFLNK | 0o777,
            target.as_bytes().to_vec(),
        ));
        self
    }

    pub fn write_to(&self, w: &mut impl Write) -> std::io::Result<()> {
        for (ino, (name, mode, data)) in (1u32..).zip(&self.entries) {
            header(w, ino, *mode, data.len(), name)?;
            w.write_all(data)?;
            pad(w, data.len())?;
        }
        header(w, 0, 0, 0, "TRAILER!!!")
    }
}

fn header(w: &mut impl Write, ino: u32, mode: u32, size: usize, name: &str) -> std::io::Result<()> {
    let nlink = if mode & S_IFDIR != 0 { 2 } else { 1 };
    let namesize = name.len() + 1;
    write!(
        w,
        "070701{ino:08x}{mode:08x}{:08x}{:08x}{nlink:08x}{:08x}{size:08x}{:08x}{:08x}{:08x}{:08x}{namesize:08x}{:08x}",
        0, 0, 0, 0, 0, 0, 0, 0
    )?;
    w.write_all(name.as_bytes())?;
    w.write_all(&[0])?;
    pad(w, 110 + namesize)
}

fn pad(w: &mut impl Write, len: usize) -> std::io::Result<()> {
    w.write_all(&[0u8; 3][..(4 - len % 4) % 4])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn newc_archive_lists_back_with_cpio_layout() {
        let mut a = Initramfs::default();
        a.dir("bin")
            .file("/bin/x", 0o755, b"abc".to_vec())
            .symlink("sh", "bin/x");
        let mut out = Vec::new();
        a.write_to(&mut out).unwrap();
        // Every header starts on a 4-byte boundary with the newc magic.
        let text = String::from_utf8_lossy(&out);
        assert_eq!(text.matches("070701").count(), 4);
        assert_eq!(&out[..6], b"070701");
        // First entry: "bin", a directory, name size 4, padded to 4.
        assert_eq!(&out[14..22], b"000041ed");
        let first_name = 110;
        assert_eq!(&out[first_name..first_name + 4], b"bin\0");
        // The file's data follows its header and name, then the trailer.
        let pos = text.find("bin/x\0").unwrap();
        let data_at = (pos + 6).div_ceil(4) * 4;
        assert_eq!(&out[data_at..data_at + 3], b"abc");
        assert!(out.ends_with(b"TRAILER!!!\0\0\0\0"));
        assert_eq!(out.len() % 4, 0);
    }
}
