//! husk's image store: OCI images by content digest under the persistent
//! state dir, pulled from registries through the OCI distribution API
//! (oci-client), verified while streaming, written atomically, with layers
//! shared between images. Both sandboxes take their images from here: wasm
//! pods the wasm layer of a wasm artifact, VM pods (later) unpacked layers.

pub mod archive;
pub mod auth;
pub mod manifest;
pub mod progress;
pub mod pull;
pub mod reference;
pub mod store;
pub mod unpack;

pub use progress::Progress;
pub use pull::{pull, PullOptions, PullReport, Want};
pub use reference::ImageRef;
pub use store::{Descriptor, ImageRecord, RemoveReport, Store};
pub use unpack::{layer_image_path, RunConfig};

use std::path::PathBuf;

/// Media types of a layer that is a wasm module or component.
pub const WASM_LAYER_TYPES: &[&str] = &[
    "application/wasm",
    "application/vnd.wasm.content.layer.v1+wasm",
    "application/vnd.bytecodealliance.wasm.component.layer.v0+wasm",
];

/// Errors of the image store and of pulls. Each names the image or file.
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    #[error("invalid image reference {input:?}: {reason}")]
    BadReference { input: String, reason: String },
    #[error("{reference}: {reason}")]
    Registry { reference: String, reason: String },
    #[error("{reference}: not found in the registry (check the name and tag)")]
    NotFound { reference: String },
    #[error("{reference}: blob {digest} does not match its digest (got {got}); the download was discarded")]
    DigestMismatch {
        reference: String,
        digest: String,
        got: String,
    },
    #[error("{reference}: no image for {wanted} in the index (it has: {available})")]
    NoPlatform {
        reference: String,
        wanted: String,
        available: String,
    },
    #[error("{reference}: unsupported digest {digest:?} (only sha256 is supported)")]
    BadDigest { reference: String, digest: String },
    #[error("image store {path}: {source}")]
    Store {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("no such image: {0} (see `husk images`, or `husk pull` it)")]
    UnknownImage(String),
    #[error("{path}: {msg}")]
    Archive { path: PathBuf, msg: String },
    #[error("layer {layer}: {msg}; the layer was not unpacked")]
    Hostile { layer: String, msg: String },
    #[error("image {image} is used by pod {pods}; remove the pod first or use rmi -f")]
    InUse { image: String, pods: String },
}

impl ImageError {
    /// Whether this is the user's input being wrong (exit status 2).
    pub fn is_usage(&self) -> bool {
        matches!(self, ImageError::BadReference { .. })
    }
}

pub(crate) fn store_err(path: impl Into<PathBuf>) -> impl FnOnce(std::io::Error) -> ImageError {
    let path = path.into();
    move |source| ImageError::Store { path, source }
}
