//! The browser self-test page (`/selftest` on the metrics listener): off unless
//! `[metrics] selftest = true`; driven by headless Chromium (Debian package `chromium`)
//! with `&auto=1`, it gathers relay candidates, runs a relay-only loopback call through
//! turnstone and POSTs its verdict to `&report=` (a listener of this test). A wrong
//! credential makes it fail with 401. The successful run's finished page is captured
//! through the DevTools protocol (a minimal WebSocket client below) and kept under
//! `target/tmp/selftest.png`; `docs/selftest.png` (shown by the README) is written when it
//! is missing or `TURNSTONE_UPDATE_SCREENSHOT=1` is set.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use common::{free_tcp_port, require_tool, ChildGuard, ServerOptions, TestServer, PASSWORD, USER};

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

/// One HTTP/1.1 request; returns (status code, headers, body).
fn http(addr: SocketAddr, method: &str, path: &str, body: &str) -> (u16, String, Vec<u8>) {
    // The metrics listener may come up just after the TURN listeners.
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut s = loop {
        match TcpStream::connect(addr) {
            Ok(s) => break s,
            Err(e) if Instant::now() < deadline => {
                let _ = e;
                std::thread::sleep(Duration::from_millis(50));
            }
            Err(e) => panic!("connect {addr}: {e}"),
        }
    };
    s.set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .expect("write");
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    let split = out
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .unwrap_or(out.len());
    let head = String::from_utf8_lossy(&out[..split]).into_owned();
    let body = out.get(split + 4..).unwrap_or_default().to_vec();
    let code = head
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    (code, head, body)
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

// ---------------------------------------------------------------------------------------
// The report listener
// ---------------------------------------------------------------------------------------

/// Accepts `POST /result` bodies and forwards them until `stop` is set.
fn report_listener() -> (SocketAddr, mpsc::Receiver<String>, Arc<AtomicBool>) {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind report listener");
    let addr = listener.local_addr().expect("addr");
    listener.set_nonblocking(true).expect("nonblocking");
    let (tx, rx) = mpsc::channel();
    let stop = Arc::new(AtomicBool::new(false));
    let stop2 = stop.clone();
    std::thread::spawn(move || {
        while !stop2.load(Ordering::Relaxed) {
            match listener.accept() {
                Ok((s, _)) => {
                    if let Some(body) = read_post(s) {
                        let _ = tx.send(body);
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    std::thread::sleep(Duration::from_millis(20));
                }
                Err(_) => return,
            }
        }
    });
    (addr, rx, stop)
}

fn read_post(stream: TcpStream) -> Option<String> {
    stream.set_nonblocking(false).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    let mut reader = BufReader::new(stream.try_clone().ok()?);
    let mut request_line = String::new();
    reader.read_line(&mut request_line).ok()?;
    let mut length = 0usize;
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line).ok()? == 0 || line.trim().is_empty() {
            break;
        }
        if let Some((k, v)) = line.split_once(':') {
            if k.trim().eq_ignore_ascii_case("content-length") {
                length = v.trim().parse().unwrap_or(0);
            }
        }
    }
    let mut body = vec![0u8; length.min(1 << 20)];
    reader.read_exact(&mut body).ok()?;
    let mut out = stream;
    let _ = out.write_all(
        b"HTTP/1.1 200 OK\r\nAccess-Control-Allow-Origin: *\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
    );
    request_line
        .starts_with("POST /result")
        .then(|| String::from_utf8_lossy(&body).into_owned())
}

fn percent_encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// Opens the self-test page in headless Chromium with `&auto=1` and waits for the result
/// it reports; if `screenshot` is given, the finished page is captured there.
fn run_page(
    metrics: SocketAddr,
    turn: &str,
    credential: &str,
    screenshot: Option<&Path>,
) -> serde_json::Value {
    let chromium = require_tool("chromium", "apt-get install -y chromium");
    let (report, rx, stop) = report_listener();
    let url = format!(
        "http://{metrics}/selftest?urls={}&username={}&credential={}&auto=1&report={}",
        percent_encode(turn),
        percent_encode(USER),
        percent_encode(credential),
        percent_encode(&format!("http://{report}/result")),
    );
    let profile = tempfile::Builder::new()
        .prefix("turnstone-chromium-")
        .tempdir()
        .expect("profile dir");
    let mut cmd = Command::new(chromium);
    cmd.args([
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--no-default-browser-check",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--disable-extensions",
        "--hide-scrollbars",
        "--window-size=1000,800",
        "--remote-debugging-port=0",
    ])
    .arg(format!("--user-data-dir={}", profile.path().display()))
    .arg(&url);
    let mut browser = ChildGuard::spawn("chromium", &mut cmd);

    let deadline = Instant::now() + RESULT_TIMEOUT;
    let result = loop {
        match rx.recv_timeout(Duration::from_millis(200)) {
            Ok(r) => break r,
            Err(mpsc::RecvTimeoutError::Timeout) => {}
            Err(mpsc::RecvTimeoutError::Disconnected) => panic!("report listener ended"),
        }
        if let Some(st) = browser.try_wait() {
            panic!("chromium exited early ({st})");
        }
        assert!(
            Instant::now() < deadline,
            "no result from the self-test page within {RESULT_TIMEOUT:?}"
        );
    };
    stop.store(true, Ordering::Relaxed);
    println!("self-test result ({turn}): {result}");
    let v: serde_json::Value =
        serde_json::from_str(&result).unwrap_or_else(|e| panic!("bad JSON ({e}): {result}"));
    if let Some(path) = screenshot {
        // The verdict is drawn right before the report is sent; let it paint.
        std::thread::sleep(Duration::from_millis(300));
        let png = cdp_screenshot(profile.path(), "/selftest");
        std::fs::create_dir_all(path.parent().expect("parent")).expect("mkdir docs");
        std::fs::write(path, &png).expect("write screenshot");
        println!("screenshot: {} ({} bytes)", path.display(), png.len());
    }
    browser.kill();
    v
}

#[test]
fn selftest_page_relays_in_chromium() {
    let (server, metrics) = server(true);
    let turn = format!("turn:127.0.0.1:{}?transport=udp", server.port());
    let shot = PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/docs/selftest.png"));
    let staging =
        std::env::temp_dir().join(format!("turnstone-selftest-{}.png", std::process::id()));
    let v = run_page(metrics, &turn, PASSWORD, Some(&staging));
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
    let png = std::fs::read(&staging).expect("screenshot");
    let _ = std::fs::remove_file(&staging);
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
    let v = run_page(metrics, &turn, "not-the-password", None);
    assert_eq!(v["ok"].as_bool(), Some(false), "{v:#}");
    let reason = v["reason"].as_str().unwrap_or_default();
    assert!(reason.contains("401"), "{v:#}");
    let codes: Vec<u64> = v["errors"]
        .as_array()
        .map(|a| a.iter().filter_map(|e| e["errorCode"].as_u64()).collect())
        .unwrap_or_default();
    assert!(codes.contains(&401), "{v:#}");
}

// ---------------------------------------------------------------------------------------
// A screenshot through the DevTools protocol (minimal WebSocket client, RFC 6455)
// ---------------------------------------------------------------------------------------

/// Captures the viewport of the page whose URL contains `url_part`, as PNG.
fn cdp_screenshot(profile: &Path, url_part: &str) -> Vec<u8> {
    use base64::Engine as _;
    // Chromium writes its DevTools port to <profile>/DevToolsActivePort.
    let deadline = Instant::now() + Duration::from_secs(10);
    let port: u16 = loop {
        if let Some(p) = std::fs::read_to_string(profile.join("DevToolsActivePort"))
            .ok()
            .and_then(|s| s.lines().next().and_then(|l| l.trim().parse().ok()))
        {
            break p;
        }
        assert!(Instant::now() < deadline, "no DevToolsActivePort");
        std::thread::sleep(Duration::from_millis(50));
    };
    let devtools: SocketAddr = ([127, 0, 0, 1], port).into();
    let (_, _, list) = http(devtools, "GET", "/json/list", "");
    let targets: serde_json::Value = serde_json::from_slice(&list).expect("/json/list JSON");
    let ws_url = targets
        .as_array()
        .into_iter()
        .flatten()
        .find(|t| t["type"] == "page" && t["url"].as_str().unwrap_or("").contains(url_part))
        .and_then(|t| t["webSocketDebuggerUrl"].as_str())
        .unwrap_or_else(|| panic!("no page target in {targets:#}"))
        .to_string();
    let path = ws_url
        .split_once("//")
        .and_then(|(_, rest)| rest.split_once('/'))
        .map(|(_, p)| format!("/{p}"))
        .expect("ws path");
    let mut ws = WebSocket::connect(devtools, &path);
    ws.send_text(r#"{"id":1,"method":"Page.captureScreenshot","params":{"format":"png"}}"#);
    loop {
        let msg = ws.recv_text();
        let v: serde_json::Value = serde_json::from_str(&msg).expect("CDP JSON");
        if v["id"] == 1 {
            let data = v["result"]["data"]
                .as_str()
                .unwrap_or_else(|| panic!("no screenshot: {msg}"));
            return base64::engine::general_purpose::STANDARD
                .decode(data)
                .expect("base64 PNG");
        }
    }
}

struct WebSocket {
    s: TcpStream,
}

impl WebSocket {
    fn connect(addr: SocketAddr, path: &str) -> WebSocket {
        let mut s = TcpStream::connect(addr).expect("connect DevTools");
        s.set_read_timeout(Some(Duration::from_secs(15)))
            .expect("timeout");
        write!(
            s,
            "GET {path} HTTP/1.1\r\nHost: {addr}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
             Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
        )
        .expect("handshake");
        let mut head = Vec::new();
        let mut byte = [0u8; 1];
        while !head.ends_with(b"\r\n\r\n") {
            s.read_exact(&mut byte).expect("handshake answer");
            head.push(byte[0]);
        }
        let head = String::from_utf8_lossy(&head);
        assert!(head.starts_with("HTTP/1.1 101"), "{head}");
        WebSocket { s }
    }

    fn send_text(&mut self, text: &str) {
        let payload = text.as_bytes();
        let mut frame = vec![0x81u8];
        match payload.len() {
            n if n < 126 => frame.push(0x80 | n as u8),
            n if n <= 0xFFFF => {
                frame.push(0x80 | 126);
                frame.extend_from_slice(&(n as u16).to_be_bytes());
            }
            n => {
                frame.push(0x80 | 127);
                frame.extend_from_slice(&(n as u64).to_be_bytes());
            }
        }
        let mask = [0x12u8, 0x34, 0x56, 0x78];
        frame.extend_from_slice(&mask);
        frame.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
        self.s.write_all(&frame).expect("send frame");
    }

    /// The next text message (continuation frames joined; pings/other frames skipped).
    fn recv_text(&mut self) -> String {
        let mut message = Vec::new();
        loop {
            let mut h = [0u8; 2];
            self.s.read_exact(&mut h).expect("frame header");
            let fin = h[0] & 0x80 != 0;
            let opcode = h[0] & 0x0F;
            let len = match h[1] & 0x7F {
                126 => {
                    let mut l = [0u8; 2];
                    self.s.read_exact(&mut l).expect("len16");
                    u64::from(u16::from_be_bytes(l))
                }
                127 => {
                    let mut l = [0u8; 8];
                    self.s.read_exact(&mut l).expect("len64");
                    u64::from_be_bytes(l)
                }
                n => u64::from(n),
            };
            let mut payload = vec![0u8; usize::try_from(len).expect("frame size")];
            self.s.read_exact(&mut payload).expect("frame payload");
            match opcode {
                0x1 | 0x0 => {
                    message.extend_from_slice(&payload);
                    if fin {
                        return String::from_utf8_lossy(&message).into_owned();
                    }
                }
                0x8 => panic!("DevTools closed the WebSocket"),
                _ => {}
            }
        }
    }
}
