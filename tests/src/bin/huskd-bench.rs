//! huskd's benchmark, through its CRI socket with a Rust CRI client:
//! RunPodSandbox + CreateContainer + StartContainer latency (until the
//! container runs), p50/p99 over 30 pods; sustained churn (run, create,
//! start, stop, remove) in pods per second over 40 pods one after another; and huskd's
//! idle memory (RSS and PSS) with those pods gone. The same for the
//! husk-vm handler (fewer pods: each boots a microVM, under QEMU/TCG on a
//! PVM host), its container a shell in the guest.
//! Run: `cargo run --release -p husk-tests --bin huskd-bench` (as root;
//! needs docker-registry and the CNI plugins).

use husk_tests::{cri_channel, oci_client, rt, Registry};
use k8s_cri::v1 as cri;
use k8s_cri::v1::image_service_client::ImageServiceClient;
use k8s_cri::v1::runtime_service_client::RuntimeServiceClient;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};
use tonic::transport::Channel;

fn pct(v: &mut [Duration], p: f64) -> Duration {
    v.sort();
    let i = ((v.len() as f64 - 1.0) * p).round() as usize;
    v[i]
}

fn ms(d: Duration) -> String {
    format!("{:.1} ms", d.as_secs_f64() * 1e3)
}

fn bin(name: &str) -> PathBuf {
    std::env::current_exe().unwrap().with_file_name(name)
}

fn kib(pid: u32, key: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup"))
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with(key))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

fn sandbox(i: usize, logs: &Path) -> cri::PodSandboxConfig {
    cri::PodSandboxConfig {
        metadata: Some(cri::PodSandboxMetadata {
            name: format!("bench-{i}"),
            uid: format!("uid-{i}"),
            namespace: "bench".into(),
            attempt: 0,
        }),
        log_directory: logs.join(i.to_string()).display().to_string(),
        ..Default::default()
    }
}

const WASM: &str = "husk-wasm";
const VM: &str = "husk-vm";

fn container(image: &str, handler: &str) -> cri::ContainerConfig {
    let (command, args) = if handler == VM {
        (
            vec!["/bin/sh".into(), "-c".into(), "exec sleep 600".into()],
            vec![],
        )
    } else {
        (vec![], vec!["stdin".into()])
    };
    cri::ContainerConfig {
        command,
        metadata: Some(cri::ContainerMetadata {
            name: "c".into(),
            attempt: 0,
        }),
        image: Some(cri::ImageSpec {
            image: image.into(),
            ..Default::default()
        }),
        args,
        log_path: "c_0.log".into(),
        ..Default::default()
    }
}

/// Run + create + start; returns (pod, container, time until running).
async fn start_one(
    rs: &mut RuntimeServiceClient<Channel>,
    i: usize,
    image: &str,
    handler: &str,
    logs: &Path,
) -> (String, String, Duration) {
    let t0 = Instant::now();
    let cfg = sandbox(i, logs);
    let pod = rs
        .run_pod_sandbox(cri::RunPodSandboxRequest {
            config: Some(cfg.clone()),
            runtime_handler: handler.into(),
        })
        .await
        .unwrap()
        .into_inner()
        .pod_sandbox_id;
    let c = rs
        .create_container(cri::CreateContainerRequest {
            pod_sandbox_id: pod.clone(),
            config: Some(container(image, handler)),
            sandbox_config: Some(cfg),
        })
        .await
        .unwrap()
        .into_inner()
        .container_id;
    rs.start_container(cri::StartContainerRequest {
        container_id: c.clone(),
    })
    .await
    .unwrap();
    (pod, c, t0.elapsed())
}

async fn remove_one(rs: &mut RuntimeServiceClient<Channel>, pod: String, c: String, timeout: i64) {
    rs.stop_container(cri::StopContainerRequest {
        container_id: c.clone(),
        timeout,
    })
    .await
    .unwrap();
    rs.remove_container(cri::RemoveContainerRequest { container_id: c })
        .await
        .unwrap();
    rs.stop_pod_sandbox(cri::StopPodSandboxRequest {
        pod_sandbox_id: pod.clone(),
    })
    .await
    .unwrap();
    rs.remove_pod_sandbox(cri::RemovePodSandboxRequest {
        pod_sandbox_id: pod,
    })
    .await
    .unwrap();
}

fn main() {
    let reg = Registry::start();
    let image = format!("{}/bench/probe:v1", reg.host());
    let wasm = std::fs::read(Path::new(env!("HUSK_TEST_GUESTS")).join("probe.wasm")).unwrap();
    rt().block_on(oci_client().push(
        &image.parse().unwrap(),
        &[oci_client::client::ImageLayer::new(
            wasm,
            "application/wasm".into(),
            None,
        )],
        oci_client::client::Config::new(
            br#"{"architecture":"wasm","os":"wasip1"}"#.to_vec(),
            "application/vnd.wasm.config.v0+json".into(),
            None,
        ),
        &oci_client::secrets::RegistryAuth::Anonymous,
        None,
    ))
    .unwrap();
    let busybox = husk_tests::push_busybox_image(&reg, "bench/busybox:v1");

    let dir = tempfile::tempdir().unwrap();
    let bridge = format!("hkb{}", std::process::id() % 100000);
    std::fs::write(
        dir.path().join("config.toml"),
        format!(
            "[network]\ncni_conf_dir = \"{}\"\nbridge = \"{bridge}\"\nsubnet = \"10.151.0.0/24\"\nname = \"{bridge}\"\n[vm]\nagent = \"{}\"\nkernel = \"{}\"\n",
            dir.path().join("net.d").display(),
            husk_tests::static_agent().display(),
            husk_tests::images_dir().join("kernel-b.bzImage").display()
        ),
    )
    .unwrap();
    let sock = dir.path().join("huskd.sock");
    let mut huskd = Command::new(bin("huskd"))
        .arg("--root")
        .arg(dir.path())
        .arg("--socket")
        .arg(&sock)
        .env_remove("HUSK_ROOT")
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    while std::os::unix::net::UnixStream::connect(&sock).is_err() {
        std::thread::sleep(Duration::from_millis(10));
    }
    let logs = dir.path().join("logs");
    rt().block_on(async {
        let ch = cri_channel(&sock).await;
        let mut rs = RuntimeServiceClient::new(ch.clone());
        for image in [&image, &busybox] {
            ImageServiceClient::new(ch.clone())
                .pull_image(cri::PullImageRequest {
                    image: Some(cri::ImageSpec {
                        image: image.clone(),
                        ..Default::default()
                    }),
                    ..Default::default()
                })
                .await
                .unwrap();
        }

        // Latency: one pod at a time, 30 pods (removed after).
        let mut lat = Vec::new();
        let mut made = Vec::new();
        for i in 0..30 {
            let (p, c, d) = start_one(&mut rs, i, &image, WASM, &logs).await;
            lat.push(d);
            made.push((p, c));
        }
        println!(
            "RunPodSandbox + CreateContainer + StartContainer (husk-wasm, 30 pods): p50 {} p99 {}",
            ms(pct(&mut lat, 0.5)),
            ms(pct(&mut lat, 0.99))
        );
        let pid = huskd.id();
        println!(
            "huskd memory with 30 pods running: RSS {:.1} MiB, PSS {:.1} MiB",
            kib(pid, "Rss:") as f64 / 1024.0,
            kib(pid, "Pss:") as f64 / 1024.0
        );
        for (p, c) in made {
            remove_one(&mut rs, p, c, 10).await;
        }

        // Churn: full lifecycles back to back, 40 pods.
        let t0 = Instant::now();
        let n = 40;
        for i in 100..100 + n {
            let (p, c, _) = start_one(&mut rs, i, &image, WASM, &logs).await;
            remove_one(&mut rs, p, c, 10).await;
        }
        let el = t0.elapsed();
        println!(
            "sustained churn (husk-wasm; run, create, start, stop, remove; {n} pods one after another): {:.1} pods/s",
            n as f64 / el.as_secs_f64()
        );

        // husk-vm: each sandbox boots a VM; 10 pods one at a time, then
        // a churn of 5.
        let mut lat = Vec::new();
        let mut made = Vec::new();
        for i in 200..210 {
            let (p, c, d) = start_one(&mut rs, i, &busybox, VM, &logs).await;
            lat.push(d);
            made.push((p, c));
            // One VM at a time: the next boot does not share the CPUs.
            let (p, c) = made.pop().unwrap();
            remove_one(&mut rs, p, c, 0).await;
        }
        println!(
            "RunPodSandbox + CreateContainer + StartContainer (husk-vm, 10 pods): p50 {} p99 {}",
            ms(pct(&mut lat, 0.5)),
            ms(pct(&mut lat, 0.99))
        );
        let t0 = Instant::now();
        let n = 5;
        for i in 300..300 + n {
            let (p, c, _) = start_one(&mut rs, i, &busybox, VM, &logs).await;
            remove_one(&mut rs, p, c, 0).await;
        }
        println!(
            "sustained churn (husk-vm; run, create, start, stop, remove; {n} pods one after another): {:.2} pods/s",
            n as f64 / t0.elapsed().as_secs_f64()
        );
    });
    std::thread::sleep(Duration::from_millis(500));
    let pid = huskd.id();
    println!(
        "huskd idle (after the pods are gone): RSS {:.1} MiB, PSS {:.1} MiB",
        kib(pid, "Rss:") as f64 / 1024.0,
        kib(pid, "Pss:") as f64 / 1024.0
    );
    let _ = huskd.kill();
    let _ = huskd.wait();
    let _ = Command::new("ip").args(["link", "del", &bridge]).output();
}
