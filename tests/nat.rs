//! The relay address behind NAT: `external_address = "auto"` discovers the public address
//! with STUN and advertises it. The test builds its own NAT in network namespaces (1:1
//! NAT with nftables, addresses only inside the namespaces): turnstone behind it, a second
//! turnstone outside as the STUN server, and `turnstone probe` outside relaying a round
//! trip through the discovered address; a reload discovers again. Without an answer the
//! server does not start and names the key.

mod common;

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use common::{require_tool, run_bounded, wait_for, ChildGuard};

/// The NAT's public address (TEST-NET-3, only inside the test's namespaces).
const PUBLIC: &str = "203.0.113.2";
/// The "Internet" host outside: the STUN server and the client.
const OUTSIDE: &str = "203.0.113.1";
/// turnstone's own (private) address behind the NAT.
const INSIDE: &str = "10.77.0.2";
const PORT: u16 = 3478;

/// Three namespaces, deleted (with their veths and nftables rules) on drop:
/// `inside` (turnstone, 10.77.0.2) — `nat` (10.77.0.1 | 203.0.113.2) — `outside` (203.0.113.1).
struct Nat {
    inside: String,
    nat: String,
    outside: String,
}

fn ip(args: &[&str]) {
    let out = run_bounded("ip", Command::new("ip").args(args), Duration::from_secs(10));
    assert!(out.status.success(), "ip {args:?}: {}", out.combined());
}

impl Nat {
    fn build() -> Nat {
        require_tool("ip", "apt-get install -y iproute2");
        require_tool("nft", "apt-get install -y nftables");
        let tag = std::process::id() % 100_000;
        let nat = Nat {
            inside: format!("ts-in-{tag}"),
            nat: format!("ts-nat-{tag}"),
            outside: format!("ts-out-{tag}"),
        };
        for ns in [&nat.inside, &nat.nat, &nat.outside] {
            let _ = Command::new("ip").args(["netns", "del", ns]).output();
            ip(&["netns", "add", ns]);
            ip(&["-n", ns, "link", "set", "lo", "up"]);
        }
        let (a, b) = (format!("tsi{tag}"), format!("tsn{tag}"));
        let (c, d) = (format!("tso{tag}"), format!("tsp{tag}"));
        ip(&[
            "link",
            "add",
            &a,
            "netns",
            &nat.inside,
            "type",
            "veth",
            "peer",
            &b,
            "netns",
            &nat.nat,
        ]);
        ip(&[
            "link",
            "add",
            &c,
            "netns",
            &nat.outside,
            "type",
            "veth",
            "peer",
            &d,
            "netns",
            &nat.nat,
        ]);
        ip(&[
            "-n",
            &nat.inside,
            "addr",
            "add",
            &format!("{INSIDE}/24"),
            "dev",
            &a,
        ]);
        ip(&["-n", &nat.nat, "addr", "add", "10.77.0.1/24", "dev", &b]);
        ip(&[
            "-n",
            &nat.nat,
            "addr",
            "add",
            &format!("{PUBLIC}/24"),
            "dev",
            &d,
        ]);
        ip(&[
            "-n",
            &nat.outside,
            "addr",
            "add",
            &format!("{OUTSIDE}/24"),
            "dev",
            &c,
        ]);
        for (ns, dev) in [
            (&nat.inside, &a),
            (&nat.nat, &b),
            (&nat.nat, &d),
            (&nat.outside, &c),
        ] {
            ip(&["-n", ns, "link", "set", dev, "up"]);
        }
        ip(&[
            "-n",
            &nat.inside,
            "route",
            "add",
            "default",
            "via",
            "10.77.0.1",
        ]);
        nat.exec(&nat.nat, &["sysctl", "-q", "-w", "net.ipv4.ip_forward=1"]);
        // 1:1 NAT, as a cloud's elastic IP: every port of PUBLIC maps to INSIDE.
        let rules = format!(
            "table ip ts_nat {{
               chain pre {{ type nat hook prerouting priority -100; ip daddr {PUBLIC} dnat to {INSIDE}; }}
               chain post {{ type nat hook postrouting priority 100; ip saddr {INSIDE} snat to {PUBLIC}; }}
             }}"
        );
        nat.exec(&nat.nat, &["nft", &rules]);
        nat
    }

    /// Runs `args` inside namespace `ns` to completion (bounded).
    fn exec(&self, ns: &str, args: &[&str]) -> String {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", ns]).args(args);
        let out = run_bounded(args[0], &mut cmd, Duration::from_secs(60));
        assert!(out.status.success(), "{args:?} in {ns}: {}", out.combined());
        out.combined()
    }

    /// A turnstone inside namespace `ns` with the configuration `toml`, once it listens.
    fn turnstone(&self, ns: &str, dir: &Path, name: &str, toml: &str) -> ChildGuard {
        let config = dir.join(format!("{name}.toml"));
        std::fs::write(&config, toml).unwrap();
        let mut cmd = Command::new("ip");
        cmd.args([
            "netns",
            "exec",
            ns,
            env!("CARGO_BIN_EXE_turnstone"),
            "--config",
        ])
        .arg(&config);
        let mut server = ChildGuard::spawn(name, &mut cmd);
        wait_for(
            &format!("{name} listening"),
            Duration::from_secs(20),
            || {
                if let Some(st) = server.try_wait() {
                    panic!("{name} exited ({st}):\n{}", server.output());
                }
                server.output().contains("listening").then_some(())
            },
        );
        server
    }
}

impl Drop for Nat {
    fn drop(&mut self) {
        for ns in [&self.inside, &self.nat, &self.outside] {
            let _ = Command::new("ip").args(["netns", "del", ns]).output();
        }
    }
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
    let nat = Nat::build();
    let dir = tempfile::tempdir().unwrap();
    let _stun = nat.turnstone(
        &nat.outside,
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
        &nat.inside,
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
        &nat.outside,
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
        &nat.outside,
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
