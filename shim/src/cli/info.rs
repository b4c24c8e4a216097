//! `husk info`: what this host runs pods with: the runtime classes, which
//! hypervisor VM pods get and why, and where the guest kernel and agent
//! come from.

use husk_sandbox::config::HuskConfig;
use husk_sandbox::state::Roots;
use husk_sandbox::vm::sandbox::{choose_hypervisor, guest_files};

#[derive(clap::Args)]
pub struct InfoArgs {
    /// Output format: text or json.
    #[arg(long, default_value = "text")]
    format: String,
    /// Also probe-boot the guest kernel under husk-vmm now (as `auto` does
    /// on a host whose KVM is not kvm-pvm), or show the cached answer.
    #[arg(long)]
    probe: bool,
}

pub fn run(roots: &Roots, a: InfoArgs) -> i32 {
    let config = match HuskConfig::load(&roots.config_file()) {
        Ok(c) => c,
        Err(e) => return super::fail(super::EXIT_USAGE, e),
    };
    let (hypervisor, reason) = choose_hypervisor(&config.vm, &roots.lib);
    let hypervisor = hypervisor.name();
    let probe = a
        .probe
        .then(|| husk_sandbox::vm::probe::husk_vmm(&config.vm, &roots.lib));
    let files = guest_files(&config.vm);
    let (kernel, agent, problem) = match &files {
        Ok((k, a)) => (k.display().to_string(), a.display().to_string(), None),
        Err(e) => (String::new(), String::new(), Some(e.to_string())),
    };
    let v = serde_json::json!({
        "version": env!("CARGO_PKG_VERSION"),
        "runtimeClasses": ["husk-wasm", "husk-vm"],
        "vm": {
            "hypervisor": hypervisor,
            "reason": reason,
            "kernel": kernel,
            "agent": agent,
            "ready": problem.is_none(),
            "problem": problem,
        },
    });
    let mut v = v;
    if let Some(p) = &probe {
        v["vm"]["probe"] = serde_json::json!({
            "hypervisor": "husk-vmm",
            "ok": p.ok,
            "detail": p.detail,
            "cached": p.cached,
        });
    }
    match a.format.as_str() {
        "json" => println!("{v:#}"),
        "text" => {
            println!("husk {}", env!("CARGO_PKG_VERSION"));
            println!("runtime classes: husk-wasm, husk-vm");
            println!("VM pods: {hypervisor} ({reason})");
            match &problem {
                None => {
                    println!("  kernel: {kernel}");
                    println!("  agent:  {agent}");
                }
                Some(p) => println!("  not ready: {p}"),
            }
            if let Some(p) = &probe {
                println!(
                    "husk-vmm probe-boot: {} ({}{})",
                    if p.ok { "passed" } else { "failed" },
                    p.detail,
                    if p.cached { ", cached" } else { "" }
                );
            }
        }
        other => {
            return super::fail(
                super::EXIT_USAGE,
                format!("--format {other:?}: use text or json"),
            )
        }
    }
    0
}
