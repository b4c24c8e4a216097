//! husk's front ends as a library: the CLI verbs, the monitor and its
//! control socket, shared by the `husk` and `huskd` binaries.

pub mod cli;
pub mod control;
pub mod monitor;

/// Diagnostics that never take the process down: a full disk under
/// monitor.log (or a closed stderr) must not panic the monitor before it
/// releases what it holds, and tracing-subscriber panics (through
/// `eprintln!`) when its writer fails.
pub mod diag {
    use std::io::Write;

    /// stderr, whose write errors are dropped.
    pub struct LossyStderr;

    impl Write for LossyStderr {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            let _ = std::io::stderr().write_all(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    /// tracing to stderr at `HUSK_LOG` (default info), lossily.
    pub fn init_tracing() {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::new(
                std::env::var("HUSK_LOG").unwrap_or_else(|_| "info".into()),
            ))
            .with_writer(|| LossyStderr)
            .try_init();
    }
}
