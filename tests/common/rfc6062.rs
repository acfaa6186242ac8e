//! RFC 6062 TCP relays from the test client: a TCP allocation, Connect to a TCP peer,
//! and a data connection bound to the peer connection with ConnectionBind.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::time::{Duration, Instant};

use turnstone::proto::{attr, method, MessageWriter};

use super::stream::{Stream, STREAM_TIMEOUT};
use super::turn::{Link, TurnClient};

/// REQUESTED-TRANSPORT value for TCP relays (RFC 6062 6.1).
pub const PROTO_TCP: u8 = 6;

/// Adds REQUESTED-TRANSPORT TCP.
pub fn tcp_transport(w: &mut MessageWriter<'_>) {
    w.attr(attr::REQUESTED_TRANSPORT, &[PROTO_TCP, 0, 0, 0]);
}

impl TurnClient {
    /// An Allocate of a TCP relay (the client must be on a stream): XOR-RELAYED-ADDRESS.
    pub fn try_allocate_tcp(&mut self) -> Result<SocketAddr, String> {
        let a = self.try_request(method::ALLOCATE, &tcp_transport)?;
        if !a.is_success() {
            return Err(format!("Allocate (TCP relay): {}", a.describe()));
        }
        a.relayed()
            .ok_or_else(|| "Allocate success without XOR-RELAYED-ADDRESS".to_string())
    }

    /// A Connect to `peer` (RFC 6062 5.2; it installs the permission): the
    /// CONNECTION-ID of its success.
    pub fn try_connect_peer(&mut self, peer: SocketAddr) -> Result<u32, String> {
        let a = self.try_request(method::CONNECT, &|w| {
            w.xor_address(attr::XOR_PEER_ADDRESS, peer);
        })?;
        if !a.is_success() {
            return Err(format!("Connect: {}", a.describe()));
        }
        a.msg()
            .get(attr::CONNECTION_ID)
            .and_then(|v| <[u8; 4]>::try_from(v).ok())
            .map(u32::from_be_bytes)
            .ok_or_else(|| "Connect success without CONNECTION-ID".to_string())
    }
}

/// Binds the new connection `data` (to the same server) to connection `id` of a client
/// of `user`/`password` (RFC 6062 5.4): on success, the stream then carries the peer's
/// bytes unframed.
pub fn bind_data_connection(
    data: Stream,
    user: &str,
    password: &str,
    id: u32,
) -> Result<Stream, String> {
    let mut c = TurnClient::stream(data, user, password);
    let a = c.try_request(method::CONNECTION_BIND, &|w| {
        w.u32_attr(attr::CONNECTION_ID, id);
    })?;
    if !a.is_success() {
        return Err(format!("ConnectionBind {id:#010x}: {}", a.describe()));
    }
    match c.link {
        Link::Stream { stream, buf } if buf.is_empty() => Ok(stream),
        Link::Stream { buf, .. } => Err(format!(
            "{} unexpected bytes after the ConnectionBind success",
            buf.len()
        )),
        Link::Udp { .. } => Err("not a stream".to_string()),
    }
}

/// A TCP peer: accepts one connection within [`STREAM_TIMEOUT`].
pub struct TcpPeer {
    pub listener: TcpListener,
    pub addr: SocketAddr,
}

impl TcpPeer {
    pub fn start() -> TcpPeer {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind the TCP peer");
        let addr = listener.local_addr().expect("peer address");
        listener.set_nonblocking(true).expect("non-blocking");
        TcpPeer { listener, addr }
    }

    /// The next connection from the relay (blocking, with [`STREAM_TIMEOUT`] timeouts).
    pub fn accept(&self) -> Result<TcpStream, String> {
        let deadline = Instant::now() + STREAM_TIMEOUT;
        loop {
            match self.listener.accept() {
                Ok((s, _)) => {
                    s.set_nonblocking(false).map_err(|e| e.to_string())?;
                    s.set_read_timeout(Some(STREAM_TIMEOUT))
                        .map_err(|e| e.to_string())?;
                    s.set_write_timeout(Some(STREAM_TIMEOUT))
                        .map_err(|e| e.to_string())?;
                    return Ok(s);
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    if Instant::now() >= deadline {
                        return Err("no connection from the relay to the TCP peer".into());
                    }
                    std::thread::sleep(Duration::from_millis(5));
                }
                Err(e) => return Err(format!("accept: {e}")),
            }
        }
    }
}

/// Writes `bytes` into `w` and reads as many back from `r`, asserting they are the same.
pub fn round_trip(w: &mut impl Write, r: &mut impl Read, bytes: &[u8], what: &str) {
    w.write_all(bytes)
        .unwrap_or_else(|e| panic!("{what}: write: {e}"));
    w.flush().unwrap_or_else(|e| panic!("{what}: flush: {e}"));
    let mut got = vec![0u8; bytes.len()];
    r.read_exact(&mut got)
        .unwrap_or_else(|e| panic!("{what}: read: {e}"));
    assert!(got == bytes, "{what}: bytes changed on the way");
}
