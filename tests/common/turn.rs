//! One small TURN client (RFC 8656, long-term credentials) over UDP, TCP or TLS.

use std::io::{ErrorKind, Read, Write};
use std::net::{IpAddr, SocketAddr, UdpSocket};
use std::time::{Duration, Instant};

use turnstone::auth::long_term_key;
use turnstone::proto::{self, attr, method, Class, Message, MessageWriter, TransactionId};

use super::server::{PASSWORD, USER};
use super::stream::{frame_len, tcp_connect_from, Stream, STREAM_TIMEOUT};
use super::stun::random_tid;

/// REQUESTED-TRANSPORT value for UDP relays.
pub const PROTO_UDP: u8 = 17;
/// How long a UDP client waits for an answer before sending a request again.
pub const UDP_RTO: Duration = Duration::from_millis(400);
/// How often a UDP client sends a request before giving up (3.2 s in all).
pub const UDP_ATTEMPTS: u32 = 8;

/// A fresh transaction ID.
pub fn tid() -> TransactionId {
    TransactionId(random_tid())
}

/// Adds REQUESTED-TRANSPORT UDP: the attribute of an ordinary Allocate.
pub fn udp_transport(w: &mut MessageWriter<'_>) {
    w.attr(attr::REQUESTED_TRANSPORT, &[PROTO_UDP, 0, 0, 0]);
}

/// A ChannelData message (unpadded, as on UDP).
pub fn channel_data(channel: u16, payload: &[u8]) -> Vec<u8> {
    let mut v = channel.to_be_bytes().to_vec();
    v.extend_from_slice(&(payload.len() as u16).to_be_bytes());
    v.extend_from_slice(payload);
    v
}

/// A Send indication carrying `payload` to `peer`.
pub fn send_indication(peer: SocketAddr, payload: &[u8]) -> Vec<u8> {
    let mut buf = Vec::new();
    let mut w = MessageWriter::new(&mut buf, method::SEND, Class::Indication, tid());
    w.xor_address(attr::XOR_PEER_ADDRESS, peer)
        .attr(attr::DATA, payload);
    w.finish();
    buf
}

/// What a client receives from a peer: the payload of ChannelData or of a Data
/// indication.
pub fn relayed_payload(buf: &[u8]) -> Option<&[u8]> {
    if proto::is_channel_data(*buf.first()?) {
        Some(proto::parse_channel_data(buf)?.1)
    } else {
        Message::parse(buf).ok()?.data()
    }
}

/// The attribute types listed in UNKNOWN-ATTRIBUTES.
pub fn unknown_attributes(m: &Message<'_>) -> Vec<u16> {
    m.get(attr::UNKNOWN_ATTRIBUTES)
        .unwrap_or_default()
        .chunks_exact(2)
        .map(|c| u16::from_be_bytes([c[0], c[1]]))
        .collect()
}

fn is_timeout(e: &std::io::Error) -> bool {
    matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut)
}

/// A response from the server: owned bytes, parsed on demand.
pub struct Answer {
    pub raw: Vec<u8>,
}

impl Answer {
    pub fn msg(&self) -> Message<'_> {
        Message::parse(&self.raw).expect("answer parses")
    }
    pub fn class(&self) -> Class {
        self.msg().class()
    }
    pub fn is_success(&self) -> bool {
        self.class() == Class::Success
    }
    /// The ERROR-CODE (which must decode when present).
    pub fn code(&self) -> Option<u16> {
        self.msg()
            .error_code()
            .expect("ERROR-CODE decodes")
            .map(|(c, _)| c)
    }
    pub fn describe(&self) -> String {
        let m = self.msg();
        format!(
            "{:?} method {:#05x} error {:?}",
            m.class(),
            m.method(),
            m.error_code().ok().flatten()
        )
    }
    /// XOR-RELAYED-ADDRESS.
    pub fn relayed(&self) -> Option<SocketAddr> {
        self.msg()
            .xor_address(attr::XOR_RELAYED_ADDRESS)
            .ok()
            .flatten()
    }
    /// XOR-MAPPED-ADDRESS.
    pub fn mapped(&self) -> Option<SocketAddr> {
        self.msg()
            .xor_address(attr::XOR_MAPPED_ADDRESS)
            .ok()
            .flatten()
    }
    /// Panics (with `what`) unless this is a success.
    pub fn expect_success(&self, what: &str) -> &Answer {
        assert!(self.is_success(), "{what}: {}", self.describe());
        self
    }
}

/// Where a client's messages go: a UDP socket (to one server address), or a TCP/TLS
/// stream with what has been read of the next frame.
pub enum Link {
    Udp { sock: UdpSocket, server: SocketAddr },
    Stream { stream: Stream, buf: Vec<u8> },
}

impl Link {
    /// A UDP socket on the loopback address of `server`'s family, with 4 MiB buffers.
    pub fn udp(server: SocketAddr) -> Link {
        let bind = if server.is_ipv6() {
            "[::1]:0"
        } else {
            "127.0.0.1:0"
        };
        let sock = UdpSocket::bind(bind).expect("bind client socket");
        let r = socket2::SockRef::from(&sock);
        let _ = r.set_recv_buffer_size(4 << 20);
        let _ = r.set_send_buffer_size(4 << 20);
        sock.set_read_timeout(Some(UDP_RTO)).expect("read timeout");
        Link::Udp { sock, server }
    }

    pub fn send(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        match self {
            Link::Udp { sock, server } => sock.send_to(bytes, *server).map(|_| ()),
            Link::Stream { stream, .. } => {
                stream.write_all(bytes)?;
                stream.flush()
            }
        }
    }

    /// The next message (STUN or ChannelData) before `deadline`, `None` once it has
    /// passed. On UDP, datagrams from elsewhere than the server are skipped unless
    /// `any_source`, and errors count as silence.
    pub fn recv(
        &mut self,
        deadline: Instant,
        any_source: bool,
    ) -> std::io::Result<Option<Vec<u8>>> {
        match self {
            Link::Udp { sock, server } => {
                let mut buf = vec![0u8; 65_536];
                loop {
                    let left = deadline.saturating_duration_since(Instant::now());
                    if left.is_zero() {
                        return Ok(None);
                    }
                    sock.set_read_timeout(Some(left))?;
                    match sock.recv_from(&mut buf) {
                        Ok((n, from)) if any_source || from == *server => {
                            return Ok(Some(buf[..n].to_vec()))
                        }
                        Ok(_) => {}
                        Err(_) => return Ok(None),
                    }
                }
            }
            Link::Stream { stream, buf } => loop {
                if buf.len() >= 4 {
                    let (frame, padded) = frame_len(buf);
                    if buf.len() >= padded {
                        let f = buf[..frame].to_vec();
                        buf.drain(..padded);
                        return Ok(Some(f));
                    }
                }
                let left = deadline.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    return Ok(None);
                }
                stream.tcp().set_read_timeout(Some(left))?;
                let mut chunk = [0u8; 16_384];
                match stream.read(&mut chunk) {
                    Ok(0) => {
                        return Err(std::io::Error::new(
                            ErrorKind::UnexpectedEof,
                            "connection closed",
                        ))
                    }
                    Ok(n) => buf.extend_from_slice(&chunk[..n]),
                    Err(e) if is_timeout(&e) => return Ok(None),
                    Err(e) if e.kind() == ErrorKind::Interrupted => {}
                    Err(e) => return Err(e),
                }
            },
        }
    }
}

/// A small TURN client: requests with long-term credentials (the 401 round fetches
/// REALM and NONCE, a 438 renews the nonce), relayed data both ways, and raw messages
/// for the tests that craft their own.
pub struct TurnClient {
    pub link: Link,
    pub user: String,
    password: String,
    pub realm: String,
    /// The long-term key for `user`, `realm` and the password.
    pub key: [u8; 16],
    pub nonce: Option<String>,
    /// UDP: how long to wait for an answer before sending again, and how often to send.
    pub rto: Duration,
    pub attempts: u32,
}

impl TurnClient {
    /// A client on `link` for `user`/`password` in the harness's realm (until a
    /// challenge names another).
    pub fn new(link: Link, user: &str, password: &str) -> TurnClient {
        let realm = super::server::REALM.to_string();
        TurnClient {
            link,
            user: user.to_string(),
            password: password.to_string(),
            key: long_term_key(user, &realm, password),
            realm,
            nonce: None,
            rto: UDP_RTO,
            attempts: UDP_ATTEMPTS,
        }
    }

    /// A client over UDP from the loopback address (of `server`'s family).
    pub fn udp(server: SocketAddr, user: &str, password: &str) -> TurnClient {
        TurnClient::new(Link::udp(server), user, password)
    }

    /// A client over a TCP or TLS stream.
    pub fn stream(stream: Stream, user: &str, password: &str) -> TurnClient {
        TurnClient::new(
            Link::Stream {
                stream,
                buf: Vec::new(),
            },
            user,
            password,
        )
    }

    /// alice/wonderland over TCP from `source` (default 127.0.0.1).
    pub fn tcp(source: Option<IpAddr>, server: SocketAddr) -> Result<TurnClient, String> {
        let t = tcp_connect_from(source, server).map_err(|e| format!("connect {server}: {e}"))?;
        Ok(TurnClient::stream(Stream::Tcp(t), USER, PASSWORD))
    }

    /// Expects `realm` in challenges (and signs for it).
    pub fn with_realm(mut self, realm: &str) -> TurnClient {
        self.set_realm(realm);
        self
    }

    fn set_realm(&mut self, realm: &str) {
        self.realm = realm.to_string();
        self.key = long_term_key(&self.user, realm, &self.password);
    }

    /// The client's own address.
    pub fn local_addr(&self) -> SocketAddr {
        match &self.link {
            Link::Udp { sock, .. } => sock.local_addr(),
            Link::Stream { stream, .. } => stream.tcp().local_addr(),
        }
        .expect("local address")
    }

    /// The server's address.
    pub fn server(&self) -> SocketAddr {
        match &self.link {
            Link::Udp { server, .. } => Ok(*server),
            Link::Stream { stream, .. } => stream.tcp().peer_addr(),
        }
        .expect("server address")
    }

    /// The UDP socket (panics on a stream client), e.g. for paced traffic.
    pub fn udp_socket(&self) -> &UdpSocket {
        match &self.link {
            Link::Udp { sock, .. } => sock,
            Link::Stream { .. } => panic!("not a UDP client"),
        }
    }

    /// Sends raw bytes to the server.
    pub fn send(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        self.link.send(bytes)
    }

    /// The next message from the server within `within`.
    pub fn recv(&mut self, within: Duration) -> Option<Vec<u8>> {
        self.link
            .recv(Instant::now() + within, false)
            .ok()
            .flatten()
    }

    /// Throws away whatever the server has sent so far.
    pub fn drain(&mut self) {
        while self.recv(Duration::from_millis(20)).is_some() {}
    }

    /// Nothing arrives (from anyone, on UDP) for `for_`.
    pub fn assert_silent(&mut self, what: &str, for_: Duration) {
        let until = Instant::now() + for_;
        if let Ok(Some(m)) = self.link.recv(until, true) {
            panic!("{what}: expected no answer, got {} bytes", m.len());
        }
    }

    /// `req` (sent twice, 500 ms apart) gets no answer at all.
    pub fn assert_no_answer(&mut self, req: &[u8], what: &str) {
        for _ in 0..2 {
            let _ = self.send(req);
            self.assert_silent(what, Duration::from_millis(500));
        }
    }

    /// A request `m`: `attrs`, then with `nonce` USERNAME, REALM, NONCE and
    /// MESSAGE-INTEGRITY, then `after` (attributes after MESSAGE-INTEGRITY).
    pub fn build(
        &self,
        m: u16,
        nonce: Option<&str>,
        attrs: &dyn Fn(&mut MessageWriter<'_>),
        after: &dyn Fn(&mut MessageWriter<'_>),
    ) -> Vec<u8> {
        let mut buf = Vec::new();
        let mut w = MessageWriter::new(&mut buf, m, Class::Request, tid());
        attrs(&mut w);
        if let Some(nonce) = nonce {
            w.attr(attr::USERNAME, self.user.as_bytes())
                .attr(attr::REALM, self.realm.as_bytes())
                .attr(attr::NONCE, nonce.as_bytes())
                .message_integrity(&self.key);
        }
        after(&mut w);
        w.finish();
        buf
    }

    /// An unauthenticated request.
    pub fn plain(&self, m: u16, attrs: &dyn Fn(&mut MessageWriter<'_>)) -> Vec<u8> {
        self.build(m, None, attrs, &|_| {})
    }

    /// An authenticated request with the current nonce.
    pub fn signed(&self, m: u16, attrs: &dyn Fn(&mut MessageWriter<'_>)) -> Vec<u8> {
        self.signed_with(m, attrs, &|_| {})
    }

    /// An authenticated request with the current nonce and `after` (attributes after
    /// MESSAGE-INTEGRITY).
    pub fn signed_with(
        &self,
        m: u16,
        attrs: &dyn Fn(&mut MessageWriter<'_>),
        after: &dyn Fn(&mut MessageWriter<'_>),
    ) -> Vec<u8> {
        let nonce = self.nonce.as_deref().expect("a nonce (fetch_nonce first)");
        self.build(m, Some(nonce), attrs, after)
    }

    /// Sends `req` (on UDP again every `rto`, `attempts` times) until the success or
    /// error response with its transaction ID arrives; other messages are skipped.
    pub fn try_transact(&mut self, req: &[u8]) -> Result<Answer, String> {
        let want = Message::parse(req)
            .map_err(|e| format!("our request: {e:?}"))?
            .transaction_id();
        let (rounds, wait) = match self.link {
            Link::Udp { .. } => (self.attempts, self.rto),
            Link::Stream { .. } => (1, STREAM_TIMEOUT),
        };
        for _ in 0..rounds {
            self.send(req).map_err(|e| format!("send: {e}"))?;
            let until = Instant::now() + wait;
            while let Some(f) = self
                .link
                .recv(until, false)
                .map_err(|e| format!("read: {e}"))?
            {
                if let Ok(m) = Message::parse(&f) {
                    if m.transaction_id() == want
                        && matches!(m.class(), Class::Success | Class::Error)
                    {
                        return Ok(Answer { raw: f });
                    }
                }
            }
        }
        Err(format!(
            "no answer to method {:#05x} within {:?} (user {}, client {}, nonce {:?})",
            Message::parse(req).map(|m| m.method()).unwrap_or(0),
            wait * rounds,
            self.user,
            self.local_addr(),
            self.nonce
        ))
    }

    /// [`Self::try_transact`], panicking without an answer.
    pub fn transact(&mut self, req: &[u8]) -> Answer {
        self.try_transact(req).unwrap_or_else(|e| panic!("{e}"))
    }

    /// Takes NONCE (which must be there) and REALM from a 401/438 challenge.
    pub fn learn(&mut self, a: &Answer) -> Result<(), String> {
        let m = a.msg();
        let nonce = m.nonce().ok().flatten().map(str::to_string);
        let realm = m.realm().ok().flatten().map(str::to_string);
        self.nonce = Some(nonce.ok_or_else(|| format!("{} without NONCE", a.describe()))?);
        if let Some(r) = realm {
            if r != self.realm {
                self.set_realm(&r);
            }
        }
        Ok(())
    }

    /// Gets a nonce the usual way: an unauthenticated Allocate, which must be answered
    /// 401 with the expected REALM and a NONCE.
    pub fn fetch_nonce(&mut self) -> String {
        let req = self.plain(method::ALLOCATE, &udp_transport);
        let a = self.transact(&req);
        assert_eq!(a.code(), Some(401), "first Allocate: {}", a.describe());
        assert_eq!(
            a.msg().realm().unwrap(),
            Some(self.realm.as_str()),
            "401 REALM"
        );
        self.learn(&a).unwrap_or_else(|e| panic!("{e}"));
        self.nonce.clone().expect("401 carries a NONCE")
    }

    /// A request with credentials: without a nonce it goes out unauthenticated first
    /// (and a 401 challenge is answered), a 438 renews the nonce; FINGERPRINT last.
    /// Returns the final answer, success or not.
    pub fn try_request(
        &mut self,
        m: u16,
        attrs: &dyn Fn(&mut MessageWriter<'_>),
    ) -> Result<Answer, String> {
        let mut last = None;
        for _ in 0..3 {
            let had_nonce = self.nonce.is_some();
            let req = self.build(m, self.nonce.as_deref(), attrs, &|w| {
                w.fingerprint();
            });
            let a = self.try_transact(&req)?;
            match a.code() {
                Some(438) => self.learn(&a)?,
                Some(401) if !had_nonce => self.learn(&a)?,
                _ => return Ok(a),
            }
            last = Some(a);
        }
        Ok(last.expect("an answer"))
    }

    /// [`Self::try_request`], panicking without an answer.
    pub fn request(&mut self, m: u16, attrs: &dyn Fn(&mut MessageWriter<'_>)) -> Answer {
        self.try_request(m, attrs).unwrap_or_else(|e| panic!("{e}"))
    }

    /// A Binding request; the XOR-MAPPED-ADDRESS of its success.
    pub fn binding(&mut self) -> Result<SocketAddr, String> {
        let req = self.build(method::BINDING, None, &|_| {}, &|w| {
            w.fingerprint();
        });
        let a = self.try_transact(&req)?;
        if !a.is_success() {
            return Err(format!("Binding: {}", a.describe()));
        }
        a.mapped()
            .ok_or_else(|| "Binding success without XOR-MAPPED-ADDRESS".to_string())
    }

    /// An Allocate (UDP relay): the answer, whatever it is.
    pub fn allocate(&mut self) -> Answer {
        self.request(method::ALLOCATE, &udp_transport)
    }

    /// An Allocate that succeeds: XOR-RELAYED-ADDRESS, or what went wrong.
    pub fn try_allocate(&mut self) -> Result<SocketAddr, String> {
        let a = self.try_request(method::ALLOCATE, &udp_transport)?;
        if !a.is_success() {
            return Err(format!("Allocate: {}", a.describe()));
        }
        a.relayed()
            .ok_or_else(|| "Allocate success without XOR-RELAYED-ADDRESS".to_string())
    }

    /// An Allocate that must succeed, signed, with our address as XOR-MAPPED-ADDRESS;
    /// returns XOR-RELAYED-ADDRESS.
    pub fn must_allocate(&mut self) -> SocketAddr {
        let a = self.allocate();
        a.expect_success("Allocate");
        let m = a.msg();
        assert!(
            m.verify_integrity(&self.key),
            "Allocate success without a valid MESSAGE-INTEGRITY"
        );
        assert_eq!(
            m.xor_address(attr::XOR_MAPPED_ADDRESS).unwrap(),
            Some(self.local_addr()),
            "XOR-MAPPED-ADDRESS"
        );
        m.xor_address(attr::XOR_RELAYED_ADDRESS)
            .unwrap()
            .expect("XOR-RELAYED-ADDRESS")
    }

    /// A Refresh with `lifetime` seconds (0 deletes the allocation): the answer.
    pub fn refresh(&mut self, lifetime: u32) -> Answer {
        self.request(method::REFRESH, &|w| {
            w.u32_attr(attr::LIFETIME, lifetime);
        })
    }

    /// A Refresh that succeeds, or what went wrong.
    pub fn try_refresh(&mut self, lifetime: u32) -> Result<(), String> {
        let a = self.try_request(method::REFRESH, &|w| {
            w.u32_attr(attr::LIFETIME, lifetime);
        })?;
        if a.is_success() {
            Ok(())
        } else {
            Err(format!("Refresh: {}", a.describe()))
        }
    }

    /// A CreatePermission for `peer`: the answer.
    pub fn create_permission(&mut self, peer: SocketAddr) -> Answer {
        self.request(method::CREATE_PERMISSION, &|w| {
            w.xor_address(attr::XOR_PEER_ADDRESS, peer);
        })
    }

    /// A CreatePermission for `peer` that must succeed.
    pub fn permit(&mut self, peer: SocketAddr) {
        let who = format!(
            "{} at {}: CreatePermission {peer}",
            self.user,
            self.local_addr()
        );
        self.create_permission(peer).expect_success(&who);
    }

    /// A ChannelBind of `number` to `peer`: the answer.
    pub fn channel_bind(&mut self, number: u16, peer: SocketAddr) -> Answer {
        self.request(method::CHANNEL_BIND, &|w| {
            let [a, b] = number.to_be_bytes();
            w.attr(attr::CHANNEL_NUMBER, &[a, b, 0, 0]);
            w.xor_address(attr::XOR_PEER_ADDRESS, peer);
        })
    }

    /// A ChannelBind of `number` to `peer` that must succeed.
    pub fn bind(&mut self, number: u16, peer: SocketAddr) {
        let who = format!(
            "{} at {}: ChannelBind {number:#06x} {peer}",
            self.user,
            self.local_addr()
        );
        self.channel_bind(number, peer).expect_success(&who);
    }

    /// Sends `payload` to `peer` in a Send indication.
    pub fn send_to_peer(&mut self, peer: SocketAddr, payload: &[u8]) -> std::io::Result<()> {
        self.send(&send_indication(peer, payload))
    }

    /// Sends `payload` as ChannelData on `number` (padded to 4 bytes on streams).
    pub fn send_channel(&mut self, number: u16, payload: &[u8]) -> std::io::Result<()> {
        let mut frame = channel_data(number, payload);
        if let Link::Stream { .. } = self.link {
            frame.resize(frame.len().div_ceil(4) * 4, 0);
        }
        self.send(&frame)
    }

    /// Did a Data indication carrying `payload` arrive within `within`?
    pub fn receives_data_indication(&mut self, payload: &[u8], within: Duration) -> bool {
        let deadline = Instant::now() + within;
        while let Ok(Some(f)) = self.link.recv(deadline, false) {
            if let Ok(m) = Message::parse(&f) {
                if m.method() == method::DATA && m.data() == Some(payload) {
                    return true;
                }
            }
        }
        false
    }
}

/// Each of `peers` is refused with a signed 403: a permission, a channel (0x4000 +
/// index), and a permission to 8.8.8.8 and the peer in one request (nothing installed);
/// then, as the control, a permission to the public 8.8.8.8 alone succeeds.
pub fn assert_peers_refused(c: &mut TurnClient, peers: &[&str], why: &str) {
    let mut failures = Vec::new();
    let public: SocketAddr = "8.8.8.8:53".parse().unwrap();
    for (i, p) in peers.iter().enumerate() {
        let peer: SocketAddr = p.parse().unwrap();
        let r = c.create_permission(peer);
        if r.code() != Some(403) {
            failures.push(format!("CreatePermission {peer}: {}", r.describe()));
        } else if !r.msg().verify_integrity(&c.key) {
            failures.push(format!("CreatePermission {peer}: 403 not signed"));
        }
        let r = c.channel_bind(0x4000 + i as u16, peer);
        if r.code() != Some(403) {
            failures.push(format!("ChannelBind {peer}: {}", r.describe()));
        }
        let r = c.request(method::CREATE_PERMISSION, &|w| {
            w.xor_address(attr::XOR_PEER_ADDRESS, public);
            w.xor_address(attr::XOR_PEER_ADDRESS, peer);
        });
        if r.code() != Some(403) {
            failures.push(format!(
                "CreatePermission {public} + {peer}: {}",
                r.describe()
            ));
        }
    }
    assert!(
        failures.is_empty(),
        "{why}: these peers must be refused with 403:\n{}",
        failures.join("\n")
    );
    // Control: a public address is fine (no packet is sent by CreatePermission).
    let r = c.create_permission(public);
    assert!(r.is_success(), "public peer: {}", r.describe());
}

/// The server still serves: a new UDP client gets the 401 challenge, then a signed
/// Allocate success with XOR-RELAYED-ADDRESS, and gives the allocation back.
pub fn assert_serves(server: SocketAddr, after: &str) {
    let mut c = TurnClient::udp(server, USER, PASSWORD);
    c.fetch_nonce();
    let a = c.allocate();
    assert!(
        a.is_success(),
        "after {after}: a good client's Allocate failed: {}",
        a.describe()
    );
    assert!(
        a.msg().verify_integrity(&c.key),
        "after {after}: unsigned Allocate success"
    );
    assert!(
        a.relayed().is_some(),
        "after {after}: Allocate success without XOR-RELAYED-ADDRESS"
    );
    let r = c.refresh(0);
    assert!(r.is_success(), "after {after}: Refresh 0: {}", r.describe());
}

/// A fresh TCP connection from `source` completes an authenticated Allocate (and the
/// connection is closed again); panics with `what` otherwise.
pub fn assert_tcp_allocates(server: SocketAddr, source: Option<IpAddr>, what: &str) -> SocketAddr {
    let r = TurnClient::tcp(source, server).and_then(|mut c| {
        let relayed = c.try_allocate()?;
        // Give the allocation back so repeated checks do not pile up.
        let _ = c.try_refresh(0);
        Ok(relayed)
    });
    r.unwrap_or_else(|e| panic!("a good TCP client from {source:?} was not served ({what}): {e}"))
}
