//! The Prometheus endpoint of a test server: HTTP GET, and samples by name and labels.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use super::server::TestServer;

impl TestServer {
    /// GET `path` on the metrics endpoint: (status, body); `None` if it cannot be read.
    pub fn try_http_get(&self, path: &str) -> Option<(u16, String)> {
        let addr = self
            .metrics_addr
            .expect("server started without .metrics()");
        let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2)).ok()?;
        s.set_read_timeout(Some(Duration::from_secs(3))).ok()?;
        write!(
            s,
            "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
        )
        .ok()?;
        let mut out = String::new();
        s.read_to_string(&mut out).ok()?;
        let status = out.split(' ').nth(1)?.parse().ok()?;
        let body = out
            .split_once("\r\n\r\n")
            .map(|(_, b)| b.to_string())
            .unwrap_or_default();
        Some((status, body))
    }

    /// GET `path` on the metrics endpoint: (status, body).
    pub fn http_get(&self, path: &str) -> (u16, String) {
        self.try_http_get(path)
            .unwrap_or_else(|| panic!("no HTTP response to GET {path}"))
    }

    /// The text of `/metrics` (which must answer 200).
    pub fn metrics_text(&self) -> String {
        let (status, body) = self.http_get("/metrics");
        assert_eq!(status, 200, "/metrics: {body}");
        body
    }

    /// The sample `name{labels}` now, if `/metrics` answers and has it.
    pub fn metric(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        let (_, text) = self.try_http_get("/metrics")?;
        sample(&text, name, labels)
    }

    /// Polls /metrics until the sample `name{labels}` is at least `min` (≤ 3 s);
    /// returns its value.
    pub fn wait_metric(&self, name: &str, labels: &[(&str, &str)], min: f64) -> f64 {
        let deadline = Instant::now() + Duration::from_secs(3);
        loop {
            let text = self.metrics_text();
            let v = sample(&text, name, labels).unwrap_or(-1.0);
            if v >= min {
                return v;
            }
            assert!(
                Instant::now() < deadline,
                "{name}{labels:?} = {v}, want >= {min} within 3 s\n{text}"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

/// The value of the Prometheus sample `name{labels...}` (labels matched as a subset).
pub fn sample(text: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    text.lines().find_map(|line| {
        let (series, value) = line.rsplit_once(' ')?;
        let (n, rest) = match series.split_once('{') {
            Some((n, rest)) => (n, rest.trim_end_matches('}')),
            None => (series, ""),
        };
        if n != name {
            return None;
        }
        let all = labels
            .iter()
            .all(|(k, v)| rest.split(',').any(|kv| kv == format!("{k}=\"{v}\"")));
        if all {
            value.parse().ok()
        } else {
            None
        }
    })
}
