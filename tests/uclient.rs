//! coturn's own test clients against turnstone (Debian package `coturn`):
//! `turnutils_uclient` relays traffic through the server to a `turnutils_peer` echo
//! peer (or between its own clients) and must report zero lost packets;
//! `turnutils_stunclient` must learn its reflexive address.
//!
//! uclient's final summary, as printed by coturn 4.6.1 (on stdout and stderr):
//!     N: : start_mclient: tot_send_msgs=10000, tot_recv_msgs=10000
//!     N: : Total lost packets 0 (0.000000%), total send dropped 0 (0.000000%)
//! and on an authentication failure: `ERROR: Cannot complete Allocation`, exit 255.

mod common;

use common::{free_udp_port, require_tool, run_bounded, ChildGuard, ServerOptions, TestServer};
use std::process::Command;
use std::time::Duration;

const HINT: &str = "apt-get install -y coturn";
const UCLIENT_TIMEOUT: Duration = Duration::from_secs(120);

/// A `turnutils_peer` UDP echo peer on 127.0.0.1, killed on drop.
struct Peer {
    port: u16,
    _guard: ChildGuard,
}

fn start_peer() -> Peer {
    let bin = require_tool("turnutils_peer", HINT);
    let port = free_udp_port();
    let mut cmd = Command::new(bin);
    cmd.args(["-L", "127.0.0.1", "-p", &port.to_string()]);
    let mut guard = ChildGuard::spawn("turnutils_peer", &mut cmd);
    // Let it bind; fail early if it died (e.g. port taken).
    std::thread::sleep(Duration::from_millis(200));
    if let Some(st) = guard.try_wait() {
        panic!("turnutils_peer exited at once ({st})"); // Drop prints its output
    }
    Peer {
        port,
        _guard: guard,
    }
}

/// The counters of uclient's final summary.
#[derive(Debug)]
struct Summary {
    sent: u64,
    received: u64,
    lost: u64,
    send_dropped: u64,
}

fn number_after(line: &str, key: &str) -> Option<u64> {
    let rest = &line[line.find(key)? + key.len()..];
    let digits: String = rest
        .trim_start()
        .chars()
        .take_while(|c| c.is_ascii_digit())
        .collect();
    digits.parse().ok()
}

/// Parses the last `start_mclient: tot_send_msgs=S, tot_recv_msgs=R` line (the
/// final one has no `msz=`) and the `Total lost packets L (...), total send dropped D`
/// line.
fn parse_summary(out: &str) -> Option<Summary> {
    let totals = out
        .lines()
        .rfind(|l| l.contains("start_mclient: tot_send_msgs=") && !l.contains("msz="))?;
    let lost = out.lines().rfind(|l| l.contains("Total lost packets"))?;
    Some(Summary {
        sent: number_after(totals, "tot_send_msgs=")?,
        received: number_after(totals, "tot_recv_msgs=")?,
        lost: number_after(lost, "Total lost packets")?,
        send_dropped: number_after(lost, "total send dropped")?,
    })
}

/// Runs uclient with `args` (plus the server address) and asserts every message
/// came back: exit 0, `clients * messages` sent, as many received, 0 lost.
fn run_uclient(server: &TestServer, args: &[String], clients: u64, messages: u64) {
    let bin = require_tool("turnutils_uclient", HINT);
    let mut cmd = Command::new(bin);
    cmd.args(args)
        .args(["-p", &server.port().to_string()])
        .args(["-m", &clients.to_string(), "-n", &messages.to_string()])
        .args(["-l", "170", "-c", "-X", "-g"])
        .arg("127.0.0.1");
    let run = run_bounded("turnutils_uclient", &mut cmd, UCLIENT_TIMEOUT);
    let out = run.combined();
    // The server's own output is printed by TestServer's Drop on failure.
    let context = || format!("uclient {args:?}\n{out}");
    assert!(
        run.status.success(),
        "uclient failed ({})\n{}",
        run.status,
        context()
    );
    let s = parse_summary(&out)
        .unwrap_or_else(|| panic!("no final summary in uclient output\n{}", context()));
    assert_eq!(
        s.sent,
        clients * messages,
        "messages sent: {s:?}\n{}",
        context()
    );
    assert!(s.received > 0, "nothing received: {s:?}\n{}", context());
    assert_eq!(s.received, s.sent, "messages lost: {s:?}\n{}", context());
    assert_eq!(s.lost, 0, "lost packets: {s:?}\n{}", context());
    assert_eq!(s.send_dropped, 0, "send dropped: {s:?}\n{}", context());
    assert!(
        out.contains("Total lost packets 0 (0.000000%)"),
        "summary line missing\n{}",
        context()
    );
}

fn s(v: &str) -> String {
    v.to_string()
}

#[test]
fn uclient_channels_to_echo_peer() {
    let server = TestServer::start_default();
    let peer = start_peer();
    let args = vec![
        s("-u"),
        s("alice"),
        s("-w"),
        s("wonderland"),
        s("-e"),
        s("127.0.0.1"),
        s("-r"),
        peer.port.to_string(),
    ];
    run_uclient(&server, &args, 10, 1000);
}

#[test]
fn uclient_send_indications_to_echo_peer() {
    let server = TestServer::start_default();
    let peer = start_peer();
    let args = vec![
        s("-s"),
        s("-u"),
        s("alice"),
        s("-w"),
        s("wonderland"),
        s("-e"),
        s("127.0.0.1"),
        s("-r"),
        peer.port.to_string(),
    ];
    run_uclient(&server, &args, 5, 500);
}

#[test]
fn uclient_client_to_client() {
    let server = TestServer::start_default();
    let args = vec![s("-y"), s("-u"), s("alice"), s("-w"), s("wonderland")];
    run_uclient(&server, &args, 4, 500);
}

#[test]
fn uclient_rest_secret() {
    // -W: uclient makes the TURN REST username "<expiry>:<-u value>" and the password
    // base64(HMAC-SHA1(secret, username)) itself.
    let server = TestServer::start(ServerOptions::default().users(&[]).secrets(&["s3cret"]));
    let peer = start_peer();
    let args = vec![
        s("-W"),
        s("s3cret"),
        s("-u"),
        s("bob"),
        s("-e"),
        s("127.0.0.1"),
        s("-r"),
        peer.port.to_string(),
    ];
    run_uclient(&server, &args, 2, 200);
}

#[test]
fn uclient_wrong_password_cannot_allocate() {
    let server = TestServer::start(ServerOptions::default().secrets(&[]));
    let peer = start_peer();
    let bin = require_tool("turnutils_uclient", HINT);
    let mut cmd = Command::new(bin);
    cmd.args(["-u", "alice", "-w", "not-the-password"])
        .args(["-e", "127.0.0.1", "-r", &peer.port.to_string()])
        .args(["-p", &server.port().to_string()])
        .args([
            "-m",
            "1",
            "-n",
            "5",
            "-l",
            "170",
            "-c",
            "-X",
            "-g",
            "127.0.0.1",
        ]);
    let run = run_bounded("turnutils_uclient", &mut cmd, UCLIENT_TIMEOUT);
    let out = run.combined();
    assert!(
        !run.status.success() && out.contains("Cannot complete Allocation"),
        "uclient should fail to allocate with a wrong password ({})\n{out}",
        run.status
    );
}

#[test]
fn stunclient_reflexive_address() {
    let server = TestServer::start_default();
    let bin = require_tool("turnutils_stunclient", HINT);
    let mut cmd = Command::new(bin);
    cmd.args(["-p", &server.port().to_string(), "127.0.0.1"]);
    let run = run_bounded("turnutils_stunclient", &mut cmd, Duration::from_secs(30));
    let out = run.combined();
    // coturn 4.6.1 prints e.g. "0: : IPv4. UDP reflexive addr: 127.0.0.1:46285"
    let line = out
        .lines()
        .find(|l| l.contains("UDP reflexive addr:"))
        .unwrap_or_else(|| panic!("no reflexive address printed\n{out}"));
    let addr = line
        .split("UDP reflexive addr:")
        .nth(1)
        .map(str::trim)
        .unwrap_or_default();
    let addr: std::net::SocketAddr = addr
        .parse()
        .unwrap_or_else(|e| panic!("bad reflexive address {addr:?}: {e}\n{out}"));
    assert_eq!(addr.ip().to_string(), "127.0.0.1", "{out}");
    assert_ne!(addr.port(), 0, "{out}");
    assert!(
        run.status.success(),
        "stunclient failed ({})\n{out}",
        run.status
    );
}

#[test]
fn raw_binding_reports_reflexive_address() {
    let server = TestServer::start_default();
    let (local, mapped) =
        common::stun_binding(server.addr, Duration::from_secs(5)).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(mapped, local, "XOR-MAPPED-ADDRESS must be our own address");
}
