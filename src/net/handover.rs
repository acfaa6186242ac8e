//! The upgrade hand-over channel and its format: one `SOCK_SEQPACKET` socket pair
//! between the running process and the new binary it starts (the child inherits its end
//! and nothing else can connect to it), carrying framed messages, file descriptors in
//! batches (`SCM_RIGHTS`), and the versioned state as checksummed JSON chunks.
//!
//! The conversation: the child says `Hello` (the format versions it reads); the parent
//! freezes its UDP traffic and sends the sockets (`Fds` batches), the state (`Chunk`s)
//! and `End` (length and SHA-256); the child builds everything without serving and says
//! `Ready`, or `Refuse` with the reason; the parent says `Commit` (or `Refuse`); the
//! child starts its workers and says `Serving`. Until `Serving`, the parent can take
//! everything back as it was.

use std::io::{IoSlice, IoSliceMut};
use std::net::SocketAddr;
use std::os::fd::{AsFd, AsRawFd, OwnedFd, RawFd};
use std::time::Duration;

use nix::sys::socket::{
    recvmsg, sendmsg, setsockopt, socketpair, sockopt, AddressFamily, ControlMessage,
    ControlMessageOwned, MsgFlags, SockFlag, SockType,
};
use serde::{Deserialize, Serialize};

use crate::server::ShardState;

/// The state format this build writes. Version 1 is the first.
pub const FORMAT_VERSION: u32 = 1;
/// The state formats this build reads.
pub const READS: &[u32] = &[1];
/// The environment variable naming the child's end of the channel.
pub const FD_ENV: &str = "TURNSTONE_UPGRADE_FD";
/// File descriptors per message (the kernel's limit, `SCM_MAX_FD`, is 253).
pub const FDS_PER_MESSAGE: usize = 200;
/// Bytes of state per message (well under the socket's send buffer).
const CHUNK: usize = 48 * 1024;
/// The largest message either side accepts.
const MAX_MESSAGE: usize = CHUNK + 1024;
/// The largest state accepted (about 20 times what 100,000 allocations take).
const MAX_STATE: u64 = 1 << 30;

/// What the child says first.
#[derive(Debug, Serialize, Deserialize)]
pub struct Hello {
    pub pid: u32,
    /// The state format versions it reads.
    pub reads: Vec<u32>,
    pub version: String,
}

/// What the child says once it has built everything.
#[derive(Debug, Serialize, Deserialize)]
pub struct Ready {
    pub allocations: usize,
}

/// One configured listener and its socket on each worker.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct ListenerState {
    pub transport: String,
    pub address: SocketAddr,
    /// One descriptor index per worker.
    pub sockets: Vec<u32>,
}

/// The state, version [`FORMAT_VERSION`].
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Handover {
    pub version: u32,
    pub from_pid: u32,
    /// Nonces the old process handed out stay valid.
    pub nonce_secret: [u8; 32],
    pub workers: usize,
    pub listeners: Vec<ListenerState>,
    pub metrics: Option<u32>,
    pub control: Option<u32>,
    /// By worker.
    pub shards: Vec<ShardState>,
    /// How many descriptors were sent (indexes run from 0).
    pub fds: u32,
    /// The name each descriptor is kept under in systemd's fd store (the journal's
    /// copy of the state names its sockets this way; empty in a hand-over).
    #[serde(default)]
    pub fd_names: Vec<String>,
}

/// A message on the channel.
pub enum Message {
    Hello(Hello),
    Fds(Vec<OwnedFd>),
    Chunk(Vec<u8>),
    End { len: u64, sha256: [u8; 32] },
    Ready(Ready),
    Refuse(String),
    Commit,
    Serving,
}

/// One end of the channel.
pub struct Channel {
    fd: OwnedFd,
}

fn err(e: impl std::fmt::Display) -> String {
    e.to_string()
}

impl Channel {
    /// A connected pair: (this process's end, close-on-exec; the child's end, inherited
    /// across `exec`).
    pub fn pair() -> Result<(Channel, OwnedFd), String> {
        let (ours, theirs) = socketpair(
            AddressFamily::Unix,
            SockType::SeqPacket,
            None,
            SockFlag::SOCK_CLOEXEC,
        )
        .map_err(|e| format!("socketpair: {e}"))?;
        // The child's end must survive exec.
        nix::fcntl::fcntl(
            &theirs,
            nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::empty()),
        )
        .map_err(|e| format!("fcntl: {e}"))?;
        Ok((Channel { fd: ours }, theirs))
    }

    /// The child's end, named by [`FD_ENV`]; `None` when not started by an upgrade.
    /// The variable is removed so that nothing started later inherits the claim. Call
    /// it first thing in `main`, before the process opens any descriptor: then a number
    /// above 2 that is open was inherited, and nothing else owns it.
    pub fn inherited() -> Option<Result<Channel, String>> {
        let v = std::env::var(FD_ENV).ok()?;
        std::env::remove_var(FD_ENV);
        let fd = match v
            .parse::<RawFd>()
            .ok()
            .filter(|&n| n > 2)
            .and_then(crate::sys::adopt_fd)
        {
            Some(fd) => fd,
            None => return Some(Err(format!("{FD_ENV}={v:?} is not an open descriptor"))),
        };
        // It must be a SOCK_SEQPACKET socket (not, say, a file someone named).
        match nix::sys::socket::getsockopt(&fd, sockopt::SockType) {
            Ok(SockType::SeqPacket) => {}
            _ => return Some(Err(format!("{FD_ENV}={v} is not the hand-over socket"))),
        }
        // Made by the process that started this one (the socket pair's creator).
        let parent = nix::unistd::getppid().as_raw();
        match nix::sys::socket::getsockopt(&fd, sockopt::PeerCredentials) {
            Ok(c) if c.pid() == parent => {}
            Ok(c) => {
                return Some(Err(format!(
                    "{FD_ENV}={v}: the socket's other end is process {}, not the parent {parent}",
                    c.pid()
                )))
            }
            Err(e) => return Some(Err(format!("{FD_ENV}={v}: {e}"))),
        }
        let _ = nix::fcntl::fcntl(
            &fd,
            nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::FD_CLOEXEC),
        );
        Some(Ok(Channel { fd }))
    }

    /// Every receive and send gives up after `t` (a peer that hangs, or stops reading,
    /// is a failed upgrade).
    pub fn set_timeout(&self, t: Duration) -> Result<(), String> {
        let tv = nix::sys::time::TimeVal::new(
            t.as_secs() as nix::sys::time::time_t,
            t.subsec_micros() as nix::sys::time::suseconds_t,
        );
        setsockopt(&self.fd, sockopt::ReceiveTimeout, &tv).map_err(err)?;
        setsockopt(&self.fd, sockopt::SendTimeout, &tv).map_err(err)
    }

    fn send_raw(&self, kind: u8, payload: &[u8], fds: &[RawFd]) -> Result<(), String> {
        self.send_flags(kind, payload, fds, MsgFlags::empty())
    }

    fn send_flags(
        &self,
        kind: u8,
        payload: &[u8],
        fds: &[RawFd],
        flags: MsgFlags,
    ) -> Result<(), String> {
        let head = [kind];
        let iov = [IoSlice::new(&head), IoSlice::new(payload)];
        let cmsg = [ControlMessage::ScmRights(fds)];
        let cmsgs: &[ControlMessage] = if fds.is_empty() { &[] } else { &cmsg };
        loop {
            match sendmsg::<()>(
                self.fd.as_raw_fd(),
                &iov,
                cmsgs,
                MsgFlags::MSG_NOSIGNAL | flags,
                None,
            ) {
                Ok(_) => return Ok(()),
                Err(nix::errno::Errno::EINTR) => continue,
                Err(e) => return Err(format!("hand-over channel: send: {e}")),
            }
        }
    }

    pub fn send_json<T: Serialize>(&self, kind: u8, v: &T) -> Result<(), String> {
        let bytes = serde_json::to_vec(v).map_err(err)?;
        self.send_raw(kind, &bytes, &[])
    }

    pub fn hello(&self, h: &Hello) -> Result<(), String> {
        self.send_json(b'H', h)
    }
    pub fn ready(&self, r: &Ready) -> Result<(), String> {
        self.send_json(b'R', r)
    }
    /// Says why, without waiting: a peer that stopped reading must not hold this up.
    pub fn refuse(&self, why: &str) -> Result<(), String> {
        let why = why.get(..why.len().min(4096)).unwrap_or("(too long)");
        self.send_flags(b'X', why.as_bytes(), &[], MsgFlags::MSG_DONTWAIT)
    }
    pub fn commit(&self) -> Result<(), String> {
        self.send_raw(b'C', &[], &[])
    }
    pub fn serving(&self) -> Result<(), String> {
        self.send_raw(b'V', &[], &[])
    }

    /// Sends `fds` in batches of [`FDS_PER_MESSAGE`].
    pub fn send_fds(&self, fds: &[std::os::fd::BorrowedFd<'_>]) -> Result<(), String> {
        for batch in fds.chunks(FDS_PER_MESSAGE) {
            let raw: Vec<RawFd> = batch.iter().map(|f| f.as_raw_fd()).collect();
            self.send_raw(b'F', &(raw.len() as u32).to_be_bytes(), &raw)?;
        }
        Ok(())
    }

    /// Sends the state: chunks, then its length and SHA-256.
    pub fn send_state(&self, h: &Handover) -> Result<(), String> {
        let bytes = encode(h)?;
        for c in bytes.chunks(CHUNK) {
            self.send_raw(b'S', c, &[])?;
        }
        let mut end = (bytes.len() as u64).to_be_bytes().to_vec();
        end.extend_from_slice(&sha256(&bytes));
        self.send_raw(b'E', &end, &[])
    }

    /// The next message; an error on end of file, a timeout or a malformed message.
    pub fn recv(&self) -> Result<Message, String> {
        let mut buf = vec![0u8; MAX_MESSAGE];
        let mut cmsg = nix::cmsg_space!([RawFd; FDS_PER_MESSAGE]);
        // A peer that exits with messages of ours unread resets the connection: the
        // kernel reports that once, then delivers what the peer sent before (its Refuse).
        let mut reset = false;
        let (n, fds, truncated) = loop {
            let mut iov = [IoSliceMut::new(&mut buf)];
            match recvmsg::<()>(
                self.fd.as_raw_fd(),
                &mut iov,
                Some(&mut cmsg),
                MsgFlags::MSG_CMSG_CLOEXEC,
            ) {
                Ok(m) => {
                    let mut fds = Vec::new();
                    for c in m.cmsgs().map_err(err)? {
                        if let ControlMessageOwned::ScmRights(raw) = c {
                            for r in raw {
                                if let Some(fd) = crate::sys::adopt_fd(r) {
                                    fds.push(fd);
                                }
                            }
                        }
                    }
                    let truncated = m
                        .flags
                        .intersects(MsgFlags::MSG_TRUNC | MsgFlags::MSG_CTRUNC);
                    break (m.bytes, fds, truncated);
                }
                Err(nix::errno::Errno::EINTR) => continue,
                Err(nix::errno::Errno::ECONNRESET) if !reset => {
                    reset = true;
                    continue;
                }
                Err(nix::errno::Errno::EAGAIN) => {
                    return Err("hand-over channel: timed out waiting for the other process".into())
                }
                Err(e) => return Err(format!("hand-over channel: receive: {e}")),
            }
        };
        if n == 0 {
            return Err("hand-over channel: the other process closed it (exited?)".into());
        }
        if truncated {
            return Err("hand-over channel: a message was larger than allowed".into());
        }
        let (kind, body) = (buf[0], &buf[1..n]);
        if kind != b'F' && !fds.is_empty() {
            return Err("hand-over channel: descriptors on a message that carries none".into());
        }
        let json = |what: &str| format!("hand-over channel: malformed {what} message");
        Ok(match kind {
            b'H' => Message::Hello(serde_json::from_slice(body).map_err(|_| json("hello"))?),
            b'R' => Message::Ready(serde_json::from_slice(body).map_err(|_| json("ready"))?),
            b'X' => Message::Refuse(String::from_utf8_lossy(body).into_owned()),
            b'C' => Message::Commit,
            b'V' => Message::Serving,
            b'S' => Message::Chunk(body.to_vec()),
            b'E' => {
                let (len, digest) = body.split_first_chunk::<8>().ok_or_else(|| json("end"))?;
                let sha256: [u8; 32] = digest.try_into().map_err(|_| json("end"))?;
                Message::End {
                    len: u64::from_be_bytes(*len),
                    sha256,
                }
            }
            b'F' => {
                let count = body
                    .first_chunk::<4>()
                    .map(|c| u32::from_be_bytes(*c) as usize);
                if count != Some(fds.len()) {
                    return Err(format!(
                        "hand-over channel: a batch announced {count:?} descriptors and carried {}",
                        fds.len()
                    ));
                }
                Message::Fds(fds)
            }
            k => return Err(format!("hand-over channel: unknown message kind {k:#04x}")),
        })
    }

    /// Receives descriptors and state up to `End` and checks them: the length and
    /// SHA-256, the JSON, the version, and that every descriptor index is in range.
    pub fn recv_state(&self) -> Result<(Handover, Vec<OwnedFd>), String> {
        let mut fds = Vec::new();
        let mut bytes = Vec::new();
        loop {
            match self.recv()? {
                Message::Fds(mut f) => fds.append(&mut f),
                Message::Chunk(c) => {
                    if bytes.len() as u64 + c.len() as u64 > MAX_STATE {
                        return Err("hand-over state: larger than 1 GiB".into());
                    }
                    bytes.extend_from_slice(&c);
                }
                Message::End { len, sha256 } => {
                    let h = decode(&bytes, len, &sha256)?;
                    if h.fds as usize != fds.len() {
                        return Err(format!(
                            "hand-over state: {} descriptors announced, {} received",
                            h.fds,
                            fds.len()
                        ));
                    }
                    return Ok((h, fds));
                }
                Message::Refuse(why) => return Err(format!("the old process gave up: {why}")),
                _ => return Err("hand-over channel: unexpected message during the state".into()),
            }
        }
    }

    pub fn as_fd(&self) -> std::os::fd::BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

/// The state as the channel and the fd store's journal carry it (JSON).
pub fn encode(h: &Handover) -> Result<Vec<u8>, String> {
    serde_json::to_vec(h).map_err(err)
}

/// The SHA-256 a state travels with.
pub fn sha256(bytes: &[u8]) -> [u8; 32] {
    let mut out = [0u8; 32];
    out.copy_from_slice(ring::digest::digest(&ring::digest::SHA256, bytes).as_ref());
    out
}

/// Checks and parses a received state: its length and SHA-256, then the JSON (a
/// version this build does not read is refused by number, before the rest is read),
/// then every descriptor index against `fds`.
pub fn decode(bytes: &[u8], len: u64, sha256: &[u8; 32]) -> Result<Handover, String> {
    if bytes.len() as u64 != len {
        return Err(format!(
            "hand-over state: truncated ({} of {len} bytes arrived)",
            bytes.len()
        ));
    }
    if &self::sha256(bytes) != sha256 {
        return Err("hand-over state: corrupted (SHA-256 mismatch)".into());
    }
    // The whole document first (one parse); only when that fails, its version alone,
    // to say which version it is when this build does not read it.
    let h: Handover = match serde_json::from_slice(bytes) {
        Ok(h) => h,
        Err(e) => {
            #[derive(Deserialize)]
            struct Version {
                version: u32,
            }
            return Err(match serde_json::from_slice::<Version>(bytes) {
                Ok(v) if !READS.contains(&v.version) => format!(
                    "hand-over state: format version {} is not one this build reads ({READS:?})",
                    v.version
                ),
                Ok(v) => format!("hand-over state: version {}: {e}", v.version),
                Err(e) => format!("hand-over state: not a state document: {e}"),
            });
        }
    };
    if !READS.contains(&h.version) {
        return Err(format!(
            "hand-over state: format version {} is not one this build reads ({READS:?})",
            h.version
        ));
    }
    check_indexes(&h)?;
    Ok(h)
}

/// Every descriptor index is below `fds`, and each is used once.
fn check_indexes(h: &Handover) -> Result<(), String> {
    let mut used = vec![false; h.fds as usize];
    let mut take = |i: u32, what: &str| -> Result<(), String> {
        match used.get_mut(i as usize) {
            Some(u) if !*u => {
                *u = true;
                Ok(())
            }
            Some(_) => Err(format!(
                "hand-over state: descriptor {i} ({what}) used twice"
            )),
            None => Err(format!(
                "hand-over state: descriptor {i} ({what}) out of range ({} sent)",
                h.fds
            )),
        }
    };
    if h.workers == 0 || h.workers > 1024 || h.shards.len() != h.workers {
        return Err(format!(
            "hand-over state: {} workers with {} shards",
            h.workers,
            h.shards.len()
        ));
    }
    for l in &h.listeners {
        if l.sockets.len() != h.workers {
            return Err(format!(
                "hand-over state: listener {} has {} sockets for {} workers",
                l.address,
                l.sockets.len(),
                h.workers
            ));
        }
        for &s in &l.sockets {
            take(s, "listener")?;
        }
    }
    for s in h.metrics.iter().chain(&h.control) {
        take(*s, "metrics or control listener")?;
    }
    for s in h.shards.iter().flat_map(ShardState::sockets) {
        take(s, "relay")?;
    }
    Ok(())
}
