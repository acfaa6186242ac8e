//! systemd's file descriptor store (`FDSTORE=1`, systemd >= 254 sets `$FDSTORE` when
//! the unit has `FileDescriptorStoreMax=`): the listening sockets and every relay socket
//! are kept there as they are made (and removed as they close), with the state of the
//! allocations in two memfd journals rewritten in turn, so that after `systemctl
//! restart` or a crash the next process gets them all back (`$LISTEN_FDS`,
//! `$LISTEN_FDNAMES`) and the calls go on. Datagrams that arrive while no process runs
//! wait in the sockets' buffers.

use std::collections::HashMap;
use std::io::{Read, Seek, SeekFrom, Write};
use std::net::SocketAddr;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};

use super::handover::{self, Handover};

/// The names of the two state journals in the store.
const JOURNALS: [&str; 2] = ["state-a", "state-b"];

/// The service manager's store, when the unit has one. Messages go out from a thread
/// of their own, in order: a worker never waits for the service manager.
pub(crate) struct FdStore {
    ops: std::sync::mpsc::Sender<Op>,
    /// `$FDSTORE`: how many descriptors the unit keeps.
    pub max: u64,
    journals: [std::fs::File; 2],
    /// Writes so far (the next goes to `journals[seq % 2]`).
    seq: std::sync::Mutex<u64>,
}

/// What the store's thread sends.
enum Op {
    Add(String, OwnedFd),
    Remove(String),
    /// Answered once everything queued before it is sent.
    Barrier(std::sync::mpsc::Sender<()>),
}

/// The name a relay socket is stored under: UDP or TCP (RFC 6062), address and port
/// (no `:`, which separates names in `$LISTEN_FDNAMES`).
pub(crate) fn relay_name(addr: SocketAddr, tcp: bool) -> String {
    let kind = if tcp { "rt" } else { "ru" };
    format!(
        "{kind}-{}-{}",
        addr.ip().to_string().replace(':', "."),
        addr.port()
    )
}

/// The name of worker `w`'s listener for `[[listen]]` entry `i`.
pub(crate) fn listener_name(w: usize, i: usize) -> String {
    format!("l-{w}-{i}")
}

impl FdStore {
    /// The store, when `$NOTIFY_SOCKET` names the service manager and `$FDSTORE` says
    /// the unit keeps descriptors; `None` otherwise (and then nothing is stored).
    /// The journals passed back at start are used again (else two new ones).
    pub(crate) fn from_env(restored: Option<&mut Restored>) -> Option<FdStore> {
        let max: u64 = std::env::var("FDSTORE").ok()?.trim().parse().ok()?;
        if max == 0 {
            return None;
        }
        let notifier = crate::notify::Notifier::from_env();
        if !notifier.is_active() {
            return None;
        }
        let (tx, rx) = std::sync::mpsc::channel::<Op>();
        std::thread::Builder::new()
            .name("turnstone-fdstore".into())
            .spawn(move || {
                for op in rx {
                    let sent = match &op {
                        Op::Add(name, fd) => notifier.send_with_fds(
                            &format!("FDSTORE=1\nFDNAME={name}"),
                            &[fd.as_fd()],
                        ),
                        Op::Remove(name) => {
                            notifier.send(&format!("FDSTOREREMOVE=1\nFDNAME={name}"))
                        }
                        Op::Barrier(done) => {
                            let _ = done.send(());
                            Ok(true)
                        }
                    };
                    if let Err(e) = sent {
                        tracing::warn!(error = %e, "fd store: the service manager did not take a message");
                    }
                }
            })
            .ok()?;
        let mut restored = restored;
        let mut journal = |name: &str| -> Option<std::fs::File> {
            if let Some(fd) = restored.as_mut().and_then(|r| r.take(name)) {
                return Some(std::fs::File::from(fd));
            }
            let fd =
                nix::sys::memfd::memfd_create(name, nix::sys::memfd::MFdFlags::MFD_CLOEXEC).ok()?;
            Some(std::fs::File::from(fd))
        };
        Some(FdStore {
            ops: tx,
            max,
            journals: [journal(JOURNALS[0])?, journal(JOURNALS[1])?],
            seq: std::sync::Mutex::new(0),
        })
    }

    fn queue(&self, op: Op) {
        let _ = self.ops.send(op);
    }

    /// Stores (a copy of) `fd` under `name`.
    pub(crate) fn add(&self, name: &str, fd: BorrowedFd<'_>) {
        match fd.try_clone_to_owned() {
            Ok(fd) => self.queue(Op::Add(name.to_owned(), fd)),
            Err(e) => tracing::warn!(error = %e, name, "fd store: cannot copy a descriptor"),
        }
    }

    /// Waits (up to `timeout`) until everything queued so far has gone to the service
    /// manager: before this process exits for a restart, every socket its journal names
    /// must be in the store.
    pub(crate) fn flush(&self, timeout: std::time::Duration) -> bool {
        let (tx, rx) = std::sync::mpsc::channel();
        self.queue(Op::Barrier(tx));
        rx.recv_timeout(timeout).is_ok()
    }

    /// Removes what is stored under `name`.
    pub(crate) fn remove(&self, name: &str) {
        self.queue(Op::Remove(name.to_owned()));
    }

    /// Stores the two journals (once, at start).
    pub(crate) fn add_journals(&self) {
        for (f, name) in self.journals.iter().zip(JOURNALS) {
            self.add(name, std::os::fd::AsFd::as_fd(f));
        }
    }

    /// Where the journals' sequence goes on from (the restored state's).
    pub(crate) fn continue_from(&self, seq: u64) {
        *self.seq.lock().unwrap_or_else(|e| e.into_inner()) = seq;
    }

    /// Writes `state` to the older journal: a crash while writing leaves the other one
    /// whole. Each holds the write's sequence number, the state's length and SHA-256.
    pub(crate) fn write_state(&self, state: &Handover) -> std::io::Result<()> {
        let bytes = handover::encode(state).map_err(std::io::Error::other)?;
        let mut seq = self.seq.lock().unwrap_or_else(|e| e.into_inner());
        *seq += 1;
        let digest = handover::sha256(&bytes);
        let mut f = &self.journals[(*seq % 2) as usize];
        f.set_len(0)?;
        f.seek(SeekFrom::Start(0))?;
        let mut head = seq.to_be_bytes().to_vec();
        head.extend_from_slice(&(bytes.len() as u64).to_be_bytes());
        head.extend_from_slice(digest.as_ref());
        f.write_all(&head)?;
        f.write_all(&bytes)?;
        Ok(())
    }
}

/// The newest state journal passed back (its write number and the state), or why
/// there is none.
pub(crate) type StoredState = Result<(u64, Handover), String>;

/// What the service manager passed at start: descriptors by name.
pub(crate) struct Restored {
    pub fds: HashMap<String, Vec<OwnedFd>>,
}

/// Takes the descriptors passed by `$LISTEN_FDS` / `$LISTEN_FDNAMES` (for this process:
/// `$LISTEN_PID`), and removes the variables. `None` when there are none.
pub(crate) fn listen_fds() -> Option<Restored> {
    let pid: u32 = std::env::var("LISTEN_PID").ok()?.trim().parse().ok()?;
    let n: i32 = std::env::var("LISTEN_FDS").ok()?.trim().parse().ok()?;
    let names = std::env::var("LISTEN_FDNAMES").unwrap_or_default();
    for k in ["LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"] {
        std::env::remove_var(k);
    }
    if pid != std::process::id() || n <= 0 {
        return None;
    }
    let mut names = names.split(':');
    let mut fds: HashMap<String, Vec<OwnedFd>> = HashMap::new();
    for raw in 3..3 + n {
        let name = names.next().unwrap_or("unknown").to_owned();
        if let Some(fd) = crate::sys::adopt_fd(raw) {
            let _ = nix::fcntl::fcntl(
                &fd,
                nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::FD_CLOEXEC),
            );
            fds.entry(name).or_default().push(fd);
        }
    }
    Some(Restored { fds })
}

impl Restored {
    /// The newest whole state of the two journals, checked as a hand-over's is.
    pub(crate) fn state(&mut self) -> StoredState {
        let mut best: Option<(u64, Handover)> = None;
        let mut errors = Vec::new();
        for name in JOURNALS {
            let Some(fd) = self
                .fds
                .get(name)
                .and_then(|v| v.last())
                .and_then(|fd| fd.try_clone().ok())
            else {
                continue;
            };
            match read_journal(std::fs::File::from(fd)) {
                Ok((seq, h)) if best.as_ref().is_none_or(|(s, _)| seq > *s) => {
                    best = Some((seq, h))
                }
                Ok(_) => {}
                Err(e) => errors.push(format!("{name}: {e}")),
            }
        }
        best.ok_or_else(|| {
            if errors.is_empty() {
                "no state journal was passed".to_owned()
            } else {
                errors.join("; ")
            }
        })
    }

    /// Takes the one descriptor stored under `name`.
    pub(crate) fn take(&mut self, name: &str) -> Option<OwnedFd> {
        self.fds.get_mut(name).and_then(Vec::pop)
    }
}

fn read_journal(mut f: std::fs::File) -> Result<(u64, Handover), String> {
    f.seek(SeekFrom::Start(0)).map_err(|e| e.to_string())?;
    let mut all = Vec::new();
    f.read_to_end(&mut all).map_err(|e| e.to_string())?;
    if all.is_empty() {
        return Err("empty".into());
    }
    let head = all.get(..48).ok_or("truncated header")?;
    let seq = u64::from_be_bytes(head[..8].try_into().map_err(|_| "header")?);
    let len = u64::from_be_bytes(head[8..16].try_into().map_err(|_| "header")?);
    let sha: [u8; 32] = head[16..48].try_into().map_err(|_| "header")?;
    let h = handover::decode(&all[48..], len, &sha)?;
    Ok((seq, h))
}

/// Removes the journals stored under [`JOURNALS`]' names (an upgrade's new process
/// takes the names for its own).
pub(crate) fn forget_journals(store: &FdStore) {
    for name in JOURNALS {
        store.remove(name);
    }
}

/// Closes what was passed back and not used, and removes its names from the store
/// (the journals' and `keep`'s excepted: copies under a name still in use are only
/// closed, since removing a name removes every descriptor stored under it).
pub(crate) fn forget_rest(
    r: Restored,
    store: Option<&FdStore>,
    keep: &std::collections::HashSet<String>,
) {
    for (name, _fds) in r.fds {
        if JOURNALS.contains(&name.as_str()) || keep.contains(&name) {
            continue;
        }
        if let Some(s) = store {
            s.remove(&name);
        }
    }
}
