//! The compile cache: turns a guest file into compiled code, reusing the
//! serialized artifact stored under the cache dir when its key matches. The
//! key is the sha256 of the (binary) guest plus wasmtime's precompile
//! compatibility hash, so an engine upgrade never loads stale code. It must
//! not run guests.

use crate::{WasmEngine, WasmError};
use sha2::{Digest, Sha256};
use std::hash::{Hash, Hasher};
use std::io::Write;
use std::path::{Path, PathBuf};

/// Whether a guest is a core module (WASI preview1) or a component
/// (WASI preview2 `wasi:cli/command`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GuestKind {
    Module,
    Component,
}

impl GuestKind {
    /// Detects the kind from a binary's header.
    pub fn detect(bytes: &[u8]) -> Option<Self> {
        if bytes.len() < 8 || &bytes[0..4] != b"\0asm" {
            return None;
        }
        match bytes[4..8] {
            [1, 0, 0, 0] => Some(GuestKind::Module),
            [_, _, 1, 0] => Some(GuestKind::Component),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            GuestKind::Module => "wasi-p1-module",
            GuestKind::Component => "wasi-p2-component",
        }
    }
}

/// Whether compiled code came from the cache or was compiled now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CacheOutcome {
    Hit,
    Compiled,
}

/// Compiled guest code, ready to instantiate any number of times.
#[derive(Clone)]
pub enum CompiledGuest {
    Module(wasmtime::Module),
    Component(wasmtime::component::Component),
}

impl CompiledGuest {
    pub fn kind(&self) -> GuestKind {
        match self {
            CompiledGuest::Module(_) => GuestKind::Module,
            CompiledGuest::Component(_) => GuestKind::Component,
        }
    }
}

/// Reads a guest file and returns its binary form: `.wasm` bytes as they are,
/// WAT text converted. Fails with [`WasmError::NotWasm`] for anything else.
pub fn read_guest_binary(path: &Path) -> Result<Vec<u8>, WasmError> {
    let bytes = std::fs::read(path).map_err(|source| WasmError::Read {
        path: path.to_owned(),
        source,
    })?;
    if bytes.starts_with(b"\0asm") {
        return Ok(bytes);
    }
    let text = std::str::from_utf8(&bytes).map_err(|_| WasmError::NotWasm {
        path: path.to_owned(),
    })?;
    let trimmed = text.trim_start();
    let looks_like_wat = trimmed.starts_with('(') || trimmed.starts_with(";;");
    if !looks_like_wat {
        return Err(WasmError::NotWasm {
            path: path.to_owned(),
        });
    }
    wat::parse_str(text).map_err(|e| WasmError::Invalid {
        path: path.to_owned(),
        reason: e.to_string(),
    })
}

impl WasmEngine {
    /// Checks that `path` holds a well-formed WebAssembly module or
    /// component without compiling it (a file cut short or corrupted is
    /// caught here). Used to validate a pod before anything is created;
    /// every proposal is accepted here, the engine's compile decides.
    pub fn check_guest_file(path: &Path) -> Result<GuestKind, WasmError> {
        let bytes = read_guest_binary(path)?;
        let kind = GuestKind::detect(&bytes).ok_or_else(|| WasmError::NotWasm {
            path: path.to_owned(),
        })?;
        wasmparser::Validator::new_with_features(wasmparser::WasmFeatures::all())
            .validate_all(&bytes)
            .map_err(|e| WasmError::Invalid {
                path: path.to_owned(),
                reason: e.to_string(),
            })?;
        Ok(kind)
    }

    /// The cache file a given binary compiles to.
    pub fn cache_path_for(&self, binary: &[u8]) -> PathBuf {
        let digest = hex::encode(Sha256::digest(binary));
        let mut h = std::collections::hash_map::DefaultHasher::new();
        self.engine.precompile_compatibility_hash().hash(&mut h);
        self.cache_dir
            .join(format!("{digest}-{:016x}.cwasm", h.finish()))
    }

    /// Loads a guest, from the compile cache when possible.
    pub fn load(&self, path: &Path) -> Result<(CompiledGuest, CacheOutcome), WasmError> {
        let binary = read_guest_binary(path)?;
        let kind = GuestKind::detect(&binary).ok_or_else(|| WasmError::NotWasm {
            path: path.to_owned(),
        })?;
        let cached = self.cache_path_for(&binary);
        if cached.exists() {
            if let Some(guest) = self.deserialize(kind, &cached) {
                return Ok((guest, CacheOutcome::Hit));
            }
            // Unreadable or incompatible artifact: recompile over it.
            tracing::warn!(file = %cached.display(), "discarding unusable compile cache entry");
        }
        let invalid = |e: wasmtime::Error| WasmError::Invalid {
            path: path.to_owned(),
            reason: format!("{e:#}"),
        };
        let (guest, serialized) = match kind {
            GuestKind::Module => {
                let m = wasmtime::Module::new(&self.engine, &binary).map_err(invalid)?;
                let bytes = m.serialize().map_err(invalid)?;
                (CompiledGuest::Module(m), bytes)
            }
            GuestKind::Component => {
                let c =
                    wasmtime::component::Component::new(&self.engine, &binary).map_err(invalid)?;
                let bytes = c.serialize().map_err(invalid)?;
                (CompiledGuest::Component(c), bytes)
            }
        };
        self.store_artifact(&cached, &serialized)?;
        Ok((guest, CacheOutcome::Compiled))
    }

    fn deserialize(&self, kind: GuestKind, file: &Path) -> Option<CompiledGuest> {
        match (kind, wasmtime::Engine::detect_precompiled_file(file).ok()??) {
            (GuestKind::Module, wasmtime::Precompiled::Module) => {
                // SAFETY: the artifact was produced by `Module::serialize` of
                // this engine configuration and written atomically into
                // husk's root-owned cache dir; the compatibility hash in its
                // name and wasmtime's own header check guard against a
                // different engine.
                unsafe { wasmtime::Module::deserialize_file(&self.engine, file) }
                    .ok()
                    .map(CompiledGuest::Module)
            }
            (GuestKind::Component, wasmtime::Precompiled::Component) => {
                // SAFETY: as above, written by `Component::serialize` of this
                // engine into husk's own cache dir.
                unsafe { wasmtime::component::Component::deserialize_file(&self.engine, file) }
                    .ok()
                    .map(CompiledGuest::Component)
            }
            _ => None,
        }
    }

    fn store_artifact(&self, dest: &Path, bytes: &[u8]) -> Result<(), WasmError> {
        let cache_err = |source| WasmError::Cache {
            dir: self.cache_dir.clone(),
            source,
        };
        let mut tmp = tempfile_in(&self.cache_dir).map_err(cache_err)?;
        tmp.1.write_all(bytes).map_err(cache_err)?;
        tmp.1.sync_all().map_err(cache_err)?;
        std::fs::rename(&tmp.0, dest).map_err(|e| {
            let _ = std::fs::remove_file(&tmp.0);
            cache_err(e)
        })
    }
}

fn tempfile_in(dir: &Path) -> std::io::Result<(PathBuf, std::fs::File)> {
    let name = format!(
        ".tmp-{}-{:x}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0)
    );
    let path = dir.join(name);
    let file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&path)?;
    Ok((path, file))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn detects_kinds() {
        assert_eq!(
            GuestKind::detect(b"\0asm\x01\0\0\0"),
            Some(GuestKind::Module)
        );
        assert_eq!(
            GuestKind::detect(b"\0asm\x0d\0\x01\0"),
            Some(GuestKind::Component)
        );
        assert_eq!(GuestKind::detect(b"#!/bin/sh\n"), None);
    }

    #[test]
    fn second_load_hits_the_cache() {
        let dir = tempfile::tempdir().unwrap();
        let engine = WasmEngine::new(&dir.path().join("cache")).unwrap();
        let guest = dir.path().join("g.wat");
        std::fs::write(&guest, r#"(module (func (export "_start")))"#).unwrap();
        let (_, first) = engine.load(&guest).unwrap();
        let (_, second) = engine.load(&guest).unwrap();
        assert_eq!(first, CacheOutcome::Compiled);
        assert_eq!(second, CacheOutcome::Hit);
    }

    #[test]
    fn rejects_non_wasm() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("x.wasm");
        std::fs::write(&f, "hello world").unwrap();
        assert!(matches!(
            WasmEngine::check_guest_file(&f),
            Err(WasmError::NotWasm { .. })
        ));
    }
}
