//! The Debian package (`cargo deb`, `[package.metadata.deb]` in Cargo.toml, `packaging/`):
//! - the .deb holds /usr/bin/turnstone, the unit with its /usr/bin drop-in, the sysusers.d
//!   entry, the configuration as a conffile (0640), and the example and the kernel fast
//!   path's drop-in (not active) under /usr/share/doc;
//! - installed with apt into a clean Debian bookworm root (mmdebstrap --variant=minbase),
//!   it creates the system user `turnstone` (no shell, no home), makes the configuration
//!   0640 root:turnstone, leaves the unit disabled, and the shipped configuration does not
//!   validate (no placeholder can serve); edited, it passes `turnstone check-config`, the
//!   installed binary run as `turnstone` in the root answers STUN and relays on loopback,
//!   and `systemd-analyze verify` accepts the installed unit;
//! - an upgrade keeps the edited configuration, removing keeps it, purging removes it.
//!
//! Tools: cargo-deb, mmdebstrap, dpkg-deb, objcopy, unshare (`bash scripts/test` installs
//! them); the root's packages come from Debian's mirror. See tests/common/debian.rs.

mod common;

use std::net::SocketAddr;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use std::time::Duration;

use common::debian::{build_deb, repo, run_ok, wait_stun, Chroot};
use common::traffic::UdpPeer;
use common::{
    free_udp_port, relay_port_range, relayed_payload, run_bounded, ServerOptions, TurnClient,
    PASSWORD, USER,
};

const CONFIG: &str = "/etc/turnstone/turnstone.toml";
const UNIT: &str = "/usr/lib/systemd/system/turnstone.service";
const DROP_IN: &str = "/usr/lib/systemd/system/turnstone.service.d/debian.conf";
const EXAMPLE: &str = "/usr/share/doc/turnstone/turnstone.toml.example";
const SYSUSERS: &str = "/usr/lib/sysusers.d/turnstone.conf";
/// The kernel fast path's systemd drop-in, shipped as documentation (not active).
const FAST_PATH_DROP_IN: &str = "/usr/share/doc/turnstone/kernel-fast-path.conf";
/// What an upgrade test installs over the crate's version.
const NEXT_VERSION: &str = "0.1.0+test1";

/// The package of the crate's version, built once per test process.
fn package() -> &'static Path {
    static DEB: OnceLock<PathBuf> = OnceLock::new();
    DEB.get_or_init(|| build_deb(None))
}

/// Mode bits (without the file type) and owner uid/gid of `path`.
fn mode_owner(path: &Path) -> (u32, u32, u32) {
    let m = std::fs::metadata(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    (m.permissions().mode() & 0o7777, m.uid(), m.gid())
}

/// `getent DATABASE KEY` in the root, split at `:`.
fn getent(root: &Chroot, database: &str, key: &str) -> Vec<String> {
    let out = root.ok(&["getent", database, key]).stdout;
    out.trim().split(':').map(str::to_string).collect()
}

/// A root with the package installed by apt (dependencies from the mirror).
fn installed() -> Chroot {
    let root = Chroot::bookworm();
    root.apt_install(&[package()]);
    root
}

/// A configuration for a server on 127.0.0.1:`port` relaying on loopback (the harness's
/// usual one: alice/wonderland, loopback peers allowed), as an operator's edit.
fn edited_config(port: u16) -> String {
    let listen = SocketAddr::from(([127, 0, 0, 1], port));
    format!(
        "# edited by the operator\n{}",
        ServerOptions::default().to_toml(listen, relay_port_range())
    )
}

/// Through the server: an Allocate, a Send indication echoed back in a Data indication,
/// and ChannelData echoed back on a channel.
fn assert_relays(server: SocketAddr) {
    let peer = UdpPeer::start(true);
    let mut c = TurnClient::udp(server, USER, PASSWORD);
    c.must_allocate();
    c.permit(peer.addr);
    c.send_to_peer(peer.addr, b"via the package").expect("send");
    assert!(
        c.receives_data_indication(b"via the package", Duration::from_secs(5)),
        "no Data indication back from the echo peer"
    );
    c.bind(0x4000, peer.addr);
    c.send_channel(0x4000, b"on a channel").expect("send");
    let back = c.recv(Duration::from_secs(5)).expect("ChannelData back");
    assert_eq!(relayed_payload(&back), Some(&b"on a channel"[..]));
}

#[test]
fn package_holds_the_files_and_the_conffile() {
    let deb = package();
    assert_eq!(
        deb.file_name().unwrap().to_string_lossy(),
        format!("turnstone_{}_amd64.deb", env!("CARGO_PKG_VERSION"))
    );
    let contents = run_ok(
        "dpkg-deb --contents",
        Command::new("dpkg-deb").arg("--contents").arg(deb),
        Duration::from_secs(30),
    )
    .stdout;
    // tar tv lines: "-rw-r----- 0/0  1234 2024-01-01 00:00 ./etc/turnstone/turnstone.toml"
    let entry = |path: &str| -> String {
        contents
            .lines()
            .find(|l| l.ends_with(&format!(".{path}")))
            .unwrap_or_else(|| panic!("{path} not in the package:\n{contents}"))
            .to_string()
    };
    for (path, mode) in [
        ("/usr/bin/turnstone", "-rwxr-xr-x"),
        (UNIT, "-rw-r--r--"),
        (DROP_IN, "-rw-r--r--"),
        (SYSUSERS, "-rw-r--r--"),
        (CONFIG, "-rw-r-----"),
        (EXAMPLE, "-rw-r--r--"),
        (FAST_PATH_DROP_IN, "-rw-r--r--"),
    ] {
        let line = entry(path);
        assert!(line.starts_with(&format!("{mode} 0/0 ")), "{path}: {line}");
    }
    // The kernel fast path's drop-in is documentation, never active as shipped.
    assert!(
        !contents.contains("turnstone.service.d/kernel-fast-path.conf"),
        "{contents}"
    );
    let info = |field: &str| {
        run_ok(
            "dpkg-deb --info",
            Command::new("dpkg-deb").arg("--info").arg(deb).arg(field),
            Duration::from_secs(30),
        )
        .stdout
    };
    assert_eq!(info("conffiles").trim(), CONFIG, "conffiles");
    let control = info("control");
    assert!(control.contains("Package: turnstone\n"), "{control}");
    assert!(
        control.contains("systemd | systemd-standalone-sysusers"),
        "the postinst runs systemd-sysusers:\n{control}"
    );
    let postinst = info("postinst");
    assert!(
        postinst.contains("systemd-sysusers") && postinst.contains("chown root:turnstone"),
        "{postinst}"
    );
    // Installing neither starts the service nor enables it (cargo-deb's "dont-enable"
    // script only re-enables a unit the administrator had enabled before an upgrade).
    assert!(
        !postinst.contains("deb-systemd-invoke start")
            && postinst.contains("if deb-systemd-helper debian-installed turnstone.service")
            && !postinst.contains("was-enabled defaults to true"),
        "{postinst}"
    );
}

#[test]
fn installed_package_serves_once_configured() {
    let root = installed();

    // The system user: no login shell, no home.
    let user = getent(&root, "passwd", "turnstone");
    let uid: u32 = user[2].parse().unwrap();
    assert!(uid < 1000, "not a system user: {user:?}");
    assert_eq!(user[5], "/nonexistent", "home: {user:?}");
    assert_eq!(user[6], "/usr/sbin/nologin", "shell: {user:?}");
    assert!(!root.path("/nonexistent").exists());
    let gid: u32 = getent(&root, "group", "turnstone")[2].parse().unwrap();

    // Files, owners and modes.
    assert_eq!(mode_owner(&root.path(CONFIG)), (0o640, 0, gid), "{CONFIG}");
    assert_eq!(
        mode_owner(&root.path("/etc/turnstone")),
        (0o750, 0, gid),
        "/etc/turnstone"
    );
    assert_eq!(mode_owner(&root.path("/usr/bin/turnstone")), (0o755, 0, 0));
    let read = |p: &str| std::fs::read_to_string(root.path(p)).expect(p);
    assert_eq!(
        read(EXAMPLE),
        std::fs::read_to_string(repo().join("conf/turnstone.toml")).unwrap()
    );
    assert_eq!(
        read(UNIT),
        std::fs::read_to_string(repo().join("systemd/turnstone.service")).unwrap()
    );
    assert!(read(DROP_IN)
        .contains("\nExecStart=/usr/bin/turnstone --config /etc/turnstone/turnstone.toml\n"));

    // Not enabled, and the shipped configuration cannot start a server.
    assert!(!root
        .path("/etc/systemd/system/multi-user.target.wants/turnstone.service")
        .exists());
    let check = root.run(&["turnstone", "check-config", CONFIG]);
    assert!(
        !check.status.success(),
        "the shipped configuration validates"
    );
    for key in ["server.realm", "relay.address", "auth"] {
        assert!(
            check.stderr.contains(key),
            "no word on {key}:\n{}",
            check.stderr
        );
    }
    let mut refused = root.command(
        Some("turnstone:turnstone"),
        &["turnstone", "--config", CONFIG],
    );
    let refused = run_bounded("turnstone", &mut refused, Duration::from_secs(30));
    assert!(
        !refused.status.success(),
        "started with the shipped configuration"
    );

    // The operator's edit (the file keeps its owner and mode).
    let port = free_udp_port();
    std::fs::write(root.path(CONFIG), edited_config(port)).expect("edit the configuration");
    root.ok(&["turnstone", "check-config", CONFIG]);

    // The installed binary as the service user: STUN and a relayed round trip.
    let server = root.spawn(
        "turnstone:turnstone",
        &["/usr/bin/turnstone", "--config", CONFIG],
    );
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    wait_stun(addr, Duration::from_secs(20), || server.output());
    assert_relays(addr);
    drop(server);

    // The unit as installed (with the drop-in: /usr/local/bin/turnstone does not exist
    // here, so a unit that still ran it would not verify).
    let verify = root.run(&["systemd-analyze", "verify", "--man=no", UNIT]);
    let text = verify.combined();
    let complaints: Vec<&str> = text.lines().filter(|l| l.contains("turnstone")).collect();
    assert!(
        verify.status.success() && complaints.is_empty(),
        "systemd-analyze verify {UNIT}:\n{text}"
    );
}

#[test]
fn upgrade_and_remove_keep_the_configuration_purge_removes_it() {
    let next = build_deb(Some(NEXT_VERSION));
    let root = installed();
    let gid: u32 = getent(&root, "group", "turnstone")[2].parse().unwrap();
    let edited = edited_config(free_udp_port());
    std::fs::write(root.path(CONFIG), &edited).expect("edit the configuration");

    let next_in_root = root.copy_in(&next, "/tmp/next.deb");
    root.ok(&["dpkg", "--install", next_in_root]);
    let version = root.ok(&[
        "dpkg-query",
        "--showformat=${Version}",
        "--show",
        "turnstone",
    ]);
    assert_eq!(version.stdout, NEXT_VERSION);
    assert_eq!(std::fs::read_to_string(root.path(CONFIG)).unwrap(), edited);
    assert_eq!(mode_owner(&root.path(CONFIG)), (0o640, 0, gid));

    root.ok(&["dpkg", "--remove", "turnstone"]);
    assert!(!root.path("/usr/bin/turnstone").exists());
    assert_eq!(std::fs::read_to_string(root.path(CONFIG)).unwrap(), edited);

    root.ok(&["dpkg", "--purge", "turnstone"]);
    assert!(
        !root.path("/etc/turnstone").exists(),
        "purge leaves /etc/turnstone"
    );
}
