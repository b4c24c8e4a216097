//! The pod model: Kubernetes manifests in, a validated [`PodPlan`] out.

pub mod manifest;
pub mod plan;
pub mod quantity;
pub mod seccomp;
pub mod spec;
pub mod strict;

pub use manifest::{
    is_file_image, load_manifest_file, parse_manifest, ImageResolver, LinuxImage, ManifestError,
    ManifestSource,
};
pub use plan::*;
pub use spec::RestartPolicy;
