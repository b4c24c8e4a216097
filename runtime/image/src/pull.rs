//! Pulls through the OCI distribution API (oci-client): manifest or index
//! (platform chosen for what the caller runs), config, then each layer the
//! store lacks, streamed into the store and verified against its digest.
//! Layers already present are reported as "Already exists" and not fetched.

use crate::manifest::{
    choose, parse_document, parse_manifest, Document, INDEX_TYPES, MANIFEST_TYPES,
};
use crate::progress::Progress;
use crate::reference::ImageRef;
use crate::store::{ImageRecord, Store};
use crate::{ImageError, WASM_LAYER_TYPES};
use oci_client::client::{ClientConfig, ClientProtocol};
use oci_client::errors::OciDistributionError;
use oci_client::manifest::OciDescriptor;
use oci_client::secrets::RegistryAuth;
use sha2::{Digest as _, Sha256};

/// Which image of a multi-platform index the caller wants.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Want {
    /// linux/amd64, for VM pods.
    Linux,
    /// A wasm artifact, for wasm pods.
    Wasm,
    /// A wasm artifact if the index has one, else linux/amd64.
    Any,
}

#[derive(Debug, Clone, Default)]
pub struct PullOptions {
    /// Registries reached over plain HTTP besides loopback ones.
    pub insecure: Vec<String>,
    /// Registry host → mirror URL (`http://127.0.0.1:5000`), as containerd's
    /// hosts.toml: content comes from the mirror, names stay the registry's.
    pub mirrors: std::collections::BTreeMap<String, String>,
    /// Credentials file of `husk login` (docker's config.json is read too).
    pub auth_file: Option<std::path::PathBuf>,
    /// Credentials for this pull only (a CRI PullImage's auth config),
    /// used before the auth file.
    pub credentials: Option<(String, String)>,
}

#[derive(Debug)]
pub struct PullReport {
    pub record: ImageRecord,
    pub downloaded: Vec<String>,
    pub existing: Vec<String>,
}

/// `r` is the name the user gave; errors about reaching the registry name
/// the host actually contacted (`src`, the mirror when there is one).
fn reg_err(r: &ImageRef, src: &ImageRef, e: OciDistributionError) -> ImageError {
    let text = e.to_string();
    let lower = text.to_ascii_lowercase().replace('_', " ");
    let not_found = matches!(e, OciDistributionError::ImageManifestNotFoundError(_))
        || ["manifest unknown", "name unknown", "blob unknown"]
            .iter()
            .any(|code| lower.contains(code));
    if not_found {
        return ImageError::NotFound {
            reference: r.name(),
        };
    }
    let reason = match e {
        OciDistributionError::AuthenticationFailure(_)
        | OciDistributionError::UnauthorizedError { .. } => {
            format!(
                "authentication failed ({text}); log in with `husk login {} -u USER --password-stdin`",
                src.registry()
            )
        }
        OciDistributionError::RequestError(ref re) if re.is_connect() || re.is_timeout() => {
            format!(
                "cannot reach registry {} ({}); is it running, and is the address right?",
                src.registry(),
                std::error::Error::source(re)
                    .map(|s| s.to_string())
                    .unwrap_or_else(|| re.to_string())
            )
        }
        _ => text,
    };
    ImageError::Registry {
        reference: r.name(),
        reason,
    }
}

/// Whether `registry` is reached over plain HTTP: loopback, or configured
/// as insecure.
pub fn is_plain(registry: &str, opts: &PullOptions) -> bool {
    crate::reference::is_loopback_host(registry) || opts.insecure.iter().any(|i| i == registry)
}

/// Where content for `r` comes from: its registry, or its mirror; and
/// whether that is plain HTTP.
fn source_of(r: &ImageRef, opts: &PullOptions) -> Result<(ImageRef, bool), ImageError> {
    let Some(url) = opts.mirrors.get(r.registry()) else {
        let plain = is_plain(r.registry(), opts);
        return Ok((r.clone(), plain));
    };
    let bad = |reason: &str| ImageError::Registry {
        reference: r.name(),
        reason: format!("mirror {url:?} for {}: {reason}", r.registry()),
    };
    let (plain, host) = match url.split_once("://") {
        Some(("http", h)) => (true, h),
        Some(("https", h)) => (false, h),
        _ => return Err(bad("use http://HOST[:PORT] or https://HOST[:PORT]")),
    };
    let host = host.trim_end_matches('/');
    let mut text = format!("{host}/{}", r.repository());
    if let Some(t) = r.tag() {
        text.push(':');
        text.push_str(t);
    }
    if let Some(d) = r.digest() {
        text.push('@');
        text.push_str(d);
    }
    let src = ImageRef::parse(&text).map_err(|e| bad(&e.to_string()))?;
    Ok((src, plain))
}

fn client_for(plain: bool) -> oci_client::Client {
    oci_client::Client::new(ClientConfig {
        protocol: if plain {
            ClientProtocol::Http
        } else {
            ClientProtocol::Https
        },
        connect_timeout: Some(std::time::Duration::from_secs(10)),
        read_timeout: Some(std::time::Duration::from_secs(60)),
        ..Default::default()
    })
}

/// Pulls `r` into `store`. On failure, blobs it added and no image uses are
/// removed again.
pub async fn pull(
    store: &Store,
    r: &ImageRef,
    want: Want,
    opts: &PullOptions,
    progress: &mut Progress,
) -> Result<PullReport, ImageError> {
    store.commit();
    store.settle(pull_inner(store, r, want, opts, progress).await)
}

async fn pull_inner(
    store: &Store,
    r: &ImageRef,
    want: Want,
    opts: &PullOptions,
    progress: &mut Progress,
) -> Result<PullReport, ImageError> {
    store.clean_tmp();
    let (src, plain) = source_of(r, opts)?;
    let client = client_for(plain);
    let creds = opts.credentials.clone().or_else(|| {
        opts.auth_file
            .as_deref()
            .and_then(|f| crate::auth::lookup(f, src.registry()))
    });
    let auth = match creds {
        Some((u, p)) => RegistryAuth::Basic(u, p),
        None => RegistryAuth::Anonymous,
    };
    let accepted: Vec<&str> = INDEX_TYPES.iter().chain(MANIFEST_TYPES).copied().collect();
    let name = r.name();
    let (mut raw, _) = client
        .pull_manifest_raw(src.inner(), &auth, &accepted)
        .await
        .map_err(|e| reg_err(r, &src, e))?;
    let mut digest = format!("sha256:{}", hex::encode(Sha256::digest(&raw)));
    if let Some(want_digest) = r.digest() {
        if want_digest != digest {
            return Err(ImageError::DigestMismatch {
                reference: name,
                digest: want_digest.to_owned(),
                got: digest,
            });
        }
    }
    let mut platform = None;
    let manifest = match parse_document(&name, &raw)? {
        Document::Manifest(m) => m,
        Document::Index(idx) => {
            let entry = choose(&name, &idx, want)?;
            platform = entry.platform;
            let child = src.with_digest(&entry.digest);
            let (bytes, _) = client
                .pull_manifest_raw(child.inner(), &auth, MANIFEST_TYPES)
                .await
                .map_err(|e| reg_err(r, &src, e))?;
            // Keep the index too, so the name's digest stays the one the
            // registry serves for it.
            store.write_blob_bytes(&name, &digest, &raw)?;
            raw = bytes;
            digest = entry.digest;
            parse_manifest(&name, &raw)?
        }
    };
    store.write_blob_bytes(&name, &digest, &raw)?;

    let mut report = PullReport {
        record: ImageRecord {
            name: name.clone(),
            digest: digest.clone(),
            media_type: manifest
                .media_type
                .clone()
                .unwrap_or_else(|| MANIFEST_TYPES[0].to_owned()),
            config: manifest.config.clone(),
            layers: manifest.layers.clone(),
            platform,
            created: None,
            pulled_at: chrono::Utc::now(),
        },
        downloaded: Vec::new(),
        existing: Vec::new(),
    };
    for d in std::iter::once(&manifest.config).chain(manifest.layers.iter()) {
        let is_layer = !std::ptr::eq(d, &manifest.config);
        if store.has_blob(&d.digest) {
            if is_layer {
                progress.exists(&d.digest);
            }
            report.existing.push(d.digest.clone());
            continue;
        }
        let desc = OciDescriptor {
            media_type: d.media_type.clone(),
            digest: d.digest.clone(),
            size: d.size as i64,
            ..Default::default()
        };
        let stream = client
            .pull_blob_stream(src.inner(), &desc)
            .await
            .map_err(|e| reg_err(r, &src, e))?;
        if is_layer {
            progress.start(&d.digest, d.size);
        }
        let n = store
            .write_blob(&name, &d.digest, stream.stream, |n| {
                progress.advance(&d.digest, n)
            })
            .await?;
        if n != d.size {
            tracing::warn!(digest = %d.digest, "size {n} differs from the manifest's {}", d.size);
        }
        if is_layer {
            progress.done(&d.digest);
        }
        report.downloaded.push(d.digest.clone());
    }
    let config: serde_json::Value = std::fs::read(store.blob_path(&manifest.config.digest))
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .unwrap_or_default();
    report.record.created = config
        .get("created")
        .and_then(|c| c.as_str())
        .map(str::to_owned);
    if report.record.platform.is_none() {
        let os = config.get("os").and_then(|v| v.as_str());
        let arch = config.get("architecture").and_then(|v| v.as_str());
        report.record.platform = match (os, arch) {
            (Some(o), Some(a)) => Some(format!("{o}/{a}")),
            _ if report
                .record
                .layers
                .iter()
                .any(|l| WASM_LAYER_TYPES.contains(&l.media_type.as_str())) =>
            {
                Some("wasi/wasm".into())
            }
            _ => None,
        };
    }
    store.put(report.record.clone())?;
    progress.message(&format!("Digest: {digest}"));
    progress.message(&format!("Status: Downloaded newer image for {name}"));
    Ok(report)
}

/// A repository of a registry's catalog and its tags.
#[derive(Debug, Clone, serde::Serialize)]
pub struct SearchHit {
    pub repository: String,
    pub tags: Vec<String>,
}

/// Repositories of `registry` whose name contains `term`, with their tags
/// (the registry's `/v2/_catalog`, which Docker Hub does not serve).
pub async fn search(
    registry: &str,
    term: &str,
    opts: &PullOptions,
) -> Result<Vec<SearchHit>, ImageError> {
    let probe = ImageRef::parse(&format!("{registry}/catalog"))?;
    let src = probe.clone();
    let client = client_for(is_plain(registry, opts));
    let auth = match opts
        .auth_file
        .as_deref()
        .and_then(|f| crate::auth::lookup(f, registry))
    {
        Some((u, p)) => RegistryAuth::Basic(u, p),
        None => RegistryAuth::Anonymous,
    };
    let mut repos = Vec::new();
    let mut last: Option<String> = None;
    loop {
        let page = client
            .catalog(probe.inner(), &auth, Some(500), last.as_deref())
            .await
            .map_err(|e| reg_err(&probe, &src, e))?;
        let n = page.repositories.len();
        last = page.repositories.last().cloned();
        repos.extend(page.repositories);
        if n < 500 {
            break;
        }
    }
    let term = term.to_ascii_lowercase();
    let mut hits = Vec::new();
    for repo in repos
        .into_iter()
        .filter(|r| r.to_ascii_lowercase().contains(&term))
    {
        let r = ImageRef::parse(&format!("{registry}/{repo}"))?;
        let tags = client
            .list_tags(r.inner(), &auth, None, None)
            .await
            .map_err(|e| reg_err(&r, &r, e))?;
        hits.push(SearchHit {
            repository: format!("{registry}/{repo}"),
            tags: tags.tags,
        });
    }
    Ok(hits)
}
