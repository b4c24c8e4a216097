//! Images end to end against a real registry on loopback (Debian's
//! docker-registry, started per test on a free port): wasm artifacts pulled
//! and run as pods, layer sharing, multi-platform indexes, rmi giving the
//! bytes back, a registry that serves corrupted bytes, and bad input.

mod common;
use common::*;
use husk_tests::{oci_client as client, rt, Registry};
use oci_client::client::{Config, ImageLayer};
use oci_client::secrets::RegistryAuth;
use oci_client::Reference;
use sha2::Digest as _;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::time::{Duration, Instant};

const WASM_CONFIG: &str = "application/vnd.wasm.config.v0+json";

/// Pushes a wasm artifact (one `application/wasm` layer); returns the
/// manifest URL's digest-less reference.
fn push_wasm(reference: &str, wasm: &[u8], config_extra: &str) {
    push_wasm_as(reference, wasm, config_extra, &RegistryAuth::Anonymous)
}

fn push_wasm_as(reference: &str, wasm: &[u8], config_extra: &str, auth: &RegistryAuth) {
    let r: Reference = reference.parse().unwrap();
    let layer = ImageLayer::new(wasm.to_vec(), "application/wasm".into(), None);
    let config = Config::new(
        format!(
            "{{\"architecture\":\"wasm\",\"os\":\"wasip1\",\"created\":\"2026-11-01T00:00:00Z\"{config_extra}}}"
        )
        .into_bytes(),
        WASM_CONFIG.into(),
        None,
    );
    rt().block_on(client().push(&r, &[layer], config, auth, None))
        .unwrap();
}

fn images_json(env: &Env) -> Vec<serde_json::Value> {
    let out = env.husk(&["images", "--format", "json"]);
    assert!(out.status.success(), "{}", stderr(&out));
    serde_json::from_slice::<serde_json::Value>(&out.stdout)
        .unwrap()
        .as_array()
        .unwrap()
        .clone()
}

fn blob_count(env: &Env) -> usize {
    std::fs::read_dir(env.root().join("lib/images/blobs/sha256"))
        .map(|r| r.count())
        .unwrap_or(0)
}

#[test]
fn wasm_artifact_pull_run_history_and_rmi() {
    let reg = Registry::start();
    let env = Env::new();
    let wasm = std::fs::read(probe()).unwrap();
    let name = format!("{}/tests/probe:v1", reg.host());
    push_wasm(&name, &wasm, ",\"history\":[{\"created\":\"2026-11-01T00:00:00Z\",\"created_by\":\"clang --target=wasm32-wasi probe.c\"}]");

    let out = env.husk(&["pull", &name]);
    let text = stdout(&out);
    assert!(out.status.success(), "{text}{}", stderr(&out));
    assert!(text.contains("Pull complete"), "{text}");
    assert!(text.contains("Digest: sha256:"), "{text}");
    let imgs = images_json(&env);
    assert_eq!(imgs.len(), 1);
    assert_eq!(imgs[0]["name"], name);
    assert_eq!(imgs[0]["platform"], "wasip1/wasm");
    assert!(imgs[0]["size"].as_u64().unwrap() >= wasm.len() as u64);
    let table = stdout(&env.husk(&["images"]));
    assert!(
        table.contains(&format!("{}/tests/probe", reg.host())) && table.contains("v1"),
        "{table}"
    );
    let hist = stdout(&env.husk(&["history", &name]));
    assert!(
        hist.contains("clang --target=wasm32-wasi probe.c"),
        "{hist}"
    );

    // A second pull downloads nothing.
    let again = stdout(&env.husk(&["pull", &name]));
    assert!(
        again.contains("Already exists") && !again.contains("Pull complete"),
        "{again}"
    );

    // Run it by reference, docker style and from a manifest.
    let out = env.husk(&["run", "--rm", &name, "echo", "from", "a", "registry"]);
    assert_eq!(stdout(&out), "from a registry\n", "{}", stderr(&out));
    let m = env.manifest(
        "pod.yaml",
        &format!("apiVersion: v1\nkind: Pod\nmetadata: {{name: user}}\nspec:\n  containers:\n  - {{name: main, image: \"{name}\", args: [stdin]}}\n"),
    );
    assert!(env.run_file(&m, &["-d"]).status.success());

    // rmi refuses while a pod uses the image, then frees every byte.
    let out = env.husk(&["rmi", &name]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains("used by pod user"),
        "{}",
        stderr(&out)
    );
    assert!(blob_count(&env) >= 3);
    // -f removes it all the same (the running guest keeps its compiled code).
    let out = env.husk(&["rmi", "-f", &name]);
    let text = stdout(&out);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(env.husk(&["rm", "-f", "user"]).status.success());
    assert!(
        text.contains(&format!("Untagged: {name}")) && text.contains("Freed:"),
        "{text}"
    );
    assert_eq!(blob_count(&env), 0, "blobs left after rmi");
    assert!(images_json(&env).is_empty());
    env.finish();
}

#[test]
fn layers_are_shared_between_images() {
    let reg = Registry::start();
    let env = Env::new();
    let wasm = std::fs::read(probe()).unwrap();
    let a = format!("{}/tests/a:1", reg.host());
    let b = format!("{}/tests/b:1", reg.host());
    push_wasm(&a, &wasm, ",\"labels\":{\"n\":\"a\"}");
    push_wasm(&b, &wasm, ",\"labels\":{\"n\":\"b\"}");
    assert!(env.husk(&["pull", &a]).status.success());
    let out = stdout(&env.husk(&["pull", &b]));
    assert!(
        out.contains("Already exists"),
        "the wasm layer is shared: {out}"
    );
    let imgs = images_json(&env);
    assert!(
        imgs.iter()
            .all(|i| i["sharedSize"].as_u64() == Some(wasm.len() as u64)),
        "{imgs:?}"
    );
    let layer = imgs[0]["layers"][0]["digest"].as_str().unwrap().to_owned();
    let layer_path = env
        .root()
        .join("lib/images/blobs/sha256")
        .join(layer.trim_start_matches("sha256:"));
    let out = stdout(&env.husk(&["rmi", &a]));
    assert!(!out.contains(&layer), "shared layer deleted with a: {out}");
    assert!(layer_path.exists());
    let out = stdout(&env.husk(&["rmi", &b]));
    assert!(out.contains(&layer), "{out}");
    assert!(!layer_path.exists());
    env.finish();
}

#[test]
fn multi_platform_index_picks_what_the_pod_runs() {
    let reg = Registry::start();
    let env = Env::new();
    let wasm = std::fs::read(probe()).unwrap();
    let wasm_ref = format!("{}/tests/multi:wasm", reg.host());
    push_wasm(&wasm_ref, &wasm, "");
    // A linux/amd64 image with one (tiny) tar layer.
    let linux_ref: Reference = format!("{}/tests/multi:linux", reg.host()).parse().unwrap();
    let layer = ImageLayer::new(
        vec![0u8; 1024],
        "application/vnd.oci.image.layer.v1.tar".into(),
        None,
    );
    let config = Config::new(
        b"{\"architecture\":\"amd64\",\"os\":\"linux\",\"rootfs\":{\"type\":\"layers\",\"diff_ids\":[]}}".to_vec(),
        "application/vnd.oci.image.config.v1+json".into(),
        None,
    );
    rt().block_on(client().push(&linux_ref, &[layer], config, &RegistryAuth::Anonymous, None))
        .unwrap();
    let manifest_of = |tag: &str| {
        let url = format!("http://{}/v2/tests/multi/manifests/{tag}", reg.host());
        let mut s = TcpStream::connect(("127.0.0.1", reg.port)).unwrap();
        write!(
            s,
            "GET {url} HTTP/1.1\r\nHost: {}\r\nAccept: application/vnd.oci.image.manifest.v1+json\r\nConnection: close\r\n\r\n",
            reg.host()
        )
        .unwrap();
        let mut resp = Vec::new();
        s.read_to_end(&mut resp).unwrap();
        let split = resp.windows(4).position(|w| w == b"\r\n\r\n").unwrap() + 4;
        let body = resp[split..].to_vec();
        (
            format!("sha256:{}", hex::encode(sha2::Sha256::digest(&body))),
            body.len(),
        )
    };
    let (wd, ws) = manifest_of("wasm");
    let (ld, ls) = manifest_of("linux");
    let index = format!(
        "{{\"schemaVersion\":2,\"mediaType\":\"application/vnd.oci.image.index.v1+json\",\"manifests\":[{{\"mediaType\":\"application/vnd.oci.image.manifest.v1+json\",\"digest\":\"{ld}\",\"size\":{ls},\"platform\":{{\"architecture\":\"amd64\",\"os\":\"linux\"}}}},{{\"mediaType\":\"application/vnd.oci.image.manifest.v1+json\",\"digest\":\"{wd}\",\"size\":{ws},\"platform\":{{\"architecture\":\"wasm\",\"os\":\"wasip1\"}}}}]}}"
    );
    let multi: Reference = format!("{}/tests/multi:latest", reg.host())
        .parse()
        .unwrap();
    rt().block_on(client().push_manifest_raw(
        &multi,
        index.into_bytes(),
        reqwest::header::HeaderValue::from_static("application/vnd.oci.image.index.v1+json"),
    ))
    .unwrap();
    let name = multi.whole();
    // A wasm pod pulls the wasm image of the index and runs it.
    let out = env.husk(&["run", "--rm", &name, "echo", "picked", "wasm"]);
    assert_eq!(stdout(&out), "picked wasm\n", "{}", stderr(&out));
    assert_eq!(images_json(&env)[0]["platform"], "wasip1/wasm");
    assert_eq!(images_json(&env)[0]["digest"], wd);
    // Asking for linux gets the other one.
    let out = env.husk(&["pull", "--platform", "linux", &name]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(images_json(&env)[0]["platform"], "linux/amd64");
    assert_eq!(images_json(&env)[0]["digest"], ld);
    // Its layer (an empty tar) unpacks into a snapshot; rmi removes it.
    let out = env.husk(&["unpack", &name]);
    assert!(out.status.success(), "{}", stderr(&out));
    let snap = std::path::PathBuf::from(stdout(&out).trim());
    assert!(snap.is_dir() && snap.starts_with(env.root()), "{snap:?}");
    // A linux image is not something a wasm pod can run.
    let out = env.husk(&["run", "--rm", &name, "echo"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        stderr(&out).contains("is not a wasm image"),
        "{}",
        stderr(&out)
    );
    assert!(env.husk(&["rmi", &name]).status.success());
    assert!(!snap.exists(), "snapshot left after rmi");
    env.finish();
}

/// What a test gateway does with one request (its head, with
/// `Connection: close`).
enum Reply {
    /// Pass it to the registry; flip the last byte of a blob body if
    /// `corrupt`; sleep `pause` after each 64 KiB sent back.
    Forward {
        head: String,
        corrupt: bool,
        pause: Duration,
    },
    /// Answer it here.
    Answer(String),
}

/// An HTTP gateway in front of the registry, one request per connection;
/// `decide` gets the request head and the gateway's own port.
fn gateway(upstream: u16, decide: impl Fn(String, u16) -> Reply + Send + Sync + 'static) -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    let decide = std::sync::Arc::new(decide);
    std::thread::spawn(move || {
        for conn in l.incoming() {
            let Ok(mut down) = conn else { break };
            let decide = decide.clone();
            std::thread::spawn(move || {
                let mut reader = BufReader::new(down.try_clone().unwrap());
                let mut head = String::new();
                loop {
                    let mut line = String::new();
                    if reader.read_line(&mut line).unwrap_or(0) == 0 {
                        return;
                    }
                    if line.to_ascii_lowercase().starts_with("connection:") {
                        continue;
                    }
                    let end = line == "\r\n";
                    if end {
                        head.push_str("Connection: close\r\n");
                    }
                    head.push_str(&line);
                    if end {
                        break;
                    }
                }
                let (head, corrupt, pause) = match decide(head, port) {
                    Reply::Answer(text) => {
                        let _ = down.write_all(text.as_bytes());
                        return;
                    }
                    Reply::Forward {
                        head,
                        corrupt,
                        pause,
                    } => (head, corrupt, pause),
                };
                let is_blob = head
                    .lines()
                    .next()
                    .is_some_and(|l| l.contains("/blobs/sha256:"));
                let mut up = TcpStream::connect(("127.0.0.1", upstream)).unwrap();
                up.write_all(head.as_bytes()).unwrap();
                let mut resp = Vec::new();
                let _ = up.read_to_end(&mut resp);
                let split = resp
                    .windows(4)
                    .position(|w| w == b"\r\n\r\n")
                    .map_or(resp.len(), |p| p + 4);
                if corrupt && is_blob && resp.len() > split && head.starts_with("GET") {
                    let last = resp.len() - 1;
                    resp[last] ^= 0xff;
                }
                for chunk in resp.chunks(64 << 10) {
                    if down.write_all(chunk).is_err() {
                        return;
                    }
                    std::thread::sleep(pause);
                }
            });
        }
    });
    port
}

/// Forwards to the registry, corrupting blobs and/or slowly.
fn proxy(upstream: u16, corrupt: bool, pause: Duration) -> u16 {
    gateway(upstream, move |head, _| Reply::Forward {
        head,
        corrupt,
        pause,
    })
}

/// A registry that wants bearer tokens, as Docker Hub and most hosted
/// registries do: a token service at /token trades `user:pass` (basic) for
/// a token, and only requests carrying it reach the registry. Debian has no
/// token server (docker-registry validates tokens but does not issue them),
/// so this test gateway issues them.
fn bearer_gate(upstream: u16, user: &str, pass: &str) -> u16 {
    use base64::Engine as _;
    let basic = format!(
        "authorization: basic {}",
        base64::engine::general_purpose::STANDARD.encode(format!("{user}:{pass}"))
    )
    .to_ascii_lowercase();
    gateway(upstream, move |head, port| {
        let lower = head.to_ascii_lowercase();
        let path = head.split(' ').nth(1).unwrap_or("").to_owned();
        let json = |status: &str, body: &str, extra: &str| {
            Reply::Answer(format!(
                "HTTP/1.1 {status}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n{extra}Connection: close\r\n\r\n{body}",
                body.len()
            ))
        };
        if path.starts_with("/token") {
            return if lower.contains(&basic) {
                json(
                    "200 OK",
                    r#"{"token":"tok-husk","access_token":"tok-husk","expires_in":300}"#,
                    "",
                )
            } else {
                json(
                    "401 Unauthorized",
                    r#"{"errors":[{"code":"UNAUTHORIZED"}]}"#,
                    "",
                )
            };
        }
        if lower.contains("authorization: bearer tok-husk") {
            let head = head
                .lines()
                .filter(|l| !l.to_ascii_lowercase().starts_with("authorization:"))
                .map(|l| format!("{l}\r\n"))
                .collect::<String>();
            return Reply::Forward {
                head,
                corrupt: false,
                pause: Duration::ZERO,
            };
        }
        json(
            "401 Unauthorized",
            r#"{"errors":[{"code":"UNAUTHORIZED","message":"authentication required"}]}"#,
            &format!(
                "WWW-Authenticate: Bearer realm=\"http://127.0.0.1:{port}/token\",service=\"husk-test\"\r\n"
            ),
        )
    })
}

#[test]
fn corrupted_bytes_and_bad_input_leave_the_store_unchanged() {
    let reg = Registry::start();
    let env = Env::new();
    let wasm = std::fs::read(probe()).unwrap();
    push_wasm(&format!("{}/tests/probe:v1", reg.host()), &wasm, "");
    let proxy = proxy(reg.port, true, Duration::ZERO);
    let out = env.husk(&["pull", &format!("127.0.0.1:{proxy}/tests/probe:v1")]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains("does not match its digest"),
        "{}",
        stderr(&out)
    );
    let tmp_left = std::fs::read_dir(env.root().join("lib/images/tmp"))
        .unwrap()
        .count();
    assert_eq!(tmp_left, 0, "partial download left");
    assert!(images_json(&env).is_empty());
    // What the failed pull had stored (manifest, config) is gone again.
    assert_eq!(blob_count(&env), 0);

    let cases: &[(&[&str], i32, &str)] = &[
        (&["pull", "Bad/Name"], 2, "invalid image reference"),
        (&["pull", "app@sha256:nothex"], 2, "invalid image reference"),
        (
            &["pull", &format!("{}/tests/absent:v1", reg.host())],
            1,
            "not found in the registry",
        ),
        (
            &["pull", "127.0.0.1:1/tests/probe:v1"],
            1,
            "cannot reach registry 127.0.0.1:1",
        ),
        (&["rmi", "nothing:here"], 1, "no such image"),
        (&["history", "nothing:here"], 1, "no such image"),
        (
            &["run", "--rm", &format!("{}/tests/absent:v1", reg.host())],
            2,
            "spec.containers[0].image",
        ),
    ];
    for (args, code, msg) in cases {
        let out = env.husk(args);
        assert_eq!(out.status.code(), Some(*code), "{args:?}: {}", stderr(&out));
        assert!(stderr(&out).contains(msg), "{args:?}: {}", stderr(&out));
    }
    assert!(images_json(&env).is_empty());
    assert_eq!(blob_count(&env), 0);
    env.finish();
}

#[test]
fn mirrors_tags_and_an_interrupted_pull() {
    let reg = Registry::start();
    let env = Env::new();
    // A 4 MiB layer that a slow proxy serves in about two seconds; it stays
    // valid wasm because a custom section swallows the padding.
    let mut wasm = std::fs::read(probe()).unwrap();
    let pad = (4 << 20) - wasm.len() - 16;
    wasm.push(0);
    let mut len = pad + 2;
    loop {
        let byte = (len & 0x7f) as u8;
        len >>= 7;
        wasm.push(if len > 0 { byte | 0x80 } else { byte });
        if len == 0 {
            break;
        }
    }
    wasm.push(1);
    wasm.push(b'p');
    wasm.extend(std::iter::repeat_n(0u8, pad));
    push_wasm(&format!("{}/mirrored/probe:v1", reg.host()), &wasm, "");
    let slow = proxy(reg.port, false, Duration::from_millis(30));
    std::fs::write(
        env.root().join("config.toml"),
        format!(
            "{}\n[registry]\nmirrors = {{ \"registry.k8s.io\" = \"http://127.0.0.1:{slow}\" }}\n",
            std::fs::read_to_string(env.root().join("config.toml")).unwrap()
        ),
    )
    .unwrap();
    let name = "registry.k8s.io/mirrored/probe:v1";
    // kill -9 in the middle of the layer download.
    let mut child = env
        .cmd()
        .args(["pull", name])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let tmp = env.root().join("lib/images/tmp");
    let t0 = Instant::now();
    loop {
        let partial = std::fs::read_dir(&tmp)
            .map(|r| r.flatten().any(|e| e.metadata().is_ok_and(|m| m.len() > 0)))
            .unwrap_or(false);
        if partial {
            break;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(20),
            "the download never started"
        );
        assert!(child.try_wait().unwrap().is_none(), "pull ended too early");
        std::thread::sleep(Duration::from_millis(10));
    }
    child.kill().unwrap();
    child.wait().unwrap();
    assert!(images_json(&env).is_empty(), "a killed pull left an image");
    // The retry redoes the download, drops the dead pull's file, and names
    // the image after the registry, not the mirror.
    let out = env.husk(&["pull", name]);
    assert!(out.status.success(), "{}", stderr(&out));
    let imgs = images_json(&env);
    assert_eq!(imgs.len(), 1);
    assert_eq!(imgs[0]["name"], name);
    assert_eq!(
        std::fs::read_dir(&tmp).unwrap().count(),
        0,
        "tmp files left"
    );
    let out = env.husk(&["run", "--rm", name, "echo", "via", "mirror"]);
    assert_eq!(stdout(&out), "via mirror\n", "{}", stderr(&out));
    // tag: a second name for the same content; removing one keeps the blobs.
    assert!(env
        .husk(&["tag", name, "local/probe:stable"])
        .status
        .success());
    let imgs = images_json(&env);
    assert_eq!(imgs.len(), 2);
    assert_eq!(imgs[0]["digest"], imgs[1]["digest"]);
    let before = blob_count(&env);
    let out = stdout(&env.husk(&["rmi", name]));
    assert!(!out.contains("Deleted"), "{out}");
    assert_eq!(blob_count(&env), before);
    assert!(env.husk(&["rmi", "local/probe:stable"]).status.success());
    assert_eq!(blob_count(&env), 0);
    env.finish();
}

#[test]
fn login_stores_credentials_that_pulls_use() {
    let reg = Registry::with_auth("alice", "wonder land");
    let env = Env::new();
    let wasm = std::fs::read(probe()).unwrap();
    let name = format!("{}/private/probe:v1", reg.host());
    push_wasm_as(
        &name,
        &wasm,
        "",
        &RegistryAuth::Basic("alice".into(), "wonder land".into()),
    );
    let auth_file = env.root().join("lib/auth.json");
    // Anonymous: refused, nothing stored.
    let out = env.husk(&["pull", &name]);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("husk login"), "{}", stderr(&out));
    assert!(images_json(&env).is_empty());
    // Wrong password: refused, nothing written.
    let login = |pass: &str| {
        let mut child = env
            .cmd()
            .args(["login", &reg.host(), "-u", "alice", "--password-stdin"])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        writeln!(child.stdin.take().unwrap(), "{pass}").unwrap();
        child.wait_with_output().unwrap()
    };
    let out = login("guess");
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains("wrong user name or password"),
        "{}",
        stderr(&out)
    );
    assert!(!auth_file.exists());
    let out = login("wonder land");
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(stdout(&out), "Login Succeeded\n");
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(
        std::fs::metadata(&auth_file).unwrap().permissions().mode() & 0o777,
        0o600
    );
    let out = env.husk(&["pull", &name]);
    assert!(out.status.success(), "{}", stderr(&out));
    let out = env.husk(&["run", "--rm", &name, "echo", "authenticated"]);
    assert_eq!(stdout(&out), "authenticated\n", "{}", stderr(&out));
    assert!(env.husk(&["logout", &reg.host()]).status.success());
    assert!(env.husk(&["rmi", &name]).status.success());
    assert_eq!(env.husk(&["pull", &name]).status.code(), Some(1));
    env.finish();
}

#[test]
fn save_and_load_oci_layouts_and_docker_archives() {
    let reg = Registry::start();
    let env = Env::new();
    let wasm = std::fs::read(probe()).unwrap();
    let name = format!("{}/offline/probe:v2", reg.host());
    push_wasm(&name, &wasm, "");
    assert!(env.husk(&["pull", "-q", &name]).status.success());
    let dir = env.root().join("saved-layout");
    let tarball = env.root().join("saved.tar");
    for out in [&dir, &tarball] {
        let o = env.husk(&["save", "-o", out.to_str().unwrap(), &name]);
        assert!(o.status.success(), "{}", stderr(&o));
    }
    assert!(dir.join("oci-layout").is_file() && dir.join("index.json").is_file());
    assert!(env.husk(&["rmi", &name]).status.success());
    assert_eq!(blob_count(&env), 0);
    for input in [&dir, &tarball] {
        let o = env.husk(&["load", "-i", input.to_str().unwrap()]);
        assert_eq!(
            stdout(&o),
            format!("Loaded image: {name}\n"),
            "{}",
            stderr(&o)
        );
        let o = env.husk(&["run", "--rm", &name, "echo", "offline"]);
        assert_eq!(stdout(&o), "offline\n", "{}", stderr(&o));
        assert!(env.husk(&["rmi", &name]).status.success());
    }
    // A tampered layout is refused and the store stays empty.
    let blob = std::fs::read_dir(dir.join("blobs/sha256"))
        .unwrap()
        .flatten()
        .max_by_key(|e| e.metadata().unwrap().len())
        .unwrap()
        .path();
    let mut bytes = std::fs::read(&blob).unwrap();
    bytes[100] ^= 1;
    std::fs::write(&blob, bytes).unwrap();
    let o = env.husk(&["load", "-i", dir.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(1));
    assert!(
        stderr(&o).contains("does not match its digest"),
        "{}",
        stderr(&o)
    );
    assert!(images_json(&env).is_empty());
    assert_eq!(blob_count(&env), 0, "a failed load left blobs");

    // A docker archive as `docker save` (before 25) writes it.
    let layer = {
        let mut b = tar::Builder::new(Vec::new());
        let mut h = tar::Header::new_gnu();
        h.set_size(6);
        h.set_mode(0o644);
        h.set_cksum();
        b.append_data(&mut h, "etc/motd", &b"hello\n"[..]).unwrap();
        b.into_inner().unwrap()
    };
    let config = br#"{"architecture":"amd64","os":"linux","created":"2026-01-02T03:04:05Z","rootfs":{"type":"layers","diff_ids":[]},"history":[{"created_by":"COPY motd /etc/motd"}]}"#;
    let manifest = br#"[{"Config":"cfg.json","RepoTags":["example.com/tools/box:1.0"],"Layers":["l1/layer.tar"]}]"#;
    let archive = env.root().join("docker.tar");
    {
        let mut b = tar::Builder::new(std::fs::File::create(&archive).unwrap());
        for (path, data) in [
            ("manifest.json", &manifest[..]),
            ("cfg.json", &config[..]),
            ("l1/layer.tar", &layer[..]),
        ] {
            let mut h = tar::Header::new_gnu();
            h.set_size(data.len() as u64);
            h.set_mode(0o644);
            h.set_cksum();
            b.append_data(&mut h, path, data).unwrap();
        }
        b.finish().unwrap();
    }
    let o = env.husk(&["load", "-i", archive.to_str().unwrap()]);
    assert_eq!(
        stdout(&o),
        "Loaded image: example.com/tools/box:1.0\n",
        "{}",
        stderr(&o)
    );
    let imgs = images_json(&env);
    assert_eq!(imgs[0]["platform"], "linux/amd64");
    let hist = stdout(&env.husk(&["history", "example.com/tools/box:1.0"]));
    assert!(hist.contains("COPY motd /etc/motd"), "{hist}");
    let o = env.husk(&["unpack", "example.com/tools/box:1.0"]);
    let snap = std::path::PathBuf::from(stdout(&o).trim());
    assert_eq!(std::fs::read(snap.join("etc/motd")).unwrap(), b"hello\n");
    assert!(env
        .husk(&["rmi", "example.com/tools/box:1.0"])
        .status
        .success());
    assert_eq!(blob_count(&env), 0);
    env.finish();
}

#[test]
fn search_inspect_and_prune() {
    let reg = Registry::start();
    let env = Env::new();
    let wasm = std::fs::read(probe()).unwrap();
    for r in ["tests/probe:v1", "tests/probe:v2", "other/thing:1"] {
        push_wasm(&format!("{}/{r}", reg.host()), &wasm, "");
    }
    let out = env.husk(&[
        "search",
        "probe",
        "--registry",
        &reg.host(),
        "--format",
        "json",
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    let hits: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(hits.as_array().unwrap().len(), 1, "{hits}");
    assert_eq!(hits[0]["repository"], format!("{}/tests/probe", reg.host()));
    let mut tags: Vec<_> = hits[0]["tags"].as_array().unwrap().clone();
    tags.sort_by_key(|t| t.to_string());
    assert_eq!(tags, ["v1", "v2"]);

    let name = format!("{}/tests/probe:v1", reg.host());
    assert!(env.husk(&["pull", "-q", &name]).status.success());
    let v: serde_json::Value =
        serde_json::from_slice(&env.husk(&["inspect", &name]).stdout).unwrap();
    assert_eq!(v["config"]["architecture"], "wasm");
    assert_eq!(v["manifest"]["layers"][0]["mediaType"], "application/wasm");

    // prune -a keeps what a pod uses.
    let m = env.manifest(
        "pod.yaml",
        &format!("apiVersion: v1\nkind: Pod\nmetadata: {{name: holder}}\nspec:\n  containers:\n  - {{name: main, image: \"{name}\", args: [stdin]}}\n"),
    );
    assert!(env.run_file(&m, &["-d"]).status.success());
    let out = stdout(&env.husk(&["image", "prune", "-a"]));
    assert!(!out.contains("Untagged"), "{out}");
    assert_eq!(images_json(&env).len(), 1);
    assert!(env.husk(&["rm", "-f", "holder"]).status.success());
    // Orphan blobs (a pull killed after writing them): old ones go, fresh
    // ones may belong to a pull in flight and stay.
    let blobs = env.root().join("lib/images/blobs/sha256");
    let old = blobs.join("0".repeat(64));
    let fresh = blobs.join("1".repeat(64));
    std::fs::write(&old, b"orphan").unwrap();
    std::fs::write(&fresh, b"orphan").unwrap();
    std::fs::File::options()
        .write(true)
        .open(&old)
        .unwrap()
        .set_modified(std::time::SystemTime::now() - Duration::from_secs(3600))
        .unwrap();
    let out = stdout(&env.husk(&["image", "prune", "-a"]));
    assert!(out.contains(&format!("Untagged: {name}")), "{out}");
    assert!(!old.exists() && fresh.exists());
    std::fs::remove_file(&fresh).unwrap();
    assert_eq!(blob_count(&env), 0);
    env.finish();
}

#[test]
fn spin_runwasi_and_entrypoint_images_run() {
    let reg = Registry::start();
    let env = Env::new();
    let wasm = std::fs::read(probe()).unwrap();
    let component = std::fs::read(probe_p2()).unwrap();
    // Spin's and runwasi's layer media types.
    for (repo, media, bytes) in [
        ("spin", "application/vnd.wasm.content.layer.v1+wasm", &wasm),
        (
            "runwasi",
            "application/vnd.bytecodealliance.wasm.component.layer.v0+wasm",
            &component,
        ),
    ] {
        let name = format!("{}/kinds/{repo}:1", reg.host());
        let r: Reference = name.parse().unwrap();
        let layer = ImageLayer::new(bytes.clone(), media.into(), None);
        let config = Config::new(b"{}".to_vec(), WASM_CONFIG.into(), None);
        rt().block_on(client().push(&r, &[layer], config, &RegistryAuth::Anonymous, None))
            .unwrap();
        let out = env.husk(&["run", "--rm", &name, "echo", repo]);
        assert_eq!(stdout(&out), format!("{repo}\n"), "{}", stderr(&out));
    }
    // An ordinary image whose entrypoint is a .wasm file in a tar layer,
    // under a second layer that whites out another file.
    let tar_layer = |files: &[(&str, &[u8])]| {
        let mut b = tar::Builder::new(Vec::new());
        for (path, data) in files {
            let mut h = tar::Header::new_gnu();
            h.set_size(data.len() as u64);
            h.set_mode(0o644);
            h.set_cksum();
            b.append_data(&mut h, path, *data).unwrap();
        }
        ImageLayer::new(
            b.into_inner().unwrap(),
            "application/vnd.oci.image.layer.v1.tar".into(),
            None,
        )
    };
    let layers = [
        tar_layer(&[("app/probe.wasm", &wasm[..]), ("app/old.wasm", &wasm[..])]),
        tar_layer(&[("app/.wh.old.wasm", &b""[..])]),
    ];
    let name = format!("{}/kinds/entry:1", reg.host());
    let config = Config::new(
        br#"{"architecture":"amd64","os":"linux","config":{"Entrypoint":["/app/probe.wasm"]},"rootfs":{"type":"layers","diff_ids":[]}}"#.to_vec(),
        "application/vnd.oci.image.config.v1+json".into(),
        None,
    );
    rt().block_on(client().push(
        &name.parse().unwrap(),
        &layers,
        config,
        &RegistryAuth::Anonymous,
        None,
    ))
    .unwrap();
    let out = env.husk(&["run", "--rm", &name, "echo", "entrypoint"]);
    assert_eq!(stdout(&out), "entrypoint\n", "{}", stderr(&out));
    env.finish();
}

#[test]
fn bearer_token_registries() {
    let reg = Registry::start();
    let env = Env::new();
    let wasm = std::fs::read(probe()).unwrap();
    push_wasm(&format!("{}/tokens/probe:v1", reg.host()), &wasm, "");
    let gate = bearer_gate(reg.port, "carol", "t0ken pass");
    let name = format!("127.0.0.1:{gate}/tokens/probe:v1");
    let out = env.husk(&["pull", &name]);
    assert_eq!(out.status.code(), Some(1), "anonymous pull got through");
    let login = |pass: &str| {
        env.husk(&[
            "login",
            &format!("127.0.0.1:{gate}"),
            "-u",
            "carol",
            "-p",
            pass,
        ])
    };
    let out = login("wrong");
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains("wrong user name or password"),
        "{}",
        stderr(&out)
    );
    let out = login("t0ken pass");
    assert!(out.status.success(), "{}", stderr(&out));
    let out = env.husk(&["run", "--rm", &name, "echo", "bearer"]);
    assert_eq!(stdout(&out), "bearer\n", "{}", stderr(&out));
    assert!(env.husk(&["rmi", &name]).status.success());
    env.finish();
}
