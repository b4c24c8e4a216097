//! The guest's side of the pod network: finds the NIC by the MAC the host
//! gave it, brings up lo and that NIC with the pod's addresses (IPv4,
//! IPv6 or both), and adds each family's default route, with the classic
//! interface ioctls (no netlink library, nothing to configure but an
//! address and a route per family).

use husk_protocol::{IpConfig, NetworkConfig};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

fn invalid(msg: String) -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::InvalidInput, msg)
}

/// `ADDRESS/PREFIX` of one family (`family`, whose prefixes go up to
/// `max`) → (address, prefix length).
fn parse_prefixed<A: std::str::FromStr>(
    text: &str,
    family: &str,
    max: u32,
) -> std::io::Result<(A, u32)> {
    let (addr, len) = text
        .split_once('/')
        .ok_or_else(|| invalid(format!("address {text:?} is not ADDRESS/PREFIX")))?;
    let addr: A = parse_addr(addr, "address", family)?;
    let len: u32 = len
        .parse()
        .ok()
        .filter(|l| *l <= max)
        .ok_or_else(|| invalid(format!("prefix {len:?} is not 0 to {max}")))?;
    Ok((addr, len))
}

/// An address of one family (`what`: an address or a gateway).
fn parse_addr<A: std::str::FromStr>(text: &str, what: &str, family: &str) -> std::io::Result<A> {
    text.parse()
        .map_err(|_| invalid(format!("{what} {text:?} is not an {family} address")))
}

/// `10.0.0.5/24` → (address, netmask).
pub fn parse_cidr(text: &str) -> std::io::Result<(Ipv4Addr, Ipv4Addr)> {
    let (addr, len) = parse_prefixed::<Ipv4Addr>(text, "IPv4", 32)?;
    let mask = if len == 0 { 0 } else { u32::MAX << (32 - len) };
    Ok((addr, Ipv4Addr::from(mask)))
}

/// The interface whose address is `mac`.
fn find_by_mac(mac: &str) -> std::io::Result<String> {
    let want = mac.to_ascii_lowercase();
    for e in std::fs::read_dir("/sys/class/net")?.flatten() {
        let addr = std::fs::read_to_string(e.path().join("address")).unwrap_or_default();
        if addr.trim() == want {
            return Ok(e.file_name().to_string_lossy().into_owned());
        }
    }
    Err(invalid(format!("no network interface has MAC {mac}")))
}

fn ifreq(name: &str) -> std::io::Result<libc::ifreq> {
    if name.is_empty() || name.len() >= libc::IFNAMSIZ {
        return Err(invalid(format!("interface name {name:?}")));
    }
    // SAFETY: ifreq is plain data; all-zero is a valid value.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (d, s) in req.ifr_name.iter_mut().zip(name.bytes()) {
        *d = s as libc::c_char;
    }
    Ok(req)
}

fn sockaddr(addr: Ipv4Addr) -> libc::sockaddr {
    let sin = libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: 0,
        sin_addr: libc::in_addr {
            s_addr: u32::from(addr).to_be(),
        },
        sin_zero: [0; 8],
    };
    // SAFETY: sockaddr_in and sockaddr have the same size; plain data.
    unsafe { std::mem::transmute::<libc::sockaddr_in, libc::sockaddr>(sin) }
}

fn ioctl<T>(sock: &OwnedFd, req: libc::c_ulong, arg: &mut T, what: &str) -> std::io::Result<()> {
    // SAFETY: `arg` is the structure this request reads or writes.
    if unsafe { libc::ioctl(sock.as_raw_fd(), req, arg as *mut T) } < 0 {
        let e = std::io::Error::last_os_error();
        return Err(std::io::Error::new(e.kind(), format!("{what}: {e}")));
    }
    Ok(())
}

fn up(sock: &OwnedFd, name: &str) -> std::io::Result<()> {
    let mut req = ifreq(name)?;
    ioctl(sock, libc::SIOCGIFFLAGS, &mut req, "get flags")?;
    // SAFETY: the union's flags member is what SIOCGIFFLAGS filled.
    unsafe { req.ifr_ifru.ifru_flags |= (libc::IFF_UP | libc::IFF_RUNNING) as i16 };
    ioctl(
        sock,
        libc::SIOCSIFFLAGS,
        &mut req,
        &format!("bring {name} up"),
    )
}

/// `fd00::5/64` → (address, prefix length).
pub fn parse_cidr6(text: &str) -> std::io::Result<(Ipv6Addr, u32)> {
    parse_prefixed(text, "IPv6", 128)
}

/// The kernel's `struct in6_rtmsg` (libc's has private fields).
#[repr(C)]
struct In6Rtmsg {
    dst: libc::in6_addr,
    src: libc::in6_addr,
    gateway: libc::in6_addr,
    kind: u32,
    dst_len: u16,
    src_len: u16,
    metric: u32,
    info: libc::c_ulong,
    flags: u32,
    ifindex: libc::c_int,
}

fn in6(a: Ipv6Addr) -> libc::in6_addr {
    libc::in6_addr {
        s6_addr: a.octets(),
    }
}

fn socket(family: libc::c_int) -> std::io::Result<OwnedFd> {
    // SAFETY: plain socket(2) call; the fd is owned right away.
    let fd = unsafe { libc::socket(family, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: a fresh fd we own.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn configure_v4(sock: &OwnedFd, name: &str, ip: &IpConfig) -> std::io::Result<()> {
    let (addr, mask) = parse_cidr(&ip.address)?;
    let gateway: Option<Ipv4Addr> = ip
        .gateway
        .as_deref()
        .map(|g| parse_addr(g, "gateway", "IPv4"))
        .transpose()?;
    let mut req = ifreq(name)?;
    req.ifr_ifru.ifru_addr = sockaddr(addr);
    ioctl(
        sock,
        libc::SIOCSIFADDR,
        &mut req,
        &format!("address {addr}"),
    )?;
    let mut req = ifreq(name)?;
    req.ifr_ifru.ifru_netmask = sockaddr(mask);
    ioctl(
        sock,
        libc::SIOCSIFNETMASK,
        &mut req,
        &format!("netmask {mask}"),
    )?;
    if let Some(gw) = gateway {
        // SAFETY: rtentry is plain data; all-zero is a valid value.
        let mut rt: libc::rtentry = unsafe { std::mem::zeroed() };
        rt.rt_dst = sockaddr(Ipv4Addr::UNSPECIFIED);
        rt.rt_genmask = sockaddr(Ipv4Addr::UNSPECIFIED);
        rt.rt_gateway = sockaddr(gw);
        rt.rt_flags = libc::RTF_UP | libc::RTF_GATEWAY;
        ioctl(
            sock,
            libc::SIOCADDRT,
            &mut rt,
            &format!("default route via {gw}"),
        )?;
    }
    Ok(())
}

/// The NIC is up already. Duplicate address detection is switched off
/// first: CNI's IPAM handed out the address, and DAD would keep it
/// unusable (tentative) for a second or more after the pod starts.
fn configure_v6(sock: &OwnedFd, name: &str, ip: &IpConfig) -> std::io::Result<()> {
    let (addr, len) = parse_cidr6(&ip.address)?;
    let gateway: Option<Ipv6Addr> = ip
        .gateway
        .as_deref()
        .map(|g| parse_addr(g, "gateway", "IPv6"))
        .transpose()?;
    let dad = format!("/proc/sys/net/ipv6/conf/{name}/accept_dad");
    std::fs::write(&dad, "0").map_err(|e| {
        std::io::Error::new(
            e.kind(),
            format!("{dad}: {e} (no IPv6 in the guest kernel?)"),
        )
    })?;
    let cname = std::ffi::CString::new(name).map_err(|_| invalid(format!("{name:?}")))?;
    // SAFETY: a NUL-terminated name we own.
    let index = unsafe { libc::if_nametoindex(cname.as_ptr()) };
    if index == 0 {
        return Err(std::io::Error::last_os_error());
    }
    let mut req = libc::in6_ifreq {
        ifr6_addr: in6(addr),
        ifr6_prefixlen: len,
        ifr6_ifindex: index as libc::c_int,
    };
    ioctl(
        sock,
        libc::SIOCSIFADDR,
        &mut req,
        &format!("address {addr}/{len}"),
    )?;
    if let Some(gw) = gateway {
        let mut rt = In6Rtmsg {
            dst: in6(Ipv6Addr::UNSPECIFIED),
            src: in6(Ipv6Addr::UNSPECIFIED),
            gateway: in6(gw),
            kind: 0,
            dst_len: 0,
            src_len: 0,
            metric: 1,
            info: 0,
            flags: (libc::RTF_UP | libc::RTF_GATEWAY) as u32,
            ifindex: index as libc::c_int,
        };
        ioctl(
            sock,
            libc::SIOCADDRT,
            &mut rt,
            &format!("default route via {gw}"),
        )?;
    }
    Ok(())
}

/// Configures the NIC; returns its name.
pub fn configure(cfg: &NetworkConfig) -> std::io::Result<String> {
    // Everything is checked before anything changes.
    let mut families = Vec::new();
    for ip in &cfg.addresses {
        let a = ip.address.split('/').next().unwrap_or_default();
        match a.parse::<IpAddr>() {
            Ok(IpAddr::V4(_)) => parse_cidr(&ip.address).map(|_| families.push(false))?,
            Ok(IpAddr::V6(_)) => parse_cidr6(&ip.address).map(|_| families.push(true))?,
            Err(_) => {
                return Err(invalid(format!(
                    "address {:?} is not an IP address",
                    ip.address
                )))
            }
        }
    }
    let name = find_by_mac(&cfg.mac)?;
    let sock = socket(libc::AF_INET)?;
    up(&sock, "lo")?;
    up(&sock, &name)?;
    let mut sock6 = None;
    for (ip, v6) in cfg.addresses.iter().zip(families) {
        if v6 {
            if sock6.is_none() {
                sock6 = Some(socket(libc::AF_INET6)?);
            }
            configure_v6(sock6.as_ref().expect("just made"), &name, ip)?;
        } else {
            configure_v4(&sock, &name, ip)?;
        }
    }
    Ok(name)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cidrs_parse_into_address_and_mask() {
        assert_eq!(
            parse_cidr("10.88.0.5/16").unwrap(),
            (Ipv4Addr::new(10, 88, 0, 5), Ipv4Addr::new(255, 255, 0, 0))
        );
        assert_eq!(parse_cidr("1.2.3.4/32").unwrap().1, Ipv4Addr::BROADCAST);
        for bad in ["10.0.0.1", "10.0.0.1/33", "nope/8", "10.0.0.1/x"] {
            assert!(parse_cidr(bad).is_err(), "{bad}");
        }
        assert_eq!(
            parse_cidr6("fd00:88::5/64").unwrap(),
            ("fd00:88::5".parse().unwrap(), 64)
        );
        for bad in ["fd00::1", "fd00::1/129", "10.0.0.1/24", "fd00::1/x"] {
            assert!(parse_cidr6(bad).is_err(), "{bad}");
        }
    }
}
