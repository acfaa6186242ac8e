//! The running process's side of an upgrade: start the binary installed at the server's
//! path, freeze the UDP traffic, hand the sockets and state over ([`super::handover`]),
//! and either commit (the new process serves; this one keeps only its TCP/TLS clients
//! until they end or the drain timeout passes) or take everything back as it was.

use std::ffi::OsString;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::handover::{Channel, Handover, Hello, ListenerState, Message, FD_ENV, FORMAT_VERSION};
use super::worker::UpgradeStep;
use super::Common;
use crate::config::ListenTransport;

/// How long the new process may take to start and say hello (config, certificates,
/// `external_address = "auto"` discovery).
const HELLO_TIMEOUT: Duration = Duration::from_secs(30);
/// How long the new process may take to build everything from the state.
const READY_TIMEOUT: Duration = Duration::from_secs(60);
/// How long one message may wait for the new process to read (the state is sent while
/// UDP traffic is frozen).
const SEND_TIMEOUT: Duration = Duration::from_secs(10);
/// How long the workers may take to act on a request (they act at their next pass).
const WORKER_TIMEOUT: Duration = Duration::from_secs(5);

/// What an upgrade needs from the start of the process.
pub(crate) struct Context {
    /// The server's binary path, as started (the new binary is whatever is there now).
    pub exe: PathBuf,
    /// The arguments it was started with.
    pub args: Vec<OsString>,
    pub listen: Vec<(ListenTransport, std::net::SocketAddr)>,
    pub nonce_secret: [u8; 32],
    pub metrics: Option<std::net::TcpListener>,
    pub control: Option<std::os::unix::net::UnixListener>,
    /// To load the kernel fast path again after a failed upgrade.
    pub config: crate::config::Config,
}

impl Context {
    /// The binary and arguments this process was started with. The path is the one it
    /// was started by (`argv[0]` made absolute, symlinks kept: a deployment that swaps a
    /// symlink upgrades to the new target), else `/proc/self/exe` as resolved now (after
    /// a package upgrade it would name the deleted old file).
    pub fn from_env() -> (PathBuf, Vec<OsString>) {
        let mut args = std::env::args_os();
        let argv0 = PathBuf::from(args.next().unwrap_or_default());
        let exe = if argv0.components().count() > 1 {
            std::env::current_dir()
                .map(|d| d.join(&argv0))
                .unwrap_or(argv0)
        } else {
            std::env::current_exe()
                .ok()
                .filter(|p| p.exists())
                .unwrap_or(argv0)
        };
        (exe, args.collect())
    }
}

/// What a successful upgrade did.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Report {
    pub pid: u32,
    pub allocations: usize,
    pub sockets: usize,
    /// How long UDP traffic was not read (from the freeze to the new process serving).
    pub pause_ms: f64,
    /// TCP and TLS allocations this process keeps serving until they end.
    pub kept_stream_allocations: usize,
}

/// Runs an upgrade to the binary at `ctx.exe`. On every failure before the new process
/// serves, this process goes on exactly as before and the error says why.
pub(crate) fn upgrade(common: &Common, ctx: &Context) -> Result<Report, String> {
    let (ch, theirs) = Channel::pair()?;
    let mut child = Command::new(&ctx.exe)
        .args(&ctx.args)
        .env(FD_ENV, theirs.as_raw_fd().to_string())
        // systemd's watchdog is the new process's to keep once it is the main process.
        .env_remove("WATCHDOG_PID")
        .stdin(Stdio::null())
        .spawn()
        .map_err(|e| format!("cannot start {}: {e}", ctx.exe.display()))?;
    drop(theirs);
    let pid = child.id();
    tracing::info!(pid, binary = %ctx.exe.display(), "upgrade: new process started");
    let mut progress = Progress::default();
    let result = talk(common, ctx, &ch, &mut child, &mut progress);
    // Whether it ended on its own (before it is killed below).
    let exited = child.try_wait().ok().flatten();
    if let Err(e) = &result {
        // It may be alive and waiting: it must not serve. Gone, its kernel program is
        // gone too, and this process can load its own again.
        let _ = ch.refuse(e);
        let _ = child.kill();
        let status = child.wait().ok();
        if progress.froze {
            resume(common, ctx, progress.kernel_released, progress.spare.take());
        }
        tracing::error!(pid, error = %e, status = ?status, "upgrade failed; this process goes on serving");
    }
    result.map_err(|e| match exited {
        Some(status) if !status.success() && !e.contains("exited") => {
            format!("{e} (the new process exited: {status}; see its log)")
        }
        _ => e,
    })
}

/// Waits for the child's hello, checking every 100 ms that it is still alive.
fn hello(ch: &Channel, child: &mut Child) -> Result<Hello, String> {
    ch.set_timeout(Duration::from_millis(100))?;
    let until = Instant::now() + HELLO_TIMEOUT;
    loop {
        match ch.recv() {
            Ok(Message::Hello(h)) => return Ok(h),
            Ok(Message::Refuse(why)) => return Err(format!("the new process refused: {why}")),
            Ok(_) => return Err("the new process said something else than hello".into()),
            Err(e) if e.contains("timed out") => {
                if let Ok(Some(status)) = child.try_wait() {
                    return Err(format!(
                        "the new process exited ({status}) before taking over; see its log"
                    ));
                }
                if Instant::now() >= until {
                    return Err(format!(
                        "the new process did not answer within {HELLO_TIMEOUT:?}"
                    ));
                }
            }
            Err(e) => return Err(e),
        }
    }
}

/// How far an upgrade got (what a failure must undo).
#[derive(Default)]
struct Progress {
    kernel_released: bool,
    froze: bool,
    /// A kernel program prepared (not attached) at the start, to take this process's
    /// place at once if the upgrade fails after it gave its own up.
    spare: Option<super::fastpath::Kernel>,
}

fn talk(
    common: &Common,
    ctx: &Context,
    ch: &Channel,
    child: &mut Child,
    progress: &mut Progress,
) -> Result<Report, String> {
    if common.fast_path.is_some() {
        // Loading takes most of a second's fraction: not while frozen, if it comes to it.
        progress.spare = super::fastpath::Kernel::prepare(&ctx.config).ok();
    }
    let h = hello(ch, child)?;
    ch.set_timeout(SEND_TIMEOUT)?;
    if !h.reads.contains(&FORMAT_VERSION) {
        let why = format!(
            "the new binary ({}) reads state formats {:?}, this one writes {FORMAT_VERSION}",
            h.version, h.reads
        );
        return Err(why);
    }
    // The kernel program goes first (the new process attaches its own): packets go to
    // the sockets meanwhile, where the workers (or, once frozen, the new process) read
    // them.
    progress.kernel_released = release_kernel(common);
    let started = Instant::now();
    progress.froze = true;
    let exports = common.pool.upgrade(UpgradeStep::Freeze, WORKER_TIMEOUT)?;
    let mut report = hand_over(common, ctx, ch, exports, started)?;
    // The unit's main process is the new one now (NotifyAccess=all lets this one say so).
    if let Err(e) = crate::notify::Notifier::from_env().send(&format!("MAINPID={}", h.pid)) {
        tracing::warn!(error = %e, "cannot tell systemd the new main process (NOTIFY_SOCKET)");
    }
    report.pid = h.pid;
    Ok(report)
}

/// The state of `exports` as one document, and the sockets its numbers name (none for
/// a snapshot's exports, which copy no socket).
pub(crate) fn build_state<'a>(
    ctx: &'a Context,
    exports: &'a [super::worker::ShardExport],
) -> Result<(Handover, Vec<BorrowedFd<'a>>), String> {
    let workers = exports.len();
    let mut fds: Vec<BorrowedFd<'_>> = Vec::new();
    let mut listeners: Vec<ListenerState> = ctx
        .listen
        .iter()
        .map(|(t, a)| ListenerState {
            transport: t.as_str().to_owned(),
            address: *a,
            sockets: Vec::with_capacity(workers),
        })
        .collect();
    let mut shards = Vec::with_capacity(workers);
    let mut base = 0u32;
    for e in exports {
        fds.extend(e.fds.iter().map(AsFd::as_fd));
        let (mut udp, mut streams) = (e.udp.iter(), e.streams.iter());
        for (l, (t, _)) in listeners.iter_mut().zip(&ctx.listen) {
            let i = match t {
                ListenTransport::Udp => udp.next(),
                _ => streams.next(),
            };
            let i = i.ok_or("a worker has fewer listeners than configured")?;
            l.sockets.push(base + i);
        }
        let mut state = e.state.clone();
        for a in &mut state.allocations {
            a.relay.socket += base;
            if let Some(s) = &mut a.second {
                s.socket += base;
            }
        }
        for r in &mut state.reservations {
            r.socket += base;
        }
        shards.push(state);
        base += e.count;
    }
    let mut next = base;
    let mut extra = |l: Option<BorrowedFd<'a>>| {
        l.map(|fd| {
            if fds.len() as u32 == next {
                fds.push(fd);
            }
            next += 1;
            next - 1
        })
    };
    let metrics = extra(ctx.metrics.as_ref().map(AsFd::as_fd));
    let control = extra(ctx.control.as_ref().map(AsFd::as_fd));
    let mut h = Handover {
        version: FORMAT_VERSION,
        from_pid: std::process::id(),
        nonce_secret: ctx.nonce_secret,
        workers,
        listeners,
        metrics,
        control,
        shards,
        fds: next,
        fd_names: Vec::new(),
    };
    h.fd_names = fd_names(&h);
    Ok((h, fds))
}

/// The fd store's name of each socket number of `h`.
fn fd_names(h: &Handover) -> Vec<String> {
    use super::fdstore::{listener_name, relay_name};
    let mut names = vec![String::new(); h.fds as usize];
    let mut set = |i: u32, name: String| {
        if let Some(n) = names.get_mut(i as usize) {
            *n = name;
        }
    };
    for (i, l) in h.listeners.iter().enumerate() {
        for (w, &s) in l.sockets.iter().enumerate() {
            set(s, listener_name(w, i));
        }
    }
    for sh in &h.shards {
        for a in &sh.allocations {
            for r in a.relays() {
                set(r.socket, relay_name(r.bound, false));
            }
        }
        for r in &sh.reservations {
            set(r.socket, relay_name(r.addr, false));
        }
    }
    if let Some(m) = h.metrics {
        set(m, "metrics".into());
    }
    if let Some(c) = h.control {
        set(c, "control".into());
    }
    names
}

/// Sends everything, waits for `Ready`, commits, waits for `Serving`; the report's
/// pause runs from `started` (the freeze) to `Serving`.
fn hand_over(
    common: &Common,
    ctx: &Context,
    ch: &Channel,
    exports: Vec<super::worker::ShardExport>,
    started: Instant,
) -> Result<Report, String> {
    let (state, fds) = build_state(ctx, &exports)?;
    let allocations = state.shards.iter().map(|s| s.allocations.len()).sum();
    ch.send_fds(&fds)?;
    ch.send_state(&state)?;
    ch.set_timeout(READY_TIMEOUT)?;
    match ch.recv()? {
        Message::Ready(r) if r.allocations == allocations => {}
        Message::Ready(r) => {
            return Err(format!(
                "the new process took {} allocations of {allocations}",
                r.allocations
            ))
        }
        Message::Refuse(why) => return Err(format!("the new process refused: {why}")),
        _ => return Err("the new process said something else than ready".into()),
    }
    ch.commit()?;
    ch.set_timeout(Duration::from_secs(10))?;
    // UDP traffic is read again (by the new process) from `Serving` on.
    let pause = match ch.recv()? {
        Message::Serving => started.elapsed(),
        Message::Refuse(why) => return Err(format!("the new process gave up: {why}")),
        _ => return Err("the new process said something else than serving".into()),
    };
    // Past this point the new process serves: this one lets go.
    if let Err(e) = common.pool.upgrade(UpgradeStep::Commit, WORKER_TIMEOUT) {
        tracing::warn!(error = %e, "upgrade: not every worker closed its copies in time");
    }
    Ok(Report {
        pid: 0,
        allocations,
        sockets: fds.len(),
        pause_ms: pause.as_secs_f64() * 1000.0,
        kept_stream_allocations: common.shared.total_allocations(),
    })
}

/// A restart by systemd (`RestartKillSignal=SIGUSR1`): freezes the UDP traffic, writes
/// the state to the fd store's journal (the sockets are there already) and returns the
/// number of allocations kept, for the caller to exit at once. On failure everything
/// resumes.
pub(crate) fn keep_for_restart(
    common: &Common,
    ctx: &Context,
    store: &super::fdstore::FdStore,
) -> Result<usize, String> {
    let kernel = release_kernel(common);
    let result = common
        .pool
        .upgrade(UpgradeStep::Freeze, WORKER_TIMEOUT)
        .and_then(|exports| {
            // Every socket the journal will name is in the store first.
            if !store.flush(Duration::from_secs(10)) {
                return Err("the service manager did not take the sockets in time".to_owned());
            }
            let (h, _) = build_state(ctx, &exports)?;
            store.write_state(&h).map_err(|e| e.to_string())?;
            Ok(h.shards.iter().map(|s| s.allocations.len()).sum())
        });
    if result.is_err() {
        resume(common, ctx, kernel, None);
        return result;
    }
    // TCP and TLS clients' connections end with this process: their allocations end
    // here, with their usage records.
    if let Err(e) = common.pool.upgrade(UpgradeStep::EndStreams, WORKER_TIMEOUT) {
        tracing::warn!(error = %e, "restart: not every worker ended its TCP/TLS allocations");
    }
    result
}

/// Detaches this process's kernel program (its counts read, its maps emptied): packets
/// go to the sockets from now on. Whether there was one.
fn release_kernel(common: &Common) -> bool {
    let Some(k) = &common.fast_path else {
        return false;
    };
    k.lock()
        .unwrap_or_else(|e| e.into_inner())
        .shutdown(&common.metrics);
    true
}

/// Takes everything back after a failed upgrade: the workers read their sockets again,
/// and the kernel program is loaded again (its maps refilled by the workers' next tick).
fn resume(
    common: &Common,
    ctx: &Context,
    had_kernel: bool,
    spare: Option<super::fastpath::Kernel>,
) {
    if had_kernel {
        if let Some(k) = &common.fast_path {
            let loaded = match spare {
                Some(mut spare) => spare.attach().map(|()| spare),
                None => super::fastpath::Kernel::load(&ctx.config),
            };
            match loaded {
                Ok(new) => *k.lock().unwrap_or_else(|e| e.into_inner()) = new,
                Err(e) => {
                    tracing::error!(error = %e, "upgrade: cannot load the kernel fast path again; relaying in userspace")
                }
            }
        }
    }
    if let Err(e) = common.pool.upgrade(UpgradeStep::Resume, WORKER_TIMEOUT) {
        tracing::error!(error = %e, "upgrade: not every worker resumed in time");
    }
}
