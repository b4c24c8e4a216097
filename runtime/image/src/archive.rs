//! Offline images: `husk load` of OCI image-layout directories (or tars of
//! one, as `docker save` ≥ 25 and skopeo/umoci/buildah write them) and of
//! docker-archive tarballs (`manifest.json` + config + layer tars);
//! `husk save` writes an OCI image layout, as a directory or a tar that also
//! carries docker's `manifest.json`, so both `husk load` and `docker load`
//! read it. Every blob is verified against its digest on the way in.

use crate::reference::{is_sha256, ImageRef};
use crate::store::{Descriptor, ImageRecord, Store};
use crate::{store_err, ImageError, WASM_LAYER_TYPES};
use sha2::{Digest as _, Sha256};
use std::path::{Path, PathBuf};

const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
const DOCKER_CONFIG: &str = "application/vnd.docker.container.image.v1+json";
const DOCKER_LAYER: &str = "application/vnd.docker.image.rootfs.diff.tar";
const REF_NAME: &str = "org.opencontainers.image.ref.name";
const IMAGE_NAME: &str = "io.containerd.image.name";

fn bad(source: &Path, msg: impl std::fmt::Display) -> ImageError {
    ImageError::Archive {
        path: source.to_owned(),
        msg: msg.to_string(),
    }
}

fn digest_of(bytes: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(bytes)))
}

/// Reads `path` and stores it as a blob, checking it is `digest` when given.
fn import_blob(
    store: &Store,
    source: &Path,
    path: &Path,
    digest: Option<&str>,
) -> Result<(String, u64), ImageError> {
    let bytes = std::fs::read(path).map_err(|e| bad(source, format!("{}: {e}", path.display())))?;
    let got = digest_of(&bytes);
    let want = digest.unwrap_or(&got);
    store
        .write_blob_bytes(&source.display().to_string(), want, &bytes)
        .map_err(|e| match e {
            ImageError::DigestMismatch { .. } => bad(
                source,
                format!(
                    "{} does not match its digest {want} (got {got})",
                    path.display()
                ),
            ),
            other => other,
        })?;
    Ok((got, bytes.len() as u64))
}

#[derive(serde::Deserialize)]
#[serde(rename_all = "camelCase")]
struct LayoutIndex {
    manifests: Vec<LayoutEntry>,
}

#[derive(serde::Deserialize)]
#[serde(rename_all = "camelCase")]
struct LayoutEntry {
    #[serde(default)]
    media_type: String,
    digest: String,
    #[serde(default)]
    annotations: std::collections::BTreeMap<String, String>,
    #[serde(default)]
    platform: Option<serde_json::Value>,
}

#[derive(serde::Deserialize)]
#[serde(rename_all = "camelCase")]
struct ManifestDoc {
    #[serde(default)]
    media_type: Option<String>,
    config: Descriptor,
    #[serde(default)]
    layers: Vec<Descriptor>,
}

fn blob_file(dir: &Path, source: &Path, digest: &str) -> Result<PathBuf, ImageError> {
    if !is_sha256(digest) {
        return Err(bad(source, format!("unsupported digest {digest:?}")));
    }
    Ok(dir.join("blobs/sha256").join(&digest[7..]))
}

fn config_meta(store: &Store, config: &Descriptor) -> (Option<String>, Option<String>) {
    let cfg: serde_json::Value = std::fs::read(store.blob_path(&config.digest))
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .unwrap_or_default();
    let s = |k: &str| cfg.get(k).and_then(|v| v.as_str()).map(str::to_owned);
    let platform = match (s("os"), s("architecture")) {
        (Some(o), Some(a)) => Some(format!("{o}/{a}")),
        _ => None,
    };
    (platform, s("created"))
}

/// Stores one manifest (and what it references) from a layout directory.
fn import_manifest(
    store: &Store,
    source: &Path,
    dir: &Path,
    digest: &str,
    name: &str,
) -> Result<ImageRecord, ImageError> {
    let mpath = blob_file(dir, source, digest)?;
    import_blob(store, source, &mpath, Some(digest))?;
    let doc: ManifestDoc =
        serde_json::from_slice(&std::fs::read(&mpath).map_err(store_err(&mpath))?)
            .map_err(|e| bad(source, format!("manifest {digest}: {e}")))?;
    for d in std::iter::once(&doc.config).chain(&doc.layers) {
        import_blob(
            store,
            source,
            &blob_file(dir, source, &d.digest)?,
            Some(&d.digest),
        )?;
    }
    let (platform, created) = config_meta(store, &doc.config);
    let platform = platform.or_else(|| {
        doc.layers
            .iter()
            .any(|l| WASM_LAYER_TYPES.contains(&l.media_type.as_str()))
            .then(|| "wasi/wasm".to_owned())
    });
    let rec = ImageRecord {
        name: name.to_owned(),
        digest: digest.to_owned(),
        media_type: doc.media_type.unwrap_or_else(|| OCI_MANIFEST.into()),
        config: doc.config,
        layers: doc.layers,
        platform,
        created,
        pulled_at: chrono::Utc::now(),
    };
    store.put(rec.clone())?;
    Ok(rec)
}

/// The name an OCI layout entry is loaded as.
fn layout_name(entry: &LayoutEntry, dir_name: &str) -> Result<String, ImageError> {
    let text = match (
        entry.annotations.get(IMAGE_NAME),
        entry.annotations.get(REF_NAME),
    ) {
        (Some(full), _) => full.clone(),
        (None, Some(r)) if r.contains('/') || r.contains(':') => r.clone(),
        (None, Some(tag)) => format!("localhost/{dir_name}:{tag}"),
        (None, None) => format!("localhost/{dir_name}:latest"),
    };
    Ok(ImageRef::parse(&text)?.name())
}

fn load_layout(store: &Store, source: &Path, dir: &Path) -> Result<Vec<ImageRecord>, ImageError> {
    let idx_path = dir.join("index.json");
    let idx: LayoutIndex = serde_json::from_slice(
        &std::fs::read(&idx_path).map_err(|e| bad(source, format!("index.json: {e}")))?,
    )
    .map_err(|e| bad(source, format!("index.json: {e}")))?;
    let dir_name = source
        .file_stem()
        .map(|s| s.to_string_lossy().to_lowercase())
        .unwrap_or_else(|| "image".into());
    let dir_name: String = dir_name
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
        .collect();
    let mut out = Vec::new();
    for entry in &idx.manifests {
        let name = layout_name(entry, &dir_name)?;
        let digest = if entry.media_type == OCI_INDEX
            || entry.media_type == "application/vnd.docker.distribution.manifest.list.v2+json"
        {
            // A nested index: take its wasm entry, else linux/amd64.
            let p = blob_file(dir, source, &entry.digest)?;
            import_blob(store, source, &p, Some(&entry.digest))?;
            let inner: LayoutIndex =
                serde_json::from_slice(&std::fs::read(&p).map_err(store_err(&p))?)
                    .map_err(|e| bad(source, format!("index {}: {e}", entry.digest)))?;
            let pick = |f: &dyn Fn(&serde_json::Value) -> bool| {
                inner
                    .manifests
                    .iter()
                    .find(|m| m.platform.as_ref().is_some_and(f))
                    .map(|m| m.digest.clone())
            };
            let s = |v: &serde_json::Value, k: &str| {
                v.get(k).and_then(|x| x.as_str()).unwrap_or("").to_owned()
            };
            pick(&|p| s(p, "architecture").starts_with("wasm") || s(p, "os").starts_with("wasi"))
                .or_else(|| pick(&|p| s(p, "os") == "linux" && s(p, "architecture") == "amd64"))
                .ok_or_else(|| {
                    bad(
                        source,
                        format!("index {} has no wasm or linux/amd64 image", entry.digest),
                    )
                })?
        } else {
            entry.digest.clone()
        };
        out.push(import_manifest(store, source, dir, &digest, &name)?);
    }
    if out.is_empty() {
        return Err(bad(source, "index.json lists no images"));
    }
    Ok(out)
}

#[derive(serde::Deserialize)]
#[serde(rename_all = "PascalCase")]
struct DockerEntry {
    config: String,
    #[serde(default)]
    repo_tags: Vec<String>,
    layers: Vec<String>,
}

/// A path inside an extracted archive, refusing names that leave it.
fn inside(dir: &Path, source: &Path, name: &str) -> Result<PathBuf, ImageError> {
    let p = Path::new(name);
    if p.is_absolute()
        || p.components()
            .any(|c| matches!(c, std::path::Component::ParentDir))
    {
        return Err(bad(source, format!("{name:?} points outside the archive")));
    }
    Ok(dir.join(p))
}

fn load_docker(store: &Store, source: &Path, dir: &Path) -> Result<Vec<ImageRecord>, ImageError> {
    let m = dir.join("manifest.json");
    let entries: Vec<DockerEntry> = serde_json::from_slice(
        &std::fs::read(&m).map_err(|e| bad(source, format!("manifest.json: {e}")))?,
    )
    .map_err(|e| bad(source, format!("manifest.json: {e}")))?;
    let mut out = Vec::new();
    for e in entries {
        let (cdigest, csize) = import_blob(store, source, &inside(dir, source, &e.config)?, None)?;
        let mut layers = Vec::new();
        for l in &e.layers {
            let (digest, size) = import_blob(store, source, &inside(dir, source, l)?, None)?;
            layers.push(Descriptor {
                media_type: DOCKER_LAYER.into(),
                digest,
                size,
            });
        }
        let config = Descriptor {
            media_type: DOCKER_CONFIG.into(),
            digest: cdigest,
            size: csize,
        };
        let manifest = serde_json::to_vec(&serde_json::json!({
            "schemaVersion": 2,
            "mediaType": DOCKER_MANIFEST,
            "config": config,
            "layers": layers,
        }))
        .expect("json");
        let mdigest = digest_of(&manifest);
        store.write_blob_bytes(&source.display().to_string(), &mdigest, &manifest)?;
        let (platform, created) = config_meta(store, &config);
        let names = if e.repo_tags.is_empty() {
            vec![format!("localhost/{}:latest", &mdigest[7..19])]
        } else {
            e.repo_tags.clone()
        };
        for n in names {
            let rec = ImageRecord {
                name: ImageRef::parse(&n)?.name(),
                digest: mdigest.clone(),
                media_type: DOCKER_MANIFEST.into(),
                config: config.clone(),
                layers: layers.clone(),
                platform: platform.clone(),
                created: created.clone(),
                pulled_at: chrono::Utc::now(),
            };
            store.put(rec.clone())?;
            out.push(rec);
        }
    }
    Ok(out)
}

/// Loads images from an OCI layout directory, or from a tar of one or of a
/// docker archive. On failure, blobs it added and no image uses are removed.
pub fn load(store: &Store, source: &Path) -> Result<Vec<ImageRecord>, ImageError> {
    store.commit();
    store.settle(load_inner(store, source))
}

fn load_inner(store: &Store, source: &Path) -> Result<Vec<ImageRecord>, ImageError> {
    if source.is_dir() {
        if !source.join("oci-layout").is_file() {
            return Err(bad(source, "not an OCI image layout (no oci-layout file)"));
        }
        return load_layout(store, source, source);
    }
    let tmp = store.root().join("tmp").join(format!(
        "{}-load-{:016x}",
        std::process::id(),
        rand::random::<u64>()
    ));
    std::fs::create_dir_all(&tmp).map_err(store_err(&tmp))?;
    let result = (|| {
        let f = std::fs::File::open(source).map_err(|e| bad(source, e))?;
        let mut ar = tar::Archive::new(f);
        // tar's unpack never writes outside `tmp` (it skips `..` entries
        // and strips leading `/`).
        ar.set_preserve_permissions(false);
        ar.unpack(&tmp)
            .map_err(|e| bad(source, format!("not a readable tar: {e}")))?;
        if tmp.join("oci-layout").is_file() && tmp.join("index.json").is_file() {
            load_layout(store, source, &tmp)
        } else if tmp.join("manifest.json").is_file() {
            load_docker(store, source, &tmp)
        } else {
            Err(bad(
                source,
                "neither an OCI image layout nor a docker archive",
            ))
        }
    })();
    let _ = std::fs::remove_dir_all(&tmp);
    result
}

/// Writes `images` as an OCI image layout: a directory, or (for a `.tar`
/// path) a tarball that also has docker's manifest.json.
pub fn save(store: &Store, images: &[ImageRecord], dest: &Path) -> Result<(), ImageError> {
    let as_tar = dest.extension().is_some_and(|e| e == "tar");
    let dir = if as_tar {
        store.root().join("tmp").join(format!(
            "{}-save-{:016x}",
            std::process::id(),
            rand::random::<u64>()
        ))
    } else {
        dest.to_owned()
    };
    let result = (|| {
        let blobs = dir.join("blobs/sha256");
        std::fs::create_dir_all(&blobs).map_err(store_err(&blobs))?;
        let mut index = Vec::new();
        let mut docker = Vec::new();
        for rec in images {
            for d in rec.blobs() {
                let to = blobs.join(&d[7..]);
                if !to.exists() {
                    std::fs::copy(store.blob_path(d), &to).map_err(store_err(&to))?;
                }
            }
            let size = std::fs::metadata(store.blob_path(&rec.digest))
                .map_err(store_err(store.blob_path(&rec.digest)))?
                .len();
            let r = ImageRef::parse(&rec.name)?;
            index.push(serde_json::json!({
                "mediaType": rec.media_type,
                "digest": rec.digest,
                "size": size,
                "annotations": {
                    IMAGE_NAME: rec.name,
                    REF_NAME: r.tag().unwrap_or("latest"),
                },
            }));
            docker.push(serde_json::json!({
                "Config": format!("blobs/sha256/{}", &rec.config.digest[7..]),
                "RepoTags": [rec.name],
                "Layers": rec.layers.iter().map(|l| format!("blobs/sha256/{}", &l.digest[7..])).collect::<Vec<_>>(),
            }));
        }
        let w = |name: &str, v: &serde_json::Value| {
            let p = dir.join(name);
            std::fs::write(&p, serde_json::to_vec_pretty(v).expect("json")).map_err(store_err(&p))
        };
        w(
            "oci-layout",
            &serde_json::json!({"imageLayoutVersion": "1.0.0"}),
        )?;
        w(
            "index.json",
            &serde_json::json!({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": index}),
        )?;
        if as_tar {
            w("manifest.json", &serde_json::Value::Array(docker))?;
            let tmp_tar = dest.with_extension("tar.partial");
            let written = std::fs::File::create(&tmp_tar).and_then(|f| {
                let mut b = tar::Builder::new(f);
                b.append_dir_all(".", &dir)?;
                b.into_inner()?.sync_all()?;
                std::fs::rename(&tmp_tar, dest)
            });
            if let Err(e) = written {
                // Never leave a half-written tarball next to the target.
                let _ = std::fs::remove_file(&tmp_tar);
                return Err(store_err(dest)(e));
            }
        }
        Ok(())
    })();
    if as_tar {
        let _ = std::fs::remove_dir_all(&dir);
    }
    result
}
