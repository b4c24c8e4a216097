#![doc = include_str!("../README.md")]

mod attach;
pub mod cgroup;
pub mod config;
pub mod cri_log;
pub mod dns;
pub mod failure;
pub mod lifecycle;
pub mod network;
pub mod pod;
pub mod recovery;
pub mod state;
pub mod vm;
pub mod volume;
pub mod wasm;

pub use failure::{Code, Failure};
pub use husk_protocol::{Tool, TtySize};
pub use vm::sandbox::VmSandbox;
pub use wasm::{
    ContainerUsage, ExecMsg, ExecOutput, ExecSession, ExecSpec, Killer, PodStats, Resizer, Sandbox,
    SandboxError, StdinWriter, VmUsage, WasmSandbox,
};
