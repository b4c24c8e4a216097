//! Why a sandbox call failed, in the terms CRI answers with: front ends
//! (huskd) choose the gRPC status from the [`Code`], never from the text.

use serde::{Deserialize, Serialize};

/// The kind of a failure, where it is one a caller acts on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Code {
    /// No such container in this pod.
    NotFound,
    /// A container of that name and attempt is already there.
    AlreadyExists,
    /// Not in a state that allows it (starting a started container,
    /// exec in one that does not run, a stopped sandbox).
    FailedPrecondition,
    /// It ran out of its time (an exec's timeout).
    DeadlineExceeded,
    /// This kind of sandbox cannot do it.
    Unimplemented,
    /// The request itself is wrong for this sandbox (mounts that cannot
    /// be laid out).
    InvalidArgument,
}

/// A failed sandbox call: a message for people, and its code when it has
/// one (otherwise the caller reports it as unknown).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Failure {
    pub code: Option<Code>,
    pub message: String,
}

impl Failure {
    pub fn new(code: Code, message: impl Into<String>) -> Self {
        Failure {
            code: Some(code),
            message: message.into(),
        }
    }

    /// `no container {id:?} in this pod`.
    pub fn no_container(id: &str) -> Self {
        Failure::new(Code::NotFound, format!("no container {id:?} in this pod"))
    }
}

impl From<String> for Failure {
    fn from(message: String) -> Self {
        Failure {
            code: None,
            message,
        }
    }
}

impl From<&str> for Failure {
    fn from(message: &str) -> Self {
        message.to_owned().into()
    }
}

impl From<Failure> for String {
    fn from(f: Failure) -> Self {
        f.message
    }
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}
