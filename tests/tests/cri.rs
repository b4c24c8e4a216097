//! huskd end to end: a Rust CRI v1 client (k8s-cri over tonic) drives the
//! real huskd over its unix socket, which runs real pod monitors, CNI and
//! wasmtime; images come from a real registry on loopback.

mod common;
mod kubeapi;
/// huskd's SPDY/3.1 codec, for a client of the tunneled port-forward (no
/// client here speaks it: Debian's kubectl predates the tunnel).
#[allow(dead_code)]
#[path = "../../shim/src/huskd/spdy.rs"]
mod spdy;
use common::huskd::Huskd;
use common::*;
use husk_tests::{push_wasm, rt, Registry};
use k8s_cri::v1 as cri;
use k8s_cri::v1::image_service_client::ImageServiceClient;
use k8s_cri::v1::runtime_service_client::RuntimeServiceClient;
use std::collections::HashMap;
use std::path::Path;
use std::time::{Duration, Instant};
use tonic::transport::Channel;

fn push_probe(reg: &Registry, name: &str) -> String {
    push_wasm(reg, name, &probe())
}

/// A small Linux image whose config runs as `user`.
fn push_user_image(reg: &Registry, name: &str, user: &str) -> String {
    let layer = husk_tests::layer_tar(&[("etc/user", 0o644, Ok(user.as_bytes()))]);
    husk_tests::push_linux_image(reg, name, vec![layer], serde_json::json!({ "User": user }))
}

/// Pulls `image`; its image ref.
async fn pull(is: &mut ImageServiceClient<Channel>, image: &str) -> String {
    is.pull_image(cri::PullImageRequest {
        image: Some(cri::ImageSpec {
            image: image.to_owned(),
            ..Default::default()
        }),
        ..Default::default()
    })
    .await
    .unwrap()
    .into_inner()
    .image_ref
}

/// A PortForward URL for `port` of sandbox `pod`.
async fn forward_url(rs: &mut RuntimeServiceClient<Channel>, pod: &str, port: i32) -> String {
    rs.port_forward(cri::PortForwardRequest {
        pod_sandbox_id: pod.to_owned(),
        port: vec![port],
    })
    .await
    .unwrap()
    .into_inner()
    .url
}

/// How many threads of process `pid` have this name.
fn threads_named(pid: u32, name: &str) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/task"))
        .map(|d| {
            d.flatten()
                .filter(|t| {
                    std::fs::read_to_string(t.path().join("comm")).is_ok_and(|c| c.trim() == name)
                })
                .count()
        })
        .unwrap_or(0)
}

/// critest's image with a predefined group: busybox, user 1000
/// (default-user) who is a member of group 50000 in /etc/group.
fn push_group_image(reg: &Registry, name: &str) -> String {
    let busybox = std::fs::read("/bin/busybox").expect("/bin/busybox (busybox-static)");
    let layer = husk_tests::layer_tar(&[
        ("bin/busybox", 0o755, Ok(&busybox)),
        ("bin/sh", 0o777, Err("busybox")),
        (
            "etc/passwd",
            0o644,
            Ok(b"root:x:0:0:root:/root:/bin/sh\ndefault-user:x:1000:1000::/home:/bin/sh\n"),
        ),
        (
            "etc/group",
            0o644,
            Ok(b"root:x:0:\ndefault-user:x:1000:\ngroup-defined-in-image:x:50000:default-user\n"),
        ),
    ]);
    husk_tests::push_linux_image(
        reg,
        name,
        vec![layer],
        serde_json::json!({"User": "1000", "Env": ["PATH=/bin"]}),
    )
}

/// ImageStatus reports the user an image's config names (a uid, or a
/// name; a group is not the user), and an image pulled by digest lists
/// that digest and no tag.
async fn image_users_and_digests(
    is: &mut ImageServiceClient<Channel>,
    users: &[(String, Option<i64>, &str)],
) {
    let spec = |image: &str| {
        Some(cri::ImageSpec {
            image: image.into(),
            ..Default::default()
        })
    };
    let mut ids = Vec::new();
    for (image, uid, name) in users {
        let id = pull(is, image).await;
        let st = is
            .image_status(cri::ImageStatusRequest {
                image: spec(image),
                verbose: false,
            })
            .await
            .unwrap()
            .into_inner()
            .image
            .unwrap();
        assert_eq!(st.uid.map(|u| u.value), *uid, "{image}: {st:?}");
        assert_eq!(st.username, *name, "{image}: {st:?}");
        assert_eq!(st.repo_tags, std::slice::from_ref(image));
        ids.push((image.clone(), id));
    }
    // The first again, by digest only.
    let (tagged, id) = &ids[0];
    is.remove_image(cri::RemoveImageRequest {
        image: spec(tagged),
    })
    .await
    .unwrap();
    let by_digest = format!("{}@{id}", tagged.rsplit_once(':').unwrap().0);
    let got = pull(is, &by_digest).await;
    assert_eq!(&got, id);
    let st = is
        .image_status(cri::ImageStatusRequest {
            image: spec(&by_digest),
            verbose: false,
        })
        .await
        .unwrap()
        .into_inner()
        .image
        .unwrap();
    assert!(st.repo_tags.is_empty(), "{st:?}");
    assert_eq!(st.repo_digests, [by_digest], "{st:?}");
    for (_, id) in &ids {
        is.remove_image(cri::RemoveImageRequest { image: spec(id) })
            .await
            .unwrap();
    }
}

fn sandbox_config(env: &Env, name: &str, attempt: u32) -> cri::PodSandboxConfig {
    cri::PodSandboxConfig {
        metadata: Some(cri::PodSandboxMetadata {
            name: name.into(),
            uid: format!("uid-{name}"),
            namespace: "default".into(),
            attempt,
        }),
        hostname: name.into(),
        log_directory: env
            .root()
            .join("kubelet-logs")
            .join(name)
            .display()
            .to_string(),
        dns_config: Some(cri::DnsConfig {
            servers: vec!["192.0.2.53".into()],
            searches: vec!["svc.cluster.local".into()],
            options: vec!["ndots:5".into()],
        }),
        labels: HashMap::from([("app".into(), name.into()), ("suite".into(), "cri".into())]),
        annotations: HashMap::from([("note".into(), "kept as given".into())]),
        ..Default::default()
    }
}

fn container_config(
    name: &str,
    image: &str,
    args: &[&str],
    mounts: Vec<cri::Mount>,
) -> cri::ContainerConfig {
    cri::ContainerConfig {
        metadata: Some(cri::ContainerMetadata {
            name: name.into(),
            attempt: 0,
        }),
        image: Some(cri::ImageSpec {
            image: image.into(),
            ..Default::default()
        }),
        args: args.iter().map(|s| s.to_string()).collect(),
        envs: vec![cri::KeyValue {
            key: "GREETING".into(),
            value: "hello from cri".into(),
        }],
        mounts,
        labels: HashMap::from([("container".into(), name.into())]),
        annotations: HashMap::from([("io.kubernetes.container.hash".into(), "abc".into())]),
        log_path: format!("{name}_0.log"),
        ..Default::default()
    }
}

/// Creates a container and starts it; its id.
async fn started(
    rs: &mut RuntimeServiceClient<Channel>,
    req: cri::CreateContainerRequest,
) -> String {
    let id = rs
        .create_container(req)
        .await
        .unwrap()
        .into_inner()
        .container_id;
    rs.start_container(cri::StartContainerRequest {
        container_id: id.clone(),
    })
    .await
    .unwrap();
    id
}

async fn wait_state(
    rs: &mut RuntimeServiceClient<Channel>,
    id: &str,
    state: cri::ContainerState,
) -> cri::ContainerStatus {
    let t0 = Instant::now();
    loop {
        let st = rs
            .container_status(cri::ContainerStatusRequest {
                container_id: id.into(),
                verbose: false,
            })
            .await
            .unwrap()
            .into_inner()
            .status
            .unwrap();
        if st.state == state as i32 {
            return st;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(30),
            "container {id} never reached {state:?}: {st:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Creates and starts a container, stops it at once with a 60 s grace
/// (critest's "should support stopping container"), and checks that it
/// ended with `want` well inside that grace: by the stop's SIGTERM, not
/// the SIGKILL at its end. Returns the container's id.
async fn stop_at_once(
    rs: &mut RuntimeServiceClient<Channel>,
    req: cri::CreateContainerRequest,
    want: i32,
) -> String {
    let id = rs
        .create_container(req)
        .await
        .unwrap()
        .into_inner()
        .container_id;
    rs.start_container(cri::StartContainerRequest {
        container_id: id.clone(),
    })
    .await
    .unwrap();
    let t0 = Instant::now();
    rs.stop_container(cri::StopContainerRequest {
        container_id: id.clone(),
        timeout: 60,
    })
    .await
    .unwrap();
    let st = wait_state(rs, &id, cri::ContainerState::ContainerExited).await;
    assert_eq!(st.exit_code, want, "{st:?}");
    assert!(
        t0.elapsed() < Duration::from_secs(30),
        "the stop took {:?} of its 60 s",
        t0.elapsed()
    );
    id
}

fn code<T: std::fmt::Debug>(r: Result<tonic::Response<T>, tonic::Status>) -> tonic::Code {
    match r {
        Ok(v) => panic!("expected an error, got {v:?}"),
        Err(s) => {
            assert!(!s.message().is_empty(), "an error without a message");
            s.code()
        }
    }
}

fn log_lines(path: &Path) -> Vec<String> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(str::to_owned)
        .collect()
}

#[test]
fn a_kubelet_runs_wasm_pods_through_huskd_and_survives_its_restart() {
    let reg = Registry::start();
    // Dual-stack: PodSandboxStatus has the IPv6 address as additional_ips.
    let env = Env::new().dual_stack();
    let image = push_probe(&reg, "cri/probe:v1");
    let server_image = push_wasm(&reg, "cri/netprobe:v1", &netprobe());
    let users = [
        ("1002", Some(1002), ""),
        ("www-data:www-data", None, "www-data"),
        ("1003:50", Some(1003), ""),
    ]
    .map(|(user, uid, name)| {
        let tag = user.replace(':', "-");
        (
            push_user_image(&reg, &format!("cri/user:{tag}"), user),
            uid,
            name,
        )
    });
    let mut huskd = Huskd::start(&env);
    let data = tempfile::tempdir().unwrap();
    rt().block_on(async {
        let ch = huskd.channel().await;
        let mut rs = RuntimeServiceClient::new(ch.clone());
        let mut is = ImageServiceClient::new(ch);

        let v = rs
            .version(cri::VersionRequest::default())
            .await
            .unwrap()
            .into_inner();
        assert_eq!(
            (v.runtime_name.as_str(), v.runtime_api_version.as_str()),
            ("husk", "v1")
        );
        let st = rs
            .status(cri::StatusRequest { verbose: false })
            .await
            .unwrap()
            .into_inner();
        let conds = st.status.unwrap().conditions;
        assert!(
            conds.iter().any(|c| c.r#type == "RuntimeReady" && c.status),
            "{conds:?}"
        );
        assert!(
            conds.iter().any(|c| c.r#type == "NetworkReady" && c.status),
            "{conds:?}"
        );

        // Images: pull, list, status, and an unknown one.
        let spec = cri::ImageSpec {
            image: image.clone(),
            ..Default::default()
        };
        let image_ref = pull(&mut is, &spec.image).await;
        assert!(image_ref.starts_with("sha256:"), "{image_ref}");
        let listed = is
            .list_images(cri::ListImagesRequest::default())
            .await
            .unwrap()
            .into_inner()
            .images;
        assert_eq!(listed.len(), 1, "{listed:?}");
        assert_eq!(listed[0].id, image_ref);
        assert!(listed[0]
            .repo_tags
            .iter()
            .any(|t| t.ends_with("cri/probe:v1")));
        let by_id = is
            .image_status(cri::ImageStatusRequest {
                image: Some(cri::ImageSpec {
                    image: image_ref.clone(),
                    ..Default::default()
                }),
                verbose: false,
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(by_id.image.unwrap().id, image_ref);
        image_users_and_digests(&mut is, &users).await;
        let missing = is
            .image_status(cri::ImageStatusRequest {
                image: Some(cri::ImageSpec {
                    image: format!("{}/cri/nothing:v1", reg.host()),
                    ..Default::default()
                }),
                verbose: false,
            })
            .await
            .unwrap()
            .into_inner();
        assert!(missing.image.is_none());
        assert_eq!(
            code(
                is.pull_image(cri::PullImageRequest {
                    image: Some(cri::ImageSpec {
                        image: format!("{}/cri/nothing:v1", reg.host()),
                        ..Default::default()
                    }),
                    ..Default::default()
                })
                .await
            ),
            tonic::Code::NotFound
        );
        let fs = is
            .image_fs_info(cri::ImageFsInfoRequest {})
            .await
            .unwrap()
            .into_inner();
        assert!(fs.image_filesystems[0].used_bytes.as_ref().unwrap().value > 0);

        // Bad sandboxes: each refused with its own code, nothing created.
        // The good one has a sysctl of its network namespace.
        let mut cfg = sandbox_config(&env, "web", 0);
        cfg.linux.get_or_insert_default().sysctls =
            HashMap::from([("net.ipv4.ip_unprivileged_port_start".into(), "443".into())]);
        let bad = |f: &dyn Fn(&mut cri::RunPodSandboxRequest)| {
            let mut r = cri::RunPodSandboxRequest {
                config: Some(cfg.clone()),
                runtime_handler: "husk-wasm".into(),
            };
            f(&mut r);
            r
        };
        for (req, want) in [
            (
                bad(&|r| r.runtime_handler = "runc".into()),
                tonic::Code::InvalidArgument,
            ),
            (
                bad(&|r| r.config.as_mut().unwrap().metadata = None),
                tonic::Code::InvalidArgument,
            ),
            (bad(&|r| r.config = None), tonic::Code::InvalidArgument),
            (
                bad(&|r| {
                    r.config.as_mut().unwrap().linux = Some(cri::LinuxPodSandboxConfig {
                        security_context: Some(cri::LinuxSandboxSecurityContext {
                            namespace_options: Some(cri::NamespaceOption {
                                network: cri::NamespaceMode::Node as i32,
                                ..Default::default()
                            }),
                            ..Default::default()
                        }),
                        ..Default::default()
                    })
                }),
                tonic::Code::InvalidArgument,
            ),
            // A wasm pod has no kernel of its own: no kernel.* sysctls.
            (
                bad(&|r| {
                    r.config.as_mut().unwrap().linux = Some(cri::LinuxPodSandboxConfig {
                        sysctls: HashMap::from([("kernel.shm_rmid_forced".into(), "1".into())]),
                        ..Default::default()
                    })
                }),
                tonic::Code::InvalidArgument,
            ),
        ] {
            assert_eq!(code(rs.run_pod_sandbox(req.clone()).await), want, "{req:?}");
        }
        assert_eq!(env.pod_dirs(), 0, "a refused sandbox left state");

        // The sandbox: ready, with an IP from CNI; the CLI sees it too.
        let pod = rs
            .run_pod_sandbox(cri::RunPodSandboxRequest {
                config: Some(cfg.clone()),
                runtime_handler: String::new(),
            })
            .await
            .unwrap()
            .into_inner()
            .pod_sandbox_id;
        assert_eq!(
            code(
                rs.run_pod_sandbox(cri::RunPodSandboxRequest {
                    config: Some(cfg.clone()),
                    runtime_handler: "husk-wasm".into(),
                })
                .await
            ),
            tonic::Code::AlreadyExists
        );
        let pst = rs
            .pod_sandbox_status(cri::PodSandboxStatusRequest {
                pod_sandbox_id: pod.clone(),
                verbose: false,
            })
            .await
            .unwrap()
            .into_inner()
            .status
            .unwrap();
        assert_eq!(pst.state, cri::PodSandboxState::SandboxReady as i32);
        assert_eq!(pst.runtime_handler, "husk-wasm");
        let netns = env.root().join("run/netns").join(&pod);
        let out = std::process::Command::new("nsenter")
            .arg(format!("--net={}", netns.display()))
            .args(["cat", "/proc/sys/net/ipv4/ip_unprivileged_port_start"])
            .output()
            .unwrap();
        assert_eq!(text(&out.stdout), "443", "{out:?}");
        let host =
            std::fs::read_to_string("/proc/sys/net/ipv4/ip_unprivileged_port_start").unwrap();
        assert_ne!(
            host.trim(),
            "443",
            "the sysctl reached the host's namespace"
        );
        assert_eq!(
            pst.annotations.get("note").map(String::as_str),
            Some("kept as given")
        );
        let net = pst.network.unwrap();
        assert!(
            net.ip.starts_with(&format!("{}.", env.subnet_prefix)),
            "pod IP {}",
            net.ip
        );
        assert_eq!(net.additional_ips.len(), 1, "{net:?}");
        assert!(
            net.additional_ips[0].ip.starts_with(&env.subnet6_prefix),
            "{net:?}"
        );
        let ps = env.husk(&["ps"]);
        assert!(
            stdout(&ps).contains("web"),
            "husk ps does not show the CRI pod: {}",
            stdout(&ps)
        );

        // A container that completes, its log in the CRI format where the
        // kubelet asked, its env and its exit.
        let log_dir = Path::new(&cfg.log_directory).to_owned();
        let create =
            |name: &str, args: &[&str], mounts: Vec<cri::Mount>| cri::CreateContainerRequest {
                pod_sandbox_id: pod.clone(),
                config: Some(container_config(name, &image, args, mounts)),
                sandbox_config: Some(cfg.clone()),
            };
        let done = rs
            .create_container(create("greet", &["env", "GREETING"], vec![]))
            .await
            .unwrap()
            .into_inner()
            .container_id;
        assert!(
            done.starts_with(&pod),
            "container id {done} is not under its pod {pod}"
        );
        let created = wait_state(&mut rs, &done, cri::ContainerState::ContainerCreated).await;
        assert_eq!(created.started_at, 0);
        assert_eq!(
            code(
                rs.create_container(create("greet", &["echo"], vec![]))
                    .await
            ),
            tonic::Code::AlreadyExists
        );
        rs.start_container(cri::StartContainerRequest {
            container_id: done.clone(),
        })
        .await
        .unwrap();
        let st = wait_state(&mut rs, &done, cri::ContainerState::ContainerExited).await;
        assert_eq!((st.exit_code, st.reason.as_str()), (0, "Completed"));
        assert!(
            st.started_at > 0 && st.finished_at >= st.started_at,
            "{st:?}"
        );
        assert_eq!(
            st.labels.get("container").map(String::as_str),
            Some("greet")
        );
        assert_eq!(
            st.annotations
                .get("io.kubernetes.container.hash")
                .map(String::as_str),
            Some("abc")
        );
        assert_eq!(st.image_ref, image_ref);
        let lines = log_lines(&log_dir.join("greet_0.log"));
        assert_eq!(lines.len(), 1, "{lines:?}");
        assert!(
            lines[0].ends_with(" stdout F GREETING=hello from cri"),
            "not a CRI log line: {:?}",
            lines[0]
        );
        assert_eq!(
            code(
                rs.start_container(cri::StartContainerRequest {
                    container_id: done.clone(),
                })
                .await
            ),
            tonic::Code::FailedPrecondition
        );

        // A container writing through a host directory the kubelet mounts.
        let writer = rs
            .create_container(create(
                "writer",
                &["write", "/data/out.txt", "written via cri"],
                vec![cri::Mount {
                    container_path: "/data".into(),
                    host_path: data.path().display().to_string(),
                    ..Default::default()
                }],
            ))
            .await
            .unwrap()
            .into_inner()
            .container_id;
        rs.start_container(cri::StartContainerRequest {
            container_id: writer.clone(),
        })
        .await
        .unwrap();
        let st = wait_state(&mut rs, &writer, cri::ContainerState::ContainerExited).await;
        assert_eq!(st.exit_code, 0, "{st:?}");
        assert_eq!(
            std::fs::read_to_string(data.path().join("out.txt")).unwrap(),
            "written via cri"
        );
        assert_eq!(st.mounts.len(), 1);

        // File mounts, as the kubelet gives every container: its own
        // /etc/hosts (read-only) and /dev/termination-log. In a wasm guest
        // each directory of them is a directory of its own.
        let files = tempfile::tempdir().unwrap();
        let (hosts, term) = (files.path().join("hosts"), files.path().join("term"));
        std::fs::write(&hosts, "10.9.8.7 from-the-kubelet\n").unwrap();
        std::fs::write(&term, "").unwrap();
        let file_mounts = || {
            vec![
                cri::Mount {
                    container_path: "/etc/hosts".into(),
                    host_path: hosts.display().to_string(),
                    readonly: true,
                    ..Default::default()
                },
                cri::Mount {
                    container_path: "/dev/termination-log".into(),
                    host_path: term.display().to_string(),
                    ..Default::default()
                },
            ]
        };
        let mut filers = Vec::new();
        for (name, args, exit) in [
            ("hosts", &["cat", "/etc/hosts"][..], 0),
            ("term", &["write", "/dev/termination-log", "bye"][..], 0),
            // Nothing can be made beside the given files, and a read-only
            // one stays so.
            ("beside", &["write", "/dev/other", "x"][..], 1),
            ("readonly", &["write", "/etc/hosts", "x"][..], 1),
        ] {
            let id = rs
                .create_container(create(name, args, file_mounts()))
                .await
                .unwrap()
                .into_inner()
                .container_id;
            rs.start_container(cri::StartContainerRequest {
                container_id: id.clone(),
            })
            .await
            .unwrap();
            let st = wait_state(&mut rs, &id, cri::ContainerState::ContainerExited).await;
            assert_eq!(st.exit_code, exit, "{name}: {st:?}");
            filers.push(id);
        }
        let hosts_log = std::fs::read_to_string(log_dir.join("hosts_0.log")).unwrap();
        assert!(
            hosts_log.contains(" stdout F 10.9.8.7 from-the-kubelet"),
            "{hosts_log}"
        );
        assert_eq!(std::fs::read_to_string(&term).unwrap(), "bye");
        assert_eq!(
            std::fs::read_to_string(&hosts).unwrap(),
            "10.9.8.7 from-the-kubelet\n"
        );
        let bound = || {
            std::fs::read_to_string("/proc/self/mountinfo")
                .unwrap()
                .contains(files.path().to_str().unwrap())
        };
        assert!(bound(), "the file mounts are not bound");
        for id in filers {
            rs.remove_container(cri::RemoveContainerRequest { container_id: id })
                .await
                .unwrap();
        }
        assert!(
            !bound(),
            "a removed container's file mounts are still bound"
        );

        // Container events (the kubelet's evented PLEG): a container's
        // life, created to deleted, in order, with its sandbox's status.
        let mut events = rs
            .get_container_events(cri::GetEventsRequest {})
            .await
            .unwrap()
            .into_inner();
        // A thread names itself once it runs: wait for that.
        let t0 = Instant::now();
        while threads_named(huskd.pid(), "cri-events") == 0 {
            assert!(t0.elapsed() < Duration::from_secs(10), "no watcher thread");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(threads_named(huskd.pid(), "cri-events"), 1);
        let ev = rs
            .create_container(create("events", &["echo"], vec![]))
            .await
            .unwrap()
            .into_inner()
            .container_id;
        rs.start_container(cri::StartContainerRequest {
            container_id: ev.clone(),
        })
        .await
        .unwrap();
        wait_state(&mut rs, &ev, cri::ContainerState::ContainerExited).await;
        rs.remove_container(cri::RemoveContainerRequest {
            container_id: ev.clone(),
        })
        .await
        .unwrap();
        let mut kinds = Vec::new();
        while kinds.last() != Some(&cri::ContainerEventType::ContainerDeletedEvent) {
            let e = tokio::time::timeout(Duration::from_secs(20), events.message())
                .await
                .expect("no container event within 20 s")
                .unwrap()
                .expect("the event stream ended");
            if e.container_id != ev {
                continue;
            }
            let kind = cri::ContainerEventType::try_from(e.container_event_type).unwrap();
            let sb = e.pod_sandbox_status.expect("the sandbox's status");
            assert_eq!(sb.id, pod);
            if kind != cri::ContainerEventType::ContainerDeletedEvent {
                assert!(e.containers_statuses.iter().any(|c| c.id == ev), "{kind:?}");
            }
            kinds.push(kind);
        }
        assert_eq!(
            kinds,
            [
                cri::ContainerEventType::ContainerCreatedEvent,
                cri::ContainerEventType::ContainerStartedEvent,
                cri::ContainerEventType::ContainerStoppedEvent,
                cri::ContainerEventType::ContainerDeletedEvent
            ]
        );
        drop(events);
        // The subscription's end stops huskd's watcher thread.
        let t0 = Instant::now();
        while threads_named(huskd.pid(), "cri-events") > 0 {
            assert!(
                t0.elapsed() < Duration::from_secs(10),
                "the event watcher outlived its subscriber"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }

        // Bad containers.
        assert_eq!(
            code(
                rs.create_container(create(
                    "nomount",
                    &["echo"],
                    vec![cri::Mount {
                        container_path: "/x".into(),
                        host_path: "/nonexistent/husk".into(),
                        ..Default::default()
                    }],
                ))
                .await
            ),
            tonic::Code::InvalidArgument
        );
        let mut unpulled = create("unpulled", &["echo"], vec![]);
        unpulled.config.as_mut().unwrap().image = Some(cri::ImageSpec {
            image: format!("{}/cri/nothing:v1", reg.host()),
            ..Default::default()
        });
        assert_eq!(
            code(rs.create_container(unpulled).await),
            tonic::Code::NotFound
        );
        let mut nowhere = create("nowhere", &["echo"], vec![]);
        nowhere.pod_sandbox_id = "0123456789abcdef".into();
        assert_eq!(
            code(rs.create_container(nowhere).await),
            tonic::Code::NotFound
        );
        for id in ["", "nope", "0123456789abcdef01234567"] {
            let r = rs
                .container_status(cri::ContainerStatusRequest {
                    container_id: id.into(),
                    verbose: false,
                })
                .await;
            let c = code(r);
            assert!(
                matches!(c, tonic::Code::NotFound | tonic::Code::InvalidArgument),
                "{id:?}: {c:?}"
            );
        }
        // An image volume is not something husk mounts: Unimplemented, so
        // a client can tell it from a bad request.
        let mut imagevol = create("imagevol", &["echo"], vec![]);
        imagevol.config.as_mut().unwrap().mounts = vec![cri::Mount {
            container_path: "/img".into(),
            image: Some(cri::ImageSpec {
                image: image.clone(),
                ..Default::default()
            }),
            ..Default::default()
        }];
        assert_eq!(
            code(rs.create_container(imagevol).await),
            tonic::Code::Unimplemented
        );
        // Stops are idempotent: what does not exist is stopped.
        rs.stop_pod_sandbox(cri::StopPodSandboxRequest {
            pod_sandbox_id: "6d1f3c1e-0000-4000-8000-000000000000".into(),
        })
        .await
        .unwrap();
        rs.stop_container(cri::StopContainerRequest {
            container_id: "0123456789abcdef01234567".into(),
            timeout: 0,
        })
        .await
        .unwrap();
        // No made-up metrics: the stats calls serve the figures.
        assert_eq!(
            code(
                rs.list_metric_descriptors(cri::ListMetricDescriptorsRequest {})
                    .await
            ),
            tonic::Code::Unimplemented
        );
        assert_eq!(
            code(
                rs.list_pod_sandbox_metrics(cri::ListPodSandboxMetricsRequest {})
                    .await
            ),
            tonic::Code::Unimplemented
        );

        // Two long-running containers: one ends when its stdin closes (the
        // wasm guest's SIGTERM), one must be killed after the timeout.
        let polite = rs
            .create_container(create("polite", &["stdin"], vec![]))
            .await
            .unwrap()
            .into_inner()
            .container_id;
        let stubborn = rs
            .create_container(create("stubborn", &["spin"], vec![]))
            .await
            .unwrap()
            .into_inner()
            .container_id;
        for id in [&polite, &stubborn] {
            rs.start_container(cri::StartContainerRequest {
                container_id: id.clone(),
            })
            .await
            .unwrap();
            wait_state(&mut rs, id, cri::ContainerState::ContainerRunning).await;
        }
        let running = rs
            .list_containers(cri::ListContainersRequest {
                filter: Some(cri::ContainerFilter {
                    pod_sandbox_id: pod.clone(),
                    state: Some(cri::ContainerStateValue {
                        state: cri::ContainerState::ContainerRunning as i32,
                    }),
                    ..Default::default()
                }),
            })
            .await
            .unwrap()
            .into_inner()
            .containers;
        let mut ids: Vec<_> = running.iter().map(|c| c.id.clone()).collect();
        ids.sort();
        let mut want = vec![polite.clone(), stubborn.clone()];
        want.sort();
        assert_eq!(ids, want);
        let ps = stdout(&env.husk(&["ps"]));
        assert!(
            ps.lines()
                .any(|l| l.contains("polite") && l.contains("Running")),
            "husk ps does not show huskd's containers:\n{ps}"
        );
        assert_eq!(
            code(
                rs.exec_sync(cri::ExecSyncRequest {
                    container_id: polite.clone(),
                    cmd: vec!["sh".into()],
                    timeout: 5,
                })
                .await
            ),
            tonic::Code::Unimplemented
        );
        assert_eq!(
            code(
                rs.exec(cri::ExecRequest {
                    container_id: polite.clone(),
                    cmd: vec!["sh".into()],
                    stdout: true,
                    ..Default::default()
                })
                .await
            ),
            tonic::Code::Unimplemented
        );

        // Attach to a guest created with stdin.
        let mut chat = container_config("chat", &image, &["chat"], vec![]);
        chat.stdin = true;
        chat.stdin_once = true;
        let chat = attach_chat(
            &mut rs,
            cri::CreateContainerRequest {
                pod_sandbox_id: pod.clone(),
                config: Some(chat),
                sandbox_config: Some(cfg.clone()),
            },
            Path::new(&cfg.log_directory),
            &polite,
        )
        .await;
        rs.remove_container(cri::RemoveContainerRequest {
            container_id: chat.clone(),
        })
        .await
        .unwrap();

        // Port-forward: a wasm server listening in the pod's network,
        // reached through the streaming server's WebSocket.
        pull(&mut is, &server_image).await;
        let server = rs
            .create_container(cri::CreateContainerRequest {
                pod_sandbox_id: pod.clone(),
                config: Some(container_config(
                    "server",
                    &server_image,
                    &["serve", "8080", "1"],
                    vec![],
                )),
                sandbox_config: Some(cfg.clone()),
            })
            .await
            .unwrap()
            .into_inner()
            .container_id;
        rs.start_container(cri::StartContainerRequest {
            container_id: server.clone(),
        })
        .await
        .unwrap();
        // As a kubelet's readiness probe would: forward once it listens.
        let server_log = Path::new(&cfg.log_directory).join("server_0.log");
        let t0 = Instant::now();
        while !std::fs::read_to_string(&server_log)
            .unwrap_or_default()
            .contains("listening on 8080")
        {
            assert!(
                t0.elapsed() < Duration::from_secs(20),
                "server not listening"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let url = forward_url(&mut rs, &pod, 8080).await;
        assert_eq!(forward_line(&url, 8080, "ping").await, "pong ping");
        let st = wait_state(&mut rs, &server, cri::ContainerState::ContainerExited).await;
        assert_eq!(st.exit_code, 0, "{st:?}");
        // A URL is good for one stream only.
        assert!(husk_tests::ws_refused(&url, "v4.channel.k8s.io").await);
        assert_eq!(
            code(
                rs.port_forward(cri::PortForwardRequest {
                    pod_sandbox_id: pod.clone(),
                    port: vec![70000],
                })
                .await
            ),
            tonic::Code::InvalidArgument
        );
        rs.remove_container(cri::RemoveContainerRequest {
            container_id: server.clone(),
        })
        .await
        .unwrap();
        spdy_forward_to_wasm(&mut rs, &pod, &cfg, &server_image).await;
        tunneled_forward_to_wasm(&mut rs, &pod, &cfg, &server_image).await;

        // The kubelet rotates a log: the container writes to a fresh file.
        let polite_log = log_dir.join("polite_0.log");
        let t0 = Instant::now();
        while log_lines(&polite_log).is_empty() {
            assert!(t0.elapsed() < Duration::from_secs(10), "no log from polite");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        std::fs::rename(&polite_log, log_dir.join("polite_0.log.1")).unwrap();
        rs.reopen_container_log(cri::ReopenContainerLogRequest {
            container_id: polite.clone(),
        })
        .await
        .unwrap();
        assert!(polite_log.exists(), "ReopenContainerLog made no new file");

        // huskd dies (-9) and comes back: everything is found again, and
        // the containers never noticed.
        huskd.kill9();
        let monitor_pid = pod_monitor_pid(&env, &pod);
        let huskd2 = Huskd::start(&env);
        let mut rs = RuntimeServiceClient::new(huskd2.channel().await);
        assert_eq!(pod_monitor_pid(&env, &pod), monitor_pid);
        let pods = rs
            .list_pod_sandbox(cri::ListPodSandboxRequest {
                filter: Some(cri::PodSandboxFilter {
                    label_selector: HashMap::from([("app".into(), "web".into())]),
                    ..Default::default()
                }),
            })
            .await
            .unwrap()
            .into_inner()
            .items;
        assert_eq!(pods.len(), 1);
        assert_eq!(pods[0].id, pod);
        assert_eq!(pods[0].state, cri::PodSandboxState::SandboxReady as i32);
        wait_state(&mut rs, &polite, cri::ContainerState::ContainerRunning).await;
        let st = wait_state(&mut rs, &done, cri::ContainerState::ContainerExited).await;
        assert_eq!(st.exit_code, 0);

        // Stop: a graceful end, then a kill after the timeout.
        rs.stop_container(cri::StopContainerRequest {
            container_id: polite.clone(),
            timeout: 10,
        })
        .await
        .unwrap();
        let st = wait_state(&mut rs, &polite, cri::ContainerState::ContainerExited).await;
        assert_eq!(st.exit_code, 0, "{st:?}");
        assert!(log_lines(&polite_log)
            .iter()
            .any(|l| l.ends_with("stdout F stdin closed, exiting cleanly")));
        let t0 = Instant::now();
        rs.stop_container(cri::StopContainerRequest {
            container_id: stubborn.clone(),
            timeout: 1,
        })
        .await
        .unwrap();
        assert!(t0.elapsed() >= Duration::from_secs(1));
        let st = wait_state(&mut rs, &stubborn, cri::ContainerState::ContainerExited).await;
        assert_eq!(st.exit_code, 137, "{st:?}");
        // A stop at once after the start, before the guest even runs
        // (critest's "should support stopping container"): its stdin
        // closes all the same, so it ends cleanly, well inside the grace.
        let hasty = stop_at_once(&mut rs, create("hasty", &["stdin"], vec![]), 0).await;
        assert!(log_lines(&log_dir.join("hasty_0.log"))
            .iter()
            .any(|l| l.ends_with("stdout F stdin closed, exiting cleanly")));
        rs.remove_container(cri::RemoveContainerRequest {
            container_id: hasty.clone(),
        })
        .await
        .unwrap();
        rs.remove_container(cri::RemoveContainerRequest {
            container_id: stubborn.clone(),
        })
        .await
        .unwrap();
        rs.remove_container(cri::RemoveContainerRequest {
            container_id: stubborn.clone(),
        })
        .await
        .unwrap();
        let left = rs
            .list_containers(cri::ListContainersRequest::default())
            .await
            .unwrap()
            .into_inner()
            .containers;
        assert_eq!(left.len(), 3, "{left:?}");

        // The sandbox stops (its network goes), then is removed.
        rs.stop_pod_sandbox(cri::StopPodSandboxRequest {
            pod_sandbox_id: pod.clone(),
        })
        .await
        .unwrap();
        let stopped = rs
            .pod_sandbox_status(cri::PodSandboxStatusRequest {
                pod_sandbox_id: pod.clone(),
                verbose: false,
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(
            stopped.status.unwrap().state,
            cri::PodSandboxState::SandboxNotready as i32
        );
        assert_eq!(stopped.containers_statuses.len(), 3);
        assert!(!env.root().join("run/netns").join(&pod).exists());
        assert_eq!(
            code(rs.create_container(create("late", &["echo"], vec![])).await),
            tonic::Code::FailedPrecondition
        );
        rs.remove_pod_sandbox(cri::RemovePodSandboxRequest {
            pod_sandbox_id: pod.clone(),
        })
        .await
        .unwrap();
        rs.remove_pod_sandbox(cri::RemovePodSandboxRequest {
            pod_sandbox_id: pod.clone(),
        })
        .await
        .unwrap();
        assert_eq!(
            code(
                rs.pod_sandbox_status(cri::PodSandboxStatusRequest {
                    pod_sandbox_id: pod.clone(),
                    verbose: false,
                })
                .await
            ),
            tonic::Code::NotFound
        );
        assert!(rs
            .list_containers(cri::ListContainersRequest::default())
            .await
            .unwrap()
            .into_inner()
            .containers
            .is_empty());
        // The kubelet's logs are the kubelet's: removal leaves them.
        assert!(log_dir.join("greet_0.log").exists());
        drop(huskd2);
    });
    assert_eq!(
        std::fs::read_to_string(data.path().join("out.txt")).unwrap(),
        "written via cri",
        "a hostPath's files must survive the pod"
    );
    env.finish();
}

fn pod_monitor_pid(env: &Env, pod: &str) -> u64 {
    let st: serde_json::Value = serde_json::from_slice(
        &std::fs::read(env.root().join("lib/pods").join(pod).join("status.json")).unwrap(),
    )
    .unwrap();
    st["monitorPid"].as_u64().unwrap()
}

#[test]
fn fifty_sandboxes_at_once_and_a_monitor_that_dies_is_reported() {
    let env = Env::new();
    let huskd = Huskd::start(&env);
    rt().block_on(async {
        let ch = huskd.channel().await;
        let calls = (0..50).map(|i| {
            let mut rs = RuntimeServiceClient::new(ch.clone());
            let cfg = sandbox_config(&env, &format!("many-{i}"), 0);
            async move {
                rs.run_pod_sandbox(cri::RunPodSandboxRequest {
                    config: Some(cfg),
                    runtime_handler: "husk-wasm".into(),
                })
                .await
                .map(|r| r.into_inner().pod_sandbox_id)
            }
        });
        let ids: Vec<String> = futures_all(calls.collect()).await;
        let mut rs = RuntimeServiceClient::new(ch);
        let listed = rs
            .list_pod_sandbox(cri::ListPodSandboxRequest {
                filter: Some(cri::PodSandboxFilter {
                    state: Some(cri::PodSandboxStateValue {
                        state: cri::PodSandboxState::SandboxReady as i32,
                    }),
                    ..Default::default()
                }),
            })
            .await
            .unwrap()
            .into_inner()
            .items;
        assert_eq!(listed.len(), 50);
        let mut ips = std::collections::HashSet::new();
        for id in &ids {
            let st = rs
                .pod_sandbox_status(cri::PodSandboxStatusRequest {
                    pod_sandbox_id: id.clone(),
                    verbose: false,
                })
                .await
                .unwrap()
                .into_inner()
                .status
                .unwrap();
            assert!(
                ips.insert(st.network.unwrap().ip),
                "two sandboxes share an IP"
            );
        }

        // A monitor killed under huskd: its sandbox is reported NOTREADY,
        // not forgotten, and can still be removed.
        let victim = &ids[7];
        let pid = pod_monitor_pid(&env, victim);
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid as i32),
            nix::sys::signal::Signal::SIGKILL,
        )
        .unwrap();
        let t0 = Instant::now();
        loop {
            let st = rs
                .pod_sandbox_status(cri::PodSandboxStatusRequest {
                    pod_sandbox_id: victim.clone(),
                    verbose: false,
                })
                .await
                .unwrap()
                .into_inner()
                .status
                .unwrap();
            if st.state == cri::PodSandboxState::SandboxNotready as i32 {
                break;
            }
            assert!(
                t0.elapsed() < Duration::from_secs(10),
                "the dead monitor's pod stays READY"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }

        let removals = ids.iter().map(|id| {
            let mut rs = rs.clone();
            let id = id.clone();
            async move {
                rs.remove_pod_sandbox(cri::RemovePodSandboxRequest { pod_sandbox_id: id })
                    .await
                    .map(|_| String::new())
            }
        });
        futures_all(removals.collect()).await;
        assert!(rs
            .list_pod_sandbox(cri::ListPodSandboxRequest::default())
            .await
            .unwrap()
            .into_inner()
            .items
            .is_empty());
    });
    assert_eq!(env.pod_dirs(), 0);
    drop(huskd);
    env.finish();
}

/// Runs the calls concurrently; every one must succeed.
async fn futures_all<F>(calls: Vec<F>) -> Vec<String>
where
    F: std::future::Future<Output = Result<String, tonic::Status>> + Send + 'static,
{
    let handles: Vec<_> = calls.into_iter().map(tokio::spawn).collect();
    let mut out = Vec::new();
    for h in handles {
        out.push(h.await.unwrap().unwrap());
    }
    out
}

async fn exec_sync(
    rs: &mut RuntimeServiceClient<Channel>,
    id: &str,
    script: &str,
) -> cri::ExecSyncResponse {
    rs.exec_sync(cri::ExecSyncRequest {
        container_id: id.into(),
        cmd: vec!["/bin/sh".into(), "-c".into(), script.into()],
        timeout: 60,
    })
    .await
    .unwrap()
    .into_inner()
}

/// Forwards `port` through the streaming `url`, sends `line`, and returns
/// the line the server answers.
async fn forward_line(url: &str, port: u16, line: &str) -> String {
    use futures_util::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::Message;
    let mut ws = husk_tests::ws_connect(url, "v4.channel.k8s.io").await;
    // Each channel opens with its port, little-endian.
    let le = port.to_le_bytes();
    let mut opened = Vec::new();
    for _ in 0..2 {
        match ws.next().await {
            Some(Ok(Message::Binary(b))) => opened.push(b.to_vec()),
            other => panic!("expected a channel's port, got {other:?}"),
        }
    }
    opened.sort();
    assert_eq!(opened, [vec![0, le[0], le[1]], vec![1, le[0], le[1]]]);
    ws.send(Message::binary(
        [&[0u8][..], format!("{line}\n").as_bytes()].concat(),
    ))
    .await
    .unwrap();
    let mut got = Vec::new();
    while !got.ends_with(b"\n") {
        match tokio::time::timeout(Duration::from_secs(60), ws.next()).await {
            Ok(Some(Ok(Message::Binary(b)))) if b.first() == Some(&0) => got.extend(&b[1..]),
            Ok(Some(Ok(Message::Binary(b)))) if b.first() == Some(&1) => {
                panic!("port-forward error: {}", String::from_utf8_lossy(&b[1..]))
            }
            Ok(Some(Ok(_))) => {}
            other => panic!("port-forward ended early ({other:?}); got {got:?}"),
        }
    }
    let _ = ws.close(None).await;
    text(&got)
}

/// Attach, as the kubelet's proxy uses it: creates and starts `req`, a
/// container with stdin whose program reads a line, prints `got LINE` and
/// `to-stderr` and exits 4; attaches (stdin, stdout, stderr) and sends
/// `hi`. What it prints comes back through the attach, its exit ends the
/// stream with its code, and its log (`chat_0.log` in `log_dir`) has the
/// line too. Stdin to `without_stdin`, a running container created
/// without it, is InvalidArgument. Its id.
async fn attach_chat(
    rs: &mut RuntimeServiceClient<Channel>,
    req: cri::CreateContainerRequest,
    log_dir: &Path,
    without_stdin: &str,
) -> String {
    let chat = rs
        .create_container(req)
        .await
        .unwrap()
        .into_inner()
        .container_id;
    rs.start_container(cri::StartContainerRequest {
        container_id: chat.clone(),
    })
    .await
    .unwrap();
    let url = rs
        .attach(cri::AttachRequest {
            container_id: chat.clone(),
            stdin: true,
            stdout: true,
            stderr: true,
            tty: false,
        })
        .await
        .unwrap()
        .into_inner()
        .url;
    let r = exec_stream(&url, vec![b"\0hi\n".to_vec()]).await;
    assert_eq!(text(&r.out), "got hi");
    assert_eq!(text(&r.err), "to-stderr");
    assert_eq!(
        r.status["details"]["causes"][0]["message"], "4",
        "{}",
        r.status
    );
    let st = wait_state(rs, &chat, cri::ContainerState::ContainerExited).await;
    assert_eq!(st.exit_code, 4, "{st:?}");
    let clog = log_lines(&log_dir.join("chat_0.log"));
    assert!(
        clog.iter().any(|l| l.ends_with(" stdout F got hi")),
        "{clog:?}"
    );
    assert_eq!(
        code(
            rs.attach(cri::AttachRequest {
                container_id: without_stdin.to_owned(),
                stdin: true,
                stdout: true,
                ..Default::default()
            })
            .await
        ),
        tonic::Code::InvalidArgument
    );
    chat
}

/// What an exec streamed: stdout, stderr and its final status.
struct Streamed {
    out: Vec<u8>,
    err: Vec<u8>,
    status: serde_json::Value,
}

/// Runs an exec through its streaming `url`: sends `input` frames, then
/// reads until the server closes, which it must do with status 1000.
async fn exec_stream(url: &str, input: Vec<Vec<u8>>) -> Streamed {
    use futures_util::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::Message;
    let mut ws = husk_tests::ws_connect(url, "v5.channel.k8s.io").await;
    for f in input {
        ws.send(Message::binary(f)).await.unwrap();
    }
    let mut r = Streamed {
        out: vec![],
        err: vec![],
        status: serde_json::Value::Null,
    };
    loop {
        match tokio::time::timeout(Duration::from_secs(60), ws.next()).await {
            Ok(Some(Ok(Message::Binary(b)))) => match b.first() {
                Some(1) => r.out.extend(&b[1..]),
                Some(2) => r.err.extend(&b[1..]),
                Some(3) => r.status = serde_json::from_slice(&b[1..]).unwrap(),
                _ => {}
            },
            // client-go keeps the Status only after a Close with 1000.
            Ok(Some(Ok(Message::Close(frame)))) => {
                let code = frame.map(|f| u16::from(f.code));
                assert_eq!(code, Some(1000), "the exec stream's close code");
                return r;
            }
            Ok(None) | Ok(Some(Err(_))) => panic!("the exec stream ended without a Close"),
            Ok(Some(Ok(_))) => {}
            Err(_) => panic!("the exec stream did not end"),
        }
    }
}

/// Starts container `name` in the wasm pod: the probe serving one
/// connection on `port`.
async fn serve_once(
    rs: &mut RuntimeServiceClient<Channel>,
    pod: &str,
    cfg: &cri::PodSandboxConfig,
    image: &str,
    name: &str,
    port: u16,
) -> String {
    let port = port.to_string();
    started(
        rs,
        cri::CreateContainerRequest {
            pod_sandbox_id: pod.into(),
            config: Some(container_config(
                name,
                image,
                &["serve", &port, "1"],
                vec![],
            )),
            sandbox_config: Some(cfg.clone()),
        },
    )
    .await
}

/// Port-forward as client-go does it over WebSocket (critest's
/// `-websocket-portforward`): the SPDY session tunneled in binary messages
/// of subprotocol `SPDY/3.1+portforward.k8s.io`, an error and a data
/// stream per connection.
async fn tunneled_forward_to_wasm(
    rs: &mut RuntimeServiceClient<Channel>,
    pod: &str,
    cfg: &cri::PodSandboxConfig,
    image: &str,
) {
    use futures_util::{SinkExt, StreamExt};
    use spdy::{Frame, FrameReader, FrameWriter};
    use tokio_tungstenite::tungstenite::Message;
    let server = serve_once(rs, pod, cfg, image, "server3", 8083).await;
    let url = forward_url(rs, pod, 8083).await;
    let ws = husk_tests::ws_connect(&url, "SPDY/3.1+portforward.k8s.io").await;
    let (mut sink, mut stream) = ws.split();
    let mut frames = Vec::new();
    let mut w = FrameWriter::new(&mut frames);
    let headers = |kind: &str| {
        vec![
            ("streamtype".to_owned(), kind.to_owned()),
            ("port".to_owned(), "8083".to_owned()),
            ("requestid".to_owned(), "0".to_owned()),
        ]
    };
    for f in [
        Frame::SynStream {
            id: 1,
            fin: false,
            headers: headers("error"),
        },
        Frame::SynStream {
            id: 3,
            fin: false,
            headers: headers("data"),
        },
        Frame::Data {
            id: 3,
            fin: true,
            data: b"through-the-tunnel\n".to_vec(),
        },
    ] {
        w.write(&f).await.unwrap();
    }
    // Split across messages the way a byte stream may be.
    let (a, b) = frames.split_at(frames.len() / 2);
    sink.send(Message::binary(a.to_vec())).await.unwrap();
    sink.send(Message::binary(b.to_vec())).await.unwrap();
    // The answer: what the server's data stream carries, until its FIN.
    let (tx, rx) = tokio::io::duplex(64 << 10);
    let pump = tokio::spawn(async move {
        let mut tx = tx;
        use tokio::io::AsyncWriteExt;
        while let Some(Ok(Message::Binary(b))) = stream.next().await {
            if tx.write_all(&b).await.is_err() {
                break;
            }
        }
    });
    let mut r = FrameReader::new(rx);
    let mut data = Vec::new();
    let mut replies = 0;
    tokio::time::timeout(Duration::from_secs(60), async {
        loop {
            match r.read().await.unwrap() {
                Some(Frame::SynReply { .. }) => replies += 1,
                Some(Frame::Data {
                    id: 3,
                    fin,
                    data: d,
                }) => {
                    data.extend(d);
                    if fin {
                        break;
                    }
                }
                Some(Frame::Data { id: 1, data: d, .. }) if !d.is_empty() => {
                    panic!("error stream: {}", String::from_utf8_lossy(&d))
                }
                Some(_) => {}
                None => panic!("the tunnel closed before the data stream ended"),
            }
        }
    })
    .await
    .expect("no answer through the tunnel");
    assert_eq!(replies, 2);
    assert_eq!(String::from_utf8_lossy(&data), "pong through-the-tunnel\n");
    pump.abort();
    let st = wait_state(rs, &server, cri::ContainerState::ContainerExited).await;
    assert_eq!(st.exit_code, 0, "{st:?}");
    rs.remove_container(cri::RemoveContainerRequest {
        container_id: server,
    })
    .await
    .unwrap();
}

/// kubectl port-forward over SPDY to a wasm server in the pod's network
/// namespace; a port nobody listens on comes back as kubectl's error.
async fn spdy_forward_to_wasm(
    rs: &mut RuntimeServiceClient<Channel>,
    pod: &str,
    cfg: &cri::PodSandboxConfig,
    image: &str,
) {
    use kubeapi::{Container, KubeApi, PortForward};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let server = serve_once(rs, pod, cfg, image, "server2", 8081).await;
    let api = KubeApi::start(rs.clone()).await;
    api.add(kubeapi::Pod {
        name: "wasmweb".into(),
        sandbox: pod.into(),
        containers: vec![Container {
            name: "server2".into(),
            id: server.clone(),
            stdin: false,
        }],
    });
    let ask = |port: u16, line: &'static str| async move {
        let mut c = tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .unwrap();
        c.write_all(line.as_bytes()).await.unwrap();
        let mut got = String::new();
        tokio::time::timeout(Duration::from_secs(60), c.read_to_string(&mut got))
            .await
            .expect("the forwarded connection did not end")
            .unwrap();
        got
    };
    let pf = PortForward::start(api.kubectl(&["port-forward", "wasmweb", ":8081"])).await;
    assert_eq!(ask(pf.port, "ping\n").await.trim(), "pong ping");
    drop(pf);
    let st = wait_state(rs, &server, cri::ContainerState::ContainerExited).await;
    assert_eq!(st.exit_code, 0, "{st:?}");
    // Nobody listens on 8082 now: the data stream ends empty and the
    // error stream says why.
    let pf = PortForward::start(api.kubectl(&["port-forward", "wasmweb", ":8082"])).await;
    assert_eq!(ask(pf.port, "ping\n").await, "");
    let t0 = Instant::now();
    while !pf.errors().contains("Connection refused") {
        assert!(
            t0.elapsed() < Duration::from_secs(30),
            "kubectl said: {}",
            pf.errors()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        pf.errors().contains("forwarding port 8082"),
        "{}",
        pf.errors()
    );
    drop(pf);
    rs.remove_container(cri::RemoveContainerRequest {
        container_id: server,
    })
    .await
    .unwrap();
}

/// kubectl exec (with stdin, exit codes, a terminal and its size), attach
/// and port-forward over SPDY into the VM pod; then what huskd refuses.
async fn spdy_clients(
    rs: &mut RuntimeServiceClient<Channel>,
    forward_url: &str,
    pod: &str,
    main: &str,
    create: &dyn Fn(cri::ContainerConfig) -> cri::CreateContainerRequest,
    config: &dyn Fn(&str, &str, Vec<cri::Mount>) -> cri::ContainerConfig,
) {
    use kubeapi::{output, Container, KubeApi, PortForward};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut chat = config(
        "chat2",
        "read l; echo got $l; echo to-stderr >&2; exit 4",
        vec![],
    );
    chat.stdin = true;
    let chat = started(rs, create(chat)).await;
    let api = KubeApi::start(rs.clone()).await;
    api.add(kubeapi::Pod {
        name: "vmweb".into(),
        sandbox: pod.into(),
        containers: vec![
            Container {
                name: "main".into(),
                id: main.into(),
                stdin: false,
            },
            Container {
                name: "chat2".into(),
                id: chat.clone(),
                stdin: true,
            },
        ],
    });

    let o = output(
        api.kubectl(&[
            "exec",
            "-i",
            "vmweb",
            "-c",
            "main",
            "--",
            "sh",
            "-c",
            "read l; echo out $l; echo err >&2; exit 5",
        ]),
        b"hi\n",
    )
    .await;
    assert_eq!(o.status.code(), Some(5), "{o:?}");
    assert_eq!(text(&o.stdout), "out hi", "{o:?}");
    assert!(text(&o.stderr).starts_with("err"), "{o:?}");
    let o = output(
        api.kubectl(&[
            "exec",
            "vmweb",
            "-c",
            "main",
            "--",
            "sh",
            "-c",
            "cat /ro/keep.txt",
        ]),
        b"",
    )
    .await;
    assert!(o.status.success(), "{o:?}");
    assert_eq!(text(&o.stdout), "read only");

    // A terminal: kubectl in a pty of `script` sized 30x100 sends that
    // size on its resize stream.
    let line = api.kubectl_line("exec -it vmweb -c main -- sh -c 'stty size; tty'");
    let o = output(
        {
            let mut c = std::process::Command::new("script");
            c.args([
                "-qec",
                &format!("stty rows 30 cols 100; {line}"),
                "/dev/null",
            ]);
            c
        },
        b"",
    )
    .await;
    let shown = text(&o.stdout);
    assert!(shown.contains("30 100"), "{o:?}");
    assert!(shown.contains("/dev/pts/"), "{o:?}");

    let o = output(
        api.kubectl(&["attach", "-i", "vmweb", "-c", "chat2"]),
        b"hi\n",
    )
    .await;
    assert_eq!(text(&o.stdout), "got hi", "{o:?}");
    assert!(text(&o.stderr).contains("to-stderr"), "{o:?}");
    assert_eq!(o.status.code(), Some(4), "{o:?}");

    // Port-forward: two connections through one kubectl, each its own
    // pair of SPDY streams.
    let pf = PortForward::start(api.kubectl(&["port-forward", "pod/vmweb", ":8080"])).await;
    for word in ["ping", "again"] {
        let mut c = tokio::net::TcpStream::connect(("127.0.0.1", pf.port))
            .await
            .unwrap();
        c.write_all(format!("{word}\n").as_bytes()).await.unwrap();
        let mut got = String::new();
        tokio::time::timeout(Duration::from_secs(60), c.read_to_string(&mut got))
            .await
            .expect("the forwarded connection did not end")
            .unwrap();
        assert_eq!(got.trim(), format!("pong {word}"));
    }
    drop(pf);
    drop(api);
    rs.remove_container(cri::RemoveContainerRequest {
        container_id: chat.clone(),
    })
    .await
    .unwrap();

    // Refusals, before any upgrade: an unknown token, a protocol huskd
    // does not speak, a request that upgrades to nothing.
    let host = forward_url
        .strip_prefix("http://")
        .and_then(|r| r.split('/').next())
        .unwrap()
        .to_owned();
    let raw = |path: String, extra: &str| {
        let host = host.clone();
        let req = format!("POST {path} HTTP/1.1\r\nHost: {host}\r\n{extra}\r\n");
        async move {
            let mut c = tokio::net::TcpStream::connect(host).await.unwrap();
            c.write_all(req.as_bytes()).await.unwrap();
            let mut got = String::new();
            c.read_to_string(&mut got).await.unwrap();
            got
        }
    };
    let spdy = "Connection: Upgrade\r\nUpgrade: SPDY/3.1\r\n";
    let r = raw(
        format!("/exec/{}", "0".repeat(32)),
        &format!("{spdy}X-Stream-Protocol-Version: v4.channel.k8s.io\r\n"),
    )
    .await;
    assert!(
        r.starts_with("HTTP/1.1 404") && r.contains("no such stream"),
        "{r}"
    );
    let fresh = rs
        .exec(cri::ExecRequest {
            container_id: main.into(),
            cmd: vec!["true".into()],
            stdout: true,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .url;
    let path = format!("/{}", fresh.splitn(4, '/').nth(3).unwrap());
    let r = raw(
        path.clone(),
        &format!("{spdy}X-Stream-Protocol-Version: v1.channel.k8s.io\r\n"),
    )
    .await;
    assert!(r.starts_with("HTTP/1.1 403"), "{r}");
    assert!(r.contains("huskd speaks v4.channel.k8s.io"), "{r}");
    let r = raw(path, "").await;
    assert!(
        r.starts_with("HTTP/1.1 400") && r.contains("SPDY/3.1 upgrade"),
        "{r}"
    );
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).trim().to_owned()
}

/// The husk-vm handler: the sandbox is a microVM booted at RunPodSandbox
/// (QEMU/TCG here); containers that CRI creates afterwards get their
/// layers and host directories over virtio-fs and run in the guest.
/// critest's sysctl, seccomp, masked/read-only path and PID namespace
/// specs in a VM sandbox: `main` has its own PID namespace and husk's
/// default seccomp profile; the sandbox has sysctls.
async fn vm_security_specs(
    rs: &mut RuntimeServiceClient<tonic::transport::Channel>,
    main: &str,
    create: impl Fn(cri::ContainerConfig) -> cri::CreateContainerRequest,
    config: impl Fn(&str, &str) -> cri::ContainerConfig,
) {
    // The sandbox's sysctls, in the guest.
    let out = exec_sync(
        rs,
        main,
        "cat /proc/sys/kernel/shm_rmid_forced /proc/sys/fs/mqueue/msg_max /proc/sys/net/ipv4/ip_unprivileged_port_start",
    )
    .await;
    assert_eq!(text(&out.stdout), "1\n100\n80", "{out:?}");
    // RuntimeDefault seccomp; PID 1 is main's own process.
    let out = exec_sync(
        rs,
        main,
        "grep Seccomp: /proc/self/status; tr -d '\\0' < /proc/1/cmdline",
    )
    .await;
    assert_eq!(text(&out.stdout), "Seccomp:\t2\nsleep600", "{out:?}");

    // A Localhost profile (critest's, blocking chmod), masked and
    // read-only paths as the kubelet sends them, and the pod's shared PID
    // namespace (no namespace options: POD, as containerd reads it).
    let dir = tempfile::tempdir().unwrap();
    let profile = dir.path().join("block-chmod.json");
    std::fs::write(
        &profile,
        r#"{"defaultAction": "SCMP_ACT_ALLOW", "syscalls": [{"names": ["chmod", "fchmodat"], "action": "SCMP_ACT_ERRNO"}]}"#,
    )
    .unwrap();
    let mut sec = config("sec", "exec sleep 600");
    let sc = cri::LinuxContainerSecurityContext {
        // /proc/kcore is a kubelet default the guest kernel need not
        // have: a masked path that is not there is left alone.
        masked_paths: vec![
            "/etc/greeting".into(),
            "/proc/kcore".into(),
            "/proc/sys/kernel".into(),
        ],
        readonly_paths: vec!["/tmp".into(), "/proc/sys".into()],
        seccomp: Some(cri::SecurityProfile {
            profile_type: cri::security_profile::ProfileType::Localhost as i32,
            localhost_ref: profile.display().to_string(),
        }),
        ..Default::default()
    };
    sec.linux = Some(cri::LinuxContainerConfig {
        security_context: Some(sc.clone()),
        ..Default::default()
    });
    let sec = started(rs, create(sec)).await;
    wait_state(rs, &sec, cri::ContainerState::ContainerRunning).await;
    let out = exec_sync(
        rs,
        &sec,
        "echo greeting=$(cat /etc/greeting); ls /proc/sys/kernel | wc -l; ls /proc/sys/fs | grep -c mqueue; \
         touch /tmp/x 2>&1; (echo 10 > /proc/sys/fs/mqueue/msg_max) 2>&1; \
         chmod 755 /etc 2>&1; tr -d '\\0' < /proc/1/cmdline; echo; \
         for p in /proc/[0-9]*; do tr '\\0' ' ' < $p/cmdline; echo; done 2>/dev/null | grep -c '^[s]leep 600'",
    )
    .await;
    let o = text(&out.stdout);
    let lines: Vec<&str> = o.lines().collect();
    // Masking /proc/sys/kernel hides it, not its siblings.
    assert_eq!(lines[..3], ["greeting=", "0", "1"], "{out:?}");
    assert!(lines[3].contains("Read-only file system"), "{out:?}");
    assert!(lines[4].contains("Read-only file system"), "{out:?}");
    assert!(lines[5].contains("Operation not permitted"), "{out:?}");
    // The pause is PID 1, and sec sees itself but not main (which has
    // its own namespace).
    assert_eq!(lines[6..], ["/pause", "1"], "{out:?}");
    // Without the profile chmod works: the profile, not the kernel,
    // refused it.
    let out = exec_sync(rs, main, "chmod 755 /etc && echo changed").await;
    assert_eq!(text(&out.stdout), "changed", "{out:?}");

    // A profile that is not there, or not a profile, is the client's
    // error, and nothing is created.
    for bad in ["/no/such/profile.json", "/etc/hostname"] {
        let mut c = config("badseccomp", "exec sleep 600");
        let mut sc = sc.clone();
        sc.seccomp.as_mut().unwrap().localhost_ref = bad.into();
        c.linux = Some(cri::LinuxContainerConfig {
            security_context: Some(sc),
            ..Default::default()
        });
        let err = rs.create_container(create(c)).await.unwrap_err();
        assert_eq!(err.code(), tonic::Code::InvalidArgument, "{err:?}");
        assert!(err.message().contains(bad), "{err:?}");
    }
    rs.remove_container(cri::RemoveContainerRequest { container_id: sec })
        .await
        .unwrap();
}

/// critest's SupplementalGroupsPolicy specs: Merge (the default) adds the
/// groups the image's /etc/group gives the user, Strict does not; both
/// the process and ContainerStatus.user show it.
async fn supplemental_groups_policy(
    rs: &mut RuntimeServiceClient<tonic::transport::Channel>,
    create: impl Fn(cri::ContainerConfig) -> cri::CreateContainerRequest,
    group_image: &str,
) {
    let features = rs
        .status(cri::StatusRequest { verbose: false })
        .await
        .unwrap()
        .into_inner()
        .features
        .unwrap();
    assert!(features.supplemental_groups_policy);
    for (policy, want) in [
        (
            cri::SupplementalGroupsPolicy::Merge,
            vec![1000, 1234, 50000],
        ),
        (cri::SupplementalGroupsPolicy::Strict, vec![1000, 1234]),
    ] {
        let name = format!("groups-{}", policy.as_str_name().to_ascii_lowercase());
        let mut c = container_config(&name, group_image, &[], vec![]);
        c.command = vec!["/bin/sh".into(), "-c".into(), "exec sleep 600".into()];
        c.linux = Some(cri::LinuxContainerConfig {
            security_context: Some(cri::LinuxContainerSecurityContext {
                run_as_user: Some(cri::Int64Value { value: 1000 }),
                supplemental_groups: vec![1234],
                supplemental_groups_policy: policy as i32,
                ..Default::default()
            }),
            ..Default::default()
        });
        let id = started(rs, create(c)).await;
        let st = wait_state(rs, &id, cri::ContainerState::ContainerRunning).await;
        let user = st.user.and_then(|u| u.linux).expect("ContainerStatus.user");
        assert_eq!((user.uid, user.gid), (1000, 1000), "{policy:?}");
        assert_eq!(user.supplemental_groups, want, "{policy:?}");
        let out = exec_sync(rs, &id, "id -G").await;
        let ids: Vec<String> = want.iter().map(|g| g.to_string()).collect();
        assert_eq!(text(&out.stdout), ids.join(" "), "{policy:?} {out:?}");
        rs.remove_container(cri::RemoveContainerRequest { container_id: id })
            .await
            .unwrap();
    }
}

#[test]
fn a_kubelet_runs_linux_containers_in_a_vm_sandbox_through_huskd() {
    let reg = Registry::start();
    let image = husk_tests::push_busybox_image(&reg, "cri/busybox:v1");
    let group_image = push_group_image(&reg, "cri/groups:v1");
    let env = vm_env().dual_stack();
    let mut huskd = Huskd::start(&env);
    let data = tempfile::tempdir().unwrap();
    std::fs::write(data.path().join("in.txt"), "from the host\n").unwrap();
    let ro = tempfile::tempdir().unwrap();
    std::fs::write(ro.path().join("keep.txt"), "read only\n").unwrap();
    rt().block_on(async {
        let mut rs = RuntimeServiceClient::new(huskd.channel().await);
        let mut is = ImageServiceClient::new(huskd.channel().await);
        let image_ref = pull(&mut is, &image).await;
        pull(&mut is, &group_image).await;

        // No hostname in the config, and a pod name longer than a host
        // name may be (critest's are): the name cut to 63 bytes, without
        // the trailing '-', is the guest's host name.
        let mut cfg = sandbox_config(&env, "vmweb", 0);
        cfg.hostname = String::new();
        let long_name = format!("vmweb--{}", "a-".repeat(40));
        cfg.metadata.as_mut().unwrap().name = long_name.clone();
        let hostname = long_name[..62].to_owned();
        assert!(hostname.ends_with('a') && long_name.as_bytes()[62] == b'-');
        // critest's safe and unsafe sysctls, and a network one: the guest
        // kernel is the pod's own.
        cfg.linux.get_or_insert_default().sysctls = HashMap::from([
            ("kernel.shm_rmid_forced".into(), "1".into()),
            ("fs.mqueue.msg_max".into(), "100".into()),
            ("net.ipv4.ip_unprivileged_port_start".into(), "80".into()),
        ]);
        // The kubelet's sum of the containers' limits: the VM is sized
        // from it at boot (256 MiB base + 128 MiB).
        cfg.linux.get_or_insert_default().resources = Some(cri::LinuxContainerResources {
            memory_limit_in_bytes: 128 << 20,
            ..Default::default()
        });
        let pod = rs
            .run_pod_sandbox(cri::RunPodSandboxRequest {
                config: Some(cfg.clone()),
                runtime_handler: "husk-vm".into(),
            })
            .await
            .unwrap()
            .into_inner()
            .pod_sandbox_id;
        let pst = rs
            .pod_sandbox_status(cri::PodSandboxStatusRequest {
                pod_sandbox_id: pod.clone(),
                verbose: false,
            })
            .await
            .unwrap()
            .into_inner()
            .status
            .unwrap();
        assert_eq!(pst.state, cri::PodSandboxState::SandboxReady as i32);
        assert_eq!(pst.runtime_handler, "husk-vm");
        let net = pst.network.unwrap();
        assert!(
            net.ip.starts_with(&format!("{}.", env.subnet_prefix)),
            "pod IP {}",
            net.ip
        );
        assert_eq!(net.additional_ips.len(), 1, "{net:?}");
        assert!(
            net.additional_ips[0].ip.starts_with(&env.subnet6_prefix),
            "{net:?}"
        );

        let config = |name: &str, script: &str, mounts: Vec<cri::Mount>| {
            let mut c = container_config(name, &image, &[], mounts);
            c.command = vec!["/bin/sh".into(), "-c".into(), script.into()];
            c
        };
        let create = |c: cri::ContainerConfig| cri::CreateContainerRequest {
            pod_sandbox_id: pod.clone(),
            config: Some(c),
            sandbox_config: Some(cfg.clone()),
        };
        let mount = |host: &Path, path: &str, readonly: bool| cri::Mount {
            host_path: host.display().to_string(),
            container_path: path.into(),
            readonly,
            ..Default::default()
        };
        // A long-running container with a writable and a read-only host
        // directory, in a PID namespace of its own (CONTAINER): SIGTERM is
        // ignored by PID 1 here, so the stop below has to kill it.
        let mut main_cfg = config(
            "main",
            "echo started; cat /etc/greeting; cat /etc/keep; cat /etc/motd 2>/dev/null || echo motd is whited out; cat /data/in.txt; echo written > /data/out.txt; printf '#!/bin/sh\\nread l; echo pong $l\\n' > /pong; chmod +x /pong; nc -ll -p 8080 -e /pong & echo $GREETING; exec sleep 600",
            vec![
                mount(data.path(), "/data", false),
                mount(ro.path(), "/ro", true),
            ],
        );
        main_cfg.linux = Some(cri::LinuxContainerConfig {
            security_context: Some(cri::LinuxContainerSecurityContext {
                namespace_options: Some(cri::NamespaceOption {
                    pid: cri::NamespaceMode::Container as i32,
                    ..Default::default()
                }),
                seccomp: Some(cri::SecurityProfile::default()),
                ..Default::default()
            }),
            ..Default::default()
        });
        let main = rs
            .create_container(create(main_cfg))
            .await
            .unwrap()
            .into_inner()
            .container_id;
        assert!(main.starts_with(&pod), "{main} is not under {pod}");
        rs.start_container(cri::StartContainerRequest {
            container_id: main.clone(),
        })
        .await
        .unwrap();
        let st = wait_state(&mut rs, &main, cri::ContainerState::ContainerRunning).await;
        assert_eq!(st.image_ref, image_ref);
        let log = Path::new(&cfg.log_directory).join("main_0.log");
        let t0 = Instant::now();
        while !log_lines(&log).iter().any(|l| l.ends_with("hello from cri")) {
            assert!(
                t0.elapsed() < Duration::from_secs(60),
                "main's log: {:?}",
                log_lines(&log)
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let lines: Vec<String> = log_lines(&log)
            .iter()
            .map(|l| l.splitn(4, ' ').nth(3).unwrap_or_default().to_owned())
            .collect();
        assert_eq!(
            lines,
            [
                "started",
                "from the top layer",
                "kept",
                "motd is whited out",
                "from the host",
                "hello from cri"
            ],
            "{lines:?}"
        );
        assert_eq!(
            std::fs::read_to_string(data.path().join("out.txt")).unwrap(),
            "written\n"
        );

        // ExecSync runs real processes in the container, in the guest.
        let out = exec_sync(&mut rs, &main, "awk '/MemTotal/ {print $2}' /proc/meminfo").await;
        let kib: u64 = text(&out.stdout).parse().unwrap();
        assert!(kib > 300 << 10, "the VM was not sized from the sandbox's resources: {kib} KiB");
        let out = exec_sync(&mut rs, &main, "hostname; uname -r; cat /ro/keep.txt").await;
        assert_eq!(out.exit_code, 0, "{out:?}");
        let o = text(&out.stdout);
        let o: Vec<&str> = o.lines().collect();
        let host_kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap();
        assert_eq!(o[0], hostname, "{o:?}");
        assert_ne!(o[1], host_kernel.trim(), "the guest runs its own kernel");
        assert_eq!(o[2], "read only");
        let out = exec_sync(&mut rs, &main, "echo oops >&2; touch /ro/x || exit 7").await;
        assert_eq!(out.exit_code, 7, "a read-only mount was writable: {out:?}");
        assert!(text(&out.stderr).starts_with("oops"), "{out:?}");
        assert!(!ro.path().join("x").exists());
        // Without NET_ADMIN (not a default capability) no bridge; with it,
        // the guest kernel makes one.
        let out = exec_sync(&mut rs, &main, "brctl addbr huskbr0 || echo refused").await;
        assert_eq!(text(&out.stdout), "refused", "{out:?}");
        let mut netadmin = config("netadmin", "exec sleep 600", vec![]);
        netadmin.linux = Some(cri::LinuxContainerConfig {
            security_context: Some(cri::LinuxContainerSecurityContext {
                capabilities: Some(cri::Capability {
                    add_capabilities: vec!["NET_ADMIN".into()],
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        });
        let netadmin = started(&mut rs, create(netadmin)).await;
        wait_state(&mut rs, &netadmin, cri::ContainerState::ContainerRunning).await;
        let out = exec_sync(
            &mut rs,
            &netadmin,
            "brctl addbr huskbr0 && grep -o huskbr0 /proc/net/dev",
        )
        .await;
        assert_eq!(text(&out.stdout), "huskbr0", "{out:?}");
        rs.remove_container(cri::RemoveContainerRequest {
            container_id: netadmin,
        })
        .await
        .unwrap();
        vm_security_specs(&mut rs, &main, &create, |n, s| config(n, s, vec![])).await;
        supplemental_groups_policy(&mut rs, &create, &group_image).await;
        // The kubelet's file mounts: its /etc/hosts (read-only) over the
        // guest's, and a termination log the container writes and the
        // kubelet reads on the host after it ends.
        let files = tempfile::tempdir().unwrap();
        let (hosts, term) = (files.path().join("etc-hosts"), files.path().join("termination-log"));
        std::fs::write(&hosts, "10.9.8.7 from-the-kubelet\n").unwrap();
        std::fs::write(&term, "").unwrap();
        let filer = started(
            &mut rs,
            create(config(
                "files",
                "cat /etc/hosts; echo bye > /dev/termination-log; (echo no > /etc/hosts) 2>/dev/null || echo hosts is read-only",
                vec![mount(&hosts, "/etc/hosts", true), mount(&term, "/dev/termination-log", false)],
            )),
        )
        .await;
        let st = wait_state(&mut rs, &filer, cri::ContainerState::ContainerExited).await;
        assert_eq!(st.exit_code, 0, "{st:?}");
        let log = Path::new(&cfg.log_directory).join("files_0.log");
        let lines: Vec<String> = log_lines(&log)
            .iter()
            .map(|l| l.splitn(4, ' ').nth(3).unwrap_or_default().to_owned())
            .collect();
        assert_eq!(lines, ["10.9.8.7 from-the-kubelet", "hosts is read-only"]);
        assert_eq!(std::fs::read_to_string(&term).unwrap(), "bye\n");
        assert_eq!(std::fs::read_to_string(&hosts).unwrap(), "10.9.8.7 from-the-kubelet\n");
        let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
        assert!(mounts.contains(files.path().to_str().unwrap()), "the file mounts are not bound");
        rs.remove_container(cri::RemoveContainerRequest {
            container_id: filer,
        })
        .await
        .unwrap();
        let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
        assert!(
            !mounts.contains(files.path().to_str().unwrap()),
            "a removed container's file mounts are still bound: {mounts}"
        );
        // An ExecSync that outlives its timeout is DeadlineExceeded (a
        // probe timeout for the kubelet), and its process is gone by then.
        let t0 = Instant::now();
        assert_eq!(
            code(
                rs.exec_sync(cri::ExecSyncRequest {
                    container_id: main.clone(),
                    cmd: vec!["/bin/sh".into(), "-c".into(), "exec sleep 31".into()],
                    timeout: 1,
                })
                .await
            ),
            tonic::Code::DeadlineExceeded
        );
        assert!(t0.elapsed() < Duration::from_secs(20));
        let out = exec_sync(&mut rs, &main, "pgrep -f 'sleep 31' || echo none").await;
        assert_eq!(text(&out.stdout), "none", "{out:?}");
        // The image's layers are shared read-only: a container's writes
        // land in its own upper layer.
        let out = exec_sync(&mut rs, &main, "echo changed > /etc/greeting && cat /etc/greeting").await;
        assert_eq!(text(&out.stdout), "changed", "{out:?}");

        // Exec through the streaming server: stdin in, both outputs and
        // the exit code out, as `kubectl exec -i` has them.
        let exec = |cmd: &str, tty: bool| cri::ExecRequest {
            container_id: main.clone(),
            cmd: vec!["/bin/sh".into(), "-c".into(), cmd.into()],
            tty,
            stdin: true,
            stdout: true,
            stderr: !tty,
        };
        let url = rs
            .exec(exec("read l; echo got $l; echo to-stderr >&2; exit 5", false))
            .await
            .unwrap()
            .into_inner()
            .url;
        let r = exec_stream(&url, vec![b"\0hello\n".to_vec(), vec![255, 0]]).await;
        assert_eq!(text(&r.out), "got hello");
        assert_eq!(text(&r.err), "to-stderr");
        assert_eq!(r.status["status"], "Failure", "{}", r.status);
        assert_eq!(r.status["details"]["causes"][0]["reason"], "ExitCode");
        assert_eq!(r.status["details"]["causes"][0]["message"], "5");
        // With a terminal that the client resizes.
        let url = rs
            .exec(exec("read l; stty size; tty", true))
            .await
            .unwrap()
            .into_inner()
            .url;
        let r = exec_stream(
            &url,
            vec![
                [&[4u8][..], br#"{"Width":100,"Height":30}"#].concat(),
                b"\0go\n".to_vec(),
            ],
        )
        .await;
        let out = text(&r.out);
        assert!(out.contains("30 100"), "{out:?}");
        assert!(out.contains("/dev/pts/"), "{out:?}");
        assert_eq!(r.status["status"], "Success", "{}", r.status);
        for (req, want) in [
            (
                cri::ExecRequest {
                    stderr: true,
                    ..exec("true", true)
                },
                tonic::Code::InvalidArgument,
            ),
            (
                cri::ExecRequest {
                    cmd: vec![],
                    ..exec("true", false)
                },
                tonic::Code::InvalidArgument,
            ),
            (
                cri::ExecRequest {
                    container_id: format!("{pod}00000000"),
                    ..exec("true", false)
                },
                tonic::Code::NotFound,
            ),
        ] {
            assert_eq!(code(rs.exec(req.clone()).await), want, "{req:?}");
        }

        // Stats: the container's cgroup in the guest, and the whole VM.
        let cstats = |rs: &mut RuntimeServiceClient<Channel>| {
            let mut rs = rs.clone();
            let id = main.clone();
            async move {
                rs.container_stats(cri::ContainerStatsRequest { container_id: id })
                    .await
                    .unwrap()
                    .into_inner()
                    .stats
                    .unwrap()
            }
        };
        let st = cstats(&mut rs).await;
        let cpu = st.cpu.as_ref().and_then(|c| c.usage_core_nano_seconds.as_ref());
        assert!(cpu.is_some_and(|c| c.value > 0), "{st:?}");
        let mem = st.memory.as_ref().and_then(|m| m.working_set_bytes.as_ref());
        assert!(mem.is_some_and(|m| m.value > 0), "{st:?}");
        let pstats = rs
            .pod_sandbox_stats(cri::PodSandboxStatsRequest {
                pod_sandbox_id: pod.clone(),
            })
            .await
            .unwrap()
            .into_inner()
            .stats
            .unwrap()
            .linux
            .unwrap();
        assert!(pstats.memory.is_some_and(|m| m.working_set_bytes.is_some_and(|w| w.value > 0)));
        assert!(pstats.containers.iter().any(|c| c.attributes.as_ref().unwrap().id == main));
        // UpdateContainerResources reaches the container's cgroup.
        rs.update_container_resources(cri::UpdateContainerResourcesRequest {
            container_id: main.clone(),
            linux: Some(cri::LinuxContainerResources {
                memory_limit_in_bytes: 64 << 20,
                ..Default::default()
            }),
            ..Default::default()
        })
        .await
        .unwrap();
        let st = cstats(&mut rs).await;
        let m = st.memory.unwrap();
        assert_eq!(
            m.working_set_bytes.unwrap().value + m.available_bytes.unwrap().value,
            64 << 20,
            "the new limit is not the cgroup's"
        );

        // Attach to a container created with stdin.
        let mut chat = config("chat", "read l; echo got $l; echo to-stderr >&2; exit 4", vec![]);
        chat.stdin = true;
        let chat = attach_chat(&mut rs, create(chat), Path::new(&cfg.log_directory), &main).await;
        rs.remove_container(cri::RemoveContainerRequest {
            container_id: chat.clone(),
        })
        .await
        .unwrap();

        // Port-forward into the VM: to a server on the guest's localhost.
        let url = forward_url(&mut rs, &pod, 8080).await;
        assert_eq!(forward_line(&url, 8080, "ping").await, "pong ping");

        // A real SPDY client: Debian's kubectl 1.20, through a stand-in for
        // the API server and the kubelet's streaming proxy.
        spdy_clients(&mut rs, &url, &pod, &main, &create, &config).await;

        // huskd killed with -9 and restarted: the VM and its container
        // never noticed.
        huskd.kill9();
        let huskd = Huskd::start(&env);
        let mut rs = RuntimeServiceClient::new(huskd.channel().await);
        let out = exec_sync(&mut rs, &main, "cat /data/out.txt").await;
        assert_eq!(text(&out.stdout), "written", "{out:?}");

        // A second container on the same layers: a fresh root, an exit code.
        let quick = rs
            .create_container(create(config(
                "quick",
                "cat /etc/greeting; exit 3",
                vec![],
            )))
            .await
            .unwrap()
            .into_inner()
            .container_id;
        rs.start_container(cri::StartContainerRequest {
            container_id: quick.clone(),
        })
        .await
        .unwrap();
        let st = wait_state(&mut rs, &quick, cri::ContainerState::ContainerExited).await;
        assert_eq!((st.exit_code, st.reason.as_str()), (3, "Error"), "{st:?}");
        let qlog = log_lines(&Path::new(&cfg.log_directory).join("quick_0.log"));
        assert!(
            qlog.iter().any(|l| l.ends_with("from the top layer")),
            "{qlog:?}"
        );
        assert_eq!(
            code(
                rs.exec_sync(cri::ExecSyncRequest {
                    container_id: quick.clone(),
                    cmd: vec!["/bin/sh".into()],
                    timeout: 5,
                })
                .await
            ),
            tonic::Code::FailedPrecondition
        );
        // The security context applies in the guest: user, group, a
        // read-only root, no capabilities.
        let mut secure = config(
            "secure",
            "id -u; id -g; touch /x 2>/dev/null && echo writable || echo read-only-root; grep CapEff /proc/self/status",
            vec![],
        );
        secure.linux = Some(cri::LinuxContainerConfig {
            security_context: Some(cri::LinuxContainerSecurityContext {
                run_as_user: Some(cri::Int64Value { value: 1000 }),
                run_as_group: Some(cri::Int64Value { value: 1001 }),
                readonly_rootfs: true,
                capabilities: Some(cri::Capability {
                    drop_capabilities: vec!["ALL".into()],
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        });
        // A group without a user is refused (the image's user is not
        // silently taken with it).
        let mut groupless = secure.clone();
        if let Some(sc) = groupless
            .linux
            .as_mut()
            .and_then(|l| l.security_context.as_mut())
        {
            sc.run_as_user = None;
        }
        assert_eq!(
            code(rs.create_container(create(groupless)).await),
            tonic::Code::InvalidArgument
        );
        let secure = rs
            .create_container(create(secure))
            .await
            .unwrap()
            .into_inner()
            .container_id;
        rs.start_container(cri::StartContainerRequest {
            container_id: secure.clone(),
        })
        .await
        .unwrap();
        let st = wait_state(&mut rs, &secure, cri::ContainerState::ContainerExited).await;
        assert_eq!(st.exit_code, 0, "{st:?}");
        let slog: Vec<String> = log_lines(&Path::new(&cfg.log_directory).join("secure_0.log"))
            .iter()
            .map(|l| l.splitn(4, ' ').nth(3).unwrap_or_default().to_owned())
            .collect();
        assert_eq!(
            slog,
            ["1000", "1001", "read-only-root", "CapEff:\t0000000000000000"],
            "{slog:?}"
        );
        rs.remove_container(cri::RemoveContainerRequest {
            container_id: secure.clone(),
        })
        .await
        .unwrap();

        // A graceful container ends on SIGTERM.
        let polite = rs
            .create_container(create(config(
                "polite",
                "trap 'echo bye; exit 0' TERM; echo up; while true; do sleep 0.2; done",
                vec![],
            )))
            .await
            .unwrap()
            .into_inner()
            .container_id;
        rs.start_container(cri::StartContainerRequest {
            container_id: polite.clone(),
        })
        .await
        .unwrap();
        let plog = Path::new(&cfg.log_directory).join("polite_0.log");
        let t0 = Instant::now();
        while !log_lines(&plog).iter().any(|l| l.ends_with(" up")) {
            assert!(t0.elapsed() < Duration::from_secs(60), "{:?}", log_lines(&plog));
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        for (id, timeout, want) in [(&polite, 30, 0), (&main, 2, 137)] {
            rs.stop_container(cri::StopContainerRequest {
                container_id: id.clone(),
                timeout,
            })
            .await
            .unwrap();
            let st = wait_state(&mut rs, id, cri::ContainerState::ContainerExited).await;
            assert_eq!(st.exit_code, want, "{st:?}");
        }
        assert!(log_lines(&plog).iter().any(|l| l.ends_with(" bye")));

        // A stop at once after the start (critest's "should support
        // stopping container"): the shell, PID 1 of its namespace, has not
        // installed its trap yet (here it waits a second first, to make
        // the guest's start-up window certain), and the kernel drops a
        // signal to such an init; the agent delivers it again until the
        // trap takes it, well inside the grace period (no SIGKILL: not 137).
        let hasty = stop_at_once(
            &mut rs,
            create(config(
                "hasty",
                "sleep 1; trap 'exit 143' TERM; while true; do sleep 0.2; done",
                vec![],
            )),
            143,
        )
        .await;

        // Removing the containers releases their mounts in the share.
        for id in [&main, &quick, &polite, &hasty] {
            rs.remove_container(cri::RemoveContainerRequest {
                container_id: id.clone(),
            })
            .await
            .unwrap();
        }
        let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
        assert!(
            !mounts.contains(data.path().to_str().unwrap()),
            "a removed container's host mount is still bound: {mounts}"
        );

        rs.stop_pod_sandbox(cri::StopPodSandboxRequest {
            pod_sandbox_id: pod.clone(),
        })
        .await
        .unwrap();
        rs.remove_pod_sandbox(cri::RemovePodSandboxRequest {
            pod_sandbox_id: pod.clone(),
        })
        .await
        .unwrap();
    });
    assert_eq!(
        std::fs::read_to_string(data.path().join("in.txt")).unwrap(),
        "from the host\n"
    );
    drop(huskd);
    env.finish();
}

/// One HTTP/2 frame: the 9-byte header, then `payload`.
fn h2_frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let mut f = (payload.len() as u32).to_be_bytes()[1..].to_vec();
    f.extend([kind, flags]);
    f.extend(stream.to_be_bytes());
    f.extend(payload);
    f
}

/// The next frame from `s`: (type, flags, stream, payload).
fn read_h2_frame(s: &mut std::os::unix::net::UnixStream) -> (u8, u8, u32, Vec<u8>) {
    use std::io::Read;
    let mut h = [0u8; 9];
    s.read_exact(&mut h).expect("huskd closed the connection");
    let len = u32::from_be_bytes([0, h[0], h[1], h[2]]) as usize;
    let mut p = vec![0u8; len];
    s.read_exact(&mut p).unwrap();
    let stream = u32::from_be_bytes([h[5], h[6], h[7], h[8]]) & 0x7fff_ffff;
    (h[3], h[4], stream, p)
}

/// A gRPC call made as grpc-go (the kubelet, crictl and critest up to
/// 1.30) makes it on a unix socket: HTTP/2 by hand, `:authority` the
/// socket's path, headers HPACK-coded with the dynamic table as Go's
/// encoder does. h2 alone refuses such a request with
/// RST_STREAM(PROTOCOL_ERROR); huskd answers it, and a call past its
/// `grpc-timeout` with DEADLINE_EXCEEDED.
#[test]
fn a_grpc_go_client_that_sends_the_socket_path_as_authority_is_answered_and_deadlines_hold() {
    use std::io::Write;
    let env = Env::new();
    let huskd = Huskd::start(&env);
    let mut s = std::os::unix::net::UnixStream::connect(&huskd.socket).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let authority = huskd.socket.to_str().unwrap().to_owned();
    let mut enc = loona_hpack::Encoder::new();
    let mut out = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
    out.extend(h2_frame(0x4, 0, 0, &[]));
    // Two calls on one connection: the second block refers to the first's
    // fields through the client's dynamic table.
    for stream in [1u32, 3] {
        let headers = [
            (":method", "POST"),
            (":scheme", "http"),
            (":path", "/runtime.v1.RuntimeService/Version"),
            (":authority", authority.as_str()),
            ("content-type", "application/grpc"),
            ("user-agent", "grpc-go/1.51.0"),
            ("te", "trailers"),
        ];
        let block = enc.encode(headers.iter().map(|(n, v)| (n.as_bytes(), v.as_bytes())));
        out.extend(h2_frame(0x1, 0x4, stream, &block));
        // An empty VersionRequest: not compressed, length 0.
        out.extend(h2_frame(0x0, 0x1, stream, &[0, 0, 0, 0, 0]));
    }
    // A pull from a registry that never answers, with grpc-go's 100 ms
    // deadline: DEADLINE_EXCEEDED, as critest 1.32 checks (tonic alone
    // answers CANCELLED).
    let black_hole = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let pull = cri::PullImageRequest {
        image: Some(cri::ImageSpec {
            image: format!("{}/never/answers:v1", black_hole.local_addr().unwrap()),
            ..Default::default()
        }),
        ..Default::default()
    };
    let block = enc.encode(
        [
            (":method", "POST"),
            (":scheme", "http"),
            (":path", "/runtime.v1.ImageService/PullImage"),
            (":authority", authority.as_str()),
            ("content-type", "application/grpc"),
            ("grpc-timeout", "100m"),
            ("te", "trailers"),
        ]
        .iter()
        .map(|(n, v)| (n.as_bytes(), v.as_bytes())),
    );
    out.extend(h2_frame(0x1, 0x4, 5, &block));
    let msg = {
        use prost::Message;
        pull.encode_to_vec()
    };
    let mut body = vec![0];
    body.extend((msg.len() as u32).to_be_bytes());
    body.extend(msg);
    out.extend(h2_frame(0x0, 0x1, 5, &body));
    s.write_all(&out).unwrap();
    let mut dec = loona_hpack::Decoder::new();
    let mut headers: HashMap<u32, Vec<(String, String)>> = HashMap::new();
    let mut data: HashMap<u32, Vec<u8>> = HashMap::new();
    let mut ended = 0;
    while ended < 3 {
        let (kind, flags, stream, payload) = read_h2_frame(&mut s);
        match kind {
            // SETTINGS: acknowledged, as a client must.
            0x4 if flags & 1 == 0 => s.write_all(&h2_frame(0x4, 1, 0, &[])).unwrap(),
            0x3 => panic!("huskd reset stream {stream}: error code {payload:?}"),
            0x7 => panic!("huskd sent GOAWAY: {payload:?}"),
            0x1 => {
                assert_ne!(
                    flags & 0x4,
                    0,
                    "no CONTINUATION expected for a short answer"
                );
                let h = dec.decode(&payload).unwrap();
                headers.entry(stream).or_default().extend(
                    h.into_iter().map(|(n, v)| {
                        (String::from_utf8(n).unwrap(), String::from_utf8(v).unwrap())
                    }),
                );
            }
            0x0 => data.entry(stream).or_default().extend(&payload),
            _ => {}
        }
        if matches!(kind, 0x0 | 0x1) && flags & 0x1 != 0 {
            ended += 1;
        }
    }
    for stream in [1, 3] {
        let h = &headers[&stream];
        let get = |k: &str| h.iter().find(|(n, _)| n == k).map(|(_, v)| v.as_str());
        assert_eq!(get(":status"), Some("200"), "{h:?}");
        assert_eq!(get("grpc-status"), Some("0"), "{h:?}");
        let body = &data[&stream];
        assert!(body.len() > 5, "{body:?}");
        use prost::Message;
        let v = cri::VersionResponse::decode(&body[5..]).unwrap();
        assert_eq!(v.runtime_name, "husk", "{v:?}");
        assert_eq!(v.runtime_api_version, "v1", "{v:?}");
    }
    let h = &headers[&5];
    let get = |k: &str| h.iter().find(|(n, _)| n == k).map(|(_, v)| v.as_str());
    assert_eq!(get("grpc-status"), Some("4"), "{h:?}");
    assert!(!data.contains_key(&5));
    drop(black_hole);
    let log = std::fs::read_to_string(env.root().join("huskd.log")).unwrap();
    assert!(
        log.contains("socket path as :authority"),
        "huskd did not log the rewrite: {log}"
    );
}
