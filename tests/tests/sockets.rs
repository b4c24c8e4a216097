//! Sockets end to end: wasi:sockets TCP in p2 components, localhost between
//! the containers of a pod, pod to pod by IP, containerPorts as preopened
//! listening sockets for p1 modules, and hostPort through CNI portmap.

mod common;
use common::*;
use std::io::{BufRead, BufReader, Write};
use std::net::TcpStream;
use std::process::Command;
use std::time::{Duration, Instant};

fn pod_ip(env: &Env, pod: &str) -> String {
    env.inspect(pod)["status"]["podIP"]
        .as_str()
        .unwrap_or_else(|| panic!("{pod} has no podIP"))
        .to_owned()
}

fn logs(env: &Env, pod: &str, container: &str) -> String {
    stdout(&env.husk(&["logs", pod, "-c", container]))
}

#[test]
fn p2_tcp_localhost_between_containers_and_pod_to_pod() {
    let env = Env::new();
    let m = env.manifest(
        "srv.yaml",
        "apiVersion: v1\nkind: Pod\nmetadata: {name: srv}\nspec:\n  restartPolicy: Never\n  containers:\n  - {name: server, image: $NETPROBE, args: [serve, \"8080\", \"2\"], ports: [{containerPort: 8080}]}\n  - {name: local, image: $NETPROBE, args: [connect, 127.0.0.1, \"8080\", from-localhost]}\n",
    );
    let out = env.run_file(&m, &["-d"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let v = env.wait_for("srv", "the localhost client to finish", |v| {
        env.container(v, "local")["state"]["terminated"].is_object()
    });
    assert_eq!(
        env.container(&v, "local")["state"]["terminated"]["exitCode"],
        0,
        "{}",
        logs(&env, "srv", "local")
    );
    assert_eq!(logs(&env, "srv", "local"), "pong from-localhost\n");
    // A second pod reaches the server by its pod IP.
    let ip = pod_ip(&env, "srv");
    let out = env.husk(&[
        "run",
        "--rm",
        netprobe().to_str().unwrap(),
        "connect",
        &ip,
        "8080",
        "from-pod",
    ]);
    assert_eq!(stdout(&out), "pong from-pod\n", "{}", stderr(&out));
    let v = env.wait_for("srv", "the server to finish", |v| {
        v["status"]["finished"] == true
    });
    assert_eq!(
        env.container(&v, "server")["state"]["terminated"]["exitCode"],
        0
    );
    assert_eq!(
        logs(&env, "srv", "server"),
        "listening on 8080\nserved from-localhost\nserved from-pod\n"
    );
    env.finish();
}

#[test]
fn p1_container_port_is_a_preopened_listening_socket() {
    let env = Env::new();
    // The server is a p1 module: it gets port 8081 as fd 3, keeps its
    // configMap volume visible, and serves a p2 client over localhost.
    let m = env.manifest(
        "p1.yaml",
        "apiVersion: v1\nkind: Pod\nmetadata: {name: p1s}\nspec:\n  restartPolicy: Never\n  volumes:\n  - {name: cfg, configMap: {name: cfg}}\n  containers:\n  - name: server\n    image: $PROBE\n    args: [serve, \"2\", /cfg/motd]\n    ports: [{containerPort: 8081}]\n    volumeMounts: [{name: cfg, mountPath: /cfg}]\n  - {name: c1, image: $NETPROBE, args: [connect, 127.0.0.1, \"8081\", one]}\n  - {name: c2, image: $NETPROBE, args: [connect, 127.0.0.1, \"8081\", two]}\n---\napiVersion: v1\nkind: ConfigMap\nmetadata: {name: cfg}\ndata: {motd: volume-visible}\n",
    );
    let out = env.run_file(&m, &[]);
    let text = stdout(&out);
    assert_eq!(out.status.code(), Some(0), "{text}\n{}", stderr(&out));
    assert!(
        text.contains("server | serving fd 3 (LISTEN_FDS=1)"),
        "{text}"
    );
    assert!(text.contains("c1 | pong one volume-visible"), "{text}");
    assert!(text.contains("c2 | pong two volume-visible"), "{text}");
    assert!(
        text.contains("server | served one") && text.contains("server | served two"),
        "{text}"
    );
    // Without a declared port there is no socket at fd 3: accept fails.
    let out = env.husk(&["run", "--rm", probe().to_str().unwrap(), "serve", "1"]);
    assert_ne!(out.status.code(), Some(0));
    assert!(stderr(&out).contains("poll") || stderr(&out).contains("accept"));
    env.finish();
}

/// Runs `server` as pod `name` with hostPort `mapping`, then checks that
/// portmap installed its DNAT (with `iptables`: iptables or ip6tables),
/// that a line sent to `gateway` (the bridge's address, host port) comes
/// back from the pod's server, and that rm takes the rules away.
fn host_port_round_trip(
    env: &Env,
    name: &str,
    mapping: &str,
    server: &[&str],
    iptables: &str,
    gateway: &str,
    line: &str,
) {
    let mut args = vec!["run", "-d", "--name", name, "-p", mapping];
    args.extend_from_slice(server);
    let out = env.husk(&args);
    assert!(out.status.success(), "{}", stderr(&out));
    env.wait_for(name, "the server to listen", |v| {
        env.container(v, "main")["state"]["running"].is_object()
    });
    let host_port = mapping.split(':').next().unwrap();
    let rules = || {
        let o = Command::new(iptables)
            .args(["-t", "nat", "-S"])
            .output()
            .unwrap();
        stdout(&o)
            .lines()
            .filter(|l| l.contains(&format!("--dport {host_port}")))
            .count()
    };
    assert!(rules() > 0, "portmap installed no {iptables} DNAT rule");
    let t0 = Instant::now();
    let mut conn = loop {
        match TcpStream::connect(gateway) {
            Ok(c) => break c,
            Err(e) => {
                assert!(t0.elapsed() < Duration::from_secs(10), "{gateway}: {e}");
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    };
    conn.set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    conn.write_all(format!("{line}\n").as_bytes()).unwrap();
    let mut reply = String::new();
    BufReader::new(conn).read_line(&mut reply).unwrap();
    assert_eq!(reply, format!("pong {line}\n"));
    env.wait_for(name, "the server to finish", |v| {
        v["status"]["finished"] == true
    });
    assert!(env.husk(&["rm", name]).status.success());
    assert_eq!(rules(), 0, "portmap's {iptables} rules left after rm");
}

#[test]
fn host_port_reaches_the_pod_through_portmap() {
    let env = Env::new();
    let host_port = 20000 + (std::process::id() % 20000) as u16;
    // From the host: the bridge's gateway address, host port → pod port.
    host_port_round_trip(
        &env,
        "web",
        &format!("{host_port}:8082"),
        &[probe().to_str().unwrap(), "serve", "1"],
        "iptables",
        &format!("{}.1:{host_port}", env.subnet_prefix),
        "via-host-port",
    );
    env.finish();
}

/// hostPort over IPv6 on a dual-stack network: portmap's ip6tables DNAT
/// from the bridge's IPv6 gateway address to the pod's IPv6 address.
#[test]
fn host_port_reaches_an_ipv6_server_through_portmap() {
    let env = Env::new().dual_stack();
    let host_port = 20000 + ((std::process::id() + 7) % 20000) as u16;
    host_port_round_trip(
        &env,
        "web6",
        &format!("{host_port}:8092"),
        &[netprobe().to_str().unwrap(), "serve6", "8092", "1"],
        "ip6tables",
        &format!("[{}1]:{host_port}", env.subnet6_prefix),
        "via-ipv6-host-port",
    );
    env.finish();
}
