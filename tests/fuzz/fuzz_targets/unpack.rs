//! husk-image's layer unpacker on hostile archives: tar entries with `..`,
//! absolute names, symlinks and hardlinks that point out, whiteouts,
//! devices, in a plain tar, a hostile gzip stream, or a tar that is
//! gzipped here (so mutations stay in the tar). Whatever the archive,
//! nothing outside the snapshot root may change.
#![no_main]

use husk_image::unpack::unpack_into;
use libfuzzer_sys::fuzz_target;
use std::path::PathBuf;
use std::sync::OnceLock;

struct Scratch {
    dir: tempfile::TempDir,
    sentinel: PathBuf,
}

fn scratch() -> &'static Scratch {
    static S: OnceLock<Scratch> = OnceLock::new();
    S.get_or_init(|| {
        let dir = tempfile::tempdir().expect("a scratch directory");
        let outside = dir.path().join("outside");
        std::fs::create_dir(&outside).unwrap();
        let sentinel = outside.join("secret");
        std::fs::write(&sentinel, b"host data").unwrap();
        Scratch { dir, sentinel }
    })
}

fuzz_target!(|data: &[u8]| {
    let Some((&how, archive)) = data.split_first() else {
        return;
    };
    let s = scratch();
    let root = s.dir.path().join("root");
    std::fs::create_dir(&root).unwrap();
    let gzipped;
    let (bytes, media) = match how % 3 {
        0 => (archive, "application/vnd.oci.image.layer.v1.tar"),
        1 => (archive, "application/vnd.oci.image.layer.v1.tar+gzip"),
        _ => {
            use std::io::Write;
            let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
            gz.write_all(archive).unwrap();
            gzipped = gz.finish().unwrap();
            (
                &gzipped[..],
                "application/vnd.docker.image.rootfs.diff.tar.gzip",
            )
        }
    };
    if let Err(e) = unpack_into("sha256:fuzz", bytes, media, &root) {
        assert!(
            e.to_string().contains("sha256:fuzz"),
            "the error names the layer: {e}"
        );
    }
    // Nothing outside the root changed.
    assert_eq!(std::fs::read(&s.sentinel).unwrap(), b"host data");
    let mut names: Vec<_> = std::fs::read_dir(s.dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    names.sort();
    assert_eq!(names, ["outside", "root"]);
    assert_eq!(
        std::fs::read_dir(s.dir.path().join("outside"))
            .unwrap()
            .count(),
        1
    );
    std::fs::remove_dir_all(&root).unwrap();
});
