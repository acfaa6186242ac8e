//! The container image (`Containerfile`), built and run with podman without any container
//! registry: the base `debian:bookworm-slim` is made from Debian's packages (mmdebstrap,
//! imported as localhost/debian:bookworm-slim), then the Containerfile is built around the
//! Debian package of the binary under test (tests/common/debian.rs) and run with `--network host --read-only --cap-drop=ALL` and the
//! configuration mounted read-only. The container must:
//! - run turnstone as PID 1 as UID 10001 with no capability, and no compiler be in the image;
//! - answer STUN and relay coturn's `turnutils_uclient` to a `turnutils_peer` echo peer;
//! - answer GET /health, and its HEALTHCHECK pass (`podman healthcheck run`);
//! - log JSON lines on stdout;
//! - drain and exit 0 on `podman stop`.
//!
//! Tools: podman, runc, mmdebstrap, cargo-deb, objcopy, coturn (`bash scripts/test` installs them).

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use common::coturn::{run_uclient, EchoPeer};
use common::debian::{
    build_deb, ensure_base_image, podman, podman_ok, repo, wait_stun, Container, PODMAN_LIMITS,
};
use common::{free_port_on, relay_port_range, Listeners, ServerOptions, PASSWORD, USER};

/// The image this test builds (removed afterwards; the base image is kept).
const IMAGE: &str = "localhost/turnstone-test:latest";
/// The Containerfile's `USER`.
const UID: u32 = 10001;
const BUILD_TIMEOUT: Duration = Duration::from_secs(300);

/// Removes [`IMAGE`] on drop.
struct Image;

impl Drop for Image {
    fn drop(&mut self) {
        let _ = common::run_bounded(
            "podman rmi",
            podman().args(["rmi", "--force", IMAGE]),
            Duration::from_secs(60),
        );
    }
}

/// Builds the Containerfile into [`IMAGE`]: the context is a temporary directory holding
/// the repository's .dockerignore and the test package where the Containerfile takes it
/// from (target/debian/turnstone_VERSION_amd64.deb).
fn build_image() -> Image {
    let version = env!("CARGO_PKG_VERSION");
    let containerfile = repo().join("Containerfile");
    let text = std::fs::read_to_string(&containerfile).expect("Containerfile");
    assert!(
        text.contains(&format!("\nARG VERSION={version}\n")),
        "the Containerfile's ARG VERSION is not the crate's version {version}"
    );
    ensure_base_image();
    let context = tempfile::Builder::new()
        .prefix("turnstone-image-")
        .tempdir()
        .expect("temp dir");
    let debian = context.path().join("target/debian");
    std::fs::create_dir_all(&debian).expect("context dir");
    let deb = build_deb(None);
    std::fs::copy(&deb, debian.join(deb.file_name().unwrap())).expect("copy the package");
    std::fs::copy(
        repo().join(".dockerignore"),
        context.path().join(".dockerignore"),
    )
    .expect("copy .dockerignore");
    let containerfile = containerfile.display().to_string();
    let context_dir = context.path().display().to_string();
    // No layer cache: nothing but IMAGE stays behind.
    let mut args = vec![
        "build",
        "--pull=never",
        "--layers=false",
        "--format",
        "docker",
    ];
    args.extend(PODMAN_LIMITS);
    args.extend(["--file", &containerfile, "--tag", IMAGE, &context_dir]);
    podman_ok(&args, BUILD_TIMEOUT);
    Image
}

/// The status code of `GET path` on `addr`.
fn http_status(addr: SocketAddr, path: &str) -> Option<u16> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(3))).ok()?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").ok()?;
    let mut out = String::new();
    s.read_to_string(&mut out).ok()?;
    out.split(' ').nth(1)?.parse().ok()
}

/// `Uid:` and `CapEff:` of `/proc/PID/status`.
fn uid_and_capabilities(pid: &str) -> (String, String) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("status");
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .map(|v| v.split_whitespace().next().unwrap_or("").to_string())
            .unwrap_or_else(|| panic!("no {name} in /proc/{pid}/status"))
    };
    (field("Uid:"), field("CapEff:"))
}

#[test]
fn image_relays_read_only_without_capabilities() {
    let _image = build_image();
    let inspect = podman_ok(
        &[
            "image",
            "inspect",
            "--format",
            "{{.Config.User}} {{json .Config.Healthcheck}}",
            IMAGE,
        ],
        Duration::from_secs(30),
    )
    .stdout;
    assert!(inspect.starts_with(&format!("{UID}:{UID} ")), "{inspect}");
    assert!(inspect.contains("/health"), "no HEALTHCHECK: {inspect}");
    let mut args = vec!["run", "--rm", "--entrypoint", "/bin/sh"];
    args.extend(PODMAN_LIMITS);
    args.extend([
        IMAGE,
        "-c",
        "for t in cc gcc clang rustc cargo; do command -v $t; done; \
         for t in sed sleep; do command -v $t >/dev/null || echo no $t; done; true",
    ]);
    let tools = podman_ok(&args, Duration::from_secs(60));
    // No compiler; what deploy/kubernetes/daemonset.yaml's shell commands use.
    assert_eq!(tools.stdout.trim(), "", "compilers, or tools missing");

    // The configuration: UDP and TCP on a loopback port, /health, text logs (the image makes
    // them JSON), a short drain.
    let dir = tempfile::tempdir().expect("temp dir");
    let ip = "127.0.0.1".parse().unwrap();
    let port = free_port_on(&[ip]);
    let metrics = SocketAddr::new(
        ip,
        loop {
            let p = free_port_on(&[ip]);
            if p != port {
                break p;
            }
        },
    );
    let mut listeners = Listeners::udp_only(SocketAddr::new(ip, port));
    listeners.tcp = true;
    listeners.metrics = Some(metrics);
    let config = ServerOptions::default()
        .server_toml("drain_timeout = \"2s\"")
        .log("info", "text")
        .to_toml_with(&listeners, relay_port_range());
    let config_path = dir.path().join("turnstone.toml");
    std::fs::write(&config_path, config).expect("write config");

    let name = format!("turnstone-test-{}", std::process::id());
    let mount = format!("{}:/etc/turnstone/turnstone.toml:ro", config_path.display());
    let health = format!("TURNSTONE_HEALTH={metrics}");
    let mut container = Container::run(
        &name,
        &[
            "--network",
            "host",
            "--read-only",
            "--cap-drop=ALL",
            "--env",
            &health,
            "--volume",
            &mount,
        ],
        IMAGE,
        &[],
    );
    let addr = SocketAddr::new(ip, port);
    wait_stun(addr, Duration::from_secs(60), || container.process.output());

    // turnstone itself is PID 1 of the container: UID 10001, no capability.
    let pid = container
        .podman(&["inspect", "--format", "{{.State.Pid}}", &name])
        .stdout;
    let comm = std::fs::read_to_string(format!("/proc/{}/comm", pid.trim())).expect("comm");
    assert_eq!(comm.trim(), "turnstone");
    let (uid, caps) = uid_and_capabilities(pid.trim());
    assert_eq!(uid, UID.to_string());
    assert_eq!(caps, "0000000000000000", "effective capabilities");

    // A real client relays through it.
    let peer = EchoPeer::start("127.0.0.1");
    let (port_arg, peer_arg) = (port.to_string(), peer.port.to_string());
    run_uclient(
        &[
            "-u",
            USER,
            "-w",
            PASSWORD,
            "-p",
            &port_arg,
            "-e",
            "127.0.0.1",
            "-r",
            &peer_arg,
            "-c",
            "-X",
            "-g",
        ],
        "127.0.0.1",
        2,
        100,
        Duration::from_secs(120),
    );

    assert_eq!(http_status(metrics, "/health"), Some(200));
    let check = container.podman(&["healthcheck", "run", &name]);
    assert!(
        check.status.success(),
        "HEALTHCHECK failed: {}",
        check.combined()
    );

    // SIGTERM drains (2 s at most) and turnstone exits 0.
    let stop = container.podman(&["stop", "--time", "20", &name]);
    assert!(stop.status.success(), "podman stop: {}", stop.combined());
    let status = container.process.wait_exit(Duration::from_secs(30));
    assert!(
        status.is_some_and(|s| s.success()),
        "exit after podman stop: {status:?}\n{}",
        container.process.output()
    );

    // Every line on stdout is a JSON log record; there are some.
    let stdout = container.process.stdout();
    let lines: Vec<&str> = stdout.lines().filter(|l| !l.trim().is_empty()).collect();
    assert!(!lines.is_empty(), "no logs on stdout");
    for line in lines {
        let v: serde_json::Value = serde_json::from_str(line)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {line}\n{stdout}"));
        assert!(v.get("level").is_some(), "{line}");
    }
}
