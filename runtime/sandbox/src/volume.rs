//! Pod volumes on the host: emptyDir (a directory, an ext4 image when it has
//! a sizeLimit, a tmpfs for `medium: Memory`), hostPath, and configMap /
//! secret projections (secrets only ever on tmpfs). [`PodVolumes`] owns every
//! directory and mount it creates and removes them in `teardown`, also when
//! `setup` fails half-way. hostPath contents are never touched.

use crate::pod::{ContainerPlan, PodPlan, VolumeFile, VolumeSource};
use crate::state::PodPaths;
use husk_wasm::Preopen;
use std::collections::{BTreeMap, HashMap};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
#[error("volume {volume:?}: {msg}")]
pub struct VolumeError {
    pub volume: String,
    pub msg: String,
}

fn verr(volume: &str, msg: impl std::fmt::Display) -> VolumeError {
    VolumeError {
        volume: volume.to_owned(),
        msg: msg.to_string(),
    }
}

/// The host side of a pod's volumes.
#[derive(Debug, Default)]
pub struct PodVolumes {
    dirs: BTreeMap<String, PathBuf>,
    /// Mount points to unmount, in creation order.
    mounts: Vec<PathBuf>,
    /// Directories husk created and removes (never hostPaths).
    owned_roots: Vec<PathBuf>,
    /// subPath and workingDir directories opened inside their volume, by
    /// (base, sub): opened once per pod, reused across container restarts.
    pinned: HashMap<(PathBuf, String), (cap_std::fs::Dir, PathBuf)>,
    /// Volumes made of single files ([`add_host_files`](Self::add_host_files)):
    /// their directory and its mounts (the tmpfs first).
    file_dirs: BTreeMap<String, (PathBuf, Vec<PathBuf>)>,
    /// Which of those are file hostPaths of the manifest (mounted at the
    /// file's own path).
    file_volumes: std::collections::BTreeSet<String>,
}

/// Mounts a tmpfs on `dir`; without `size`, the kernel's default (half of
/// RAM) applies.
fn mount_tmpfs(dir: &Path, size: Option<u64>, mode: u32) -> nix::Result<()> {
    use nix::mount::MsFlags;
    let opts = match size {
        Some(size) => format!("size={size},mode={mode:o}"),
        None => format!("mode={mode:o}"),
    };
    nix::mount::mount(
        Some("tmpfs"),
        dir,
        Some("tmpfs"),
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC,
        Some(opts.as_str()),
    )
}

fn run_tool(cmd: &mut std::process::Command) -> Result<(), String> {
    let out = cmd
        .output()
        .map_err(|e| format!("{:?}: {e}", cmd.get_program()))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "{:?} failed: {}",
            cmd.get_program(),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

impl PodVolumes {
    /// Creates every volume of `plan`. On error, undoes what was done.
    pub fn setup(plan: &PodPlan, paths: &PodPaths) -> Result<Self, VolumeError> {
        let mut me = PodVolumes::default();
        match me.setup_all(plan, paths) {
            Ok(()) => Ok(me),
            Err(e) => {
                me.teardown();
                Err(e)
            }
        }
    }

    fn own_root(&mut self, dir: PathBuf) -> Result<(), std::io::Error> {
        if !self.owned_roots.contains(&dir) {
            std::fs::create_dir_all(&dir)?;
            self.owned_roots.push(dir);
        }
        Ok(())
    }

    fn setup_all(&mut self, plan: &PodPlan, paths: &PodPaths) -> Result<(), VolumeError> {
        for v in &plan.volumes {
            let name = v.name.as_str();
            let dir = match &v.source {
                VolumeSource::EmptyDir {
                    memory: true,
                    size_limit,
                } => {
                    self.own_root(paths.volumes_run())
                        .map_err(|e| verr(name, e))?;
                    let dir = paths.volumes_run().join(name);
                    std::fs::create_dir(&dir).map_err(|e| verr(name, e))?;
                    mount_tmpfs(&dir, size_limit.filter(|s| *s > 0), 0o777)
                        .map_err(|e| verr(name, format!("tmpfs: {e}")))?;
                    self.mounts.push(dir.clone());
                    dir
                }
                VolumeSource::EmptyDir {
                    memory: false,
                    size_limit,
                } => {
                    self.own_root(paths.volumes_lib())
                        .map_err(|e| verr(name, e))?;
                    let dir = paths.volumes_lib().join(name);
                    std::fs::create_dir(&dir).map_err(|e| verr(name, e))?;
                    if let Some(limit) = size_limit {
                        // A sized disk emptyDir is a small ext4 image, so the
                        // kernel refuses writes past the limit.
                        let img = paths.volumes_lib().join(format!("{name}.img"));
                        let f = std::fs::File::create(&img).map_err(|e| verr(name, e))?;
                        // ext4 needs some room for its own metadata.
                        f.set_len((*limit).max(1 << 20) + (1 << 20))
                            .map_err(|e| verr(name, e))?;
                        drop(f);
                        run_tool(
                            std::process::Command::new("mkfs.ext4")
                                .args([
                                    "-q",
                                    "-F",
                                    "-m",
                                    "0",
                                    "-O",
                                    "^has_journal",
                                    "-E",
                                    "root_owner=0:0",
                                ])
                                .arg(&img),
                        )
                        .map_err(|e| verr(name, format!("{e} (install e2fsprogs)")))?;
                        run_tool(
                            std::process::Command::new("mount")
                                .args(["-o", "loop,nosuid,nodev,noexec"])
                                .arg(&img)
                                .arg(&dir),
                        )
                        .map_err(|e| verr(name, e))?;
                        self.mounts.push(dir.clone());
                        let _ = std::fs::remove_dir(dir.join("lost+found"));
                        let _ =
                            std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o777));
                    } else {
                        let _ =
                            std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o777));
                    }
                    dir
                }
                VolumeSource::HostPath {
                    path,
                    create,
                    file: true,
                } => {
                    self.file_volume(plan, paths, name, path, *create)?;
                    continue;
                }
                VolumeSource::HostPath { path, create, .. } => {
                    if *create {
                        std::fs::create_dir_all(path).map_err(|e| verr(name, e))?;
                    }
                    if !path.is_dir() {
                        return Err(verr(
                            name,
                            format!("hostPath {} is not a directory", path.display()),
                        ));
                    }
                    path.clone()
                }
                VolumeSource::ConfigMap { files, .. } => {
                    self.own_root(paths.volumes_run())
                        .map_err(|e| verr(name, e))?;
                    let dir = paths.volumes_run().join(name);
                    std::fs::create_dir(&dir).map_err(|e| verr(name, e))?;
                    write_files(&dir, files).map_err(|e| verr(name, e))?;
                    dir
                }
                VolumeSource::Secret { files, .. } => {
                    self.own_root(paths.volumes_run())
                        .map_err(|e| verr(name, e))?;
                    let dir = paths.volumes_run().join(name);
                    std::fs::create_dir(&dir).map_err(|e| verr(name, e))?;
                    let size =
                        husk_protocol::projected::tmpfs_size(files.iter().map(|f| f.data.len()));
                    mount_tmpfs(&dir, Some(size), 0o755)
                        .map_err(|e| verr(name, format!("tmpfs: {e}")))?;
                    self.mounts.push(dir.clone());
                    write_files(&dir, files).map_err(|e| verr(name, e))?;
                    dir
                }
            };
            self.dirs.insert(v.name.clone(), dir);
        }
        Ok(())
    }

    /// A hostPath of `type: File` (or `FileOrCreate`, which makes it
    /// empty): a directory holding it under the name of each mount of it
    /// (see [`add_host_files`](Self::add_host_files)), read-only where every
    /// mount under that name is. A VM container mounts the file from it
    /// (a subPath), a wasm guest has it as that directory.
    fn file_volume(
        &mut self,
        plan: &PodPlan,
        paths: &PodPaths,
        name: &str,
        path: &Path,
        create: bool,
    ) -> Result<(), VolumeError> {
        if create && !path.exists() {
            std::fs::OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(false)
                .open(path)
                .map_err(|e| verr(name, format!("{}: {e}", path.display())))?;
        }
        let mut entries: BTreeMap<String, bool> = BTreeMap::new();
        for m in plan
            .all_containers()
            .flat_map(|c| &c.mounts)
            .filter(|m| m.volume == name)
        {
            if m.sub_path.is_some() {
                return Err(verr(name, "a file volume takes no subPath"));
            }
            let base = file_volume_entry(&m.mount_path)
                .ok_or_else(|| verr(name, format!("{:?} is not a file path", m.mount_path)))?;
            *entries.entry(base).or_insert(true) &= m.read_only;
        }
        self.own_root(paths.volumes_run())
            .map_err(|e| verr(name, e))?;
        let files: Vec<(String, PathBuf, bool)> = entries
            .into_iter()
            .map(|(base, ro)| (base, path.to_owned(), ro))
            .collect();
        self.add_host_files(name, &paths.volumes_run().join(name), &files)?;
        self.file_volumes.insert(name.to_owned());
        Ok(())
    }

    /// Whether volume `name` is a file hostPath of the manifest.
    pub fn is_file_volume(&self, name: &str) -> bool {
        self.file_volumes.contains(name)
    }

    /// Host directory of a volume.
    pub fn host_dir(&self, volume: &str) -> Option<&Path> {
        self.dirs.get(volume).map(|p| p.as_path())
    }

    /// Adds a host directory as volume `name` (a CRI client's mount,
    /// prepared by the client); it is never removed by husk.
    pub fn add_host_dir(&mut self, name: &str, path: &Path) -> Result<(), VolumeError> {
        if !path.is_dir() {
            return Err(verr(name, format!("{} is not a directory", path.display())));
        }
        self.dirs.insert(name.to_owned(), path.to_owned());
        Ok(())
    }

    /// Makes volume `name` a directory `dir` holding just `files` (each a
    /// name in it, a host file, and whether it is read-only): how a wasm
    /// container gets file mounts (the kubelet's /etc/hosts and
    /// /dev/termination-log), WASI preopens being directories. `dir` is a
    /// small tmpfs, read-only once each host file is bound onto an empty
    /// file in it: the guest writes the files it was given (unless
    /// read-only) and can create nothing beside them. Host files are never
    /// changed by husk; on failure nothing is left.
    pub fn add_host_files(
        &mut self,
        name: &str,
        dir: &Path,
        files: &[(String, PathBuf, bool)],
    ) -> Result<(), VolumeError> {
        use nix::mount::{mount, MsFlags};
        let mut mounts: Vec<PathBuf> = Vec::new();
        let undo = |mounts: &mut Vec<PathBuf>| {
            for m in mounts.drain(..).rev() {
                let _ = nix::mount::umount2(&m, nix::mount::MntFlags::MNT_DETACH);
            }
            let _ = std::fs::remove_dir(dir);
        };
        let bind_ro = |at: &Path| {
            mount(
                None::<&str>,
                at,
                None::<&str>,
                MsFlags::MS_BIND
                    | MsFlags::MS_REMOUNT
                    | MsFlags::MS_RDONLY
                    | MsFlags::MS_NOSUID
                    | MsFlags::MS_NODEV,
                None::<&str>,
            )
        };
        let r = (|| -> Result<(), VolumeError> {
            std::fs::create_dir_all(dir)
                .map_err(|e| verr(name, format!("{}: {e}", dir.display())))?;
            mount_tmpfs(dir, Some(64 << 10), 0o755)
                .map_err(|e| verr(name, format!("tmpfs on {}: {e}", dir.display())))?;
            mounts.push(dir.to_owned());
            for (file, host, read_only) in files {
                if file.is_empty() || file.contains('/') || file == "." || file == ".." {
                    return Err(verr(name, format!("{file:?} is not a file name")));
                }
                if !host.is_file() {
                    return Err(verr(name, format!("{} is not a file", host.display())));
                }
                let at = dir.join(file);
                std::fs::File::create(&at)
                    .map_err(|e| verr(name, format!("{}: {e}", at.display())))?;
                mount(
                    Some(host.as_path()),
                    &at,
                    None::<&str>,
                    MsFlags::MS_BIND,
                    None::<&str>,
                )
                .map_err(|e| verr(name, format!("bind {}: {e}", host.display())))?;
                mounts.push(at.clone());
                if *read_only {
                    bind_ro(&at).map_err(|e| verr(name, format!("{}: {e}", at.display())))?;
                }
            }
            bind_ro(dir).map_err(|e| verr(name, format!("{}: {e}", dir.display())))
        })();
        if let Err(e) = r {
            undo(&mut mounts);
            return Err(e);
        }
        self.dirs.insert(name.to_owned(), dir.to_owned());
        self.file_dirs
            .insert(name.to_owned(), (dir.to_owned(), mounts));
        Ok(())
    }

    /// Forgets the volumes whose names start with `prefix` (a removed CRI
    /// container's mounts); a file volume's mounts and directory go.
    pub fn forget_prefixed(&mut self, prefix: &str) {
        self.dirs.retain(|k, _| !k.starts_with(prefix));
        let gone: Vec<String> = self
            .file_dirs
            .keys()
            .filter(|k| k.starts_with(prefix))
            .cloned()
            .collect();
        for k in gone {
            if let Some((dir, mounts)) = self.file_dirs.remove(&k) {
                Self::unmount_file_dir(&dir, mounts);
            }
        }
    }

    /// Unmounts a file volume (its binds, then its tmpfs) and removes its
    /// directory, which is empty then; a mount that stays keeps it.
    fn unmount_file_dir(dir: &Path, mounts: Vec<PathBuf>) {
        for m in mounts.into_iter().rev() {
            if let Err(e) = nix::mount::umount2(&m, nix::mount::MntFlags::MNT_DETACH) {
                tracing::warn!(mount = %m.display(), "umount failed: {e}");
            }
        }
        let _ = std::fs::remove_dir(dir);
        // The directory holding the pod's file volumes, once empty.
        if let Some(parent) = dir.parent() {
            let _ = std::fs::remove_dir(parent);
        }
    }

    /// The preopens of one container: each mount (subPath resolved inside
    /// the volume, never through a symlink out of it), plus `.` for its
    /// workingDir when that lies in a mount.
    pub fn preopens_for(&mut self, c: &ContainerPlan) -> Result<Vec<Preopen>, VolumeError> {
        let mut out: Vec<Preopen> = Vec::new();
        for m in &c.mounts {
            let base = self
                .dirs
                .get(&m.volume)
                .ok_or_else(|| verr(&m.volume, "not set up"))?
                .clone();
            // A file hostPath: its directory, at the file's directory. A
            // wasm guest has one preopen per directory, so that directory
            // holds nothing else of the container's.
            if self.is_file_volume(&m.volume) && m.sub_path.is_none() {
                let guest = Path::new(&m.mount_path)
                    .parent()
                    .map(|p| p.to_string_lossy().into_owned())
                    .unwrap_or_default();
                if let Some(other) = c.mounts.iter().find(|o| {
                    !std::ptr::eq(*o, m)
                        && (o.mount_path.trim_end_matches('/') == guest
                            || (self.is_file_volume(&o.volume)
                                && Path::new(&o.mount_path).parent() == Some(Path::new(&guest))
                                && o.volume != m.volume))
                }) {
                    return Err(verr(
                        &m.volume,
                        format!(
                            "a wasm guest sees {} as the directory {guest}, which {} also needs ({}): mount files of one volume there, and nothing else",
                            m.mount_path, other.volume, other.mount_path
                        ),
                    ));
                }
                if !out.iter().any(|p| p.guest == guest) {
                    out.push(Preopen {
                        host: base,
                        guest,
                        read_only: m.read_only,
                    });
                }
                continue;
            }
            let host = match &m.sub_path {
                None => base,
                Some(sub) => self.pin_subdir(&m.volume, &base, sub, m.read_only)?,
            };
            out.push(Preopen {
                host,
                guest: m.mount_path.clone(),
                read_only: m.read_only,
            });
        }
        if let Some(wd) = &c.working_dir {
            let best = out
                .iter()
                .filter(|p| {
                    wd == &p.guest || wd.starts_with(&format!("{}/", p.guest.trim_end_matches('/')))
                })
                .max_by_key(|p| p.guest.len())
                .cloned();
            if let Some(p) = best {
                let rel = wd[p.guest.len()..].trim_start_matches('/').to_owned();
                let host = if rel.is_empty() {
                    p.host.clone()
                } else {
                    self.pin_subdir("workingDir", &p.host, &rel, p.read_only)?
                };
                out.push(Preopen {
                    host,
                    guest: ".".into(),
                    read_only: p.read_only,
                });
            }
        }
        Ok(out)
    }

    /// Opens `sub` below `base` with cap-std (which refuses `..` and
    /// symlinks that leave `base`), creating it when missing, and returns a
    /// /proc/self/fd path to the opened directory so nothing can swap it.
    fn pin_subdir(
        &mut self,
        volume: &str,
        base: &Path,
        sub: &str,
        read_only: bool,
    ) -> Result<PathBuf, VolumeError> {
        let key = (base.to_owned(), sub.to_owned());
        if let Some((_, path)) = self.pinned.get(&key) {
            return Ok(path.clone());
        }
        let root = cap_std::fs::Dir::open_ambient_dir(base, cap_std::ambient_authority())
            .map_err(|e| verr(volume, format!("{}: {e}", base.display())))?;
        if !read_only {
            root.create_dir_all(sub)
                .map_err(|e| verr(volume, format!("subPath {sub:?}: {e}")))?;
        }
        let dir = root
            .open_dir(sub)
            .map_err(|e| verr(volume, format!("subPath {sub:?}: {e}")))?;
        use std::os::fd::AsRawFd;
        let path = PathBuf::from(format!("/proc/self/fd/{}", dir.as_raw_fd()));
        self.pinned.insert(key, (dir, path.clone()));
        Ok(path)
    }

    /// Replaces the files of the configMap or secret volume `name` (an
    /// update of its object): running guests see the new set at once, or
    /// still the old one; never a mix.
    pub fn update_files(&self, name: &str, files: &[VolumeFile]) -> Result<(), VolumeError> {
        let dir = self
            .dirs
            .get(name)
            .ok_or_else(|| verr(name, "not a volume of this pod"))?;
        if std::fs::read_link(dir.join(husk_protocol::projected::DATA)).is_err() {
            return Err(verr(name, "not a configMap or secret volume"));
        }
        if self.mounts.contains(dir) {
            // A secret's tmpfs: room for the old set and the new one.
            let need =
                husk_protocol::projected::tmpfs_size_for_update(files.iter().map(|f| f.data.len()));
            let have = nix::sys::statfs::statfs(dir.as_path())
                .map(|s| s.blocks() * s.block_size() as u64)
                .unwrap_or(0);
            use nix::mount::MsFlags;
            nix::mount::mount(
                Some("tmpfs"),
                dir.as_path(),
                Some("tmpfs"),
                MsFlags::MS_REMOUNT | MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC,
                Some(format!("size={}", need.max(have)).as_str()),
            )
            .map_err(|e| verr(name, format!("tmpfs: {e}")))?;
        }
        write_files(dir, files).map_err(|e| verr(name, e))
    }

    /// Unmounts and removes everything husk created. Idempotent.
    pub fn teardown(&mut self) {
        self.pinned.clear();
        for (_, (dir, mounts)) in std::mem::take(&mut self.file_dirs) {
            Self::unmount_file_dir(&dir, mounts);
        }
        for m in self.mounts.drain(..).rev() {
            if let Err(e) = nix::mount::umount2(&m, nix::mount::MntFlags::MNT_DETACH) {
                tracing::warn!(mount = %m.display(), "umount failed: {e}");
            }
        }
        for r in self.owned_roots.drain(..).rev() {
            if let Err(e) = std::fs::remove_dir_all(&r) {
                if e.kind() != std::io::ErrorKind::NotFound {
                    tracing::warn!(dir = %r.display(), "cannot remove: {e}");
                }
            }
        }
        self.dirs.clear();
    }
}

/// The name a file mount at `mount_path` has in its file volume's
/// directory: the path's last part.
pub fn file_volume_entry(mount_path: &str) -> Option<String> {
    let name = Path::new(mount_path)
        .file_name()?
        .to_string_lossy()
        .into_owned();
    (Path::new(mount_path).is_absolute() && name != "..").then_some(name)
}

/// Writes a configMap's or secret's files as the kubelet's atomic writer
/// does, so that an update replaces them whole.
fn write_files(dir: &Path, files: &[VolumeFile]) -> std::io::Result<()> {
    husk_protocol::projected::write(dir, &protocol_files(files))
}

/// The plan's files as the protocol (and its atomic writer) carries them.
pub fn protocol_files(files: &[VolumeFile]) -> Vec<husk_protocol::File> {
    files
        .iter()
        .map(|f| husk_protocol::File {
            path: f.path.clone(),
            data: f.data.clone(),
            mode: f.mode,
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pod::plan::{ContainerPlan, MountPlan};

    fn container(sub: &str, wd: &str) -> ContainerPlan {
        ContainerPlan {
            name: "c".into(),
            image_ref: "g.wasm".into(),
            image: "g.wasm".into(),
            guest_kind: "wasi-p1-module".into(),
            argv: vec![],
            env: vec![],
            working_dir: Some(wd.into()),
            mounts: vec![MountPlan {
                volume: "v".into(),
                mount_path: "/m".into(),
                read_only: false,
                sub_path: Some(sub.into()),
            }],
            ports: vec![],
            memory_limit: None,
            cpu_limit_millis: None,
            layers: vec![],
            layer_images: vec![],
            security: Default::default(),
            image_user: None,
            stdin: false,
            stdin_once: false,
        }
    }

    #[test]
    fn subpaths_are_pinned_once_across_restarts() {
        let tmp = tempfile::tempdir().unwrap();
        let mut vols = PodVolumes::default();
        vols.dirs.insert("v".into(), tmp.path().to_owned());
        let c = container("a/b", "/m/w");
        let first = vols.preopens_for(&c).unwrap();
        assert!(
            tmp.path().join("a/b/w").is_dir(),
            "subPath and workingDir created"
        );
        for _ in 0..5 {
            let again = vols.preopens_for(&c).unwrap();
            assert_eq!(
                again.iter().map(|p| &p.host).collect::<Vec<_>>(),
                first.iter().map(|p| &p.host).collect::<Vec<_>>()
            );
        }
        // One handle for the subPath, one for the workingDir inside it.
        assert_eq!(vols.pinned.len(), 2);
        vols.teardown();
        assert!(vols.pinned.is_empty());
    }

    #[test]
    fn subpath_symlink_out_of_the_volume_is_refused() {
        let tmp = tempfile::tempdir().unwrap();
        let outside = tempfile::tempdir().unwrap();
        std::os::unix::fs::symlink(outside.path(), tmp.path().join("esc")).unwrap();
        let mut vols = PodVolumes::default();
        vols.dirs.insert("v".into(), tmp.path().to_owned());
        let err = vols.preopens_for(&container("esc", "/m")).unwrap_err();
        assert!(err.to_string().contains("subPath \"esc\""), "{err}");
    }
}
