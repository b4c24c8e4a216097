//! `husk-vmm`: boots one microVM from flags or a JSON config file. Prints
//! `{"event":"running",…}` and `{"event":"exit",…}` lines on stderr. Exit
//! status: 0 reset/poweroff, 1 VMM error, 2 bad configuration, 3 triple
//! fault, 4 emulation failure, 5 stopped after the stop timeout.

use clap::Parser;
use husk_vmm::{VmConfig, VmError};
use std::path::PathBuf;

#[derive(Parser)]
#[command(name = "husk-vmm", version, about = "husk's KVM microVM monitor")]
struct Args {
    /// JSON file with the whole configuration (flags override it).
    #[arg(long)]
    config: Option<PathBuf>,
    /// Kernel: an ELF with a PVH entry note, or a bzImage.
    #[arg(long)]
    kernel: Option<PathBuf>,
    /// initramfs (cpio archive, plain or compressed).
    #[arg(long)]
    initrd: Option<PathBuf>,
    #[arg(long)]
    cmdline: Option<String>,
    /// Guest memory in MiB.
    #[arg(long)]
    mem: Option<u64>,
    #[arg(long)]
    vcpus: Option<u8>,
    /// Serial console to this file (default: stdout).
    #[arg(long)]
    serial: Option<PathBuf>,
    /// Emulate the i8254 PIT (off by default).
    #[arg(long)]
    pit: bool,
    /// No virtio-rng device.
    #[arg(long)]
    no_rng: bool,
    /// A virtio-blk disk: PATH or PATH,ro (repeatable).
    #[arg(long = "disk", value_name = "PATH[,ro]")]
    disks: Vec<String>,
    /// virtio-net over a tap: tap=NAME[,netns=PATH][,mac=aa:bb:cc:dd:ee:ff],
    /// or fd=N[,mac=…] for an inherited tap descriptor (IFF_VNET_HDR).
    #[arg(long)]
    net: Option<String>,
    /// virtio-vsock: cid=N,uds=PATH (guest connections to port P go to
    /// PATH_P; host connections write "CONNECT <port>\n" to PATH).
    #[arg(long)]
    vsock: Option<String>,
    /// virtio-fs share of a host directory: tag=TAG,path=DIR[,ro][,xattr]
    /// (repeatable).
    #[arg(long = "fs", value_name = "tag=TAG,path=DIR[,ro][,xattr]")]
    fs: Vec<String>,
    /// Seconds the guest gets to stop after SIGTERM/SIGINT (ctrl-alt-del)
    /// before its vCPUs are stopped (default 5).
    #[arg(long, value_name = "SECONDS")]
    stop_timeout: Option<f64>,
    /// The uid the jailed process runs as (with --jail-gid; default
    /// 0x70000000 plus the pid).
    #[arg(long, value_name = "UID", requires = "jail_gid")]
    jail_uid: Option<u32>,
    /// The gid the jailed process runs as (with --jail-uid).
    #[arg(long, value_name = "GID", requires = "jail_uid")]
    jail_gid: Option<u32>,
}

fn config(a: Args) -> Result<VmConfig, VmError> {
    let mut cfg: serde_json::Value = match &a.config {
        Some(p) => {
            let text =
                std::fs::read(p).map_err(|e| VmError::Config(format!("{}: {e}", p.display())))?;
            serde_json::from_slice(&text)
                .map_err(|e| VmError::Config(format!("{}: {e}", p.display())))?
        }
        None => serde_json::json!({}),
    };
    let set = |cfg: &mut serde_json::Value, k: &str, v: serde_json::Value| {
        cfg[k] = v;
    };
    if let Some(k) = a.kernel {
        set(&mut cfg, "kernel", serde_json::json!(k));
    }
    if let Some(i) = a.initrd {
        set(&mut cfg, "initrd", serde_json::json!(i));
    }
    if let Some(c) = a.cmdline {
        set(&mut cfg, "cmdline", serde_json::json!(c));
    }
    if let Some(m) = a.mem {
        set(&mut cfg, "mem_mib", serde_json::json!(m));
    }
    if let Some(v) = a.vcpus {
        set(&mut cfg, "vcpus", serde_json::json!(v));
    }
    if let Some(s) = a.serial {
        set(&mut cfg, "serial", serde_json::json!(s));
    }
    if !a.disks.is_empty() {
        let disks: Vec<_> = a
            .disks
            .iter()
            .map(|d| match d.strip_suffix(",ro") {
                Some(p) => serde_json::json!({"path": p, "read_only": true}),
                None => serde_json::json!({"path": d}),
            })
            .collect();
        set(&mut cfg, "disks", serde_json::json!(disks));
    }
    if let Some(n) = &a.net {
        let mut net = serde_json::Map::new();
        for part in n.split(',') {
            let (k, v) = part.split_once('=').ok_or_else(|| {
                VmError::Config(format!(
                    "--net {n:?}: use tap=NAME[,netns=PATH][,mac=MAC] or fd=N[,mac=MAC]"
                ))
            })?;
            match k {
                "tap" | "netns" | "mac" => net.insert(k.to_owned(), serde_json::json!(v)),
                "fd" => {
                    let fd: i32 = v
                        .parse()
                        .map_err(|_| VmError::Config(format!("--net fd {v:?} is not a number")))?;
                    net.insert(k.to_owned(), serde_json::json!(fd))
                }
                _ => return Err(VmError::Config(format!("--net: unknown key {k:?}"))),
            };
        }
        set(&mut cfg, "net", serde_json::Value::Object(net));
    }
    if let Some(v) = &a.vsock {
        let mut m = serde_json::Map::new();
        for part in v.split(',') {
            match part.split_once('=') {
                Some(("cid", c)) => {
                    let cid: u64 = c.parse().map_err(|_| {
                        VmError::Config(format!("--vsock cid {c:?} is not a number"))
                    })?;
                    m.insert("cid".into(), serde_json::json!(cid));
                }
                Some(("uds", p)) => {
                    m.insert("uds".into(), serde_json::json!(p));
                }
                _ => {
                    return Err(VmError::Config(format!(
                        "--vsock {v:?}: use cid=N,uds=PATH"
                    )))
                }
            }
        }
        set(&mut cfg, "vsock", serde_json::Value::Object(m));
    }
    if !a.fs.is_empty() {
        let mut shares = Vec::new();
        for f in &a.fs {
            let mut m = serde_json::Map::new();
            for part in f.split(',') {
                match part.split_once('=') {
                    Some(("tag", t)) => m.insert("tag".into(), serde_json::json!(t)),
                    Some(("path", p)) => m.insert("path".into(), serde_json::json!(p)),
                    None if part == "ro" => m.insert("read_only".into(), serde_json::json!(true)),
                    None if part == "xattr" => m.insert("xattr".into(), serde_json::json!(true)),
                    _ => {
                        return Err(VmError::Config(format!(
                            "--fs {f:?}: use tag=TAG,path=DIR[,ro][,xattr]"
                        )))
                    }
                };
            }
            if !m.contains_key("tag") || !m.contains_key("path") {
                return Err(VmError::Config(format!(
                    "--fs {f:?}: give both tag= and path="
                )));
            }
            shares.push(serde_json::Value::Object(m));
        }
        set(&mut cfg, "fs", serde_json::json!(shares));
    }
    if let Some(t) = a.stop_timeout {
        if !(0.0..=3600.0).contains(&t) {
            return Err(VmError::Config(format!(
                "--stop-timeout {t}: use 0 to 3600 seconds"
            )));
        }
        set(
            &mut cfg,
            "stop_timeout_ms",
            serde_json::json!((t * 1000.0) as u64),
        );
    }
    if let (Some(uid), Some(gid)) = (a.jail_uid, a.jail_gid) {
        set(
            &mut cfg,
            "jail",
            serde_json::json!({"uid": uid, "gid": gid}),
        );
    }
    if a.no_rng {
        set(&mut cfg, "rng", serde_json::json!(false));
    }
    if a.pit {
        set(&mut cfg, "pit", serde_json::json!(true));
    }
    if cfg.get("kernel").is_none() {
        return Err(VmError::Config("no kernel: give --kernel FILE".into()));
    }
    serde_json::from_value(cfg).map_err(|e| VmError::Config(e.to_string()))
}

fn main() {
    let args = Args::parse();
    // SIGTERM or SIGINT: ask the guest to stop (ctrl-alt-del), then stop it.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    for sig in [signal_hook::consts::SIGTERM, signal_hook::consts::SIGINT] {
        let _ = signal_hook::flag::register(sig, stop.clone());
    }
    let result = config(args).and_then(|cfg| {
        husk_vmm::run(
            &cfg,
            || {
                eprintln!(
                    "{}",
                    serde_json::json!({"event": "running", "pid": std::process::id()})
                );
            },
            &stop,
        )
    });
    match result {
        Ok(exit) => {
            eprintln!(
                "{}",
                serde_json::json!({"event": "exit", "reason": exit.reason(), "status": exit.status()})
            );
            std::process::exit(exit.status());
        }
        Err(e) => {
            eprintln!("husk-vmm: {e}");
            eprintln!(
                "{}",
                serde_json::json!({"event": "exit", "reason": "error", "status": e.status(), "error": e.to_string()})
            );
            std::process::exit(e.status());
        }
    }
}
