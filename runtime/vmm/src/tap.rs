//! Tap devices for virtio-net: created (or opened, if it exists) inside a
//! network namespace given by path, with IFF_VNET_HDR and a 12-byte header,
//! non-blocking, and brought up. The namespace is entered by a short-lived
//! helper thread, so the VMM's own threads never change namespace.

use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::Path;

const TUNSETIFF: libc::c_ulong = 0x4004_54ca;
const TUNSETVNETHDRSZ: libc::c_ulong = 0x4004_54d8;

fn ifreq(name: &str) -> std::io::Result<libc::ifreq> {
    if name.is_empty() || name.len() >= libc::IFNAMSIZ {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            format!("tap name {name:?} must be 1 to 15 bytes"),
        ));
    }
    // SAFETY: ifreq is plain data; all-zero is a valid value.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (d, s) in req.ifr_name.iter_mut().zip(name.bytes()) {
        *d = s as libc::c_char;
    }
    Ok(req)
}

/// virtio-net's header without the num_buffers field: 12 bytes.
fn set_vnet_hdr(tun: &File) -> std::io::Result<()> {
    let hdr: libc::c_int = 12;
    // SAFETY: TUNSETVNETHDRSZ reads the int we own.
    if unsafe { libc::ioctl(tun.as_raw_fd(), TUNSETVNETHDRSZ, &hdr) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

fn open_here(name: &str) -> std::io::Result<File> {
    let tun = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
        .open("/dev/net/tun")?;
    let mut req = ifreq(name)?;
    req.ifr_ifru.ifru_flags = (libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR) as i16;
    // SAFETY: TUNSETIFF reads and writes the ifreq we own.
    if unsafe { libc::ioctl(tun.as_raw_fd(), TUNSETIFF, &mut req) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    set_vnet_hdr(&tun)?;
    // Bring the link up, through a socket of this namespace.
    // SAFETY: plain socket(2) call; the fd is owned right away.
    let sock = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if sock < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: sock is a fresh fd we own.
    let sock = unsafe { OwnedFd::from_raw_fd(sock) };
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

use std::os::unix::fs::OpenOptionsExt;

/// Opens tap `name` in the namespace at `netns` (or the current one).
pub fn open(name: &str, netns: Option<&Path>) -> std::io::Result<File> {
    let Some(ns) = netns else {
        return open_here(name);
    };
    let ns = File::open(ns)?;
    let name = name.to_owned();
    std::thread::scope(|s| {
        s.spawn(move || {
            nix::sched::setns(&ns, nix::sched::CloneFlags::CLONE_NEWNET)
                .map_err(std::io::Error::from)?;
            open_here(&name)
        })
        .join()
        .unwrap_or_else(|_| Err(std::io::Error::other("tap helper thread panicked")))
    })
}

const TUNGETIFF: libc::c_ulong = 0x8004_54d2;

/// Takes over a tap descriptor inherited from the parent: it must be a tap
/// made with IFF_VNET_HDR (what virtio-net's header needs); it is made
/// non-blocking and close-on-exec, with a 12-byte header.
pub fn inherit(fd: i32) -> std::io::Result<File> {
    // SAFETY: F_GETFD only asks whether `fd` is open.
    if unsafe { libc::fcntl(fd, libc::F_GETFD) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: an open descriptor nothing else in this process owns: the
    // caller hands it over once.
    let tun = unsafe { File::from_raw_fd(fd) };
    // SAFETY: ifreq is plain data; TUNGETIFF fills it.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    // SAFETY: TUNGETIFF writes the ifreq we own.
    if unsafe { libc::ioctl(tun.as_raw_fd(), TUNGETIFF, &mut req) } < 0 {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            format!("not a tap device ({})", std::io::Error::last_os_error()),
        ));
    }
    // SAFETY: TUNGETIFF filled the flags member.
    let flags = i32::from(unsafe { req.ifr_ifru.ifru_flags });
    if flags & libc::IFF_TAP == 0 || flags & libc::IFF_VNET_HDR == 0 {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            "the tap must be made with IFF_TAP and IFF_VNET_HDR",
        ));
    }
    set_vnet_hdr(&tun)?;
    // SAFETY: fcntl on the descriptor we own takes integers.
    unsafe {
        let fl = libc::fcntl(fd, libc::F_GETFL);
        if fl < 0 || libc::fcntl(fd, libc::F_SETFL, fl | libc::O_NONBLOCK) < 0 {
            return Err(std::io::Error::last_os_error());
        }
        libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC);
    }
    Ok(tun)
}

/// Parses `aa:bb:cc:dd:ee:ff`.
pub fn parse_mac(text: &str) -> Option<[u8; 6]> {
    let mut mac = [0u8; 6];
    let mut parts = text.split(':');
    for b in &mut mac {
        *b = u8::from_str_radix(parts.next()?, 16).ok()?;
    }
    parts.next().is_none().then_some(mac)
}
