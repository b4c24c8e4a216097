//! CRI's ImageService on husk's image store (the one `husk pull` and
//! `husk images` use): an image's id is its manifest digest.

use crate::store::{internal, Huskd};
use husk_image::{ImageError, ImageRecord, ImageRef, Progress, Store, Want};
use husk_shim::cli::images::{open_store, pull_options};
use k8s_cri::v1 as cri;
use k8s_cri::v1::image_service_server::ImageService;
use std::path::Path;
use std::sync::Arc;
use tonic::{Request, Response, Status};

pub struct Images(pub Arc<Huskd>);

/// The image `key` names (a reference, an id or its 12+ digit prefix).
pub fn find(store: &Store, key: &str) -> Option<ImageRecord> {
    store.find(key).ok()
}

fn to_image(store: &Store, rec: &ImageRecord) -> cri::Image {
    let repo = ImageRef::parse(&rec.name)
        .map(|r| format!("{}/{}", r.registry(), r.repository()))
        .unwrap_or_else(|_| rec.name.clone());
    // A name pulled by digest is a repo digest (the digest it was pulled
    // by: an index's, where the manifest's is the id), not a tag.
    let (repo_tags, mut repo_digests) = if rec.name.contains('@') {
        (vec![], vec![rec.name.clone()])
    } else {
        (vec![rec.name.clone()], vec![])
    };
    let own = format!("{repo}@{}", rec.digest);
    if !repo_digests.contains(&own) {
        repo_digests.push(own);
    }
    let (uid, username) = image_user(store, rec);
    cri::Image {
        id: rec.digest.clone(),
        repo_tags,
        repo_digests,
        size: rec.size(),
        uid,
        username,
        spec: Some(cri::ImageSpec {
            image: rec.digest.clone(),
            ..Default::default()
        }),
        pinned: false,
    }
}

/// The user an image's config names (`USER`; a group after `:` is not
/// the user): a uid when numeric, else a name, as CRI reports it.
fn image_user(store: &Store, rec: &ImageRecord) -> (Option<cri::Int64Value>, String) {
    let user = store.run_config(rec).user.unwrap_or_default();
    let user = user.split(':').next().unwrap_or_default();
    match user.parse::<i64>() {
        Ok(uid) => (Some(cri::Int64Value { value: uid }), String::new()),
        Err(_) => (None, user.to_owned()),
    }
}

/// All names of one image id become one CRI image.
fn merged(store: &Store, recs: &[ImageRecord]) -> Vec<cri::Image> {
    let mut out: Vec<cri::Image> = Vec::new();
    for r in recs {
        let img = to_image(store, r);
        match out.iter_mut().find(|i| i.id == img.id) {
            Some(i) => {
                i.repo_tags.extend(img.repo_tags);
                for d in img.repo_digests {
                    if !i.repo_digests.contains(&d) {
                        i.repo_digests.push(d);
                    }
                }
            }
            None => out.push(img),
        }
    }
    out
}

fn store_status(e: ImageError) -> Status {
    if e.is_usage() {
        Status::invalid_argument(e.to_string())
    } else {
        Status::unknown(e.to_string())
    }
}

fn image_key(spec: Option<&cri::ImageSpec>) -> Result<String, Status> {
    spec.map(|s| s.image.clone())
        .filter(|s| !s.is_empty())
        .ok_or_else(|| Status::invalid_argument("image.image is empty"))
}

/// Bytes and inodes used under `dir`.
fn usage(dir: &Path) -> (u64, u64) {
    use std::os::unix::fs::MetadataExt;
    let mut bytes = 0;
    let mut inodes = 0;
    let mut stack = vec![dir.to_owned()];
    while let Some(d) = stack.pop() {
        let Ok(rd) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in rd.flatten() {
            let Ok(m) = e.metadata() else { continue };
            inodes += 1;
            bytes += m.blocks() * 512;
            if m.is_dir() {
                stack.push(e.path());
            }
        }
    }
    (bytes, inodes)
}

impl Images {
    async fn with_store<T: Send + 'static>(
        &self,
        f: impl FnOnce(Store) -> Result<T, Status> + Send + 'static,
    ) -> Result<T, Status> {
        let roots = self.0.roots.clone();
        tokio::task::spawn_blocking(move || f(open_store(&roots).map_err(store_status)?))
            .await
            .map_err(internal)?
    }
}

#[tonic::async_trait]
impl ImageService for Images {
    async fn list_images(
        &self,
        req: Request<cri::ListImagesRequest>,
    ) -> Result<Response<cri::ListImagesResponse>, Status> {
        let filter = req
            .into_inner()
            .filter
            .and_then(|f| f.image)
            .map(|i| i.image)
            .filter(|i| !i.is_empty());
        let images = self
            .with_store(move |store| {
                let all = store.list().map_err(store_status)?;
                let all = match filter {
                    None => all,
                    Some(key) => match find(&store, &key) {
                        Some(r) => all.into_iter().filter(|x| x.digest == r.digest).collect(),
                        None => vec![],
                    },
                };
                Ok(merged(&store, &all))
            })
            .await?;
        Ok(Response::new(cri::ListImagesResponse { images }))
    }

    async fn image_status(
        &self,
        req: Request<cri::ImageStatusRequest>,
    ) -> Result<Response<cri::ImageStatusResponse>, Status> {
        let req = req.into_inner();
        let key = image_key(req.image.as_ref())?;
        let verbose = req.verbose;
        let (image, info) = self
            .with_store(move |store| {
                let Some(rec) = find(&store, &key) else {
                    return Ok((None, Default::default()));
                };
                let all = store.list().map_err(store_status)?;
                let same: Vec<_> = all.into_iter().filter(|x| x.digest == rec.digest).collect();
                let mut info = std::collections::HashMap::new();
                if verbose {
                    info.insert(
                        "info".into(),
                        serde_json::json!({ "platform": rec.platform, "layers": rec.layers.len(), "created": rec.created })
                            .to_string(),
                    );
                }
                Ok((merged(&store, &same).into_iter().next(), info))
            })
            .await?;
        Ok(Response::new(cri::ImageStatusResponse { image, info }))
    }

    async fn pull_image(
        &self,
        req: Request<cri::PullImageRequest>,
    ) -> Result<Response<cri::PullImageResponse>, Status> {
        let req = req.into_inner();
        let key = image_key(req.image.as_ref())?;
        let r = ImageRef::parse(&key).map_err(store_status)?;
        let mut opts = pull_options(&self.0.roots);
        if let Some(a) = req.auth {
            if !a.username.is_empty() {
                opts.credentials = Some((a.username, a.password));
            } else if !a.auth.is_empty() {
                use base64::Engine;
                let decoded = base64::engine::general_purpose::STANDARD
                    .decode(&a.auth)
                    .ok()
                    .and_then(|b| String::from_utf8(b).ok())
                    .and_then(|s| s.split_once(':').map(|(u, p)| (u.into(), p.into())))
                    .ok_or_else(|| {
                        Status::invalid_argument("auth.auth is not base64 of user:password")
                    })?;
                opts.credentials = Some(decoded);
            }
        }
        let roots = self.0.roots.clone();
        let rec = tokio::task::spawn_blocking(move || {
            let store = open_store(&roots).map_err(store_status)?;
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .map_err(internal)?;
            let mut progress = Progress::quiet();
            rt.block_on(husk_image::pull(
                &store,
                &r,
                Want::Any,
                &opts,
                &mut progress,
            ))
            .map(|rep| rep.record)
            .map_err(|e| match e {
                ImageError::UnknownImage(_) | ImageError::NotFound { .. } => {
                    Status::not_found(e.to_string())
                }
                e => store_status(e),
            })
        })
        .await
        .map_err(internal)??;
        Ok(Response::new(cri::PullImageResponse {
            image_ref: rec.digest,
        }))
    }

    async fn remove_image(
        &self,
        req: Request<cri::RemoveImageRequest>,
    ) -> Result<Response<cri::RemoveImageResponse>, Status> {
        let key = image_key(req.into_inner().image.as_ref())?;
        self.with_store(move |store| {
            // Removing what is gone is done.
            let Some(rec) = find(&store, &key) else {
                return Ok(());
            };
            // By id: every name of it; by name: that name.
            let by_id = key.trim_start_matches("sha256:").len() >= 12
                && rec.digest.contains(key.trim_start_matches("sha256:"));
            let names: Vec<String> = if by_id {
                store
                    .list()
                    .map_err(store_status)?
                    .into_iter()
                    .filter(|x| x.digest == rec.digest)
                    .map(|x| x.name)
                    .collect()
            } else {
                vec![rec.name]
            };
            for n in names {
                match store.remove(&n) {
                    Ok(_) | Err(ImageError::UnknownImage(_)) => {}
                    Err(e) => return Err(store_status(e)),
                }
            }
            Ok(())
        })
        .await?;
        Ok(Response::new(cri::RemoveImageResponse {}))
    }

    async fn image_fs_info(
        &self,
        _: Request<cri::ImageFsInfoRequest>,
    ) -> Result<Response<cri::ImageFsInfoResponse>, Status> {
        let roots = self.0.roots.clone();
        let fs = tokio::task::spawn_blocking(move || {
            let now = chrono::Utc::now().timestamp_nanos_opt().unwrap_or(0);
            let fs = |dir: std::path::PathBuf| {
                let (bytes, inodes) = usage(&dir);
                cri::FilesystemUsage {
                    timestamp: now,
                    fs_id: Some(cri::FilesystemIdentifier {
                        mountpoint: dir.display().to_string(),
                    }),
                    used_bytes: Some(cri::UInt64Value { value: bytes }),
                    inodes_used: Some(cri::UInt64Value { value: inodes }),
                }
            };
            (fs(roots.lib.join("images")), fs(roots.lib.join("pods")))
        })
        .await
        .map_err(internal)?;
        Ok(Response::new(cri::ImageFsInfoResponse {
            image_filesystems: vec![fs.0],
            container_filesystems: vec![fs.1],
        }))
    }
}
