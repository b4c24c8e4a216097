//! The Pod manifest parser and validator (`husk run -f`, and what
//! ConfigMaps/Secrets in the same file feed it) on hostile YAML: deep
//! nesting, anchors and aliases, `$(VAR)` references, unknown fields,
//! quantities, every kind of volume. It must answer every input in bounded
//! time and memory (libFuzzer's -timeout and -rss_limit_mb stop a run
//! that does not), and every refusal names the file.
#![no_main]

use husk_sandbox::pod::{parse_manifest, ImageResolver, LinuxImage, ManifestSource};
use libfuzzer_sys::fuzz_target;
use std::path::PathBuf;
use std::sync::OnceLock;

/// Every registry reference is this one small module; Linux images have
/// no layers.
struct Images(PathBuf);

impl ImageResolver for Images {
    fn resolve(&self, _reference: &str) -> Result<PathBuf, String> {
        Ok(self.0.clone())
    }
    fn resolve_linux(&self, _reference: &str) -> Result<LinuxImage, String> {
        Ok(LinuxImage {
            cmd: vec!["/bin/sh".into()],
            ..Default::default()
        })
    }
}

fn base() -> &'static (tempfile::TempDir, Images) {
    static B: OnceLock<(tempfile::TempDir, Images)> = OnceLock::new();
    B.get_or_init(|| {
        let dir = tempfile::tempdir().expect("a scratch directory");
        let wasm =
            wat::parse_str(r#"(module (func (export "_start")) (memory (export "memory") 1))"#)
                .expect("the guest module");
        let path = dir.path().join("probe.wasm");
        std::fs::write(&path, wasm).unwrap();
        (dir, Images(path))
    })
}

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let (dir, images) = base();
    let src = ManifestSource {
        display: "fuzz.yaml".into(),
        base_dir: dir.path(),
        images: Some(images),
    };
    match parse_manifest(text, &src) {
        Ok(plan) => {
            // An accepted pod has a valid name and at least one container.
            assert!(!plan.containers.is_empty());
            assert!(
                husk_sandbox::pod::manifest::is_dns_subdomain(&plan.name),
                "{:?}",
                plan.name
            );
        }
        Err(e) => {
            assert_eq!(e.file, "fuzz.yaml");
            assert!(!e.msg.is_empty());
        }
    }
});
