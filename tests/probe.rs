//! `turnstone probe` against real servers: turnstone over UDP, TCP and TLS (trusting the
//! harness's self-signed certificate with `--ca`), with a TURN REST secret, and coturn's
//! `turnserver`; and the failure classes: 401 (wrong password), unreachable (nothing
//! listening / nothing answering), 403 (the probe's own loopback peer refused by
//! policy), TLS error (certificate not trusted).

mod common;

use std::net::UdpSocket;
use std::time::Duration;

use common::{run_bounded, Backend, RunOutput, ServerOptions, TestServer, PASSWORD, SECRET, USER};

/// Runs `turnstone probe ARGS` (bounded to 60 s).
fn probe(args: &[&str]) -> RunOutput {
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_turnstone"));
    cmd.arg("probe").args(args);
    run_bounded("turnstone probe", &mut cmd, Duration::from_secs(60))
}

/// The probe succeeded, printed every step and an OK verdict naming `url`.
fn assert_ok(out: &RunOutput, url: &str) {
    let text = out.combined();
    println!("{text}");
    assert!(
        out.status.success(),
        "probe failed ({}):\n{text}",
        out.status
    );
    for step in [
        "binding",
        "allocate",
        "permission",
        "channel",
        "relay",
        "refresh",
    ] {
        assert!(
            text.lines().any(|l| l.trim_start().starts_with(step)),
            "no {step} step:\n{text}"
        );
    }
    let verdict = text
        .lines()
        .find(|l| l.starts_with("OK: ") || l.starts_with("FAIL: "))
        .unwrap_or_default();
    assert!(
        verdict.starts_with(&format!("OK: {url} relays (rtt ")) && verdict.ends_with(" ms)"),
        "verdict {verdict:?}:\n{text}"
    );
    assert!(text.contains("relayed address 127.0.0.1:"), "{text}");
    assert!(text.contains("401 challenge"), "{text}");
}

/// The probe failed with exit status `code` and a verdict line containing `needle`.
fn assert_fail(out: &RunOutput, code: i32, needles: &[&str]) {
    let text = out.combined();
    println!("{text}");
    assert_eq!(out.status.code(), Some(code), "exit status:\n{text}");
    let verdict = text
        .lines()
        .find(|l| l.starts_with("FAIL: "))
        .unwrap_or_else(|| panic!("no FAIL line:\n{text}"));
    assert!(
        needles.iter().any(|n| verdict.contains(n)),
        "verdict {verdict:?} has none of {needles:?}"
    );
}

#[test]
fn probe_turnstone_udp() {
    let server = TestServer::start_with(Backend::Turnstone, ServerOptions::default());
    let url = format!("turn:127.0.0.1:{}?transport=udp", server.port());
    let out = probe(&[&url, "--user", USER, "--password", PASSWORD]);
    assert_ok(&out, &url);
    // --peer: the probe listens on that port and the relay sends there.
    let peer = format!("127.0.0.1:{}", common::free_udp_port());
    let out = probe(&[&url, "-u", USER, "-p", PASSWORD, "--peer", &peer]);
    assert_ok(&out, &url);
    assert!(
        out.stdout.contains(&format!("bound to {peer}")),
        "{}",
        out.stdout
    );
}

#[test]
fn probe_turnstone_tcp_with_rest_secret() {
    let server = TestServer::start_with(Backend::Turnstone, ServerOptions::default().tcp());
    let url = format!("turn:127.0.0.1:{}?transport=tcp", server.port());
    let out = probe(&[&url, "--secret", SECRET, "--user-id", "ops"]);
    assert_ok(&out, &url);
    assert!(out.stdout.contains("TURN REST username"), "{}", out.stdout);
    assert!(out.stdout.contains(":ops\""), "{}", out.stdout);
    assert!(out.stdout.contains("tcp connected"), "{}", out.stdout);
}

#[test]
fn probe_turnstone_tls_with_ca() {
    let server = TestServer::start_with(Backend::Turnstone, ServerOptions::default().tls());
    let cert = server.cert.as_ref().expect("tls server has a certificate");
    let ca = cert.cert_pem.display().to_string();
    for host in ["localhost", "127.0.0.1"] {
        let url = format!("turns:{host}:{}", server.tls_port());
        let out = probe(&[&url, "-u", USER, "-p", PASSWORD, "--ca", &ca]);
        assert_ok(&out, &url);
        assert!(out.stdout.contains("ALPN stun.turn"), "{}", out.stdout);
    }
    // The same server, not trusted: a TLS error; trusted blindly: OK.
    let url = format!("turns:localhost:{}?transport=tcp", server.tls_port());
    let out = probe(&[&url, "-u", USER, "-p", PASSWORD]);
    assert_fail(&out, 5, &["TLS error"]);
    let out = probe(&[&url, "-u", USER, "-p", PASSWORD, "--insecure"]);
    assert_ok(&out, &url);
}

#[test]
fn probe_coturn_udp_and_tcp() {
    let server = TestServer::start_with(Backend::Coturn, ServerOptions::default());
    for transport in ["udp", "tcp"] {
        let url = format!("turn:127.0.0.1:{}?transport={transport}", server.port());
        let out = probe(&[&url, "--user", USER, "--password", PASSWORD]);
        assert_ok(&out, &url);
        assert!(out.stdout.contains("Coturn"), "{}", out.stdout);
    }
}

#[test]
fn probe_wrong_password_is_401() {
    let server = TestServer::start_with(Backend::Turnstone, ServerOptions::default().tcp());
    for transport in ["udp", "tcp"] {
        let url = format!("turn:127.0.0.1:{}?transport={transport}", server.port());
        let out = probe(&[&url, "--user", USER, "--password", "not-the-password"]);
        assert_fail(&out, 6, &["401"]);
    }
    let url = format!("turn:127.0.0.1:{}", server.port());
    let out = probe(&[&url, "--secret", "not-the-secret"]);
    assert_fail(&out, 6, &["401"]);
}

#[test]
fn probe_nothing_listening_is_unreachable() {
    let port = common::free_tcp_port();
    for url in [
        format!("turn:127.0.0.1:{port}"),
        format!("turn:127.0.0.1:{port}?transport=tcp"),
        format!("turns:127.0.0.1:{port}"),
    ] {
        let out = probe(&[&url, "-u", USER, "-p", PASSWORD, "--timeout", "2s"]);
        assert_fail(&out, 3, &["unreachable"]);
    }
    // Something bound but silent: no answer within the timeout.
    let silent = UdpSocket::bind("127.0.0.1:0").expect("bind");
    let url = format!("turn:{}", silent.local_addr().expect("addr"));
    let out = probe(&[&url, "-u", USER, "-p", PASSWORD, "--timeout", "1s"]);
    assert_fail(&out, 3, &["unreachable", "timeout"]);
    assert!(out.stdout.contains("no answer"), "{}", out.stdout);
}

#[test]
fn probe_peer_refused_by_policy_is_403() {
    // Without allow_peers, loopback peers (the probe's own peer socket) are refused.
    let server = TestServer::start_with(
        Backend::Turnstone,
        ServerOptions::default().allow_peers(&[]),
    );
    let url = format!("turn:127.0.0.1:{}", server.port());
    let out = probe(&[&url, "-u", USER, "-p", PASSWORD]);
    assert_fail(&out, 7, &["403"]);
    // The allocation was still given back.
    assert!(out.stdout.contains("allocation deleted"), "{}", out.stdout);
}
