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
}

pub fn run(roots: &Roots, a: InfoArgs) -> i32 {
    let config = match HuskConfig::load(&roots.config_file()) {
        Ok(c) => c,
        Err(e) => return super::fail(super::EXIT_USAGE, e),
    };
    let (hypervisor, reason) = choose_hypervisor(&config.vm);
    let hypervisor = hypervisor.name();
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
