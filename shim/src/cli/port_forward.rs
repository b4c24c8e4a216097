//! `husk port-forward POD [LOCAL:]REMOTE…`: as `kubectl port-forward`,
//! listens on the host (127.0.0.1 unless `--address` says otherwise) and
//! relays each connection to REMOTE on the pod's localhost: inside the
//! pod's network namespace for a wasm pod, and for a VM pod through the
//! agent's connect tool in one of its running containers (they all share
//! the VM's network). Runs until interrupted, or until the pod ends.

use super::exec::stream_request;
use super::{fail, running_pod, EXIT_FAILURE, EXIT_USAGE};
use crate::control::Request;
use husk_sandbox::pod::manifest::RUNTIME_VM;
use husk_sandbox::state::{ContainerState, PodStatus, Roots};
use husk_sandbox::ExecSpec;
use std::io::Write;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, Shutdown, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::time::Duration;

#[derive(clap::Args)]
pub struct PortForwardArgs {
    /// Address to listen on (an IP address of this host).
    #[arg(long, default_value = "127.0.0.1")]
    address: String,
    pod: String,
    /// `PORT` (the same port on both sides), `LOCAL:REMOTE`, or `:REMOTE`
    /// (a free local port).
    #[arg(required = true, value_name = "[LOCAL:]REMOTE")]
    ports: Vec<String>,
}

/// Where the pod's localhost is.
#[derive(Clone)]
enum Target {
    Netns(PathBuf),
    Vm { socket: PathBuf, container: String },
}

/// `8080`, `9000:8080` or `:8080` → (local, remote); local 0 is any free
/// port.
pub fn parse_ports(spec: &str) -> Result<(u16, u16), String> {
    let port = |s: &str, what: &str, zero_ok: bool| -> Result<u16, String> {
        match s.parse::<u16>() {
            Ok(p) if p > 0 || zero_ok => Ok(p),
            _ => Err(format!(
                "port mapping {spec:?}: {what} port {s:?} is not a port number (1-65535)"
            )),
        }
    };
    match spec.split_once(':') {
        None => {
            let p = port(spec, "the", false)?;
            Ok((p, p))
        }
        Some(("", remote)) => Ok((0, port(remote, "the remote", false)?)),
        Some((local, remote)) => Ok((
            port(local, "the local", true)?,
            port(remote, "the remote", false)?,
        )),
    }
}

pub fn run(roots: &Roots, a: PortForwardArgs) -> i32 {
    let address: IpAddr = match a.address.parse() {
        Ok(ip) => ip,
        Err(_) => {
            return fail(
                EXIT_USAGE,
                format!("--address {:?} is not an IP address", a.address),
            )
        }
    };
    let mut mappings = Vec::new();
    for spec in &a.ports {
        match parse_ports(spec) {
            Ok(m) => mappings.push(m),
            Err(e) => return fail(EXIT_USAGE, e),
        }
    }
    let v = match running_pod(roots, &a.pod, None) {
        Ok(v) => v,
        Err(code) => return code,
    };
    let name = v.record.plan.name.clone();
    let paths = roots.pod(&v.record.id);
    let target = if v.record.plan.runtime_class == RUNTIME_VM {
        let running = v
            .status
            .iter()
            .flat_map(PodStatus::all_containers)
            .find(|c| matches!(c.state, ContainerState::Running { .. }))
            .map(|c| c.name.clone());
        match running {
            Some(container) => Target::Vm {
                socket: paths.socket(),
                container,
            },
            None => {
                return fail(
                    EXIT_FAILURE,
                    format!("pod {name} has no running container to forward to"),
                )
            }
        }
    } else {
        Target::Netns(paths.netns.clone())
    };
    let mut listeners = Vec::new();
    for (local, remote) in mappings {
        let l = match TcpListener::bind((address, local)) {
            Ok(l) => l,
            Err(e) => {
                return fail(
                    EXIT_FAILURE,
                    format!("cannot listen on {address}:{local}: {e}"),
                )
            }
        };
        let bound = l.local_addr().map(|a| a.to_string()).unwrap_or_default();
        println!("Forwarding from {bound} -> {remote}");
        listeners.push((l, remote));
    }
    let _ = std::io::stdout().flush();
    for (l, remote) in listeners {
        let target = target.clone();
        let name = name.clone();
        std::thread::spawn(move || {
            for conn in l.incoming().flatten() {
                let (target, name) = (target.clone(), name.clone());
                std::thread::spawn(move || {
                    if let Err(e) = forward(conn, &target, remote) {
                        eprintln!("husk: pod {name}: forwarding port {remote}: {e}");
                    }
                });
            }
        });
    }
    // Until the pod ends (or a signal ends this process, as for kubectl).
    let id = v.record.id.clone();
    while !super::pod_over(roots, &id) {
        std::thread::sleep(Duration::from_millis(250));
    }
    fail(
        EXIT_FAILURE,
        format!("pod {name} ended; stopped forwarding"),
    )
}

/// Relays one accepted connection to `remote` on the pod's localhost.
fn forward(conn: TcpStream, target: &Target, remote: u16) -> Result<(), String> {
    match target {
        Target::Netns(netns) => {
            let pod = connect_in(netns, remote)?;
            relay_tcp(conn, pod);
            Ok(())
        }
        Target::Vm { socket, container } => relay_vm(conn, socket, container, remote),
    }
}

/// A connection to localhost:`port` (IPv4, then IPv6) made from inside the
/// network namespace at `netns`, by a thread of its own.
fn connect_in(netns: &Path, port: u16) -> Result<TcpStream, String> {
    let netns = netns.to_owned();
    std::thread::spawn(move || {
        let f = std::fs::File::open(&netns).map_err(|e| format!("{}: {e}", netns.display()))?;
        nix::sched::setns(&f, nix::sched::CloneFlags::CLONE_NEWNET)
            .map_err(|e| format!("entering {}: {e}", netns.display()))?;
        TcpStream::connect((Ipv4Addr::LOCALHOST, port))
            .or_else(|e4| TcpStream::connect((Ipv6Addr::LOCALHOST, port)).map_err(|_| e4))
            .map_err(|e| format!("localhost:{port}: {e}"))
    })
    .join()
    .unwrap_or_else(|_| Err("the connecting thread panicked".into()))
}

/// Copies both ways; each side's end half-closes the other.
fn relay_tcp(a: TcpStream, b: TcpStream) {
    let (Ok(mut a2), Ok(mut b2)) = (a.try_clone(), b.try_clone()) else {
        return;
    };
    let up = std::thread::spawn(move || {
        let mut a = a;
        let mut b = b;
        let _ = std::io::copy(&mut a, &mut b);
        let _ = b.shutdown(Shutdown::Write);
    });
    let _ = std::io::copy(&mut b2, &mut a2);
    let _ = a2.shutdown(Shutdown::Write);
    let _ = up.join();
}

/// Relays `conn` through the agent's connect tool in `container` (an
/// exec stream whose stdin and stdout are the connection).
fn relay_vm(conn: TcpStream, socket: &Path, container: &str, port: u16) -> Result<(), String> {
    let req = Request::ExecStream {
        container: Some(container.to_owned()),
        spec: ExecSpec {
            argv: vec![],
            tty: None,
            copy: Some(husk_protocol::Tool::Connect { port }),
        },
    };
    let input = conn.try_clone().map_err(|e| e.to_string())?;
    let mut output = conn.try_clone().map_err(|e| e.to_string())?;
    let mut errors = Vec::new();
    let r = stream_request(
        socket,
        &req,
        Some(Box::new(input)),
        &mut output,
        &mut errors,
        false,
    );
    let _ = conn.shutdown(Shutdown::Both);
    match r? {
        0 => Ok(()),
        _ if errors.is_empty() => Err("the connect tool failed".into()),
        _ => Err(String::from_utf8_lossy(&errors).trim().to_owned()),
    }
}

#[cfg(test)]
mod tests {
    use super::parse_ports;

    #[test]
    fn port_mappings_parse_as_kubectl_reads_them() {
        assert_eq!(parse_ports("8080"), Ok((8080, 8080)));
        assert_eq!(parse_ports("9000:80"), Ok((9000, 80)));
        assert_eq!(parse_ports(":80"), Ok((0, 80)));
        assert_eq!(parse_ports("0:80"), Ok((0, 80)));
        for bad in ["", "0", "x", "80:", "80:0", "70000", "1:2:3", "-1:80"] {
            let e = parse_ports(bad).unwrap_err();
            assert!(e.contains(&format!("{bad:?}")), "{e}");
        }
    }
}
