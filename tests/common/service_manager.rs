//! A stand-in for systemd as a `Type=notify` unit with `FileDescriptorStoreMax=` sees
//! it, where no systemd runs: the `$NOTIFY_SOCKET` that records every message
//! (`READY=1`, `MAINPID=`, `STOPPING=1`...), keeps what `FDSTORE=1` sends under its
//! `FDNAME=` (and drops what `FDSTOREREMOVE=1` names), and starts the service again
//! with the stored descriptors as systemd does (`$LISTEN_FDS` from descriptor 3,
//! `$LISTEN_FDNAMES`, `$LISTEN_PID`).

use std::io::IoSliceMut;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use nix::sys::socket::{recvmsg, ControlMessageOwned, MsgFlags};

use super::process::ChildGuard;

/// What the manager received and keeps.
#[derive(Default)]
pub struct Received {
    /// Every message, in order, with the sender's pid when the kernel said it.
    pub messages: Vec<String>,
    /// The fd store: (name, descriptor), in the order stored.
    pub store: Vec<(String, OwnedFd)>,
}

pub struct ServiceManager {
    pub path: PathBuf,
    pub received: Arc<Mutex<Received>>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl ServiceManager {
    /// Listens on `dir/notify.sock`.
    pub fn new(dir: &Path) -> ServiceManager {
        let path = dir.join("notify.sock");
        let sock = UnixDatagram::bind(&path).expect("bind notify socket");
        sock.set_read_timeout(Some(Duration::from_millis(100)))
            .expect("timeout");
        let received = Arc::new(Mutex::new(Received::default()));
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let (received, stop) = (received.clone(), stop.clone());
            std::thread::spawn(move || {
                let mut buf = vec![0u8; 4096];
                let mut cmsg = nix::cmsg_space!([RawFd; 253]);
                while !stop.load(Ordering::Relaxed) {
                    let mut iov = [IoSliceMut::new(&mut buf)];
                    let Ok(m) = recvmsg::<()>(
                        sock.as_raw_fd(),
                        &mut iov,
                        Some(&mut cmsg),
                        MsgFlags::MSG_CMSG_CLOEXEC,
                    ) else {
                        continue;
                    };
                    let mut fds = Vec::new();
                    if let Ok(cmsgs) = m.cmsgs() {
                        for c in cmsgs {
                            if let ControlMessageOwned::ScmRights(raw) = c {
                                fds.extend(raw.into_iter().filter_map(turnstone::sys::adopt_fd));
                            }
                        }
                    }
                    let n = m.bytes;
                    let text = String::from_utf8_lossy(&buf[..n]).into_owned();
                    let field = |k: &str| {
                        text.lines()
                            .find_map(|l| l.strip_prefix(k))
                            .map(str::to_owned)
                    };
                    let mut r = received.lock().unwrap();
                    if field("FDSTORE=") == Some("1".into()) {
                        let name = field("FDNAME=").unwrap_or_else(|| "stored".into());
                        // systemd keeps one copy of each open file (same device and
                        // inode), whatever name it is sent under again.
                        let id = |fd: &OwnedFd| {
                            nix::sys::stat::fstat(fd)
                                .map(|st| (st.st_dev, st.st_ino))
                                .ok()
                        };
                        for fd in fds {
                            let new = id(&fd);
                            if new.is_none() || !r.store.iter().any(|(_, f)| id(f) == new) {
                                r.store.push((name.clone(), fd));
                            }
                        }
                    }
                    if field("FDSTOREREMOVE=") == Some("1".into()) {
                        if let Some(name) = field("FDNAME=") {
                            r.store.retain(|(n, _)| *n != name);
                        }
                    }
                    r.messages.push(text);
                }
            })
        };
        ServiceManager {
            path,
            received,
            stop,
            thread: Some(thread),
        }
    }

    /// Every message so far.
    pub fn messages(&self) -> Vec<String> {
        self.received.lock().unwrap().messages.clone()
    }

    /// The names in the fd store, sorted.
    pub fn stored_names(&self) -> Vec<String> {
        let mut v: Vec<String> = self
            .received
            .lock()
            .unwrap()
            .store
            .iter()
            .map(|(n, _)| n.clone())
            .collect();
        v.sort();
        v
    }

    /// Waits until a message satisfies `pred`, or panics after `timeout`.
    pub fn wait_message(
        &self,
        what: &str,
        timeout: Duration,
        pred: impl Fn(&str) -> bool,
    ) -> String {
        let until = Instant::now() + timeout;
        loop {
            if let Some(m) = self.messages().into_iter().find(|m| pred(m)) {
                return m;
            }
            assert!(
                Instant::now() < until,
                "no {what} from the service within {timeout:?}; got {:#?}",
                self.messages()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Starts `program args` as the unit would: `$NOTIFY_SOCKET`, `$FDSTORE`, and the
    /// stored descriptors from 3 on with `$LISTEN_FDS`, `$LISTEN_FDNAMES` and
    /// `$LISTEN_PID` (set by a shell that then execs the program, so the pid is the
    /// service's). Output goes to `logs` (stdout.log, stderr.log, appended to).
    pub fn start(&self, program: &Path, args: &[&str], logs: &Path) -> ChildGuard {
        let r = self.received.lock().unwrap();
        // Copies at 1000 and up (not close-on-exec) for the shell to move down to 3...
        let mut high = Vec::new();
        for (i, (_, fd)) in r.store.iter().enumerate() {
            let raw = nix::fcntl::fcntl(fd, nix::fcntl::FcntlArg::F_DUPFD(1000 + i as RawFd))
                .expect("dup a stored descriptor");
            high.push(turnstone::sys::adopt_fd(raw).expect("the copy is open"));
        }
        let names: Vec<&str> = r.store.iter().map(|(n, _)| n.as_str()).collect();
        let mut script = String::new();
        for (i, fd) in high.iter().enumerate() {
            script += &format!("exec {}<&{} {}<&-\n", 3 + i, fd.as_raw_fd(), fd.as_raw_fd());
        }
        if !high.is_empty() {
            script += &format!(
                "export LISTEN_FDS={} LISTEN_FDNAMES={} LISTEN_PID=$$\n",
                high.len(),
                names.join(":")
            );
        }
        script += "exec \"$0\" \"$@\"\n";
        drop(r);
        let mut cmd = Command::new("bash");
        cmd.arg("-c")
            .arg(script)
            .arg(program)
            .args(args)
            .env("NOTIFY_SOCKET", &self.path)
            .env("FDSTORE", "16384")
            .env_remove("RUST_LOG");
        let g =
            ChildGuard::spawn_appending(&format!("service {}", program.display()), &mut cmd, logs);
        drop(high);
        g
    }
}

impl Drop for ServiceManager {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
