//! Image references, normalised as Docker does: `busybox` is
//! `docker.io/library/busybox:latest`; `host:5000/ns/name:tag` and
//! `name@sha256:…` keep their registry and digest.

use crate::ImageError;
use oci_client::Reference;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageRef(Reference);

impl ImageRef {
    pub fn parse(input: &str) -> Result<Self, ImageError> {
        let bad = |reason: String| ImageError::BadReference {
            input: input.to_owned(),
            reason,
        };
        if input.is_empty() || input.trim() != input {
            return Err(bad("empty or surrounded by spaces".into()));
        }
        let r: Reference = input.parse().map_err(|e| bad(format!("{e}")))?;
        let repo_ok = r.repository().split('/').all(|c| {
            !c.is_empty()
                && c.bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"._-".contains(&b))
        });
        if !repo_ok {
            return Err(bad(format!(
                "repository {:?} must be lowercase letters, digits, '.', '_', '-' and '/'",
                r.repository()
            )));
        }
        if let Some(d) = r.digest() {
            if !is_sha256(d) {
                return Err(bad(format!("digest {d:?} is not sha256:<64 hex digits>")));
            }
        }
        Ok(ImageRef(r))
    }

    /// The normalised reference: `registry/repository[:tag][@digest]`.
    pub fn name(&self) -> String {
        self.0.whole()
    }

    /// Registry host as written (`docker.io` for Docker Hub).
    pub fn registry(&self) -> &str {
        self.0.registry()
    }

    pub fn repository(&self) -> &str {
        self.0.repository()
    }

    pub fn tag(&self) -> Option<&str> {
        self.0.tag()
    }

    pub fn digest(&self) -> Option<&str> {
        self.0.digest()
    }

    /// The same repository at `digest`.
    pub fn with_digest(&self, digest: &str) -> Self {
        ImageRef(Reference::with_digest(
            self.0.registry().to_owned(),
            self.0.repository().to_owned(),
            digest.to_owned(),
        ))
    }

    pub(crate) fn inner(&self) -> &Reference {
        &self.0
    }

    /// Whether the registry is on this machine (plain HTTP by default).
    pub fn is_loopback(&self) -> bool {
        is_loopback_host(self.registry())
    }
}

impl std::fmt::Display for ImageRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.name())
    }
}

/// Whether `registry` (`host[:port]`) is this machine.
pub fn is_loopback_host(registry: &str) -> bool {
    let host = registry.rsplit_once(':').map_or(registry, |h| h.0);
    matches!(host, "localhost" | "[::1]") || host.starts_with("127.")
}

/// `sha256:` followed by 64 lowercase hex digits.
pub fn is_sha256(d: &str) -> bool {
    d.strip_prefix("sha256:").is_some_and(|h| {
        h.len() == 64
            && h.bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normalises_like_docker() {
        let r = ImageRef::parse("busybox").unwrap();
        assert_eq!(r.name(), "docker.io/library/busybox:latest");
        let r = ImageRef::parse("127.0.0.1:5000/ns/app:v1").unwrap();
        assert_eq!(r.name(), "127.0.0.1:5000/ns/app:v1");
        assert!(r.is_loopback());
        assert_eq!(r.registry(), "127.0.0.1:5000");
        assert_eq!(r.repository(), "ns/app");
        let d = format!("sha256:{}", "a".repeat(64));
        let r = ImageRef::parse(&format!("localhost:5000/app@{d}")).unwrap();
        assert_eq!(r.digest(), Some(d.as_str()));
        assert!(!ImageRef::parse("quay.io/x/y").unwrap().is_loopback());
    }

    #[test]
    fn rejects_bad_syntax() {
        for bad in [
            "",
            " busybox",
            "UPPER/case",
            "a@sha256:xyz",
            "a:b:c:d",
            "app@md5:abc",
        ] {
            assert!(ImageRef::parse(bad).is_err(), "{bad:?} accepted");
        }
    }
}
