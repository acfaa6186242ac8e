//! A fake old process for the upgrade hand-over (`turnstone::net::handover`): the test
//! holds one end of the channel, starts the built binary with the other inherited (as a
//! running server does on `turnstone upgrade`), and writes whatever it likes on it,
//! well-formed or not.

use std::io::IoSlice;
use std::net::{SocketAddr, UdpSocket};
use std::os::fd::{AsRawFd, BorrowedFd, RawFd};
use std::process::Command;
use std::time::Duration;

use nix::sys::socket::{sendmsg, ControlMessage, MsgFlags};
use turnstone::net::handover::{Channel, Hello, Message, FD_ENV};

use super::process::ChildGuard;
use super::server::{free_udp_port, relay_port_range, ServerOptions};

/// Bytes of state per `S` message (as the server writes them).
pub const CHUNK: usize = 48 * 1024;

/// `CLOCK_MONOTONIC` now, in nanoseconds (the hand-over's clock).
pub fn mono_now_ns() -> u64 {
    let t = nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC).expect("clock");
    t.tv_sec() as u64 * 1_000_000_000 + t.tv_nsec() as u64
}

/// SHA-256 of `bytes`.
pub fn sha256(bytes: &[u8]) -> [u8; 32] {
    ring::digest::digest(&ring::digest::SHA256, bytes)
        .as_ref()
        .try_into()
        .expect("32 bytes")
}

/// One message as the channel frames it: a kind byte, the payload, and `fds` attached
/// (`SCM_RIGHTS`), with nothing checked: for malformed messages the public API will not
/// write.
pub fn send_raw(ch: &Channel, kind: u8, payload: &[u8], fds: &[RawFd]) {
    let head = [kind];
    let iov = [IoSlice::new(&head), IoSlice::new(payload)];
    let cmsg = [ControlMessage::ScmRights(fds)];
    let cmsgs: &[ControlMessage] = if fds.is_empty() { &[] } else { &cmsg };
    sendmsg::<()>(
        ch.as_fd().as_raw_fd(),
        &iov,
        cmsgs,
        MsgFlags::MSG_NOSIGNAL,
        None,
    )
    .unwrap_or_else(|e| panic!("send message {:?}: {e}", kind as char));
}

/// An `F` message announcing `announced` descriptors and carrying `fds`.
pub fn send_fds(ch: &Channel, announced: u32, fds: &[RawFd]) {
    send_raw(ch, b'F', &announced.to_be_bytes(), fds);
}

/// `bytes` in `S` chunks.
pub fn send_chunks(ch: &Channel, bytes: &[u8]) {
    for c in bytes.chunks(CHUNK) {
        send_raw(ch, b'S', c, &[]);
    }
}

/// The `E` message: `len` and `sha256`, whatever was sent.
pub fn send_end(ch: &Channel, len: u64, sha256: &[u8; 32]) {
    let mut end = len.to_be_bytes().to_vec();
    end.extend_from_slice(sha256);
    send_raw(ch, b'E', &end, &[]);
}

/// The state `bytes` in chunks, then its true length and SHA-256.
pub fn send_state_bytes(ch: &Channel, bytes: &[u8]) {
    send_chunks(ch, bytes);
    send_end(ch, bytes.len() as u64, &sha256(bytes));
}

/// A new turnstone process started by a fake old one (the test).
pub struct FakeOld {
    pub ch: Channel,
    pub child: ChildGuard,
    /// Its UDP listen address (one listener).
    pub listen: SocketAddr,
    pub relay_ports: (u16, u16),
    pub workers: usize,
    _dir: tempfile::TempDir,
}

impl FakeOld {
    /// Starts the built binary with `options` (one UDP listener on a free port, one
    /// worker unless `options.workers` says otherwise) and the child's end of a new
    /// channel named by `TURNSTONE_UPGRADE_FD`, and waits for its `Hello`.
    pub fn start(mut options: ServerOptions) -> (FakeOld, Hello) {
        let workers = *options.workers.get_or_insert(1);
        let dir = tempfile::Builder::new()
            .prefix("turnstone-handover-")
            .tempdir()
            .expect("temp dir");
        let listen = SocketAddr::from(([127, 0, 0, 1], free_udp_port()));
        let relay_ports = relay_port_range();
        let config = dir.path().join("turnstone.toml");
        std::fs::write(&config, options.to_toml(listen, relay_ports)).expect("write config");
        let (ch, theirs) = Channel::pair().expect("socketpair");
        // `Channel::pair` leaves the child's end inheritable; other tests of this binary
        // start processes meanwhile, and they must not inherit it (a process holding it
        // would hide the child's exit from our end). Close-on-exec here, cleared in the
        // one child between fork and exec.
        nix::fcntl::fcntl(
            &theirs,
            nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::FD_CLOEXEC),
        )
        .expect("fcntl");
        let raw = theirs.as_raw_fd();
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_turnstone"));
        cmd.arg("--config")
            .arg(&config)
            .env(FD_ENV, raw.to_string())
            .env_remove("RUST_LOG")
            .env_remove("NOTIFY_SOCKET");
        {
            use std::os::unix::process::CommandExt;
            // SAFETY: between fork and exec only fcntl(2), which is async-signal-safe,
            // on a descriptor this process keeps open until the spawn returns.
            unsafe {
                cmd.pre_exec(move || {
                    let fd = BorrowedFd::borrow_raw(raw);
                    nix::fcntl::fcntl(
                        fd,
                        nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::empty()),
                    )
                    .map(|_| ())
                    .map_err(std::io::Error::from)
                });
            }
        }
        let child = ChildGuard::spawn("turnstone (new process)", &mut cmd);
        drop(theirs);
        ch.set_timeout(Duration::from_secs(20)).expect("timeout");
        let hello = match ch.recv() {
            Ok(Message::Hello(h)) => h,
            Ok(_) => panic!(
                "the new process said something else than hello\n{}",
                child.output()
            ),
            Err(e) => panic!("no hello from the new process: {e}\n{}", child.output()),
        };
        (
            FakeOld {
                ch,
                child,
                listen,
                relay_ports,
                workers,
                _dir: dir,
            },
            hello,
        )
    }

    /// The child's pid.
    pub fn pid(&self) -> u32 {
        self.child.id().expect("child running")
    }

    /// One UDP socket per worker bound to the listen address (`SO_REUSEPORT`, as the
    /// server's own), for the state's `listeners`.
    pub fn listener_sockets(&self) -> Vec<UdpSocket> {
        (0..self.workers)
            .map(|_| {
                let s = socket2::Socket::new(
                    socket2::Domain::IPV4,
                    socket2::Type::DGRAM,
                    Some(socket2::Protocol::UDP),
                )
                .expect("socket");
                s.set_reuse_port(true).expect("SO_REUSEPORT");
                s.bind(&self.listen.into())
                    .unwrap_or_else(|e| panic!("bind {}: {e}", self.listen));
                s.into()
            })
            .collect()
    }

    /// The next message from the child (within `within`), or what went wrong.
    pub fn recv(&self, within: Duration) -> Result<Message, String> {
        self.ch.set_timeout(within)?;
        self.ch.recv()
    }

    /// The child refuses: it exits non-zero, and then its `Refuse` is what this end
    /// reads (read after the exit, so the reason must be waiting here whatever the
    /// timing) and its stderr says why. Returns the reason and the stderr.
    pub fn expect_refusal(&mut self) -> (String, String) {
        let status = self
            .child
            .wait_exit(Duration::from_secs(20))
            .unwrap_or_else(|| panic!("the new process did not exit\n{}", self.child.output()));
        assert!(
            !status.success(),
            "the new process exited with {status} after refusing\n{}",
            self.child.output()
        );
        let why = match self.recv(Duration::from_secs(1)) {
            Ok(Message::Refuse(why)) => why,
            Ok(_) => panic!(
                "expected Refuse, got another message\n{}",
                self.child.output()
            ),
            Err(e) => panic!(
                "the old process's end holds no Refuse after the new process exited \
                 ({status}): {e}\n{}",
                self.child.output()
            ),
        };
        (why, self.child.stderr())
    }
}
