//! HTTP on 127.0.0.1 for the browser tests: the page server (`tests/browser/`, POSTs) and a client.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// Where the pages and their scripts are.
const PAGES_DIR: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/browser");
/// The largest request body taken (call results with many getStats() samples are big).
const BODY_MAX: usize = 4 << 20;

/// What a page POSTed.
pub enum Posted {
    /// A line of its log (`POST /log`).
    Log(String),
    /// Its result (`POST /result`).
    Result(String),
}

/// Serves `GET /NAME` (the file `tests/browser/NAME`) and forwards the bodies of
/// `POST /log` and `POST /result` (from any origin), until dropped.
pub struct PageServer {
    addr: SocketAddr,
    posted: mpsc::Receiver<Posted>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl PageServer {
    /// Listens on a port of 127.0.0.1 the kernel picks.
    pub fn start() -> PageServer {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind the page server");
        let addr = listener.local_addr().expect("page server address");
        listener.set_nonblocking(true).expect("nonblocking");
        let (tx, posted) = mpsc::channel();
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let stop = stop.clone();
            std::thread::spawn(move || serve(&listener, &tx, &stop))
        };
        PageServer {
            addr,
            posted,
            stop,
            thread: Some(thread),
        }
    }

    /// The URL of `path` (with its query) on this server, e.g. `url("/result")`.
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    /// The next POST, waiting up to `wait` for it.
    pub fn recv(&self, wait: Duration) -> Result<Posted, mpsc::RecvTimeoutError> {
        self.posted.recv_timeout(wait)
    }

    /// The next POST if there is one already.
    pub fn try_recv(&self) -> Option<Posted> {
        self.posted.try_recv().ok()
    }
}

impl Drop for PageServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn serve(listener: &TcpListener, tx: &mpsc::Sender<Posted>, stop: &AtomicBool) {
    while !stop.load(Ordering::Relaxed) {
        match listener.accept() {
            Ok((stream, _)) => {
                let _ = handle(stream, tx);
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                std::thread::sleep(Duration::from_millis(20));
            }
            Err(_) => return,
        }
    }
}

/// Answers one request (one per connection).
fn handle(stream: TcpStream, tx: &mpsc::Sender<Posted>) -> std::io::Result<()> {
    stream.set_nonblocking(false)?;
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    let mut reader = BufReader::new(stream.try_clone()?);
    let mut request_line = String::new();
    reader.read_line(&mut request_line)?;
    let mut content_length = 0usize;
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line)? == 0 || line.trim().is_empty() {
            break;
        }
        if let Some((k, v)) = line.split_once(':') {
            if k.trim().eq_ignore_ascii_case("content-length") {
                content_length = v.trim().parse().unwrap_or(0);
            }
        }
    }
    let mut body = vec![0u8; content_length.min(BODY_MAX)];
    reader.read_exact(&mut body)?;
    let body = String::from_utf8_lossy(&body).into_owned();
    let mut parts = request_line.split_whitespace();
    let method = parts.next().unwrap_or("");
    let path = parts.next().unwrap_or("");
    let ok = ("200 OK", "text/plain", b"ok".to_vec());
    let (status, content_type, payload) = match (method, path) {
        ("GET", p) => match page_file(p) {
            Some(file) => ("200 OK", file.0, file.1),
            None => ("404 Not Found", "text/plain", b"not found".to_vec()),
        },
        ("POST", "/log") => {
            let _ = tx.send(Posted::Log(body));
            ok
        }
        ("POST", "/result") => {
            let _ = tx.send(Posted::Result(body));
            ok
        }
        _ => ("404 Not Found", "text/plain", b"not found".to_vec()),
    };
    let mut out = stream;
    write!(
        out,
        "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\n\
         Access-Control-Allow-Origin: *\r\nCache-Control: no-store\r\nConnection: close\r\n\r\n",
        payload.len()
    )?;
    out.write_all(&payload)?;
    out.flush()
}

/// The content type and bytes of the file of `tests/browser/` that `path` (`/NAME`, with
/// or without a query) names; only plain names in that folder.
fn page_file(path: &str) -> Option<(&'static str, Vec<u8>)> {
    let name = path.split('?').next()?.strip_prefix('/')?;
    let plain = !name.starts_with('.')
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'_'));
    if !plain {
        return None;
    }
    let content_type = match Path::new(name).extension()?.to_str()? {
        "html" => "text/html; charset=utf-8",
        "js" => "text/javascript; charset=utf-8",
        "css" => "text/css; charset=utf-8",
        _ => return None,
    };
    let bytes = std::fs::read(Path::new(PAGES_DIR).join(name)).ok()?;
    Some((content_type, bytes))
}

/// One HTTP/1.1 request to `addr` (retried for 5 s while the connection is refused, as
/// a listener may still be coming up); returns the status code, the head and the body.
pub fn request(addr: SocketAddr, method: &str, path: &str, body: &str) -> (u16, String, Vec<u8>) {
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut s = loop {
        match TcpStream::connect(addr) {
            Ok(s) => break s,
            Err(_) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(50)),
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
