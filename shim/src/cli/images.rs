//! Image verbs: `husk pull`, `husk images`, `husk history`, `husk rmi`, and
//! the resolver that turns a wasm container's registry reference into the
//! file of its wasm layer (pulling it when missing, like `docker run`).

use super::{fail, EXIT_FAILURE, EXIT_USAGE};
use husk_image::{ImageError, ImageRecord, ImageRef, Progress, PullOptions, Store, Want};
use husk_sandbox::config::HuskConfig;
use husk_sandbox::pod::ImageResolver;
use husk_sandbox::state::Roots;
use std::path::PathBuf;

pub fn open_store(roots: &Roots) -> Result<Store, ImageError> {
    Store::open(&roots.lib.join("images"))
}

pub fn pull_options(roots: &Roots) -> PullOptions {
    let cfg = HuskConfig::load(&roots.config_file()).unwrap_or_default();
    PullOptions {
        insecure: cfg.registry.insecure,
        mirrors: cfg.registry.mirrors,
        auth_file: Some(auth_file(roots)),
        credentials: None,
    }
}

fn auth_file(roots: &Roots) -> PathBuf {
    roots.lib.join("auth.json")
}

fn image_fail(e: ImageError) -> i32 {
    fail(
        if e.is_usage() {
            EXIT_USAGE
        } else {
            EXIT_FAILURE
        },
        e,
    )
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("tokio runtime")
}

fn do_pull(
    roots: &Roots,
    store: &Store,
    r: &ImageRef,
    want: Want,
    progress: &mut Progress,
) -> Result<ImageRecord, ImageError> {
    let opts = pull_options(roots);
    runtime()
        .block_on(husk_image::pull(store, r, want, &opts, progress))
        .map(|rep| rep.record)
}

/// The image store as seen by manifest validation.
pub struct StoreResolver<'a> {
    pub roots: &'a Roots,
}

impl StoreResolver<'_> {
    /// The image in the store, pulled (as `want`) when it is not there.
    fn find_or_pull(&self, reference: &str, want: Want) -> Result<(Store, ImageRecord), String> {
        let store = open_store(self.roots).map_err(|e| e.to_string())?;
        let r = ImageRef::parse(reference).map_err(|e| e.to_string())?;
        let rec = match store.find(&r.name()) {
            Ok(rec) => rec,
            Err(ImageError::UnknownImage(_)) => {
                eprintln!("Unable to find image '{}' locally", r.name());
                let mut progress = Progress::new(false).to_stderr();
                do_pull(self.roots, &store, &r, want, &mut progress).map_err(|e| e.to_string())?
            }
            Err(e) => return Err(e.to_string()),
        };
        Ok((store, rec))
    }
}

impl ImageResolver for StoreResolver<'_> {
    fn resolve(&self, reference: &str) -> Result<PathBuf, String> {
        let (store, rec) = self.find_or_pull(reference, Want::Wasm)?;
        match store.wasm_file(&rec).map_err(|e| e.to_string())? {
            Some(p) => Ok(p),
            None => Err(format!(
                "{} is not a wasm image (layer media types: {}); a wasm pod needs a layer of type {}, or an image whose entrypoint is a .wasm file",
                rec.name,
                rec.layers
                    .iter()
                    .map(|l| l.media_type.as_str())
                    .collect::<Vec<_>>()
                    .join(", "),
                husk_image::WASM_LAYER_TYPES.join(" or ")
            )),
        }
    }

    fn resolve_linux(&self, reference: &str) -> Result<husk_sandbox::pod::LinuxImage, String> {
        let (store, rec) = self.find_or_pull(reference, Want::Linux)?;
        linux_image(&store, &rec)
    }
}

/// A Linux image of the store, unpacked, as a VM pod's container runs on
/// it.
pub fn linux_image(
    store: &Store,
    rec: &ImageRecord,
) -> Result<husk_sandbox::pod::LinuxImage, String> {
    if rec.wasm_layer().is_some() {
        return Err(format!(
            "{} is a wasm image; a husk-vm pod runs Linux images (use the husk-wasm runtime class)",
            rec.name
        ));
    }
    let layers = store.unpack(rec).map_err(|e| e.to_string())?;
    let run = store.run_config(rec);
    let layer_images = layers
        .iter()
        .map(|d| husk_image::layer_image_path(d))
        .collect();
    Ok(husk_sandbox::pod::LinuxImage {
        layers,
        layer_images,
        entrypoint: run.entrypoint,
        cmd: run.cmd,
        env: run.env,
        working_dir: run.working_dir,
        user: run.user,
    })
}

#[derive(clap::Args)]
pub struct PullArgs {
    /// Image reference: NAME[:TAG] or NAME@sha256:DIGEST.
    image: String,
    /// No progress output.
    #[arg(short, long)]
    quiet: bool,
    /// Which image of a multi-platform index: wasm, linux or any.
    #[arg(long, default_value = "any")]
    platform: String,
}

pub fn pull(roots: &Roots, a: PullArgs) -> i32 {
    let want = match a.platform.as_str() {
        "wasm" => Want::Wasm,
        "linux" | "linux/amd64" => Want::Linux,
        "any" => Want::Any,
        other => {
            return fail(
                EXIT_USAGE,
                format!("--platform {other:?}: use wasm, linux or any"),
            )
        }
    };
    let r = match ImageRef::parse(&a.image) {
        Ok(r) => r,
        Err(e) => return image_fail(e),
    };
    let store = match open_store(roots) {
        Ok(s) => s,
        Err(e) => return image_fail(e),
    };
    let mut progress = Progress::new(a.quiet);
    match do_pull(roots, &store, &r, want, &mut progress) {
        Ok(rec) => {
            if a.quiet {
                println!("{}", rec.name);
            }
            0
        }
        Err(e) => image_fail(e),
    }
}

#[derive(clap::Args)]
pub struct ImagesArgs {
    /// table or json.
    #[arg(long, default_value = "table")]
    format: String,
}

fn human(bytes: u64) -> String {
    const UNITS: &[&str] = &["B", "kB", "MB", "GB", "TB"];
    let mut v = bytes as f64;
    let mut u = 0;
    while v >= 1000.0 && u + 1 < UNITS.len() {
        v /= 1000.0;
        u += 1;
    }
    if u == 0 {
        format!("{bytes}B")
    } else {
        format!("{v:.1}{}", UNITS[u])
    }
}

/// (repository, tag) of a normalised name.
fn repo_tag(name: &str) -> (String, String) {
    match ImageRef::parse(name) {
        Ok(r) => (
            format!("{}/{}", r.registry(), r.repository()),
            r.tag().unwrap_or("<none>").to_owned(),
        ),
        Err(_) => (name.to_owned(), "<none>".into()),
    }
}

pub fn images(roots: &Roots, a: ImagesArgs) -> i32 {
    let store = match open_store(roots) {
        Ok(s) => s,
        Err(e) => return image_fail(e),
    };
    let (list, users) = match (store.list(), store.blob_users()) {
        (Ok(l), Ok(u)) => (l, u),
        (Err(e), _) | (_, Err(e)) => return image_fail(e),
    };
    let shared = |rec: &ImageRecord| -> u64 {
        rec.layers
            .iter()
            .filter(|l| users.get(&l.digest).copied().unwrap_or(0) > 1)
            .map(|l| l.size)
            .sum()
    };
    match a.format.as_str() {
        "json" => {
            let v: Vec<_> = list
                .iter()
                .map(|r| {
                    let (repo, tag) = repo_tag(&r.name);
                    serde_json::json!({
                        "name": r.name,
                        "repository": repo,
                        "tag": tag,
                        "digest": r.digest,
                        "size": r.size(),
                        "sharedSize": shared(r),
                        "platform": r.platform,
                        "created": r.created,
                        "pulledAt": r.pulled_at,
                        "layers": r.layers,
                    })
                })
                .collect();
            println!("{}", serde_json::to_string_pretty(&v).expect("json"));
            0
        }
        "table" => {
            println!(
                "{:<40} {:<12} {:<19} {:<10} {:<12} CREATED",
                "REPOSITORY", "TAG", "DIGEST", "SIZE", "SHARED SIZE"
            );
            for r in &list {
                let (repo, tag) = repo_tag(&r.name);
                println!(
                    "{:<40} {:<12} {:<19} {:<10} {:<12} {}",
                    repo,
                    tag,
                    &r.digest[..r.digest.len().min(19)],
                    human(r.size()),
                    human(shared(r)),
                    r.created.as_deref().unwrap_or("-")
                );
            }
            0
        }
        other => fail(EXIT_USAGE, format!("--format {other:?}: use table or json")),
    }
}

#[derive(clap::Args)]
pub struct HistoryArgs {
    image: String,
}

pub fn history(roots: &Roots, a: HistoryArgs) -> i32 {
    let store = match open_store(roots) {
        Ok(s) => s,
        Err(e) => return image_fail(e),
    };
    let rec = match store.find(&a.image) {
        Ok(r) => r,
        Err(e) => return image_fail(e),
    };
    let config: serde_json::Value = std::fs::read(store.blob_path(&rec.config.digest))
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .unwrap_or_default();
    let history = config
        .get("history")
        .and_then(|h| h.as_array())
        .cloned()
        .unwrap_or_default();
    println!(
        "{:<19} {:<32} {:<10} CREATED BY",
        "LAYER", "CREATED", "SIZE"
    );
    let mut layers = rec.layers.iter();
    if history.is_empty() {
        for l in layers {
            println!(
                "{:<19} {:<32} {:<10} -",
                &l.digest[..19],
                "-",
                human(l.size)
            );
        }
        return 0;
    }
    // Newest first, as docker does; empty layers have no blob.
    let mut rows = Vec::new();
    for h in &history {
        let empty = h.get("empty_layer").and_then(|e| e.as_bool()) == Some(true);
        let layer = if empty { None } else { layers.next() };
        rows.push((
            layer.map_or("<missing>".into(), |l| l.digest[..19].to_owned()),
            h.get("created")
                .and_then(|c| c.as_str())
                .unwrap_or("-")
                .to_owned(),
            human(layer.map_or(0, |l| l.size)),
            h.get("created_by")
                .and_then(|c| c.as_str())
                .unwrap_or("")
                .to_owned(),
        ));
    }
    for (l, c, s, by) in rows.iter().rev() {
        println!("{l:<19} {c:<32} {s:<10} {by}");
    }
    0
}

#[derive(clap::Args)]
pub struct LoadArgs {
    /// An OCI image-layout directory, or a tar of one or of a docker archive.
    #[arg(short, long)]
    input: PathBuf,
}

pub fn load(roots: &Roots, a: LoadArgs) -> i32 {
    let result = open_store(roots).and_then(|s| husk_image::archive::load(&s, &a.input));
    match result {
        Ok(recs) => {
            for r in recs {
                println!("Loaded image: {}", r.name);
            }
            0
        }
        Err(e) => image_fail(e),
    }
}

#[derive(clap::Args)]
pub struct SaveArgs {
    /// Destination: a directory (OCI image layout) or FILE.tar.
    #[arg(short, long)]
    output: PathBuf,
    #[arg(required = true)]
    images: Vec<String>,
}

pub fn save(roots: &Roots, a: SaveArgs) -> i32 {
    let result = (|| {
        let store = open_store(roots)?;
        let recs = a
            .images
            .iter()
            .map(|i| store.find(i))
            .collect::<Result<Vec<_>, _>>()?;
        husk_image::archive::save(&store, &recs, &a.output)
    })();
    match result {
        Ok(()) => 0,
        Err(e) => image_fail(e),
    }
}

#[derive(clap::Args)]
pub struct UnpackArgs {
    image: String,
}

/// Unpacks a Linux image's layers into snapshots and prints their
/// directories, lowest layer first (what a VM pod's root is overlaid from).
pub fn unpack(roots: &Roots, a: UnpackArgs) -> i32 {
    let result = (|| {
        let store = open_store(roots)?;
        let rec = store.find(&a.image)?;
        store.unpack(&rec)
    })();
    match result {
        Ok(dirs) => {
            for d in dirs {
                println!("{}", d.display());
            }
            0
        }
        Err(e) => image_fail(e),
    }
}

#[derive(clap::Args)]
pub struct TagArgs {
    /// An image in the store.
    source: String,
    /// The new name.
    target: String,
}

pub fn tag(roots: &Roots, a: TagArgs) -> i32 {
    let result = (|| {
        let store = open_store(roots)?;
        let target = ImageRef::parse(&a.target)?;
        let mut rec = store.find(&a.source)?;
        rec.name = target.name();
        store.put(rec)?;
        Ok::<_, ImageError>(())
    })();
    match result {
        Ok(()) => 0,
        Err(e) => image_fail(e),
    }
}

#[derive(clap::Args)]
pub struct RmiArgs {
    #[arg(required = true)]
    images: Vec<String>,
    /// Remove even if a pod uses the image.
    #[arg(short, long)]
    force: bool,
}

/// Prints what a removal did, docker style.
fn print_removal(rep: &husk_image::RemoveReport, total: &str) {
    for u in &rep.untagged {
        println!("Untagged: {u}");
    }
    for d in &rep.deleted {
        println!("Deleted: {d}");
    }
    println!("{total}: {}", human(rep.freed));
}

/// Pods whose containers run `rec`.
fn users_of(roots: &Roots, store: &Store, rec: &ImageRecord) -> Vec<String> {
    let wasm = rec.wasm_layer().map(|l| store.blob_path(&l.digest));
    roots
        .list_pods()
        .into_iter()
        .filter(|p| {
            p.plan.all_containers().any(|c| {
                Some(&c.image) == wasm.as_ref()
                    || ImageRef::parse(&c.image_ref).is_ok_and(|r| r.name() == rec.name)
            })
        })
        .map(|p| p.plan.name)
        .collect()
}

pub fn rmi(roots: &Roots, a: RmiArgs) -> i32 {
    let store = match open_store(roots) {
        Ok(s) => s,
        Err(e) => return image_fail(e),
    };
    let mut code = 0;
    for key in &a.images {
        let rec = match store.find(key) {
            Ok(r) => r,
            Err(e) => {
                code = image_fail(e);
                continue;
            }
        };
        let users = users_of(roots, &store, &rec);
        if !users.is_empty() && !a.force {
            code = image_fail(ImageError::InUse {
                image: rec.name,
                pods: users.join(", "),
            });
            continue;
        }
        match store.remove(&rec.name) {
            Ok(rep) => print_removal(&rep, "Freed"),
            Err(e) => code = image_fail(e),
        }
    }
    code
}

#[derive(clap::Args)]
pub struct LoginArgs {
    /// Registry host[:port].
    registry: String,
    #[arg(short, long)]
    username: String,
    /// The password (prefer --password-stdin: arguments are visible in ps).
    #[arg(short, long, conflicts_with = "password_stdin")]
    password: Option<String>,
    /// Read the password from stdin.
    #[arg(long)]
    password_stdin: bool,
}

pub fn login(roots: &Roots, a: LoginArgs) -> i32 {
    let password = match (&a.password, a.password_stdin) {
        (Some(p), _) => p.clone(),
        (None, true) => {
            let mut line = String::new();
            if let Err(e) = std::io::stdin().read_line(&mut line) {
                return fail(EXIT_FAILURE, format!("cannot read the password: {e}"));
            }
            line.trim_end_matches(['\r', '\n']).to_owned()
        }
        (None, false) => {
            return fail(
                EXIT_USAGE,
                "give the password with --password-stdin (or -p)",
            )
        }
    };
    let plain = husk_image::pull::is_plain(&a.registry, &pull_options(roots));
    let checked = runtime().block_on(husk_image::auth::verify(
        &a.registry,
        plain,
        &a.username,
        &password,
    ));
    if let Err(e) = checked {
        return image_fail(e);
    }
    match husk_image::auth::store(&auth_file(roots), &a.registry, &a.username, &password) {
        Ok(()) => {
            println!("Login Succeeded");
            0
        }
        Err(e) => image_fail(e),
    }
}

#[derive(clap::Args)]
pub struct LogoutArgs {
    registry: String,
}

pub fn logout(roots: &Roots, a: LogoutArgs) -> i32 {
    match husk_image::auth::remove(&auth_file(roots), &a.registry) {
        Ok(true) => {
            println!("Removing login credentials for {}", a.registry);
            0
        }
        Ok(false) => fail(EXIT_FAILURE, format!("not logged in to {}", a.registry)),
        Err(e) => image_fail(e),
    }
}

#[derive(clap::Args)]
pub struct SearchArgs {
    /// Part of a repository name.
    term: String,
    /// The registry to search (host[:port]); it must serve /v2/_catalog.
    #[arg(long)]
    registry: String,
    /// table or json.
    #[arg(long, default_value = "table")]
    format: String,
}

pub fn search(roots: &Roots, a: SearchArgs) -> i32 {
    let hits = match runtime().block_on(husk_image::pull::search(
        &a.registry,
        &a.term,
        &pull_options(roots),
    )) {
        Ok(h) => h,
        Err(e) => return image_fail(e),
    };
    match a.format.as_str() {
        "json" => println!("{}", serde_json::to_string_pretty(&hits).expect("json")),
        "table" => {
            println!("{:<50} TAGS", "NAME");
            for h in &hits {
                println!("{:<50} {}", h.repository, h.tags.join(", "));
            }
        }
        other => return fail(EXIT_USAGE, format!("--format {other:?}: use table or json")),
    }
    0
}

#[derive(clap::Subcommand)]
pub enum ImageCommand {
    /// Remove images no pod uses (with -a; without, only unreferenced blobs
    /// and leftovers of interrupted pulls).
    Prune {
        /// Remove every image that no pod uses.
        #[arg(short, long)]
        all: bool,
    },
}

pub fn image(roots: &Roots, cmd: ImageCommand) -> i32 {
    match cmd {
        ImageCommand::Prune { all } => {
            let store = match open_store(roots) {
                Ok(s) => s,
                Err(e) => return image_fail(e),
            };
            let keep = |rec: &ImageRecord| !all || !users_of(roots, &store, rec).is_empty();
            match store.prune(keep, std::time::Duration::from_secs(600)) {
                Ok(rep) => {
                    print_removal(&rep, "Total reclaimed space");
                    0
                }
                Err(e) => image_fail(e),
            }
        }
    }
}

/// An image's record, manifest and config as JSON, if `key` names one.
pub fn inspect_image(roots: &Roots, key: &str) -> Option<serde_json::Value> {
    let store = open_store(roots).ok()?;
    let rec = store.find(key).ok()?;
    let read = |d: &str| -> serde_json::Value {
        std::fs::read(store.blob_path(d))
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or_default()
    };
    Some(serde_json::json!({
        "name": rec.name,
        "digest": rec.digest,
        "platform": rec.platform,
        "created": rec.created,
        "pulledAt": rec.pulled_at,
        "size": rec.size(),
        "manifest": read(&rec.digest),
        "config": read(&rec.config.digest),
    }))
}
