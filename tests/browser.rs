//! Headless Chromium (Debian package `chromium`) through turnstone: a page with two
//! relay-only RTCPeerConnections exchanges data-channel messages both ways through
//! the TURN server, then reports (POST to this test's own tiny HTTP server) which
//! candidates the selected pairs use. Both ends of both pairs must be `relay`.
//! No node or WebDriver: the test serves `tests/browser/index.html` itself.

mod common;

use common::{require_tool, ChildGuard, TestServer, PASSWORD, USER};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

const PAGE: &str = include_str!("browser/index.html");
const RESULT_TIMEOUT: Duration = Duration::from_secs(30);
const MESSAGES: usize = 20;

enum Posted {
    Log(String),
    Result(String),
}

/// Serves GET / (the page) and accepts POST /log and POST /result, forwarding the
/// bodies, until `stop` is set.
fn serve(listener: TcpListener, tx: mpsc::Sender<Posted>, stop: Arc<AtomicBool>) {
    listener.set_nonblocking(true).expect("nonblocking");
    while !stop.load(Ordering::Relaxed) {
        match listener.accept() {
            Ok((stream, _)) => {
                let _ = handle(stream, &tx);
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                std::thread::sleep(Duration::from_millis(20));
            }
            Err(_) => return,
        }
    }
}

fn handle(stream: TcpStream, tx: &mpsc::Sender<Posted>) -> std::io::Result<()> {
    stream.set_nonblocking(false)?;
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    let mut reader = BufReader::new(stream.try_clone()?);
    let mut request_line = String::new();
    reader.read_line(&mut request_line)?;
    let mut content_length = 0usize;
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line)? == 0 || line == "\r\n" || line == "\n" {
            break;
        }
        if let Some((k, v)) = line.split_once(':') {
            if k.trim().eq_ignore_ascii_case("content-length") {
                content_length = v.trim().parse().unwrap_or(0);
            }
        }
    }
    let mut body = vec![0u8; content_length.min(1 << 20)];
    reader.read_exact(&mut body)?;
    let body = String::from_utf8_lossy(&body).into_owned();
    let mut parts = request_line.split_whitespace();
    let method = parts.next().unwrap_or("");
    let path = parts.next().unwrap_or("");
    let (status, content_type, payload) = match (method, path) {
        ("GET", p) if p == "/" || p.starts_with("/?") || p.starts_with("/index.html") => {
            ("200 OK", "text/html; charset=utf-8", PAGE.as_bytes())
        }
        ("POST", "/log") => {
            let _ = tx.send(Posted::Log(body));
            ("200 OK", "text/plain", &b"ok"[..])
        }
        ("POST", "/result") => {
            let _ = tx.send(Posted::Result(body));
            ("200 OK", "text/plain", &b"ok"[..])
        }
        _ => ("404 Not Found", "text/plain", &b"not found"[..]),
    };
    let mut out = stream;
    write!(
        out,
        "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nCache-Control: no-store\r\nConnection: close\r\n\r\n",
        payload.len()
    )?;
    out.write_all(payload)?;
    out.flush()
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

#[test]
fn chromium_data_channel_relays_through_turn() {
    let chromium = require_tool("chromium", "apt-get install -y chromium");
    let server = TestServer::start_default();

    let listener = TcpListener::bind("127.0.0.1:0").expect("bind http");
    let http = listener.local_addr().expect("http addr");
    let (tx, rx) = mpsc::channel();
    let stop = Arc::new(AtomicBool::new(false));
    let http_thread = {
        let stop = stop.clone();
        std::thread::spawn(move || serve(listener, tx, stop))
    };

    let turn = format!("turn:127.0.0.1:{}?transport=udp", server.port());
    let url = format!(
        "http://{http}/?turn={}&username={}&credential={}&messages={MESSAGES}",
        percent_encode(&turn),
        percent_encode(USER),
        percent_encode(PASSWORD)
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
        "--remote-debugging-port=0",
    ])
    .arg(format!("--user-data-dir={}", profile.path().display()))
    .arg(&url);
    let mut browser = ChildGuard::spawn("chromium", &mut cmd);

    let deadline = Instant::now() + RESULT_TIMEOUT;
    let mut page_log = Vec::new();
    let result = loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            break None;
        }
        match rx.recv_timeout(left.min(Duration::from_millis(200))) {
            Ok(Posted::Result(r)) => break Some(r),
            Ok(Posted::Log(l)) => page_log.push(l),
            Err(mpsc::RecvTimeoutError::Timeout) => {}
            Err(mpsc::RecvTimeoutError::Disconnected) => break None,
        }
        if let Some(st) = browser.try_wait() {
            panic!(
                "chromium exited early ({st})\npage log:\n{}",
                page_log.join("\n")
            );
        }
    };
    browser.kill();
    stop.store(true, Ordering::Relaxed);
    let _ = http_thread.join();

    let page_log = page_log.join("\n");
    let Some(result) = result else {
        // Chromium's and the server's output are printed by their Drop impls.
        panic!("no result from the page within {RESULT_TIMEOUT:?}\npage log:\n{page_log}");
    };
    println!("browser result: {result}");
    let v: serde_json::Value = serde_json::from_str(&result)
        .unwrap_or_else(|e| panic!("bad result JSON ({e}): {result}\npage log:\n{page_log}"));
    let context = || format!("result: {result}\npage log:\n{page_log}");

    assert_eq!(
        v["messagesAtoB"].as_u64(),
        Some(MESSAGES as u64),
        "{}",
        context()
    );
    assert_eq!(
        v["messagesBtoA"].as_u64(),
        Some(MESSAGES as u64),
        "{}",
        context()
    );
    for pc in ["a", "b"] {
        for end in ["local", "remote"] {
            assert_eq!(
                v[pc][end]["candidateType"].as_str(),
                Some("relay"),
                "{pc}'s selected pair {end} candidate must be relay\n{}",
                context()
            );
        }
        // The relayed candidates must be this server's: 127.0.0.1, in its port range.
        let port = v[pc]["local"]["port"].as_u64().unwrap_or(0);
        assert!(
            server.is_relay_port(port as u16),
            "{pc}'s local relay candidate port {port} is outside {:?}\n{}",
            server.relay_ports,
            context()
        );
    }
    assert_eq!(v["ok"].as_bool(), Some(true), "{}", context());
}
