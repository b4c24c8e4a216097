//! What a hostile registry serves for a name: an image index or manifest,
//! read by husk-image's pure parsers. A document that is accepted names
//! only well-formed sha256 digests (they become blob paths in the store).
#![no_main]

use husk_image::manifest::{choose, parse_document, parse_manifest, Document};
use husk_image::pull::Want;
use husk_image::reference::is_sha256;
use libfuzzer_sys::fuzz_target;

fn hex64(d: &str) -> bool {
    let h = d.strip_prefix("sha256:").unwrap_or("");
    h.len() == 64 && h.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

fuzz_target!(|data: &[u8]| {
    match parse_document("fuzz.example/r:1", data) {
        Ok(Document::Index(idx)) => {
            for want in [Want::Linux, Want::Wasm, Want::Any] {
                match choose("fuzz.example/r:1", &idx, want) {
                    Ok(c) => assert!(is_sha256(&c.digest) && hex64(&c.digest), "{c:?}"),
                    Err(e) => assert!(e.to_string().contains("fuzz.example/r:1"), "{e}"),
                }
            }
        }
        Ok(Document::Manifest(m)) => {
            for d in std::iter::once(&m.config).chain(&m.layers) {
                assert!(hex64(&d.digest), "{:?}", d.digest);
            }
        }
        Err(e) => assert!(e.to_string().contains("fuzz.example/r:1"), "{e}"),
    }
    if let Ok(m) = parse_manifest("fuzz.example/r:1", data) {
        assert!(hex64(&m.config.digest));
    }
});
