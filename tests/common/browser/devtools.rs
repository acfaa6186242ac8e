//! A PNG of a page in the running Chromium via the DevTools protocol (a minimal WebSocket client).

use super::http::request;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::time::{Duration, Instant};

/// Captures the viewport of the page whose URL contains `url_part`, as PNG.
pub fn screenshot(profile: &Path, url_part: &str) -> Vec<u8> {
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
    let (_, _, list) = request(devtools, "GET", "/json/list", "");
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

/// The client end of a WebSocket (plain TCP): masked text frames out, text messages in.
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
