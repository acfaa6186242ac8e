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

use common::coturn::{self, EchoPeer, COTURN_HINT};
use common::{require_tool, run_bounded, ServerOptions, TestServer};
use std::process::Command;
use std::time::Duration;

const UCLIENT_TIMEOUT: Duration = Duration::from_secs(120);

/// Runs uclient with `args`, `-p PORT -c -X -g` and the server address and asserts
/// every message came back (see [`coturn::run_uclient`]).
fn run_uclient(server: &TestServer, args: &[&str], clients: u64, messages: u64) {
    let port = server.port().to_string();
    let mut all = args.to_vec();
    all.extend(["-p", &port, "-c", "-X", "-g"]);
    coturn::run_uclient(&all, "127.0.0.1", clients, messages, UCLIENT_TIMEOUT);
}

/// uclient with `args` relaying to a `turnutils_peer` echo peer on 127.0.0.1.
fn run_uclient_to_peer(server: &TestServer, args: &[&str], clients: u64, messages: u64) {
    let peer = EchoPeer::start("127.0.0.1");
    let peer_port = peer.port.to_string();
    let mut all = args.to_vec();
    all.extend(["-e", "127.0.0.1", "-r", &peer_port]);
    run_uclient(server, &all, clients, messages);
}

#[test]
fn uclient_channels_to_echo_peer() {
    let server = TestServer::start_default();
    run_uclient_to_peer(&server, &["-u", "alice", "-w", "wonderland"], 10, 1000);
}

#[test]
fn uclient_send_indications_to_echo_peer() {
    let server = TestServer::start_default();
    let args = ["-s", "-u", "alice", "-w", "wonderland"];
    run_uclient_to_peer(&server, &args, 5, 500);
}

#[test]
fn uclient_client_to_client() {
    let server = TestServer::start_default();
    let args = ["-y", "-u", "alice", "-w", "wonderland"];
    run_uclient(&server, &args, 4, 500);
}

/// Many clients of one static user, as a web page that hands every visitor the same
/// username and credential: `-m 100` makes more than 100 allocations (two per client),
/// which the defaults must serve (no per-user limit for static users; coturn has none).
#[test]
fn uclient_many_clients_share_one_static_user() {
    let server = TestServer::start_default();
    run_uclient_to_peer(&server, &["-u", "alice", "-w", "wonderland"], 100, 10);
}

#[test]
fn uclient_rest_secret() {
    // -W: uclient makes the TURN REST username "<expiry>:<-u value>" and the password
    // base64(HMAC-SHA1(secret, username)) itself.
    let server = TestServer::start(ServerOptions::default().users(&[]).secrets(&["s3cret"]));
    run_uclient_to_peer(&server, &["-W", "s3cret", "-u", "bob"], 2, 200);
}

#[test]
fn uclient_wrong_password_cannot_allocate() {
    let server = TestServer::start(ServerOptions::default().secrets(&[]));
    let peer = EchoPeer::start("127.0.0.1");
    let bin = require_tool("turnutils_uclient", COTURN_HINT);
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
    let bin = require_tool("turnutils_stunclient", COTURN_HINT);
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
