//! virtio-fs (device type 26): a host directory shared with the guest,
//! served by fuse-backend-rs's passthrough file system (the FUSE server
//! Kata's Dragonball VMM uses) from inside husk-vmm, so no virtiofsd
//! process and no vhost-user socket are needed.
//!
//! The directory is served from a detached copy of its mount tree
//! (open_tree(2) with OPEN_TREE_CLONE) that nothing else can reach, made
//! nosuid and nodev and, for a read-only share, read-only with
//! mount_setattr(2), so the kernel, not a check in this process, refuses a
//! write. The copy is never attached anywhere: nothing is mounted on the
//! host, and it goes away with husk-vmm. (In husk-vmm's jail, the
//! file system still reaches it as `/proc/self/fd/N`: the jail binds this
//! process's own fd directory there.) Lookups of ".." at the share's
//! root stay at the root (the passthrough file system maps them to ".",
//! and a detached mount has no parent to climb to); host symlinks are
//! never followed on the host (every component is opened O_NOFOLLOW).
//! A husk-vmm with shares gives up CAP_MKNOD ([`give_up_device_nodes`]):
//! a device node a guest made on a share would be a real device on the
//! host, with the mode the guest chose; [`NoSetId`] refuses them anyway
//! and keeps set-id bits off every file and directory the guest makes or
//! chmods.
//!
//! Queue 0 is the high-priority queue, queue 1 the one request queue; both
//! are served in the device thread, one request at a time.

mod no_set_id;

use crate::virtio::{serve_chains, Device};
use fuse_backend_rs::api::server::Server;
use fuse_backend_rs::passthrough::{self, PassthroughFs};
use fuse_backend_rs::transport::{Reader, VirtioFsWriter};
pub use no_set_id::NoSetId;
use std::ffi::CString;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use virtio_queue::Queue;
use vm_memory::GuestMemoryMmap;

/// Longest tag the virtio-fs configuration space holds.
pub const TAG_MAX: usize = 36;

const OPEN_TREE_CLONE: libc::c_uint = 1;
const AT_RECURSIVE: libc::c_uint = 0x8000;
const MOUNT_ATTR_RDONLY: u64 = 0x1;
const MOUNT_ATTR_NOSUID: u64 = 0x2;
const MOUNT_ATTR_NODEV: u64 = 0x4;

/// `struct mount_attr` of mount_setattr(2).
#[repr(C)]
struct MountAttr {
    attr_set: u64,
    attr_clr: u64,
    propagation: u64,
    userns_fd: u64,
}

pub struct Fs {
    tag: [u8; TAG_MAX],
    server: Server<NoSetId<PassthroughFs>>,
    /// The detached tree; its descriptor number is in the root path.
    _tree: OwnedFd,
}

impl Fs {
    /// Shares `path` under `tag`. The tree is cloned (with the mounts
    /// under it) and made read-only as a whole when asked.
    /// `xattr`: pass extended attributes through (overlayfs in the guest
    /// needs them on its layers; off by default, as in virtiofsd).
    pub fn new(tag: &str, path: &Path, read_only: bool, xattr: bool) -> std::io::Result<Self> {
        if tag.is_empty() || tag.len() > TAG_MAX {
            return Err(std::io::Error::other(format!(
                "tag {tag:?} must be 1 to {TAG_MAX} bytes"
            )));
        }
        if !path.is_dir() {
            return Err(std::io::Error::other("not a directory"));
        }
        let tree = detached_tree(path, read_only)?;
        let fs = PassthroughFs::new(passthrough::Config {
            // The file system opens its root by path (O_NOFOLLOW, on every
            // FUSE_INIT): "." inside the tree's descriptor names the tree
            // and is not itself a link. (In the jail, /proc/self/fd is
            // this process's own fd directory, bound there.)
            root_dir: format!("/proc/self/fd/{}/.", tree.as_raw_fd()),
            xattr,
            ..Default::default()
        })?;
        // The passthrough file system clears the umask on import, so that
        // modes the guest asks for are kept exactly; this process's own
        // files (its vsock sockets) are created before devices like this.
        fs.import()?;
        let mut t = [0u8; TAG_MAX];
        t[..tag.len()].copy_from_slice(tag.as_bytes());
        Ok(Fs {
            tag: t,
            server: Server::new(NoSetId(fs)),
            _tree: tree,
        })
    }
}

/// Drops CAP_MKNOD from this thread's effective, permitted and bounding
/// sets; threads made after this have none either. Call before any other
/// thread starts.
pub fn give_up_device_nodes() -> std::io::Result<()> {
    use caps::{CapSet, Capability};
    for set in [CapSet::Effective, CapSet::Permitted, CapSet::Bounding] {
        caps::drop(None, set, Capability::CAP_MKNOD).map_err(std::io::Error::other)?;
    }
    Ok(())
}

/// A private, unattached copy of the mount tree at `path`: nosuid, nodev,
/// and read-only when asked (recursively).
pub(crate) fn detached_tree(path: &Path, read_only: bool) -> std::io::Result<OwnedFd> {
    let c = CString::new(path.as_os_str().as_bytes())
        .map_err(|_| std::io::Error::other("path contains a NUL byte"))?;
    // SAFETY: c is a valid C string; the call only returns a descriptor.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_open_tree,
            libc::AT_FDCWD,
            c.as_ptr(),
            OPEN_TREE_CLONE | AT_RECURSIVE | libc::O_CLOEXEC as libc::c_uint,
        )
    };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: open_tree returned a new descriptor that nothing else owns.
    let tree = unsafe { OwnedFd::from_raw_fd(fd as i32) };
    let attr = MountAttr {
        attr_set: MOUNT_ATTR_NOSUID
            | MOUNT_ATTR_NODEV
            | if read_only { MOUNT_ATTR_RDONLY } else { 0 },
        attr_clr: 0,
        propagation: 0,
        userns_fd: 0,
    };
    // SAFETY: attr is a valid mount_attr of the size passed; "" with
    // AT_EMPTY_PATH names the tree descriptor itself.
    let r = unsafe {
        libc::syscall(
            libc::SYS_mount_setattr,
            tree.as_raw_fd(),
            c"".as_ptr(),
            libc::AT_EMPTY_PATH as libc::c_uint | AT_RECURSIVE,
            &attr as *const MountAttr,
            std::mem::size_of::<MountAttr>(),
        )
    };
    if r < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(tree)
}

impl Device for Fs {
    fn device_type(&self) -> u32 {
        26
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[256, 256]
    }

    fn process(&mut self, index: usize, queues: &mut [Queue], mem: &GuestMemoryMmap) -> bool {
        let Some(queue) = queues.get_mut(index) else {
            return false;
        };
        let server = &self.server;
        serve_chains(queue, mem, |chain| {
            // A chain the FUSE server cannot parse (or a request it cannot
            // answer) is used with nothing written; the guest sees a short
            // reply, husk-vmm goes on.
            let Ok(reader) = Reader::from_descriptor_chain(mem, chain.clone()) else {
                return 0;
            };
            let Ok(writer) = VirtioFsWriter::new(mem, chain) else {
                return 0;
            };
            server
                .handle_message(reader, writer.into(), None, None)
                .map_or(0, |n| u32::try_from(n).unwrap_or(0))
        })
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        // tag[36], then num_request_queues (u32) = 1.
        let mut config = [0u8; TAG_MAX + 4];
        config[..TAG_MAX].copy_from_slice(&self.tag);
        config[TAG_MAX..].copy_from_slice(&1u32.to_le_bytes());
        for (i, b) in data.iter_mut().enumerate() {
            *b = config.get(offset as usize + i).copied().unwrap_or(0);
        }
    }
}
