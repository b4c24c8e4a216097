//! A VM pod's network interface, in Kata's tc-filter model: the pod's
//! network namespace keeps the veth that CNI configured (eth0, with the
//! pod IP), a tap device is created next to it for the VM, and tc mirrors
//! every frame from one to the other, both ways. The guest's NIC takes the
//! veth's MAC and the pod IP, so the CNI plugins never know a VM exists.
//! The tap belongs to the open file: it disappears when the last holder
//! (the hypervisor) closes it; the tc filters go with the namespace.

use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Command;

const TUNSETIFF: libc::c_ulong = 0x4004_54ca;

#[derive(Debug, thiserror::Error)]
pub enum NicError {
    #[error("network namespace {0}: {1}")]
    Netns(PathBuf, std::io::Error),
    #[error("tap {name} in {netns}: {source}")]
    Tap {
        name: String,
        netns: PathBuf,
        source: std::io::Error,
    },
    #[error("{veth} in {netns}: {source}")]
    Veth {
        veth: String,
        netns: PathBuf,
        source: std::io::Error,
    },
    #[error("tc {args}: {message}; tc comes with iproute2")]
    Tc { args: String, message: String },
}

/// The VM's side of the pod network, ready to hand to the hypervisor.
pub struct VmNic {
    /// The tap's open file; the tap lives as long as it (and its dups).
    pub tap: File,
    pub tap_name: String,
    /// The veth's MAC, which the guest's NIC takes.
    pub mac: String,
}

fn ifreq(name: &str) -> std::io::Result<libc::ifreq> {
    if name.is_empty() || name.len() >= libc::IFNAMSIZ {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            format!("interface name {name:?} must be 1 to 15 bytes"),
        ));
    }
    // SAFETY: ifreq is plain data; all-zero is a valid value.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (d, s) in req.ifr_name.iter_mut().zip(name.bytes()) {
        *d = s as libc::c_char;
    }
    Ok(req)
}

/// In the calling thread's namespace: a new tap (no packet info; with the
/// virtio-net header when `vnet_hdr`), up.
fn create_tap(name: &str, vnet_hdr: bool) -> std::io::Result<File> {
    let tun = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_CLOEXEC)
        .open("/dev/net/tun")?;
    let mut req = ifreq(name)?;
    req.ifr_ifru.ifru_flags =
        (libc::IFF_TAP | libc::IFF_NO_PI | if vnet_hdr { libc::IFF_VNET_HDR } else { 0 }) as i16;
    // SAFETY: TUNSETIFF reads and writes the ifreq we own.
    if unsafe { libc::ioctl(tun.as_raw_fd(), TUNSETIFF, &mut req) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    let sock = socket()?;
    let mut req = ifreq(name)?;
    // SAFETY: SIOCGIFFLAGS/SIOCSIFFLAGS read and write the ifreq we own.
    unsafe {
        if libc::ioctl(sock.as_raw_fd(), libc::SIOCGIFFLAGS, &mut req) < 0 {
            return Err(std::io::Error::last_os_error());
        }
        req.ifr_ifru.ifru_flags |= libc::IFF_UP as i16;
        if libc::ioctl(sock.as_raw_fd(), libc::SIOCSIFFLAGS, &req) < 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(tun)
}

fn socket() -> std::io::Result<OwnedFd> {
    // SAFETY: plain socket(2) call; the fd is owned right away.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: a fresh fd we own.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// In the calling thread's namespace: the MAC of `name`.
fn mac_of(name: &str) -> std::io::Result<String> {
    let sock = socket()?;
    let mut req = ifreq(name)?;
    // SAFETY: SIOCGIFHWADDR fills the ifreq we own.
    if unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCGIFHWADDR, &mut req) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: the union's hwaddr member is what SIOCGIFHWADDR filled.
    let data = unsafe { req.ifr_ifru.ifru_hwaddr.sa_data };
    Ok(data[..6]
        .iter()
        .map(|b| format!("{:02x}", *b as u8))
        .collect::<Vec<_>>()
        .join(":"))
}

/// Runs tc commands (one per line, as `tc -batch` reads them) inside the
/// namespace, in one process.
fn tc_batch(ns: &File, commands: &str) -> Result<(), NicError> {
    use std::io::Write;
    let fd = ns.as_raw_fd();
    let mut cmd = Command::new("tc");
    cmd.args(["-batch", "-"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped());
    // SAFETY: setns is a single system call, async-signal-safe; the fd is
    // open in the parent for the duration of the spawn.
    unsafe {
        cmd.pre_exec(move || {
            if libc::setns(fd, libc::CLONE_NEWNET) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let fail = |message: String| NicError::Tc {
        args: commands.lines().collect::<Vec<_>>().join("; "),
        message,
    };
    let mut child = cmd.spawn().map_err(|e| fail(e.to_string()))?;
    if let Some(mut stdin) = child.stdin.take() {
        stdin
            .write_all(commands.as_bytes())
            .map_err(|e| fail(e.to_string()))?;
    }
    let out = child.wait_with_output().map_err(|e| fail(e.to_string()))?;
    if !out.status.success() {
        return Err(fail(String::from_utf8_lossy(&out.stderr).trim().to_owned()));
    }
    Ok(())
}

/// Creates tap `tap_name` next to `veth` in the namespace at `netns` and
/// mirrors the two with tc. `vnet_hdr`: the tap carries the virtio-net
/// header (husk-vmm wants it; QEMU finds out for itself).
pub fn attach(netns: &Path, veth: &str, tap_name: &str, vnet_hdr: bool) -> Result<VmNic, NicError> {
    let ns = File::open(netns).map_err(|e| NicError::Netns(netns.to_owned(), e))?;
    // The namespace is entered by a short-lived helper thread, so that no
    // thread of the caller changes namespace.
    let (tap, mac) = std::thread::scope(|s| {
        s.spawn(|| {
            nix::sched::setns(&ns, nix::sched::CloneFlags::CLONE_NEWNET)
                .map_err(|e| NicError::Netns(netns.to_owned(), e.into()))?;
            let mac = mac_of(veth).map_err(|source| NicError::Veth {
                veth: veth.to_owned(),
                netns: netns.to_owned(),
                source,
            })?;
            let tap = create_tap(tap_name, vnet_hdr).map_err(|source| NicError::Tap {
                name: tap_name.to_owned(),
                netns: netns.to_owned(),
                source,
            })?;
            Ok::<_, NicError>((tap, mac))
        })
        .join()
        .unwrap_or_else(|_| {
            Err(NicError::Netns(
                netns.to_owned(),
                std::io::Error::other("helper thread panicked"),
            ))
        })
    })?;
    let mut commands = String::new();
    for (from, to) in [(veth, tap_name), (tap_name, veth)] {
        commands.push_str(&format!(
            "qdisc add dev {from} ingress\n\
             filter add dev {from} parent ffff: protocol all u32 match u8 0 0 \
             action mirred egress redirect dev {to}\n"
        ));
    }
    tc_batch(&ns, &commands)?;
    Ok(VmNic {
        tap,
        tap_name: tap_name.to_owned(),
        mac,
    })
}
