//! husk's front ends as a library: the CLI verbs, the monitor and its
//! control socket, shared by the `husk` and `huskd` binaries.

pub mod cli;
pub mod control;
pub mod monitor;
