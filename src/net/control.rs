//! The control socket `turnstone upgrade` talks to: a Unix stream socket in a directory
//! only the server's user may enter (0700), and a peer-credential check on every
//! connection (only that user or root is heard). One request per connection, one line:
//! `upgrade`; the answer is progress lines, then `ok {json}` or `error {why}`.

use std::io::{BufRead, BufReader, Write};
use std::os::fd::AsFd;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// A request from the control socket to the main thread, with where to answer.
pub(crate) struct Request {
    pub reply: std::sync::mpsc::Sender<Result<String, String>>,
}

/// Where the control socket is: `server.control_socket`, else
/// `$RUNTIME_DIRECTORY/control.sock` (systemd's `RuntimeDirectory=`), else none.
pub fn socket_path(configured: Option<&Path>) -> Option<PathBuf> {
    if let Some(p) = configured {
        return Some(p.to_owned());
    }
    let dir = std::env::var_os("RUNTIME_DIRECTORY")?;
    // systemd may list several, separated by colons: the first is ours.
    let first = dir.to_string_lossy().split(':').next()?.to_owned();
    (!first.is_empty()).then(|| Path::new(&first).join("control.sock"))
}

/// The path `turnstone upgrade` uses without `--socket`.
pub fn default_client_path() -> PathBuf {
    socket_path(None).unwrap_or_else(|| PathBuf::from("/run/turnstone/control.sock"))
}

/// Binds the control socket at `path` for `key` (the configuration key named in
/// errors). The directory must exist, belong to this process's user and let nobody else
/// in or write (mode 0700 or stricter); a stale socket file is replaced, a live one
/// (another server answering) is an error.
pub(crate) fn bind(path: &Path, key: &str) -> anyhow::Result<UnixListener> {
    let dir = path
        .parent()
        .ok_or_else(|| anyhow::anyhow!("{key}: {} has no directory", path.display()))?;
    let meta = std::fs::metadata(dir).map_err(|e| {
        anyhow::anyhow!(
            "{key}: directory {}: {e} (create it, mode 0700, owned by the server's user)",
            dir.display()
        )
    })?;
    let euid = nix::unistd::geteuid().as_raw();
    if meta.uid() != euid || meta.mode() & 0o077 != 0 {
        anyhow::bail!(
            "{key}: directory {} must belong to uid {euid} and have mode 0700 (it has uid {} \
             and mode {:o}): anyone who can reach the socket can ask for an upgrade",
            dir.display(),
            meta.uid(),
            meta.mode() & 0o7777
        );
    }
    if path.exists() {
        if answers(path) {
            anyhow::bail!("{key}: {} is in use by a running server", path.display());
        }
        std::fs::remove_file(path)
            .map_err(|e| anyhow::anyhow!("{key}: cannot replace {}: {e}", path.display()))?;
    }
    let l = UnixListener::bind(path)
        .map_err(|e| anyhow::anyhow!("{key}: cannot bind {}: {e}", path.display()))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    Ok(l)
}

/// Does a server answer at `path`? (A socket that only accepts, such as a previous
/// process's listener still held by systemd's fd store, does not.)
fn answers(path: &Path) -> bool {
    let Ok(mut s) = UnixStream::connect(path) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_millis(500)));
    if s.write_all(b"ping\n").is_err() {
        return false;
    }
    let mut b = [0u8; 1];
    matches!(std::io::Read::read(&mut s, &mut b), Ok(1))
}

/// Serves `listener` on a thread until `stop` is set (the socket was handed to a new
/// process), passing each upgrade request to `tx`.
pub(crate) fn serve(
    listener: UnixListener,
    tx: tokio::sync::mpsc::UnboundedSender<Request>,
    stop: Arc<AtomicBool>,
) -> std::io::Result<()> {
    std::thread::Builder::new()
        .name("turnstone-control".to_owned())
        .spawn(move || {
            while !stop.load(Ordering::Acquire) {
                let mut fds = [nix::poll::PollFd::new(
                    listener.as_fd(),
                    nix::poll::PollFlags::POLLIN,
                )];
                match nix::poll::poll(&mut fds, 250u16) {
                    Ok(n) if n > 0 => {}
                    _ => continue,
                }
                if stop.load(Ordering::Acquire) {
                    break;
                }
                let Ok((stream, _)) = listener.accept() else {
                    continue;
                };
                if let Err(e) = handle(stream, &tx) {
                    tracing::debug!(error = %e, "control socket: request failed");
                }
            }
        })?;
    Ok(())
}

fn handle(
    stream: UnixStream,
    tx: &tokio::sync::mpsc::UnboundedSender<Request>,
) -> std::io::Result<()> {
    let mut out = stream.try_clone()?;
    let cred = nix::sys::socket::getsockopt(&stream, nix::sys::socket::sockopt::PeerCredentials)?;
    let euid = nix::unistd::geteuid().as_raw();
    if cred.uid() != 0 && cred.uid() != euid {
        tracing::warn!(
            uid = cred.uid(),
            pid = cred.pid(),
            "control socket: refused a process of another user"
        );
        writeln!(
            out,
            "error refused: uid {} may not control this server",
            cred.uid()
        )?;
        // Closing now would lose the answer: a client that has not written its request
        // yet gets EPIPE when it does, one that has gets the connection reset (its request
        // unread here). End this side and let the request in (bounded) first.
        let _ = out.shutdown(std::net::Shutdown::Write);
        stream.set_read_timeout(Some(Duration::from_secs(1)))?;
        let _ = std::io::copy(&mut std::io::Read::take(stream, 256), &mut std::io::sink());
        return Ok(());
    }
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    let mut line = String::new();
    BufReader::new(std::io::Read::take(stream, 256)).read_line(&mut line)?;
    match line.trim() {
        "upgrade" => {
            tracing::info!(pid = cred.pid(), "control socket: upgrade requested");
            let (reply, rx) = std::sync::mpsc::channel();
            if tx.send(Request { reply }).is_err() {
                writeln!(out, "error the server is stopping")?;
                return Ok(());
            }
            writeln!(out, "upgrading")?;
            match rx.recv_timeout(Duration::from_secs(300)) {
                Ok(Ok(report)) => writeln!(out, "ok {report}")?,
                Ok(Err(why)) => writeln!(out, "error {why}")?,
                Err(_) => writeln!(out, "error no answer from the server")?,
            }
        }
        other => writeln!(
            out,
            "error unknown request {:?}; the one request is \"upgrade\"",
            other.chars().take(64).collect::<String>()
        )?,
    }
    Ok(())
}

/// `turnstone upgrade`: asks the server at `path` to upgrade, prints what it says, and
/// returns whether it succeeded.
pub fn request_upgrade(path: &Path, out: &mut dyn Write) -> Result<(), String> {
    let mut s = UnixStream::connect(path).map_err(|e| {
        format!(
            "cannot reach the server's control socket {}: {e} (is it running? as which user? \
             --socket names another path)",
            path.display()
        )
    })?;
    // A refusal may come before the request is read: its answer is still read below.
    let _ = s.write_all(b"upgrade\n");
    s.set_read_timeout(Some(Duration::from_secs(330)))
        .map_err(|e| e.to_string())?;
    let mut last = String::new();
    for line in BufReader::new(s).lines() {
        let line = line.map_err(|e| format!("control socket: {e}"))?;
        let _ = writeln!(out, "{line}");
        last = line;
    }
    if last.starts_with("ok ") {
        Ok(())
    } else if let Some(why) = last.strip_prefix("error ") {
        Err(why.to_owned())
    } else {
        Err("the server closed the control connection without an answer".to_owned())
    }
}
