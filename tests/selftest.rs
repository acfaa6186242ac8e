//! The browser self-test page (`/selftest` on the metrics listener): off unless
//! `[metrics] selftest = true`; driven by headless Chromium (Debian package `chromium`,
//! run by `tests/common/browser.rs`) with `&auto=1`, it gathers relay candidates, runs a
//! relay-only loopback call through turnstone and POSTs its verdict to `&report=` (the
//! runner's page server). A wrong credential makes it fail with 401. The successful run's
//! finished page is captured through the DevTools protocol and kept under
//! `target/tmp/selftest.png`; `docs/selftest.png` (shown by the README) is written when it
//! is missing or `TURNSTONE_UPDATE_SCREENSHOT=1` is set.

mod common;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use common::browser::http::request as http;
use common::browser::{percent_encode, Chromium, PageServer};
use common::{free_tcp_port, ServerOptions, TestServer, PASSWORD, USER};

const RESULT_TIMEOUT: Duration = Duration::from_secs(45);
const SCREENSHOT_MAX: usize = 300 * 1024;

/// A turnstone with the metrics listener on a free port (and the self-test page if
/// `selftest`); returns it with the listener's address.
fn server(selftest: bool) -> (TestServer, SocketAddr) {
    let metrics: SocketAddr = ([127, 0, 0, 1], free_tcp_port()).into();
    let toml = format!("[metrics]\nlisten = \"{metrics}\"\nselftest = {selftest}\n");
    let server = TestServer::start_with(
        common::Backend::Turnstone,
        ServerOptions::default().extra_toml(&toml),
    );
    (server, metrics)
}

#[test]
fn selftest_page_only_when_enabled() {
    let (_off, metrics) = server(false);
    assert_eq!(http(metrics, "GET", "/selftest", "").0, 404);
    assert_eq!(http(metrics, "GET", "/health", "").0, 200);

    let (_on, metrics) = server(true);
    let (code, head, body) = http(metrics, "GET", "/selftest?auto=1", "");
    assert_eq!(code, 200, "{head}");
    assert!(
        head.contains("Content-Type: text/html; charset=utf-8"),
        "{head}"
    );
    let body = String::from_utf8_lossy(&body);
    assert!(
        body.contains("<title>turnstone self-test</title>"),
        "{body}"
    );
    assert_eq!(http(metrics, "HEAD", "/selftest", "").2.len(), 0);
    assert_eq!(http(metrics, "POST", "/selftest", "x").0, 405);
    assert_eq!(http(metrics, "GET", "/metrics", "").0, 200);
}

/// Opens the self-test page in headless Chromium with `&auto=1` and waits for the result
/// it reports (to a page server of this test); Chromium is left open on the finished page.
fn run_page(metrics: SocketAddr, turn: &str, credential: &str) -> (Chromium, serde_json::Value) {
    let reports = PageServer::start();
    let url = format!(
        "http://{metrics}/selftest?urls={}&username={}&credential={}&auto=1&report={}",
        percent_encode(turn),
        percent_encode(USER),
        percent_encode(credential),
        percent_encode(&reports.url("/result")),
    );
    let mut chromium = Chromium::launch(
        reports,
        &url,
        &["--hide-scrollbars", "--window-size=1000,800"],
    );
    let r = chromium.wait_result(RESULT_TIMEOUT);
    println!("self-test result ({turn}): {}", r.raw);
    (chromium, r.v)
}

#[test]
fn selftest_page_relays_in_chromium() {
    let (server, metrics) = server(true);
    let turn = format!("turn:127.0.0.1:{}?transport=udp", server.port());
    let shot = PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/docs/selftest.png"));
    let (chromium, v) = run_page(metrics, &turn, PASSWORD);
    // The verdict is drawn right before the report is sent; let it paint.
    std::thread::sleep(Duration::from_millis(300));
    let png = chromium.screenshot("/selftest");
    drop(chromium);
    println!("screenshot: {} bytes", png.len());
    assert_eq!(v["ok"].as_bool(), Some(true), "{v:#}");
    let relays = v["relayCandidates"].as_array().expect("relayCandidates");
    assert!(!relays.is_empty(), "{v:#}");
    for c in relays {
        assert_eq!(c["type"], "relay", "{v:#}");
        assert_eq!(c["relayProtocol"], "udp", "{v:#}");
        let port = c["port"].as_u64().unwrap_or(0) as u16;
        assert!(
            server.is_relay_port(port),
            "{c} not in {:?}",
            server.relay_ports
        );
    }
    for pc in ["a", "b"] {
        for end in ["local", "remote"] {
            assert_eq!(v[pc][end]["candidateType"], "relay", "{v:#}");
        }
        assert_eq!(v[pc]["local"]["relayProtocol"], "udp", "{v:#}");
    }
    assert!(v["rttMs"].as_f64().is_some_and(|r| r >= 0.0), "{v:#}");
    assert!(png.starts_with(b"\x89PNG"), "not a PNG");
    assert!(
        png.len() < SCREENSHOT_MAX,
        "screenshot is {} bytes",
        png.len()
    );
    // Kept under target/ on every run; docs/selftest.png (committed, shown by the README)
    // only when missing or with TURNSTONE_UPDATE_SCREENSHOT=1, so runs leave the tree clean.
    let kept = Path::new(env!("CARGO_TARGET_TMPDIR")).join("selftest.png");
    std::fs::write(&kept, &png).expect("write target screenshot");
    println!("screenshot kept as {}", kept.display());
    if !shot.exists() || std::env::var_os("TURNSTONE_UPDATE_SCREENSHOT").is_some() {
        std::fs::create_dir_all(shot.parent().expect("docs")).expect("mkdir docs");
        std::fs::write(&shot, &png).expect("write docs/selftest.png");
    }
}

#[test]
fn selftest_page_reports_401_for_a_wrong_credential() {
    let (server, metrics) = server(true);
    let turn = format!("turn:127.0.0.1:{}?transport=udp", server.port());
    let (_, v) = run_page(metrics, &turn, "not-the-password");
    assert_eq!(v["ok"].as_bool(), Some(false), "{v:#}");
    let reason = v["reason"].as_str().unwrap_or_default();
    assert!(reason.contains("401"), "{v:#}");
    let codes: Vec<u64> = v["errors"]
        .as_array()
        .map(|a| a.iter().filter_map(|e| e["errorCode"].as_u64()).collect())
        .unwrap_or_default();
    assert!(codes.contains(&401), "{v:#}");
}
