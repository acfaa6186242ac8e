//! A minimal TURN client over UDP for the benchmark tools: builds requests with
//! turnstone's own codec (`turnstone::proto`), reads replies, and does the long-term
//! credential dance (401 with REALM and NONCE, then MESSAGE-INTEGRITY; 438 refreshes the
//! nonce). Blocking helpers for setting up a few allocations; the request builders and
//! [`parse_reply`] are shared with the non-blocking engines (`allocrate`, `mem`).

use std::io;
use std::net::{SocketAddr, UdpSocket};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use turnstone::auth::{long_term_key, Key};
use turnstone::proto::{attr, method, Class, Message, MessageWriter, TransactionId};

/// REQUESTED-TRANSPORT value for UDP: protocol 17 in the first byte (RFC 8656 18.7).
const TRANSPORT_UDP: u32 = 17 << 24;

/// Credentials learned from a 401/438 answer plus the configured user and password.
#[derive(Clone, Debug)]
pub struct Auth {
    pub realm: String,
    pub nonce: String,
    pub key: Key,
}

/// The static user every tool authenticates as.
#[derive(Clone, Debug)]
pub struct User {
    pub name: String,
    pub password: String,
}

impl User {
    /// `Auth` for the realm and nonce of a challenge; the key is recomputed only when the
    /// realm changes (pass the previous `Auth`).
    pub fn auth_for(&self, realm: &str, nonce: &str, prev: Option<&Auth>) -> Auth {
        let key = match prev {
            Some(p) if p.realm == realm => p.key,
            _ => long_term_key(&self.name, realm, &self.password),
        };
        Auth {
            realm: realm.to_string(),
            nonce: nonce.to_string(),
            key,
        }
    }
}

static TID_COUNTER: AtomicU64 = AtomicU64::new(0);

/// A transaction ID unique within this process (counter) and across runs (start time).
pub fn new_tid() -> TransactionId {
    let n = TID_COUNTER.fetch_add(1, Ordering::Relaxed);
    let t = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    let mut id = [0u8; 12];
    id[..8].copy_from_slice(&n.to_be_bytes());
    id[8..].copy_from_slice(&(t ^ std::process::id()).to_be_bytes());
    TransactionId(id)
}

fn add_auth(w: &mut MessageWriter<'_>, user: &User, auth: Option<&Auth>) {
    if let Some(a) = auth {
        w.attr(attr::USERNAME, user.name.as_bytes());
        w.attr(attr::REALM, a.realm.as_bytes());
        w.attr(attr::NONCE, a.nonce.as_bytes());
        w.message_integrity(&a.key);
    }
}

/// Allocate request (RFC 8656 7.1), UDP relay, default lifetime.
pub fn build_allocate(buf: &mut Vec<u8>, tid: TransactionId, user: &User, auth: Option<&Auth>) {
    let mut w = MessageWriter::new(buf, method::ALLOCATE, Class::Request, tid);
    w.u32_attr(attr::REQUESTED_TRANSPORT, TRANSPORT_UDP);
    add_auth(&mut w, user, auth);
    w.finish();
}

/// Refresh request (RFC 8656 7.2); lifetime 0 deletes the allocation.
pub fn build_refresh(
    buf: &mut Vec<u8>,
    tid: TransactionId,
    user: &User,
    auth: Option<&Auth>,
    lifetime: u32,
) {
    let mut w = MessageWriter::new(buf, method::REFRESH, Class::Request, tid);
    w.u32_attr(attr::LIFETIME, lifetime);
    add_auth(&mut w, user, auth);
    w.finish();
}

/// ChannelBind request (RFC 8656 11.1).
pub fn build_channel_bind(
    buf: &mut Vec<u8>,
    tid: TransactionId,
    user: &User,
    auth: Option<&Auth>,
    channel: u16,
    peer: SocketAddr,
) {
    let mut w = MessageWriter::new(buf, method::CHANNEL_BIND, Class::Request, tid);
    w.u32_attr(attr::CHANNEL_NUMBER, u32::from(channel) << 16);
    w.xor_address(attr::XOR_PEER_ADDRESS, peer);
    add_auth(&mut w, user, auth);
    w.finish();
}

/// CreatePermission request (RFC 8656 9.1).
pub fn build_create_permission(
    buf: &mut Vec<u8>,
    tid: TransactionId,
    user: &User,
    auth: Option<&Auth>,
    peer: SocketAddr,
) {
    let mut w = MessageWriter::new(buf, method::CREATE_PERMISSION, Class::Request, tid);
    w.xor_address(attr::XOR_PEER_ADDRESS, peer);
    add_auth(&mut w, user, auth);
    w.finish();
}

/// Send indication (RFC 8656 10.1) carrying `data` to `peer`.
pub fn build_send_indication(buf: &mut Vec<u8>, peer: SocketAddr, data: &[u8]) {
    let mut w = MessageWriter::new(buf, method::SEND, Class::Indication, new_tid());
    w.xor_address(attr::XOR_PEER_ADDRESS, peer);
    w.attr(attr::DATA, data);
    w.finish();
}

/// Binding request (RFC 8489), used to wait until a server answers.
pub fn build_binding(buf: &mut Vec<u8>, tid: TransactionId) {
    let w = MessageWriter::new(buf, method::BINDING, Class::Request, tid);
    w.finish();
}

/// What a response to one of our requests says.
#[derive(Debug, Clone)]
pub enum Reply {
    /// Success; XOR-RELAYED-ADDRESS when present (Allocate).
    Success { relayed: Option<SocketAddr> },
    /// 401 or 438 carrying REALM and NONCE: retry with these.
    Challenge {
        code: u16,
        realm: String,
        nonce: String,
    },
    /// Any other error code.
    Error(u16),
}

/// Parses `buf` as the response to transaction `tid`; `None` if it is something else
/// (another transaction, ChannelData, an indication, garbage).
pub fn parse_reply(buf: &[u8], tid: TransactionId) -> Option<Reply> {
    let m = Message::parse(buf).ok()?;
    if m.transaction_id() != tid {
        return None;
    }
    match m.class() {
        Class::Success => Some(Reply::Success {
            relayed: m.xor_address(attr::XOR_RELAYED_ADDRESS).ok().flatten(),
        }),
        Class::Error => {
            let code = m.error_code().ok().flatten().map(|(c, _)| c).unwrap_or(0);
            if code == 401 || code == 438 {
                if let (Ok(Some(realm)), Ok(Some(nonce))) = (m.realm(), m.nonce()) {
                    return Some(Reply::Challenge {
                        code,
                        realm: realm.to_string(),
                        nonce: nonce.to_string(),
                    });
                }
            }
            Some(Reply::Error(code))
        }
        _ => None,
    }
}

/// A blocking TURN client: one UDP socket, one allocation.
pub struct Client {
    pub sock: UdpSocket,
    pub user: User,
    pub auth: Option<Auth>,
    buf: Vec<u8>,
    rbuf: Vec<u8>,
}

#[derive(Clone, Copy)]
enum Req {
    Allocate,
    Refresh(u32),
    ChannelBind(u16, SocketAddr),
    CreatePermission(SocketAddr),
}

impl Client {
    /// Binds 127.0.0.1:0 (or `local`) and connects it to `server`.
    pub fn new(server: SocketAddr, user: User, local: Option<SocketAddr>) -> io::Result<Client> {
        let bind: SocketAddr = local.unwrap_or_else(|| SocketAddr::from(([127, 0, 0, 1], 0)));
        let sock = crate::util::udp_socket(bind, crate::util::BIG_BUFFER)?;
        sock.connect(server)?;
        Ok(Client {
            sock,
            user,
            auth: None,
            buf: Vec::with_capacity(512),
            rbuf: vec![0u8; 2048],
        })
    }

    fn build(&mut self, req: Req, tid: TransactionId) {
        let auth = self.auth.as_ref();
        match req {
            Req::Allocate => build_allocate(&mut self.buf, tid, &self.user, auth),
            Req::Refresh(l) => build_refresh(&mut self.buf, tid, &self.user, auth, l),
            Req::ChannelBind(ch, peer) => {
                build_channel_bind(&mut self.buf, tid, &self.user, auth, ch, peer)
            }
            Req::CreatePermission(peer) => {
                build_create_permission(&mut self.buf, tid, &self.user, auth, peer)
            }
        }
    }

    /// Sends `req` until it succeeds: answers challenges (up to 3), retransmits after
    /// 500 ms (up to 4 times).
    fn transact(&mut self, req: Req) -> io::Result<Option<SocketAddr>> {
        let mut challenges = 0;
        let mut sends = 0;
        let tid_err = |what: String| io::Error::other(what);
        'outer: loop {
            let tid = new_tid();
            self.build(req, tid);
            loop {
                if sends >= 5 {
                    return Err(tid_err("no answer from the server".into()));
                }
                self.sock.send(&self.buf)?;
                sends += 1;
                let deadline = Instant::now() + Duration::from_millis(500);
                loop {
                    let now = Instant::now();
                    if now >= deadline {
                        break;
                    }
                    self.sock.set_read_timeout(Some(deadline - now))?;
                    let n = match self.sock.recv(&mut self.rbuf) {
                        Ok(n) => n,
                        Err(e)
                            if e.kind() == io::ErrorKind::WouldBlock
                                || e.kind() == io::ErrorKind::TimedOut =>
                        {
                            break
                        }
                        Err(e) => return Err(e),
                    };
                    let Some(reply) = self.rbuf.get(..n).and_then(|b| parse_reply(b, tid)) else {
                        continue;
                    };
                    match reply {
                        Reply::Success { relayed } => return Ok(relayed),
                        Reply::Challenge { code, realm, nonce } => {
                            challenges += 1;
                            if challenges > 3 {
                                return Err(tid_err(format!("repeated {code}")));
                            }
                            self.auth =
                                Some(self.user.auth_for(&realm, &nonce, self.auth.as_ref()));
                            continue 'outer;
                        }
                        Reply::Error(code) => return Err(tid_err(format!("error {code}"))),
                    }
                }
            }
        }
    }

    /// Allocate (with the 401 round trip): returns the relayed address.
    pub fn allocate(&mut self) -> io::Result<SocketAddr> {
        self.transact(Req::Allocate)?
            .ok_or_else(|| io::Error::other("Allocate success without XOR-RELAYED-ADDRESS"))
    }

    pub fn channel_bind(&mut self, channel: u16, peer: SocketAddr) -> io::Result<()> {
        self.transact(Req::ChannelBind(channel, peer)).map(|_| ())
    }

    pub fn create_permission(&mut self, peer: SocketAddr) -> io::Result<()> {
        self.transact(Req::CreatePermission(peer)).map(|_| ())
    }

    /// Refresh; lifetime 0 deletes the allocation.
    pub fn refresh(&mut self, lifetime: u32) -> io::Result<()> {
        self.transact(Req::Refresh(lifetime)).map(|_| ())
    }
}

/// Sends Binding requests to `server` until one is answered or `timeout` passes.
pub fn wait_for_server(server: SocketAddr, timeout: Duration) -> io::Result<()> {
    let deadline = Instant::now() + timeout;
    let mut buf = Vec::new();
    let mut rbuf = [0u8; 1500];
    while Instant::now() < deadline {
        // A new source port each time: a server with several SO_REUSEPORT sockets hashes
        // a 5-tuple to one of them, which may not be serving yet.
        let sock = UdpSocket::bind("127.0.0.1:0")?;
        sock.connect(server)?;
        sock.set_read_timeout(Some(Duration::from_millis(200)))?;
        let tid = new_tid();
        build_binding(&mut buf, tid);
        // ECONNREFUSED from an earlier send surfaces here or on recv: just retry.
        let _ = sock.send(&buf);
        if let Ok(n) = sock.recv(&mut rbuf) {
            if let Some(b) = rbuf.get(..n) {
                if Message::parse(b)
                    .map(|m| m.transaction_id() == tid)
                    .unwrap_or(false)
                {
                    return Ok(());
                }
            }
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Err(io::Error::other(format!(
        "{server} did not answer a Binding request"
    )))
}
