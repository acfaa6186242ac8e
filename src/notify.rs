//! The systemd notify protocol (`sd_notify(3)`), without a crate: state changes written as
//! `KEY=VALUE` lines in one datagram to the `AF_UNIX` socket named by `$NOTIFY_SOCKET`
//! (a path, or `@name` for an abstract socket).
//!
//! The unit (`systemd/turnstone.service`) is `Type=notify`: systemd waits for `READY=1`
//! before it calls the service started, expects `RELOADING=1` then `READY=1` around a
//! SIGHUP reload, `STOPPING=1` when shutdown begins, and, with `WatchdogSec=`, a
//! `WATCHDOG=1` at least every `$WATCHDOG_USEC` microseconds (send at half of it).
//!
//! Every function is a no-op returning `Ok(false)` when `$NOTIFY_SOCKET` is unset (not
//! started by systemd), so callers can call them unconditionally and ignore or log
//! the error.

use std::ffi::{OsStr, OsString};
use std::io;
use std::io::IoSlice;
use std::os::fd::{AsRawFd, BorrowedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::net::UnixDatagram;

use nix::sys::socket::{sendmsg, ControlMessage, MsgFlags, UnixAddr};
use std::time::Duration;

/// Where notifications go: the socket named by `$NOTIFY_SOCKET`, or nowhere.
#[derive(Debug, Clone)]
pub struct Notifier {
    target: Option<OsString>,
}

impl Notifier {
    /// The notifier for `$NOTIFY_SOCKET`; inactive when the variable is unset or empty.
    pub fn from_env() -> Notifier {
        Notifier {
            target: std::env::var_os("NOTIFY_SOCKET").filter(|s| !s.is_empty()),
        }
    }

    /// A notifier for an explicit socket name (an absolute path, or `@name` for an
    /// abstract socket), as `$NOTIFY_SOCKET` would give it.
    pub fn new(socket: impl AsRef<OsStr>) -> Notifier {
        let s = socket.as_ref();
        Notifier {
            target: (!s.is_empty()).then(|| s.to_owned()),
        }
    }

    /// A notifier that sends nothing.
    pub fn disabled() -> Notifier {
        Notifier { target: None }
    }

    /// Is there a socket to notify?
    pub fn is_active(&self) -> bool {
        self.target.is_some()
    }

    /// Sends `state` (newline-separated `KEY=VALUE` assignments) in one datagram.
    /// `Ok(false)` when inactive, `Ok(true)` when sent.
    pub fn send(&self, state: &str) -> io::Result<bool> {
        self.send_with_fds(state, &[])
    }

    /// [`Notifier::send`] with descriptors attached (`SCM_RIGHTS`), as `FDSTORE=1` wants.
    pub fn send_with_fds(&self, state: &str, fds: &[BorrowedFd<'_>]) -> io::Result<bool> {
        let Some(target) = &self.target else {
            return Ok(false);
        };
        let addr = socket_addr(target)?;
        let sock = UnixDatagram::unbound()?;
        let raw: Vec<RawFd> = fds.iter().map(AsRawFd::as_raw_fd).collect();
        let cmsg = [ControlMessage::ScmRights(&raw)];
        let cmsgs: &[ControlMessage] = if raw.is_empty() { &[] } else { &cmsg };
        sendmsg(
            sock.as_raw_fd(),
            &[IoSlice::new(state.as_bytes())],
            cmsgs,
            MsgFlags::MSG_NOSIGNAL,
            Some(&addr),
        )?;
        Ok(true)
    }

    /// `READY=1`: start-up (or a reload) is complete; every listener is bound.
    pub fn ready(&self) -> io::Result<bool> {
        self.send("READY=1")
    }

    /// `RELOADING=1` with `MONOTONIC_USEC` (required by systemd >= 253 to match the reload
    /// to the request). Send [`Notifier::ready`] once the reload is done (or refused).
    pub fn reloading(&self) -> io::Result<bool> {
        if !self.is_active() {
            return Ok(false);
        }
        let usec = monotonic_usec()?;
        self.send(&format!("RELOADING=1\nMONOTONIC_USEC={usec}"))
    }

    /// `STOPPING=1`: shutdown (draining) has begun.
    pub fn stopping(&self) -> io::Result<bool> {
        self.send("STOPPING=1")
    }

    /// `STATUS=...`: a one-line status shown by `systemctl status`. Newlines in `text`
    /// are replaced by spaces (they would start a new assignment).
    pub fn status(&self, text: &str) -> io::Result<bool> {
        if !self.is_active() {
            return Ok(false);
        }
        let one_line: String = text
            .chars()
            .map(|c| if c == '\n' || c == '\r' { ' ' } else { c })
            .collect();
        self.send(&format!("STATUS={one_line}"))
    }

    /// `WATCHDOG=1`: the keep-alive ping for `WatchdogSec=`.
    pub fn watchdog(&self) -> io::Result<bool> {
        self.send("WATCHDOG=1")
    }
}

/// The socket address for a `$NOTIFY_SOCKET` value: `@name` is abstract (Linux), anything
/// else must be an absolute path.
fn socket_addr(target: &OsStr) -> io::Result<UnixAddr> {
    let bytes = target.as_bytes();
    match bytes.first() {
        Some(b'@') => Ok(UnixAddr::new_abstract(bytes.get(1..).unwrap_or_default())?),
        Some(b'/') => Ok(UnixAddr::new(target)?),
        _ => Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!(
                "NOTIFY_SOCKET={:?} is neither an absolute path nor an @abstract name",
                target
            ),
        )),
    }
}

/// CLOCK_MONOTONIC in microseconds (what systemd's `MONOTONIC_USEC` means).
pub fn monotonic_usec() -> io::Result<u64> {
    let ts = nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC)?;
    let secs = u64::try_from(ts.tv_sec()).unwrap_or(0);
    let nanos = u64::try_from(ts.tv_nsec()).unwrap_or(0);
    Ok(secs.saturating_mul(1_000_000).saturating_add(nanos / 1000))
}

/// `READY=1` to `$NOTIFY_SOCKET` (no-op when unset).
pub fn ready() -> io::Result<bool> {
    Notifier::from_env().ready()
}

/// `RELOADING=1` + `MONOTONIC_USEC` to `$NOTIFY_SOCKET` (no-op when unset).
pub fn reloading() -> io::Result<bool> {
    Notifier::from_env().reloading()
}

/// `STOPPING=1` to `$NOTIFY_SOCKET` (no-op when unset).
pub fn stopping() -> io::Result<bool> {
    Notifier::from_env().stopping()
}

/// `STATUS=text` to `$NOTIFY_SOCKET` (no-op when unset).
pub fn status(text: &str) -> io::Result<bool> {
    Notifier::from_env().status(text)
}

/// `WATCHDOG=1` to `$NOTIFY_SOCKET` (no-op when unset).
pub fn watchdog() -> io::Result<bool> {
    Notifier::from_env().watchdog()
}

/// The watchdog timeout systemd enforces (`$WATCHDOG_USEC`), if it is meant for this
/// process (`$WATCHDOG_PID` unset or equal to our pid). Ping [`watchdog`] at half of it.
pub fn watchdog_interval() -> Option<Duration> {
    let usec = std::env::var("WATCHDOG_USEC").ok();
    let pid = std::env::var("WATCHDOG_PID").ok();
    parse_watchdog(usec.as_deref(), pid.as_deref(), std::process::id())
}

/// [`watchdog_interval`] on given values: `usec` must be a positive integer; `pid`, when
/// present, must be `my_pid`.
pub fn parse_watchdog(usec: Option<&str>, pid: Option<&str>, my_pid: u32) -> Option<Duration> {
    let usec: u64 = usec?.trim().parse().ok()?;
    if usec == 0 {
        return None;
    }
    if let Some(pid) = pid {
        if pid.trim().parse::<u32>().ok()? != my_pid {
            return None;
        }
    }
    Some(Duration::from_micros(usec))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn recv(sock: &UnixDatagram) -> String {
        let mut buf = [0u8; 512];
        let n = sock.recv(&mut buf).unwrap();
        String::from_utf8(buf[..n].to_vec()).unwrap()
    }

    fn listener() -> (tempfile::TempDir, std::path::PathBuf, UnixDatagram) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notify.sock");
        let sock = UnixDatagram::bind(&path).unwrap();
        sock.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        (dir, path, sock)
    }

    #[test]
    fn path_socket_gets_every_state() {
        let (_dir, path, sock) = listener();
        let n = Notifier::new(&path);
        assert!(n.is_active());
        assert!(n.ready().unwrap());
        assert_eq!(recv(&sock), "READY=1");
        assert!(n.stopping().unwrap());
        assert_eq!(recv(&sock), "STOPPING=1");
        assert!(n.watchdog().unwrap());
        assert_eq!(recv(&sock), "WATCHDOG=1");
        assert!(n.status("relaying\n3 allocations").unwrap());
        assert_eq!(recv(&sock), "STATUS=relaying 3 allocations");
    }

    #[test]
    fn reloading_carries_monotonic_usec() {
        let (_dir, path, sock) = listener();
        let before = monotonic_usec().unwrap();
        assert!(Notifier::new(&path).reloading().unwrap());
        let after = monotonic_usec().unwrap();
        let msg = recv(&sock);
        let mut lines = msg.lines();
        assert_eq!(lines.next(), Some("RELOADING=1"));
        let usec: u64 = lines
            .next()
            .and_then(|l| l.strip_prefix("MONOTONIC_USEC="))
            .expect(&msg)
            .parse()
            .unwrap();
        assert!(before <= usec && usec <= after, "{before} {usec} {after}");
        assert_eq!(lines.next(), None);
    }

    #[test]
    fn abstract_socket() {
        let name = format!("turnstone-notify-test-{}", std::process::id());
        use std::os::linux::net::SocketAddrExt;
        let addr = std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes()).unwrap();
        let sock = UnixDatagram::bind_addr(&addr).unwrap();
        sock.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        assert!(Notifier::new(format!("@{name}")).ready().unwrap());
        assert_eq!(recv(&sock), "READY=1");
    }

    #[test]
    fn inactive_is_a_no_op() {
        let n = Notifier::disabled();
        assert!(!n.is_active());
        assert!(!n.ready().unwrap());
        assert!(!n.reloading().unwrap());
        assert!(!n.stopping().unwrap());
        assert!(!n.status("x").unwrap());
        assert!(!n.watchdog().unwrap());
        assert!(!Notifier::new("").is_active());
    }

    #[test]
    fn bad_targets_are_errors() {
        assert_eq!(
            Notifier::new("relative.sock").ready().unwrap_err().kind(),
            io::ErrorKind::InvalidInput
        );
        // Nobody listens there.
        let dir = tempfile::tempdir().unwrap();
        assert!(Notifier::new(dir.path().join("none.sock")).ready().is_err());
    }

    #[test]
    fn watchdog_interval_parsing() {
        let d = Some(Duration::from_secs(30));
        assert_eq!(parse_watchdog(Some("30000000"), None, 7), d);
        assert_eq!(parse_watchdog(Some("30000000"), Some("7"), 7), d);
        assert_eq!(parse_watchdog(Some("30000000"), Some("8"), 7), None);
        assert_eq!(parse_watchdog(Some("30000000"), Some("x"), 7), None);
        assert_eq!(parse_watchdog(Some("0"), None, 7), None);
        assert_eq!(parse_watchdog(Some("-5"), None, 7), None);
        assert_eq!(parse_watchdog(Some("soon"), None, 7), None);
        assert_eq!(parse_watchdog(None, Some("7"), 7), None);
    }
}
