//! The relay address behind NAT: `external_address = "auto"` discovers the public address
//! with STUN and advertises it. The test builds its own NAT in network namespaces (1:1
//! NAT with nftables, addresses only inside the namespaces): turnstone behind it, a second
//! turnstone outside as the STUN server, and `turnstone probe` outside relaying a round
//! trip through the discovered address; a reload discovers again. Without an answer the
//! server does not start and names the key.

mod common;

use std::process::Command;
use std::time::{Duration, Instant};

use common::netns::{ip, Netns};
use common::{require_tool, run_bounded};

/// The NAT's public address (TEST-NET-3, only inside the test's namespaces).
const PUBLIC: &str = "203.0.113.2";
/// The "Internet" host outside: the STUN server and the client.
const OUTSIDE: &str = "203.0.113.1";
/// turnstone's own (private) address behind the NAT.
const INSIDE: &str = "10.77.0.2";
const PORT: u16 = 3478;

/// Three namespaces joined by veths (deleted on drop): `in` (turnstone, 10.77.0.2) —
/// `nat` (10.77.0.1 | 203.0.113.2) — `out` (203.0.113.1).
fn build_nat() -> Netns {
    require_tool("nft", "apt-get install -y nftables");
    let n = Netns::new(&["in", "nat", "out"]);
    n.veth("in", &format!("{INSIDE}/24"), "nat", "10.77.0.1/24");
    // Datagrams from outside keep the veth's checksum offload (CHECKSUM_PARTIAL): the
    // kernel fast path (on by default, "auto", in the server's namespace) passes them up.
    n.veth(
        "out",
        &format!("{OUTSIDE}/24"),
        "nat",
        &format!("{PUBLIC}/24"),
    );
    ip(&[
        "-n",
        &n.ns("in"),
        "route",
        "add",
        "default",
        "via",
        "10.77.0.1",
    ]);
    n.exec("nat", &["sysctl", "-q", "-w", "net.ipv4.ip_forward=1"]);
    // 1:1 NAT, as a cloud's elastic IP: every port of PUBLIC maps to INSIDE.
    let rules = format!(
        "table ip ts_nat {{
           chain pre {{ type nat hook prerouting priority -100; ip daddr {PUBLIC} dnat to {INSIDE}; }}
           chain post {{ type nat hook postrouting priority 100; ip saddr {INSIDE} snat to {PUBLIC}; }}
         }}"
    );
    n.exec("nat", &["nft", &rules]);
    n
}

fn config(address: &str, relay: &str, allow: &str) -> String {
    format!(
        "[server]\nrealm = \"nat.test\"\n\n[[listen]]\ntransport = \"udp\"\naddress = \"{address}:{PORT}\"\n\n\
         [relay]\n{relay}\nports = \"40000-40999\"\n\n[auth]\nusers = {{ alice = \"wonderland\" }}\n\n\
         [policy]\nallow_peers = [\"{allow}\"]\n"
    )
}

#[test]
fn relay_behind_nat_advertises_the_discovered_address() {
    let nat = build_nat();
    let dir = tempfile::tempdir().unwrap();
    let _stun = nat.turnstone(
        "out",
        dir.path(),
        "stun-server",
        &config(
            OUTSIDE,
            &format!("address = \"{OUTSIDE}\""),
            "203.0.113.0/24",
        ),
    );
    let relay = format!(
        "address = \"{INSIDE}\"\nexternal_address = \"auto\"\ndiscover_with = [\"stun:{OUTSIDE}:{PORT}\"]"
    );
    let behind = nat.turnstone(
        "in",
        dir.path(),
        "behind-nat",
        &config(INSIDE, &relay, "203.0.113.0/24"),
    );
    let logs = behind.output();
    assert!(
        logs.contains("discovered the public address")
            && logs.contains(&format!("public={PUBLIC}")),
        "no discovery of {PUBLIC}:\n{logs}"
    );
    assert!(
        !logs
            .lines()
            .any(|l| l.contains("WARN") && l.contains("relay.address")),
        "auto must not warn about the private relay address:\n{logs}"
    );

    // A client on the outside relays a round trip through the advertised address (the
    // probe's own socket on OUTSIDE is the peer): the relay's traffic crosses the NAT both
    // ways.
    let url = format!("turn:{PUBLIC}:{PORT}?transport=udp");
    let out = nat.exec(
        "out",
        &[
            env!("CARGO_BIN_EXE_turnstone"),
            "probe",
            &url,
            "--user",
            "alice",
            "--password",
            "wonderland",
        ],
    );
    assert!(out.contains(&format!("relayed address {PUBLIC}:")), "{out}");
    assert!(
        out.lines()
            .any(|l| l.starts_with(&format!("OK: {url} relays"))),
        "{out}"
    );

    // A reload discovers again (and keeps serving).
    let pid = behind.id().expect("pid").to_string();
    let hup = run_bounded(
        "kill",
        Command::new("kill").args(["-HUP", &pid]),
        Duration::from_secs(5),
    );
    assert!(hup.status.success());
    let deadline = Instant::now() + Duration::from_secs(20);
    while Instant::now() < deadline && !behind.output().contains("configuration reloaded") {
        std::thread::sleep(Duration::from_millis(100));
    }
    let logs = behind.output();
    assert!(logs.contains("configuration reloaded"), "{logs}");
    assert_eq!(
        logs.matches("discovered the public address").count(),
        2,
        "discovery at start and on reload:\n{logs}"
    );
    let out = nat.exec(
        "out",
        &[
            env!("CARGO_BIN_EXE_turnstone"),
            "probe",
            &url,
            "-u",
            "alice",
            "-p",
            "wonderland",
        ],
    );
    assert!(
        out.contains(&format!("relayed address {PUBLIC}:")),
        "after reload: {out}"
    );
}

#[test]
fn without_a_stun_answer_the_server_does_not_start() {
    let dir = tempfile::tempdir().unwrap();
    // Nothing listens on the STUN server's port (bound here, never read).
    let silent = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let stun = silent.local_addr().unwrap();
    let listen = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let port = listen.local_addr().unwrap().port();
    drop(listen);
    let toml = format!(
        "[server]\nrealm = \"nat.test\"\n[[listen]]\ntransport = \"udp\"\naddress = \"127.0.0.1:{port}\"\n\
         [relay]\naddress = \"127.0.0.1\"\nexternal_address = \"auto\"\ndiscover_with = [\"stun:{stun}\"]\n\
         [auth]\nusers = {{ alice = \"wonderland\" }}\n"
    );
    let path = dir.path().join("auto.toml");
    std::fs::write(&path, toml).unwrap();
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_turnstone"));
    cmd.arg("--config").arg(&path);
    let out = run_bounded("turnstone", &mut cmd, Duration::from_secs(30));
    let text = out.combined();
    assert!(
        !out.status.success(),
        "started without a public address:\n{text}"
    );
    assert!(text.contains("relay.external_address"), "{text}");
    assert!(
        text.contains(&format!("stun:127.0.0.1:{}", stun.port())),
        "{text}"
    );
    assert!(!text.contains("listening"), "{text}");
}
