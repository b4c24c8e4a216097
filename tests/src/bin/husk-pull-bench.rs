//! Pull benchmark: a 200 MiB image of 5 layers in a docker-registry on
//! loopback, pulled by `husk pull` and copied by `skopeo copy` into an OCI
//! directory, in the same run, each into an empty destination; then the
//! time `husk unpack` takes to turn 5 tar layers of 200 MiB (1 MiB files)
//! into snapshots.
//! Run: `cargo run --release -p husk-tests --bin husk-pull-bench` (needs
//! docker-registry and skopeo: apt-get install docker-registry skopeo).

use husk_tests::{husk_at, run_ok, Registry};
use oci_client::client::{ClientConfig, ClientProtocol, Config, ImageLayer};
use oci_client::secrets::RegistryAuth;
use std::process::Command;
use std::time::{Duration, Instant};

const LAYERS: usize = 5;
const LAYER_MIB: usize = 40;
const RUNS: usize = 3;

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

/// Fills `buf` with incompressible bytes (xorshift64).
fn fill(buf: &mut [u8], x: &mut u64) {
    for chunk in buf.chunks_mut(8) {
        *x ^= *x << 13;
        *x ^= *x >> 7;
        *x ^= *x << 17;
        chunk.copy_from_slice(&x.to_le_bytes()[..chunk.len()]);
    }
}

fn push(name: &str, layers: &[ImageLayer], config: Config) {
    let client = oci_client::Client::new(ClientConfig {
        protocol: ClientProtocol::Http,
        ..Default::default()
    });
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
        .block_on(client.push(
            &name.parse().unwrap(),
            layers,
            config,
            &RegistryAuth::Anonymous,
            None,
        ))
        .expect("push");
}

fn main() {
    let reg = Registry::start();
    let name = format!("{}/bench/big:v1", reg.host());
    // Incompressible layers (a cheap xorshift stream).
    let mut x: u64 = 0x9e3779b97f4a7c15;
    let layers: Vec<ImageLayer> = (0..LAYERS)
        .map(|_| {
            let mut data = vec![0u8; LAYER_MIB << 20];
            fill(&mut data, &mut x);
            ImageLayer::new(
                data,
                "application/vnd.oci.image.layer.v1.tar+gzip".into(),
                None,
            )
        })
        .collect();
    let config = Config::new(
        b"{\"architecture\":\"amd64\",\"os\":\"linux\",\"rootfs\":{\"type\":\"layers\",\"diff_ids\":[]}}".to_vec(),
        "application/vnd.oci.image.config.v1+json".into(),
        None,
    );
    push(&name, &layers, config);
    drop(layers);
    let mut husk_times = Vec::new();
    let mut skopeo_times = Vec::new();
    for _ in 0..RUNS {
        let root = tempfile::tempdir().unwrap();
        let t0 = Instant::now();
        run_ok(husk_at(root.path()).args(["pull", "-q", &name]));
        husk_times.push(t0.elapsed());

        let dest = tempfile::tempdir().unwrap();
        let t0 = Instant::now();
        let out = Command::new("skopeo")
            .args(["copy", "-q", "--src-tls-verify=false"])
            .arg(format!("docker://{name}"))
            .arg(format!("oci:{}:v1", dest.path().join("oci").display()))
            .output()
            .expect("skopeo (apt-get install skopeo)");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        skopeo_times.push(t0.elapsed());
    }
    // Unpack: the same sizes as tar layers of 1 MiB files.
    let tar_name = format!("{}/bench/tars:v1", reg.host());
    let tars: Vec<ImageLayer> = (0..LAYERS)
        .map(|l| {
            let mut b = tar::Builder::new(Vec::new());
            for f in 0..LAYER_MIB {
                let mut data = vec![0u8; 1 << 20];
                fill(&mut data, &mut x);
                let mut h = tar::Header::new_gnu();
                h.set_size(data.len() as u64);
                h.set_mode(0o644);
                h.set_cksum();
                b.append_data(&mut h, format!("layer{l}/file{f}"), &data[..])
                    .unwrap();
            }
            ImageLayer::new(
                b.into_inner().unwrap(),
                "application/vnd.oci.image.layer.v1.tar".into(),
                None,
            )
        })
        .collect();
    push(
        &tar_name,
        &tars,
        Config::new(
            b"{\"architecture\":\"amd64\",\"os\":\"linux\",\"rootfs\":{\"type\":\"layers\",\"diff_ids\":[]}}".to_vec(),
            "application/vnd.oci.image.config.v1+json".into(),
            None,
        ),
    );
    drop(tars);
    let mut unpack_times = Vec::new();
    for _ in 0..RUNS {
        let root = tempfile::tempdir().unwrap();
        run_ok(husk_at(root.path()).args(["pull", "-q", &tar_name]));
        let t0 = Instant::now();
        run_ok(husk_at(root.path()).args(["unpack", &tar_name]));
        unpack_times.push(t0.elapsed());
    }
    let u = median(unpack_times);
    let (h, s) = (median(husk_times), median(skopeo_times));
    let mib = (LAYERS * LAYER_MIB) as f64;
    println!(
        "pull of {mib} MiB in {LAYERS} layers from a loopback registry (median of {RUNS}): husk {:.2} s ({:.0} MiB/s), skopeo copy {:.2} s ({:.0} MiB/s)",
        h.as_secs_f64(),
        mib / h.as_secs_f64(),
        s.as_secs_f64(),
        mib / s.as_secs_f64()
    );
    println!(
        "unpack of {mib} MiB in {LAYERS} tar layers (1 MiB files) into snapshots (median of {RUNS}): {:.2} s ({:.0} MiB/s)",
        u.as_secs_f64(),
        mib / u.as_secs_f64()
    );
}
