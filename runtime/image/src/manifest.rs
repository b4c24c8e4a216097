//! What a registry answers for a name, read without touching the store or
//! the network: an image index (the platform husk runs is chosen from it)
//! or an image manifest (config and layers, every digest checked before
//! it names a blob path). Pure functions, so hostile documents are fuzzed
//! here (tests/fuzz, target `oci_manifest`).

use crate::pull::Want;
use crate::reference::is_sha256;
use crate::store::Descriptor;
use crate::ImageError;
use serde::Deserialize;

pub const INDEX_TYPES: &[&str] = &[
    "application/vnd.oci.image.index.v1+json",
    "application/vnd.docker.distribution.manifest.list.v2+json",
];
pub const MANIFEST_TYPES: &[&str] = &[
    "application/vnd.oci.image.manifest.v1+json",
    "application/vnd.docker.distribution.manifest.v2+json",
];

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Index {
    pub manifests: Vec<IndexEntry>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct IndexEntry {
    #[serde(default)]
    pub media_type: String,
    pub digest: String,
    #[serde(default)]
    pub platform: Option<Platform>,
}

#[derive(Debug, Deserialize, Default)]
pub struct Platform {
    #[serde(default)]
    pub architecture: String,
    #[serde(default)]
    pub os: String,
}

impl Platform {
    pub fn is_wasm(&self) -> bool {
        self.architecture.starts_with("wasm") || self.os.starts_with("wasi")
    }

    fn is_linux_amd64(&self) -> bool {
        self.os == "linux" && self.architecture == "amd64"
    }
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Manifest {
    #[serde(default)]
    pub media_type: Option<String>,
    pub config: Descriptor,
    #[serde(default)]
    pub layers: Vec<Descriptor>,
}

/// A document the registry served for a name.
#[derive(Debug)]
pub enum Document {
    Index(Index),
    Manifest(Manifest),
}

/// The index entry chosen for what the caller runs.
#[derive(Debug, PartialEq, Eq)]
pub struct Chosen {
    /// A `sha256:` digest of 64 hex digits.
    pub digest: String,
    /// `os/architecture`, when the entry says.
    pub platform: Option<String>,
}

fn registry(name: &str, reason: String) -> ImageError {
    ImageError::Registry {
        reference: name.to_owned(),
        reason,
    }
}

/// Reads what the registry served for `name` (an index when it has
/// `manifests`).
pub fn parse_document(name: &str, raw: &[u8]) -> Result<Document, ImageError> {
    let probe: serde_json::Value = serde_json::from_slice(raw)
        .map_err(|e| registry(name, format!("the manifest is not JSON: {e}")))?;
    if probe.get("manifests").is_some() {
        let idx: Index = serde_json::from_value(probe)
            .map_err(|e| registry(name, format!("invalid image index: {e}")))?;
        return Ok(Document::Index(idx));
    }
    manifest_of(name, serde_json::from_value(probe)).map(Document::Manifest)
}

/// Reads an image manifest (what an index entry names).
pub fn parse_manifest(name: &str, raw: &[u8]) -> Result<Manifest, ImageError> {
    manifest_of(name, serde_json::from_slice(raw))
}

fn manifest_of(name: &str, m: Result<Manifest, serde_json::Error>) -> Result<Manifest, ImageError> {
    let m = m.map_err(|e| registry(name, format!("invalid image manifest: {e}")))?;
    for d in std::iter::once(&m.config).chain(m.layers.iter()) {
        if !is_sha256(&d.digest) {
            return Err(ImageError::BadDigest {
                reference: name.to_owned(),
                digest: d.digest.clone(),
            });
        }
    }
    Ok(m)
}

/// The entry of `idx` for `want`: a wasm artifact, linux/amd64, or the
/// first of those two there is.
pub fn choose(name: &str, idx: &Index, want: Want) -> Result<Chosen, ImageError> {
    let plat = |e: &IndexEntry| {
        e.platform
            .as_ref()
            .map(|p| format!("{}/{}", p.os, p.architecture))
    };
    let find = |f: fn(&Platform) -> bool| {
        idx.manifests
            .iter()
            .find(|e| e.platform.as_ref().is_some_and(f))
    };
    let (wasm, linux) = (find(Platform::is_wasm), find(Platform::is_linux_amd64));
    let chosen = match want {
        Want::Wasm => wasm,
        Want::Linux => linux,
        Want::Any => wasm.or(linux),
    };
    let Some(entry) = chosen else {
        return Err(ImageError::NoPlatform {
            reference: name.to_owned(),
            wanted: match want {
                Want::Wasm => "wasm".into(),
                Want::Linux | Want::Any => "linux/amd64".into(),
            },
            available: idx
                .manifests
                .iter()
                .map(|e| plat(e).unwrap_or_else(|| "unknown".into()))
                .collect::<Vec<_>>()
                .join(", "),
        });
    };
    if !is_sha256(&entry.digest)
        || !MANIFEST_TYPES.contains(&entry.media_type.as_str()) && !entry.media_type.is_empty()
    {
        return Err(ImageError::BadDigest {
            reference: name.to_owned(),
            digest: entry.digest.clone(),
        });
    }
    Ok(Chosen {
        digest: entry.digest.clone(),
        platform: plat(entry),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const D: &str = "sha256:0000000000000000000000000000000000000000000000000000000000000000";

    #[test]
    fn an_index_gives_the_platform_asked_for() {
        let raw = format!(
            r#"{{"manifests":[{{"digest":"{D}","platform":{{"os":"linux","architecture":"arm64"}}}},
                {{"digest":"{}","platform":{{"os":"linux","architecture":"amd64"}}}}]}}"#,
            D.replace("00", "11")
        );
        let Document::Index(idx) = parse_document("r", raw.as_bytes()).unwrap() else {
            panic!("an index")
        };
        let c = choose("r", &idx, Want::Linux).unwrap();
        assert_eq!(c.platform.as_deref(), Some("linux/amd64"));
        assert!(c.digest.contains("1111"));
        let e = choose("r", &idx, Want::Wasm).unwrap_err().to_string();
        assert!(e.contains("linux/arm64, linux/amd64"), "{e}");
    }

    #[test]
    fn a_digest_that_is_not_sha256_is_refused_before_it_names_a_path() {
        let raw = format!(
            r#"{{"config":{{"mediaType":"x","digest":"{D}","size":1}},
            "layers":[{{"mediaType":"x","digest":"sha256:../../etc","size":1}}]}}"#
        );
        let e = parse_document("r", raw.as_bytes()).unwrap_err();
        assert!(matches!(e, ImageError::BadDigest { .. }), "{e}");
        let e = parse_manifest("r", b"[1]").unwrap_err().to_string();
        assert!(e.contains("invalid image manifest"), "{e}");
    }
}
