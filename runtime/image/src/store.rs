//! The content store: `blobs/sha256/<hex>` (manifests, configs, layers),
//! `images.json` (name → manifest digest and what it references), `tmp/`
//! for downloads in flight. A blob becomes visible only after its bytes
//! matched its digest, were fsynced and renamed into place; the index is
//! rewritten atomically under an exclusive lock. A pull killed half-way
//! leaves only `tmp/` files of a dead process, which the next pull removes.

use crate::reference::{is_sha256, ImageRef};
use crate::{store_err, ImageError, WASM_LAYER_TYPES};
use futures_util::{Stream, StreamExt};
use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};
use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Descriptor {
    pub media_type: String,
    pub digest: String,
    pub size: u64,
}

/// One image in the store, under one name.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ImageRecord {
    /// The normalised reference it was pulled or tagged as.
    pub name: String,
    /// Digest of the manifest.
    pub digest: String,
    pub media_type: String,
    pub config: Descriptor,
    pub layers: Vec<Descriptor>,
    /// `os/arch` of the chosen manifest, when the config says.
    #[serde(default)]
    pub platform: Option<String>,
    /// `created` from the image config.
    #[serde(default)]
    pub created: Option<String>,
    pub pulled_at: chrono::DateTime<chrono::Utc>,
}

impl ImageRecord {
    /// Config plus layers, as stored (compressed) bytes.
    pub fn size(&self) -> u64 {
        self.config.size + self.layers.iter().map(|l| l.size).sum::<u64>()
    }

    /// The layer that holds the wasm module or component, for a wasm
    /// artifact (one layer of a wasm media type).
    pub fn wasm_layer(&self) -> Option<&Descriptor> {
        self.layers
            .iter()
            .find(|l| WASM_LAYER_TYPES.contains(&l.media_type.as_str()))
    }

    /// Every blob this image references.
    pub fn blobs(&self) -> impl Iterator<Item = &str> {
        std::iter::once(self.digest.as_str())
            .chain(std::iter::once(self.config.digest.as_str()))
            .chain(self.layers.iter().map(|l| l.digest.as_str()))
    }
}

#[derive(Debug, Default, Serialize, Deserialize)]
struct Index {
    images: Vec<ImageRecord>,
}

/// What `remove` did.
#[derive(Debug, Default)]
pub struct RemoveReport {
    pub untagged: Vec<String>,
    pub deleted: Vec<String>,
    pub freed: u64,
}

pub struct Store {
    root: PathBuf,
    /// Blobs this process added since the last `commit`/`rollback`.
    written: std::sync::Mutex<Vec<String>>,
}

/// The exclusive lock on the index, released on drop.
struct Locked {
    _guard: nix::fcntl::Flock<File>,
}

impl Store {
    /// Opens (creating) the store at `root`.
    pub fn open(root: &Path) -> Result<Self, ImageError> {
        for d in ["blobs/sha256", "tmp"] {
            std::fs::create_dir_all(root.join(d)).map_err(store_err(root.join(d)))?;
        }
        Ok(Store {
            root: root.to_owned(),
            written: Default::default(),
        })
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    fn lock(&self) -> Result<Locked, ImageError> {
        let p = self.root.join("lock");
        let f = File::options()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&p)
            .map_err(store_err(&p))?;
        nix::fcntl::Flock::lock(f, nix::fcntl::FlockArg::LockExclusive)
            .map(|g| Locked { _guard: g })
            .map_err(|(_, e)| ImageError::Store {
                path: p,
                source: e.into(),
            })
    }

    fn index_path(&self) -> PathBuf {
        self.root.join("images.json")
    }

    fn read_index(&self) -> Result<Index, ImageError> {
        let p = self.index_path();
        match std::fs::read(&p) {
            Ok(b) => serde_json::from_slice(&b).map_err(|e| ImageError::Store {
                path: p,
                source: std::io::Error::new(std::io::ErrorKind::InvalidData, e),
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Index::default()),
            Err(e) => Err(store_err(p)(e)),
        }
    }

    fn write_index(&self, idx: &Index, _lock: &Locked) -> Result<(), ImageError> {
        let bytes = serde_json::to_vec_pretty(idx).expect("json");
        write_atomic(&self.index_path(), &bytes).map_err(store_err(self.index_path()))
    }

    /// Every image, sorted by name.
    pub fn list(&self) -> Result<Vec<ImageRecord>, ImageError> {
        let mut v = self.read_index()?.images;
        v.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(v)
    }

    /// Finds an image by name (normalised as a reference), by full
    /// `repository@digest`, or by a prefix (12+ hex digits) of its digest.
    pub fn find(&self, key: &str) -> Result<ImageRecord, ImageError> {
        let images = self.read_index()?.images;
        let hex = key.strip_prefix("sha256:").unwrap_or(key);
        if hex.len() >= 12 && hex.bytes().all(|b| b.is_ascii_hexdigit()) {
            if let Some(r) = images.iter().find(|r| r.digest[7..].starts_with(hex)) {
                return Ok(r.clone());
            }
        }
        let r = ImageRef::parse(key)?;
        let name = r.name();
        if let Some(found) = images.iter().find(|i| i.name == name) {
            return Ok(found.clone());
        }
        if let Some(d) = r.digest() {
            if let Some(found) = images.iter().find(|i| i.digest == d) {
                return Ok(found.clone());
            }
        }
        Err(ImageError::UnknownImage(name))
    }

    pub fn blob_path(&self, digest: &str) -> PathBuf {
        let hex = digest.strip_prefix("sha256:").unwrap_or(digest);
        self.root.join("blobs/sha256").join(hex)
    }

    pub fn has_blob(&self, digest: &str) -> bool {
        is_sha256(digest) && self.blob_path(digest).is_file()
    }

    /// Removes download files left by processes that died (kill -9 during a
    /// pull): they never count as content.
    pub fn clean_tmp(&self) {
        let dead = |tag: &str| {
            tag.split('-')
                .next()
                .and_then(|p| p.parse::<u32>().ok())
                .is_none_or(|p| !Path::new(&format!("/proc/{p}")).exists())
        };
        for e in std::fs::read_dir(self.root.join("tmp"))
            .into_iter()
            .flatten()
            .flatten()
        {
            if dead(&e.file_name().to_string_lossy()) {
                let _ = std::fs::remove_file(e.path());
                let _ = std::fs::remove_dir_all(e.path());
            }
        }
        let snapshots = std::fs::read_dir(self.root.join("snapshots"));
        for e in snapshots.into_iter().flatten().flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if name.strip_prefix(".tmp-").is_some_and(dead) {
                let _ = std::fs::remove_dir_all(e.path());
            }
            // A layer's disk image being written (`<layer>.ext4.tmp-<pid>-…`).
            if name
                .split_once(".ext4.tmp-")
                .is_some_and(|(_, tag)| dead(tag))
            {
                let _ = std::fs::remove_file(e.path());
            }
        }
    }

    /// Streams a blob into the store, hashing as it goes. The blob appears
    /// only if the bytes match `digest`; otherwise nothing is left.
    /// `progress` is told the bytes written so far.
    pub async fn write_blob<S>(
        &self,
        reference: &str,
        digest: &str,
        mut stream: S,
        mut progress: impl FnMut(u64),
    ) -> Result<u64, ImageError>
    where
        S: Stream<Item = std::io::Result<bytes::Bytes>> + Unpin,
    {
        if !is_sha256(digest) {
            return Err(ImageError::BadDigest {
                reference: reference.to_owned(),
                digest: digest.to_owned(),
            });
        }
        let tmp = TmpFile::new(&self.root)?;
        let mut file = File::create(&tmp.0).map_err(store_err(&tmp.0))?;
        let mut hasher = Sha256::new();
        let mut n = 0u64;
        while let Some(chunk) = stream.next().await {
            let chunk = match chunk {
                Ok(c) => c,
                // oci-client checks the digest too, and ends the stream
                // with this error after the last byte: report it as the
                // mismatch it is, with the digest of what arrived.
                Err(e) if e.to_string().starts_with("Invalid digest") => break,
                Err(e) => {
                    return Err(ImageError::Registry {
                        reference: reference.to_owned(),
                        reason: format!("download of {digest} failed: {e}"),
                    })
                }
            };
            hasher.update(&chunk);
            file.write_all(&chunk).map_err(store_err(&tmp.0))?;
            n += chunk.len() as u64;
            progress(n);
        }
        let got = format!("sha256:{}", hex::encode(hasher.finalize()));
        if got != digest {
            return Err(ImageError::DigestMismatch {
                reference: reference.to_owned(),
                digest: digest.to_owned(),
                got,
            });
        }
        file.sync_all().map_err(store_err(&tmp.0))?;
        tmp.persist(&self.blob_path(digest))?;
        self.journal(digest);
        Ok(n)
    }

    /// Stores bytes already in memory (manifests, configs) under `digest`.
    pub fn write_blob_bytes(
        &self,
        reference: &str,
        digest: &str,
        bytes: &[u8],
    ) -> Result<(), ImageError> {
        let got = format!("sha256:{}", hex::encode(Sha256::digest(bytes)));
        if !is_sha256(digest) {
            return Err(ImageError::BadDigest {
                reference: reference.to_owned(),
                digest: digest.to_owned(),
            });
        }
        if got != digest {
            return Err(ImageError::DigestMismatch {
                reference: reference.to_owned(),
                digest: digest.to_owned(),
                got,
            });
        }
        if self.has_blob(digest) {
            return Ok(());
        }
        let tmp = TmpFile::new(&self.root)?;
        write_file_synced(&tmp.0, bytes).map_err(store_err(&tmp.0))?;
        tmp.persist(&self.blob_path(digest))?;
        self.journal(digest);
        Ok(())
    }

    fn journal(&self, digest: &str) {
        if let Ok(mut w) = self.written.lock() {
            w.push(digest.to_owned());
        }
    }

    /// Ends an operation that began with [`Store::commit`]: keeps its blobs
    /// if it succeeded, rolls them back if not.
    pub fn settle<T>(&self, result: Result<T, ImageError>) -> Result<T, ImageError> {
        match &result {
            Ok(_) => self.commit(),
            Err(_) => self.rollback(),
        }
        result
    }

    /// Forgets the blobs written so far: they belong to images now.
    pub fn commit(&self) {
        if let Ok(mut w) = self.written.lock() {
            w.clear();
        }
    }

    /// Deletes the blobs this process wrote since the last commit that no
    /// image references: a failed pull or load leaves the store as it was.
    pub fn rollback(&self) {
        let written = match self.written.lock() {
            Ok(mut w) => std::mem::take(&mut *w),
            Err(_) => return,
        };
        let Ok(lock) = self.lock() else { return };
        let Ok(idx) = self.read_index() else { return };
        let keep: std::collections::HashSet<&str> =
            idx.images.iter().flat_map(|i| i.blobs()).collect();
        for d in written.iter().filter(|d| !keep.contains(d.as_str())) {
            let _ = std::fs::remove_file(self.blob_path(d));
        }
        drop(lock);
    }

    /// Adds `rec`, replacing any image of the same name; returns the
    /// replaced image's record, whose blobs are collected if nothing else
    /// uses them.
    pub fn put(&self, rec: ImageRecord) -> Result<Option<RemoveReport>, ImageError> {
        let lock = self.lock()?;
        let mut idx = self.read_index()?;
        let old = idx.images.iter().position(|i| i.name == rec.name);
        let replaced = old.map(|i| idx.images.remove(i));
        idx.images.push(rec);
        self.write_index(&idx, &lock)?;
        Ok(replaced.map(|r| self.collect(&idx, &[r], &lock)))
    }

    /// Removes the image named `name` and every blob nothing else uses.
    pub fn remove(&self, name: &str) -> Result<RemoveReport, ImageError> {
        let lock = self.lock()?;
        let mut idx = self.read_index()?;
        let Some(pos) = idx.images.iter().position(|i| i.name == name) else {
            return Err(ImageError::UnknownImage(name.to_owned()));
        };
        let rec = idx.images.remove(pos);
        self.write_index(&idx, &lock)?;
        let mut report = self.collect(&idx, &[rec], &lock);
        report.untagged.push(name.to_owned());
        Ok(report)
    }

    /// Deletes the blobs of `gone` that no image in `idx` references.
    fn collect(&self, idx: &Index, gone: &[ImageRecord], _lock: &Locked) -> RemoveReport {
        let keep: std::collections::HashSet<&str> =
            idx.images.iter().flat_map(|i| i.blobs()).collect();
        let mut report = RemoveReport::default();
        for d in gone.iter().flat_map(|g| g.blobs()) {
            if keep.contains(d) || report.deleted.iter().any(|x| x == d) {
                continue;
            }
            let p = self.blob_path(d);
            if let Ok(m) = std::fs::metadata(&p) {
                if std::fs::remove_file(&p).is_ok() {
                    report.freed += m.len();
                    report.deleted.push(d.to_owned());
                }
            }
            let snap = self.snapshot_path(d);
            if snap.is_dir() {
                let _ = std::fs::remove_dir_all(&snap);
            }
            // The layer's file-system image for VM pods goes with it.
            let _ = std::fs::remove_file(crate::unpack::layer_image_path(&snap));
        }
        report
    }

    /// Removes every image `keep` rejects, then blobs no image references
    /// that are older than `grace` (younger ones may belong to a pull in
    /// flight in another process), and dead processes' temporary files.
    pub fn prune(
        &self,
        mut keep: impl FnMut(&ImageRecord) -> bool,
        grace: std::time::Duration,
    ) -> Result<RemoveReport, ImageError> {
        self.clean_tmp();
        let lock = self.lock()?;
        let mut idx = self.read_index()?;
        let (kept, gone): (Vec<_>, Vec<_>) = idx.images.drain(..).partition(|i| keep(i));
        idx.images = kept;
        self.write_index(&idx, &lock)?;
        let mut report = self.collect(&idx, &gone, &lock);
        report.untagged = gone.into_iter().map(|g| g.name).collect();
        let referenced: std::collections::HashSet<&str> =
            idx.images.iter().flat_map(|i| i.blobs()).collect();
        let blobs = self.root.join("blobs/sha256");
        for e in std::fs::read_dir(&blobs)
            .map_err(store_err(&blobs))?
            .flatten()
        {
            let digest = format!("sha256:{}", e.file_name().to_string_lossy());
            let Ok(meta) = e.metadata() else { continue };
            let old = meta
                .modified()
                .ok()
                .and_then(|m| m.elapsed().ok())
                .is_some_and(|age| age >= grace);
            if !referenced.contains(digest.as_str())
                && old
                && std::fs::remove_file(e.path()).is_ok()
            {
                report.freed += meta.len();
                report.deleted.push(digest);
            }
        }
        Ok(report)
    }

    /// For each blob digest, how many images reference it.
    pub fn blob_users(&self) -> Result<std::collections::HashMap<String, usize>, ImageError> {
        let mut m = std::collections::HashMap::new();
        for i in self.read_index()?.images {
            let mut seen = std::collections::HashSet::new();
            for d in i.blobs() {
                if seen.insert(d.to_owned()) {
                    *m.entry(d.to_owned()).or_insert(0) += 1;
                }
            }
        }
        Ok(m)
    }
}

/// A download file in `tmp/`, named after the pid that writes it; removed
/// on drop unless persisted.
struct TmpFile(PathBuf);

impl TmpFile {
    fn new(root: &Path) -> Result<Self, ImageError> {
        let r: u64 = rand::random();
        Ok(TmpFile(
            root.join("tmp")
                .join(format!("{}-{r:016x}", std::process::id())),
        ))
    }

    fn persist(self, to: &Path) -> Result<(), ImageError> {
        std::fs::rename(&self.0, to).map_err(store_err(to))?;
        if let Some(dir) = to.parent() {
            if let Ok(d) = File::open(dir) {
                let _ = d.sync_all();
            }
        }
        std::mem::forget(self);
        Ok(())
    }
}

impl Drop for TmpFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

fn write_file_synced(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let mut f = File::create(path)?;
    f.write_all(bytes)?;
    f.sync_all()
}

/// Writes `bytes` to `path` through a temporary file in the same directory,
/// fsynced and renamed over it: readers see the old or the new content.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir)?;
    let tmp = dir.join(format!(
        ".{}.tmp{}",
        path.file_name().unwrap_or_default().to_string_lossy(),
        std::process::id()
    ));
    write_file_synced(&tmp, bytes)?;
    std::fs::rename(&tmp, path)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn digest(b: &[u8]) -> String {
        format!("sha256:{}", hex::encode(Sha256::digest(b)))
    }

    fn rt() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap()
    }

    fn chunks(
        parts: &[&'static [u8]],
    ) -> impl Stream<Item = std::io::Result<bytes::Bytes>> + Unpin {
        futures_util::stream::iter(
            parts
                .iter()
                .map(|p| Ok(bytes::Bytes::from_static(p)))
                .collect::<Vec<_>>(),
        )
    }

    #[test]
    fn a_blob_appears_only_when_its_digest_matches() {
        let tmp = tempfile::tempdir().unwrap();
        let store = Store::open(tmp.path()).unwrap();
        let good = digest(b"hello world");
        let n = rt()
            .block_on(store.write_blob("t", &good, chunks(&[b"hello ", b"world"]), |_| {}))
            .unwrap();
        assert_eq!(n, 11);
        assert_eq!(
            std::fs::read(store.blob_path(&good)).unwrap(),
            b"hello world"
        );
        let err = rt()
            .block_on(store.write_blob("t", &digest(b"other"), chunks(&[b"tampered"]), |_| {}))
            .unwrap_err();
        assert!(matches!(err, ImageError::DigestMismatch { .. }), "{err}");
        assert!(!store.has_blob(&digest(b"other")));
        assert_eq!(
            std::fs::read_dir(tmp.path().join("tmp")).unwrap().count(),
            0
        );
        // A digest that is not sha256 hex never becomes a path.
        let err = rt()
            .block_on(store.write_blob("t", "sha256:../../etc", chunks(&[b"x"]), |_| {}))
            .unwrap_err();
        assert!(matches!(err, ImageError::BadDigest { .. }));
    }

    #[test]
    fn remove_keeps_shared_blobs_and_frees_the_rest() {
        let tmp = tempfile::tempdir().unwrap();
        let store = Store::open(tmp.path()).unwrap();
        let blob = |b: &[u8]| {
            let d = digest(b);
            store.write_blob_bytes("t", &d, b).unwrap();
            Descriptor {
                media_type: "application/wasm".into(),
                digest: d,
                size: b.len() as u64,
            }
        };
        let shared = blob(b"shared layer");
        let rec = |name: &str, own: &[u8]| ImageRecord {
            name: name.into(),
            digest: blob(format!("manifest {name}").as_bytes()).digest,
            media_type: "m".into(),
            config: blob(b"{}"),
            layers: vec![shared.clone(), blob(own)],
            platform: None,
            created: None,
            pulled_at: chrono::Utc::now(),
        };
        store.put(rec("a", b"only a")).unwrap();
        store.put(rec("b", b"only b")).unwrap();
        assert_eq!(store.blob_users().unwrap()[&shared.digest], 2);
        let r = store.remove("a").unwrap();
        assert_eq!(r.deleted.len(), 2, "manifest a and layer 'only a': {r:?}");
        assert_eq!(r.freed, "manifest a".len() as u64 + 6);
        assert!(store.has_blob(&shared.digest));
        let r = store.remove("b").unwrap();
        assert!(r.deleted.contains(&shared.digest));
        assert_eq!(
            std::fs::read_dir(tmp.path().join("blobs/sha256"))
                .unwrap()
                .count(),
            0
        );
        assert!(matches!(
            store.remove("b"),
            Err(ImageError::UnknownImage(_))
        ));
    }

    #[test]
    fn tmp_files_of_dead_processes_are_cleaned() {
        let tmp = tempfile::tempdir().unwrap();
        let store = Store::open(tmp.path()).unwrap();
        let dead = tmp.path().join("tmp/999999999-00");
        let mine = tmp.path().join(format!("tmp/{}-01", std::process::id()));
        std::fs::write(&dead, b"partial").unwrap();
        std::fs::write(&mine, b"in flight").unwrap();
        let snaps = tmp.path().join("snapshots");
        std::fs::create_dir_all(&snaps).unwrap();
        let dead_img = snaps.join("ab.ext4.tmp-999999999-00");
        let my_img = snaps.join(format!("ab.ext4.tmp-{}-01", std::process::id()));
        let done_img = snaps.join("ab.ext4");
        for f in [&dead_img, &my_img, &done_img] {
            std::fs::write(f, b"x").unwrap();
        }
        store.clean_tmp();
        assert!(!dead.exists());
        assert!(mine.exists());
        assert!(!dead_img.exists());
        assert!(my_img.exists() && done_img.exists());
    }
}
