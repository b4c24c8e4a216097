#![doc = include_str!("../README.md")]

mod cache;
mod guest;
mod p1sock;

pub use cache::{CacheOutcome, CompiledGuest, GuestKind};
pub use guest::{GuestExit, GuestSpec, KillSwitch, Preopen};

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// How often the epoch advances. A guest in a busy loop notices a kill
/// request within one tick.
pub const EPOCH_TICK: Duration = Duration::from_millis(10);

/// Errors of the wasm engine. Each names the guest file it is about.
#[derive(Debug, thiserror::Error)]
pub enum WasmError {
    #[error("{path}: cannot read the guest file: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "{path}: not a WebAssembly module or component (expected the \\0asm header or WAT text)"
    )]
    NotWasm { path: PathBuf },
    #[error("{path}: invalid WebAssembly: {reason}")]
    Invalid { path: PathBuf, reason: String },
    #[error("compile cache {dir}: {source}")]
    Cache {
        dir: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot configure the wasm engine: {0}")]
    Engine(String),
    #[error("{what}: {reason}")]
    Setup { what: String, reason: String },
}

/// One wasmtime engine, its compile cache and its epoch ticker.
pub struct WasmEngine {
    engine: wasmtime::Engine,
    cache_dir: PathBuf,
    ticker_stop: Arc<AtomicBool>,
    /// Empty read-only directory behind the placeholders of p1 sockets.
    placeholder_dir: PathBuf,
    p1_helpers: std::sync::OnceLock<p1sock::Helpers>,
}

impl WasmEngine {
    /// Creates the engine with epoch interruption on and the compile cache in
    /// `cache_dir` (created if missing).
    pub fn new(cache_dir: &Path) -> Result<Self, WasmError> {
        let mut config = wasmtime::Config::new();
        config.epoch_interruption(true);
        config.wasm_component_model(true);
        let engine =
            wasmtime::Engine::new(&config).map_err(|e| WasmError::Engine(e.to_string()))?;
        std::fs::create_dir_all(cache_dir).map_err(|source| WasmError::Cache {
            dir: cache_dir.to_owned(),
            source,
        })?;
        let placeholder_dir = cache_dir.join(".empty");
        std::fs::create_dir_all(&placeholder_dir).map_err(|source| WasmError::Cache {
            dir: placeholder_dir.clone(),
            source,
        })?;
        let ticker_stop = Arc::new(AtomicBool::new(false));
        let weak = engine.weak();
        let stop = ticker_stop.clone();
        std::thread::Builder::new()
            .name("husk-epoch".into())
            .spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    std::thread::sleep(EPOCH_TICK);
                    match weak.upgrade() {
                        Some(engine) => engine.increment_epoch(),
                        None => break,
                    }
                }
            })
            .map_err(|e| WasmError::Engine(format!("cannot start the epoch ticker: {e}")))?;
        Ok(Self {
            engine,
            cache_dir: cache_dir.to_owned(),
            ticker_stop,
            placeholder_dir,
            p1_helpers: std::sync::OnceLock::new(),
        })
    }

    /// The underlying wasmtime engine.
    pub fn engine(&self) -> &wasmtime::Engine {
        &self.engine
    }

    /// Directory of the compile cache.
    pub fn cache_dir(&self) -> &Path {
        &self.cache_dir
    }
}

impl Drop for WasmEngine {
    fn drop(&mut self) {
        self.ticker_stop.store(true, Ordering::Relaxed);
    }
}
