//! A huskd of a test's own, serving the test's root.

use super::{husk_bin, Env};
use husk_tests::cri_channel;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use tonic::transport::Channel;

pub fn huskd_bin() -> PathBuf {
    husk_bin().with_file_name("huskd")
}

/// A huskd serving the test's root; killed (-9) on drop, as a crash would.
pub struct Huskd {
    pub child: Child,
    pub socket: PathBuf,
}

impl Huskd {
    pub fn start(env: &Env) -> Self {
        let socket = env.root().join("huskd.sock");
        let child = Command::new(huskd_bin())
            .arg("--root")
            .arg(env.root())
            .arg("--socket")
            .arg(&socket)
            .env_remove("HUSK_ROOT")
            .stdout(Stdio::null())
            .stderr(
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(env.root().join("huskd.log"))
                    .unwrap(),
            )
            .spawn()
            .unwrap();
        let t0 = Instant::now();
        while std::os::unix::net::UnixStream::connect(&socket).is_err() {
            assert!(
                t0.elapsed() < Duration::from_secs(20),
                "huskd did not start"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        Huskd { child, socket }
    }

    pub fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub async fn channel(&self) -> Channel {
        cri_channel(&self.socket).await
    }
}

impl Drop for Huskd {
    fn drop(&mut self) {
        self.kill9();
    }
}
