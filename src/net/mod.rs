//! The tokio shell: it binds sockets, moves bytes between them and the sans-I/O core,
//! and handles signals. It holds no protocol logic.
//!
//! One worker thread per core, each with its own current-thread runtime, its own
//! `SO_REUSEPORT` socket per UDP listen address, its own [`Server`] core and the relay
//! sockets of the allocations the kernel's hash sends to it. Nothing is shared between
//! workers on the relay path.

mod batch;
mod cert_watch;
pub mod control;
pub mod discover;
pub mod fastpath;
mod fdstore;
pub mod handover;
mod ports;
mod socket;
pub mod stream;
mod takeover;
pub mod tls;
pub mod upgrade;
mod worker;

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use std::os::fd::AsFd;

use anyhow::Context;

use arc_swap::ArcSwapOption;

use crate::config::{Config, KernelFastPath, ListenTransport};
use crate::metrics::Metrics;
use crate::notify;
use crate::server::{Runtime, Shared, Transport};

/// How long stopping waits for the workers to end the live allocations and write their
/// final usage records.
const STOP_WAIT: Duration = Duration::from_secs(2);
pub use ports::PortPool;

/// How the process was started: the config and where it came from (for reload).
pub struct Launch {
    pub config: Config,
    pub path: Option<PathBuf>,
    /// The hand-over channel, when an upgrade started this process
    /// ([`handover::Channel::inherited`], taken first thing in `main`).
    pub inherited: Option<Result<handover::Channel, String>>,
    /// Applies `[log] level` on reload, when the caller set up a reloadable filter.
    pub log_level: Option<LogLevelSetter>,
}

/// What every worker shares with the others and with the main thread.
pub(crate) struct Common {
    pub shared: Arc<Shared>,
    pub ports: PortPool,
    /// Socket buffer size for relay sockets.
    pub buffer: usize,
    /// The TLS configuration for `tls` listeners, swapped whole on reload and when the
    /// certificate files change on disk.
    pub tls: ArcSwapOption<rustls::ServerConfig>,
    /// The certificate and key files behind `tls`, polled for changes.
    pub(crate) cert_watch: cert_watch::CertWatch,
    pub conns: Arc<stream::ConnCounter>,
    pub stream_limits: stream::StreamLimits,
    pub metrics: Arc<Metrics>,
    /// The worker threads' shard hand-off (adaptive worker count).
    pub(crate) pool: worker::Pool,
    /// The kernel fast path, when `relay.kernel_fast_path` loaded it.
    pub(crate) fast_path: Option<Mutex<fastpath::Kernel>>,
    /// systemd's file descriptor store, when the unit has one.
    pub(crate) fd_store: Option<fdstore::FdStore>,
}

/// Loads the kernel fast path as `relay.kernel_fast_path` asks: `None` when off or
/// ("auto") when it cannot be had; an error when "required" and it cannot. Logs one line
/// saying which path is active where, or why the kernel's is not. With `attach` false
/// the program is only prepared ([`attach_fast_path`] finishes).
fn load_fast_path(config: &Config, attach: bool) -> anyhow::Result<Option<fastpath::Kernel>> {
    let mode = config.relay.kernel_fast_path;
    if mode == KernelFastPath::Off {
        tracing::info!("kernel fast path off (relay.kernel_fast_path = \"off\")");
        return Ok(None);
    }
    let loaded = if attach {
        fastpath::Kernel::load(config)
    } else {
        fastpath::Kernel::prepare(config)
    };
    fast_path_result(config, loaded, attach)
}

/// Attaches a program [`load_fast_path`] prepared (an upgrade's new process, once the
/// old one has detached its own).
fn attach_fast_path(
    config: &Config,
    kernel: Option<fastpath::Kernel>,
) -> anyhow::Result<Option<fastpath::Kernel>> {
    let Some(mut k) = kernel else {
        return Ok(None);
    };
    let attached = k.attach().map(|()| k);
    fast_path_result(config, attached, true)
}

fn fast_path_result(
    config: &Config,
    loaded: Result<fastpath::Kernel, fastpath::NotUsed>,
    attached: bool,
) -> anyhow::Result<Option<fastpath::Kernel>> {
    let mode = config.relay.kernel_fast_path;
    match loaded {
        Ok(k) if !attached => Ok(Some(k)),
        Ok(k) => {
            let on = k.interfaces.join(", ");
            let off = fastpath::forwarding_off(config, &k.interfaces);
            if off.is_empty() {
                tracing::info!(
                    "kernel fast path on: {on} (generic XDP); UDP allocations without \
                     bandwidth limits relay in the kernel"
                );
            } else {
                tracing::warn!(
                    "kernel fast path on: {on} (generic XDP), but IP forwarding is off on {} \
                     (sysctl net.ipv4.conf.IF.forwarding, net.ipv6.conf.IF.forwarding): the \
                     program's route lookups fail there and packets arriving there relay in \
                     userspace",
                    off.join(", ")
                );
            }
            Ok(Some(k))
        }
        Err(why) if mode == KernelFastPath::Required => {
            anyhow::bail!(
                "relay.kernel_fast_path = \"required\" but the kernel fast path cannot be used: {why}"
            )
        }
        Err(fastpath::NotUsed::LoopbackOnly) => {
            tracing::info!("kernel fast path: not used (loopback only)");
            Ok(None)
        }
        Err(why) => {
            tracing::warn!("kernel fast path: not used, relaying in userspace: {why}");
            Ok(None)
        }
    }
}

/// One worker's own listener sockets.
pub(crate) struct WorkerSockets {
    pub udp: Vec<std::net::UdpSocket>,
    pub streams: Vec<(std::net::TcpListener, Transport)>,
}

fn load_tls(config: &Config) -> anyhow::Result<Option<cert_watch::Loaded>> {
    if !config
        .listen
        .iter()
        .any(|l| matches!(l.transport, ListenTransport::Tls))
    {
        return Ok(None);
    }
    let (Some(cert), Some(key)) = (&config.tls.cert_file, &config.tls.key_file) else {
        anyhow::bail!("tls: a tls listener needs [tls] certificate and private_key");
    };
    cert_watch::Loaded::load(cert, key)
        .map(Some)
        .map_err(|e| anyhow::anyhow!("tls: {e}"))
}

/// Runs the server until SIGTERM or SIGINT.
pub fn run(launch: Launch) -> anyhow::Result<()> {
    crate::sys::configure_allocator();
    let mut config = launch.config;
    for w in config.warnings() {
        tracing::warn!(problem = %w, "configuration");
    }
    discover::resolve_external_addresses(&mut config).map_err(anyhow::Error::msg)?;
    match socket::raise_open_file_limit() {
        // Listeners, stream connections and a few files besides the relay sockets.
        Ok(n) if n < config.limits.max_allocations as u64 + 1024 => tracing::warn!(
            open_files = n,
            max_allocations = config.limits.max_allocations,
            "the open-file limit (RLIMIT_NOFILE) holds fewer relay sockets than \
             limits.max_allocations; raise it (LimitNOFILE= in the systemd unit, ulimit -n) \
             or lower limits.max_allocations"
        ),
        Ok(n) if n < config.limits.max_connections as u64 + 1024 => tracing::warn!(
            open_files = n,
            max_connections = config.limits.max_connections,
            "the open-file limit (RLIMIT_NOFILE) holds fewer TCP/TLS connections than \
             limits.max_connections; raise it (LimitNOFILE= in the systemd unit, ulimit -n) \
             or lower limits.max_connections"
        ),
        Ok(n) => tracing::debug!(open_files = n, "open-file limit"),
        Err(e) => tracing::warn!(error = %e, "cannot read or raise the open-file limit"),
    }
    let sig = Signals::install()?;
    // Started by an upgrade: the old process's state first (it has frozen its UDP
    // traffic for us). Any failure from here to `Ready` is said to it, and it goes on.
    let inherited = match launch.inherited {
        None => None,
        Some(Ok(ch)) => Some(ch),
        Some(Err(e)) => anyhow::bail!("upgrade: {e}"),
    };
    // Restarted by systemd with its fd store: the sockets and journals it kept.
    let restored = match inherited {
        None => fdstore::listen_fds(),
        Some(_) => None,
    };
    // Read before the store takes the journals back for its own writes.
    let restored = restored.map(|mut r| {
        let state = r.state();
        (r, state)
    });
    let mut restored = restored;
    let store = fdstore::FdStore::from_env(restored.as_mut().map(|(r, _)| r));
    let upgraded = inherited.is_some();
    let started = match start(&mut config, inherited.as_ref(), restored, store) {
        Ok(s) => s,
        Err(e) => {
            if let Some(ch) = &inherited {
                let _ = ch.refuse(&format!("{e:#}"));
            }
            return Err(e);
        }
    };
    let Started {
        common,
        shards,
        nonce_secret,
        metrics_listener,
        control_listener,
    } = started;
    if let Some(ch) = &inherited {
        // Nothing is served before the old process commits: it may still take over
        // again.
        ch.set_timeout(Duration::from_secs(60))
            .map_err(anyhow::Error::msg)?;
        match ch.recv().map_err(anyhow::Error::msg)? {
            handover::Message::Commit => {}
            handover::Message::Refuse(why) => {
                anyhow::bail!("upgrade: the old process gave up: {why}")
            }
            _ => anyhow::bail!("upgrade: the old process said something else than commit"),
        }
    }
    for shard in shards {
        let common = common.clone();
        std::thread::Builder::new()
            .name(format!("turnstone-w{}", shard.index()))
            .spawn(move || worker::run(common, shard))?;
    }
    let metrics = common.metrics.clone();
    let stop_listeners = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let (control_tx, control_rx) = tokio::sync::mpsc::unbounded_channel();
    let extras = (|| -> anyhow::Result<()> {
        if let Some(l) = &metrics_listener {
            let m = metrics.clone();
            let health: crate::metrics::Health =
                Arc::new(move || m.workers_alive(Duration::from_secs(5)) && !m.is_draining());
            let addr = l.local_addr()?;
            crate::metrics::serve_until(
                l.try_clone()?,
                metrics.clone(),
                health,
                Some(stop_listeners.clone()),
            )?;
            tracing::info!(%addr, "metrics on http://{addr}/metrics and /health");
        }
        if let Some(url) = &config.store.url {
            crate::store::start(
                &crate::store::Target::node(url, config.store.ca_file.as_deref()),
                crate::store::node_id(&config),
                crate::store::advertise(&config),
                common.shared.clone(),
                metrics.clone(),
            )?;
        }
        if let Some(l) = &control_listener {
            control::serve(l.try_clone()?, control_tx, stop_listeners.clone())?;
            if let Ok(addr) = l.local_addr() {
                tracing::info!(path = ?addr.as_pathname(), "control socket (turnstone upgrade)");
            }
        }
        Ok(())
    })();
    match extras {
        Ok(()) => {}
        // The workers serve already, with the calls taken over: this must not end them.
        Err(e) if inherited.is_some() => {
            tracing::error!(error = %format!("{e:#}"), "upgrade: serving without it")
        }
        Err(e) => return Err(e),
    }
    let workers = common.shared.workers();
    for l in &config.listen {
        tracing::info!(address = %l.address, transport = ?l.transport, workers, "listening");
    }
    // After an upgrade the old process tells systemd this one is the main process, once
    // it has let go (NotifyAccess=all); READY=1 changes nothing for an active unit.
    let notified = notify::ready();
    if let Err(e) = notified {
        tracing::warn!(error = %e, "cannot notify systemd (NOTIFY_SOCKET)");
    }
    if let Some(ch) = inherited {
        let _ = ch.serving();
        tracing::info!("upgrade: serving; the old process lets go");
    }
    let (exe, args) = upgrade::Context::from_env();
    let ctx = upgrade::Context {
        exe,
        args,
        listen: config
            .listen
            .iter()
            .map(|l| (l.transport, l.address))
            .collect(),
        nonce_secret,
        metrics: metrics_listener,
        control: control_listener,
        config: config.clone(),
    };
    if let Some(store) = &common.fd_store {
        if upgraded {
            // The old process's journals go; this one's take their names.
            fdstore::forget_journals(store);
        }
        takeover::keep_in_store(store, &common, &ctx);
    }
    signals(
        sig,
        common,
        launch.path,
        ctx,
        config.server.drain_timeout,
        launch.log_level,
        Control {
            requests: control_rx,
            stop_listeners,
        },
    )
}

/// Everything [`start`] built, not yet serving.
struct Started {
    common: Arc<Common>,
    shards: Vec<worker::Shard>,
    nonce_secret: [u8; 32],
    metrics_listener: Option<std::net::TcpListener>,
    control_listener: Option<std::os::unix::net::UnixListener>,
}

/// Builds the server without serving: the shared state, the listeners (bound, or taken
/// over in an upgrade), every worker's shard with the allocations taken over.
fn start(
    config: &mut Config,
    inherited: Option<&handover::Channel>,
    restored: Option<(fdstore::Restored, fdstore::StoredState)>,
    fd_store: Option<fdstore::FdStore>,
) -> anyhow::Result<Started> {
    // Loaded (and so its maps empty: the core's Clear) before any worker serves. In an
    // upgrade, prepared before saying hello (loading is the slow part) and attached once
    // the old process has detached its own, before it sends the state.
    let (mut taken, kernel) = match (inherited, restored) {
        (Some(ch), _) => {
            let prepared = load_fast_path(config, false)?;
            let taken = takeover::receive(ch, config)?;
            (Some(taken), attach_fast_path(config, prepared)?)
        }
        (None, Some((r, state))) => (
            takeover::restore(config, r, state, fd_store.as_ref()),
            load_fast_path(config, true)?,
        ),
        (None, None) => (None, load_fast_path(config, true)?),
    };
    let nonce_secret: [u8; 32] = taken
        .as_ref()
        .map_or_else(rand::random, |t| t.state.nonce_secret);
    let mut runtime = Runtime::from_config(config, nonce_secret);
    runtime.kernel_fast_path = kernel.is_some();
    let shared = Shared::new(runtime);
    let tls_config = load_tls(config)?;
    let workers = match (&taken, config.server.workers) {
        (Some(t), _) => t.state.workers,
        (None, 0) => std::thread::available_parallelism().map_or(1, |n| n.get()),
        (None, n) => n,
    };
    shared.set_workers(workers);
    let metrics = Arc::new(Metrics::new(workers));
    let common = Arc::new(Common {
        shared: shared.clone(),
        ports: PortPool::new(
            &config.relay.addresses,
            config.relay.port_min,
            config.relay.port_max,
        ),
        buffer: config.relay.socket_buffer,
        tls: ArcSwapOption::empty(),
        cert_watch: cert_watch::CertWatch::new(),
        conns: Arc::new(stream::ConnCounter::with_drops(metrics.stream_drops())),
        stream_limits: stream::StreamLimits::from_config(config),
        metrics: metrics.clone(),
        pool: worker::Pool::new(workers, config.server.adaptive_workers)?,
        fast_path: kernel.map(Mutex::new),
        fd_store,
    });

    if let Some(loaded) = tls_config {
        common
            .cert_watch
            .install(&common.tls, &metrics, loaded, "start");
        cert_watch::spawn(common.clone()).context("cannot start the certificate watcher")?;
    }

    // Every worker's sockets before announcing readiness, so a bad address is a
    // start-up error.
    let sockets = match &mut taken {
        Some(t) => takeover::inherited_sockets(config, t)?,
        None => bind_sockets(config, workers)?,
    };
    if let (Some(store), true) = (&common.fd_store, taken.is_none()) {
        // Relay sockets up to the whole port range, the listeners, metrics, control and
        // the two journals.
        let ports = u64::from(config.relay.port_max - config.relay.port_min) + 1;
        let want = ports * config.relay.addresses.len() as u64
            + (config.listen.len() * workers) as u64
            + 4;
        if store.max < want {
            tracing::warn!(
                fd_store_max = store.max,
                needed = want,
                "FileDescriptorStoreMax (and $FDSTORE) hold fewer descriptors than the relay \
                 port range may use: relay sockets beyond it are not kept across a restart \
                 or crash; raise both in the unit"
            );
        }
        // The listeners (taken over or restored ones are in the store already).
        for (w, socks) in sockets.iter().enumerate() {
            let (mut udp, mut streams) = (socks.udp.iter(), socks.streams.iter());
            for (i, l) in config.listen.iter().enumerate() {
                let fd = match l.transport {
                    ListenTransport::Udp => udp.next().map(|s| s.as_fd()),
                    _ => streams.next().map(|(s, _)| s.as_fd()),
                };
                if let Some(fd) = fd {
                    store.add(&fdstore::listener_name(w, i), fd);
                }
            }
        }
    }
    if let Some(first) = sockets.first().and_then(|w| w.udp.first()) {
        let want = config.relay.socket_buffer;
        let (rcv, snd) = socket::granted_buffers(first);
        if rcv < want || snd < want {
            tracing::warn!(
                asked = want,
                receive = rcv,
                send = snd,
                "the kernel capped UDP socket buffers below relay.socket_buffer; raise \
                 net.core.rmem_max and net.core.wmem_max (sysctl) to avoid drops under load"
            );
        }
    }
    let mut shards = Vec::with_capacity(workers);
    for (i, socks) in sockets.into_iter().enumerate() {
        shards.push(worker::Shard::new(i, &common, socks)?);
    }
    let mut metrics_listener = None;
    let mut control_listener = None;
    if let Some(t) = &mut taken {
        let mut allocations = 0;
        for (shard, state) in shards.iter_mut().zip(&t.state.shards) {
            allocations += shard
                .import(&common, state, &mut t.fds)
                .map_err(|e| anyhow::anyhow!("upgrade: {e}"))?;
        }
        // The old process's metrics and control listeners, where this configuration
        // still wants them there.
        let mut take = |i: Option<u32>| i.and_then(|i| t.fds.get_mut(i as usize)?.take());
        if let Some(fd) = take(t.state.metrics) {
            let l = std::net::TcpListener::from(fd);
            if config.metrics.listen.is_some() && l.local_addr().ok() == config.metrics.listen {
                metrics_listener = Some(l);
            }
        }
        if let Some(fd) = take(t.state.control) {
            let l = std::os::unix::net::UnixListener::from(fd);
            let want = control::socket_path(config.server.control_socket.as_deref());
            let have = l
                .local_addr()
                .ok()
                .and_then(|a| a.as_pathname().map(Path::to_owned));
            if want.is_some() && want == have {
                control_listener = Some(l);
            }
        }
        if let Some(ch) = inherited {
            ch.ready(&handover::Ready { allocations })
                .map_err(anyhow::Error::msg)?;
        }
        if inherited.is_some() {
            tracing::info!(
                allocations,
                "upgrade: allocations taken over; waiting for the old process to let go"
            );
        }
    }
    if metrics_listener.is_none() {
        if let Some(addr) = config.metrics.listen {
            metrics_listener = Some(
                std::net::TcpListener::bind(addr)
                    .with_context(|| format!("metrics.listen: cannot bind {addr}"))?,
            );
        }
    }
    if control_listener.is_none() {
        if let Some(path) = control::socket_path(config.server.control_socket.as_deref()) {
            control_listener = Some(control::bind(&path, "server.control_socket")?);
        }
    }
    Ok(Started {
        common,
        shards,
        nonce_secret,
        metrics_listener,
        control_listener,
    })
}

/// Binds every worker's listeners.
fn bind_sockets(config: &Config, workers: usize) -> anyhow::Result<Vec<WorkerSockets>> {
    let mut sockets = Vec::with_capacity(workers);
    for _ in 0..workers {
        let mut w = WorkerSockets {
            udp: Vec::new(),
            streams: Vec::new(),
        };
        for l in &config.listen {
            let addr = l.address;
            match l.transport {
                ListenTransport::Udp => w.udp.push(
                    socket::udp_listener(addr, config.relay.socket_buffer)
                        .with_context(|| format!("listen: cannot bind UDP {addr}"))?,
                ),
                // Every worker has its own TCP and TLS listeners too (SO_REUSEPORT: the
                // kernel spreads connections); an RFC 6062 data connection accepted by
                // another worker than its allocation's is handed over to that one.
                ListenTransport::Tcp => w.streams.push((
                    socket::tcp_listener(addr)
                        .with_context(|| format!("listen: cannot bind TCP {addr}"))?,
                    Transport::Tcp,
                )),
                ListenTransport::Tls => w.streams.push((
                    socket::tcp_listener(addr)
                        .with_context(|| format!("listen: cannot bind TCP {addr} (tls)"))?,
                    Transport::Tls,
                )),
            }
        }
        sockets.push(w);
    }
    Ok(sockets)
}

/// The main thread waits for signals: SIGHUP reloads, SIGTERM/SIGINT stop.
/// The signal handlers, installed before any worker starts or systemd hears READY=1, so
/// an early SIGHUP or SIGTERM is never taken with its default (fatal) action.
pub(crate) struct Signals {
    rt: tokio::runtime::Runtime,
    hup: tokio::signal::unix::Signal,
    term: tokio::signal::unix::Signal,
    int: tokio::signal::unix::Signal,
    usr1: tokio::signal::unix::Signal,
    usr2: tokio::signal::unix::Signal,
}

impl Signals {
    fn install() -> anyhow::Result<Signals> {
        use tokio::signal::unix::{signal, SignalKind};
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let (hup, term, int, usr1, usr2) = {
            let _enter = rt.enter();
            (
                signal(SignalKind::hangup())?,
                signal(SignalKind::terminate())?,
                signal(SignalKind::interrupt())?,
                signal(SignalKind::user_defined1())?,
                signal(SignalKind::user_defined2())?,
            )
        };
        Ok(Signals {
            rt,
            hup,
            term,
            int,
            usr1,
            usr2,
        })
    }
}

/// The control socket's requests, and the flag that stops the control and metrics
/// threads once a new process has their listeners.
struct Control {
    requests: tokio::sync::mpsc::UnboundedReceiver<control::Request>,
    stop_listeners: Arc<std::sync::atomic::AtomicBool>,
}

fn signals(
    sig: Signals,
    common: Arc<Common>,
    path: Option<PathBuf>,
    ctx: upgrade::Context,
    mut drain_timeout: Duration,
    log_level: Option<LogLevelSetter>,
    mut control: Control,
) -> anyhow::Result<()> {
    let Signals {
        rt,
        mut hup,
        mut term,
        mut int,
        mut usr1,
        mut usr2,
    } = sig;
    let nonce_secret = ctx.nonce_secret;
    let ctx = Arc::new(ctx);
    rt.block_on(async move {
        // An upgrade runs on its own thread; its result comes back here, to everyone
        // who asked for it meanwhile.
        let (done_tx, mut done_rx) = tokio::sync::mpsc::unbounded_channel();
        let mut waiting: Vec<std::sync::mpsc::Sender<Result<String, String>>> = Vec::new();
        let mut upgrading = false;
        let mut handed_over = None;
        // systemd's watchdog: ping at half its interval while every worker is alive.
        let wd = notify::watchdog_interval();
        let mut watchdog =
            tokio::time::interval(wd.map_or(Duration::from_secs(3600), |d| (d / 2).max(Duration::from_millis(100))));
        // Memory back to the kernel after a wave of allocations ends.
        let mut trim = crate::sys::MemoryTrim::default();
        let mut trim_tick = tokio::time::interval(Duration::from_millis(500));
        let (mut entries, mut entries_ticks) = (0usize, 0u32);
        // The fd store's journal: within 100 ms of a request that may have changed an
        // allocation, and every second (usage counts).
        let mut journal_tick = tokio::time::interval(Duration::from_millis(100));
        let (mut journal_seen, mut journal_at) = (u64::MAX, tokio::time::Instant::now());
        loop {
            tokio::select! {
                // Not while an upgrade runs: its requests to the workers go first (and
                // the state is the new process's to write once it serves).
                _ = journal_tick.tick(), if common.fd_store.is_some() && !upgrading => {
                    let changes = common.shared.changes();
                    if changes != journal_seen || journal_at.elapsed() >= Duration::from_secs(1) {
                        if let Some(store) = &common.fd_store {
                            takeover::write_journal(store, &common, &ctx);
                        }
                        journal_seen = changes;
                        journal_at = tokio::time::Instant::now();
                    }
                }
                _ = trim_tick.tick() => {

                    if let Some(k) = &common.fast_path {
                        let mut k = k.lock().unwrap_or_else(|e| e.into_inner());
                        k.read_counters(&common.metrics);
                        // Counting walks the maps a key (a syscall) at a time: every
                        // reading while small, every 10 s above 4096 entries.
                        entries_ticks = entries_ticks.wrapping_add(1);
                        if entries <= 4096 || entries_ticks % 20 == 0 {
                            entries = k.entries();
                            common.metrics.set_kernel_entries(entries);
                        }
                    }
                    if trim.check(common.shared.total_allocations()) {
                        let released = crate::sys::release_free_memory();
                        tracing::debug!(released, "allocation wave ended: free memory returned to the kernel");
                    }
                }
                _ = hup.recv() => {
                    let _ = notify::reloading();
                    if let Some(t) = reload(&common, path.as_deref(), nonce_secret, log_level.as_ref()) {
                        drain_timeout = t;
                    }
                    let _ = notify::ready();
                }
                // systemd's RestartKillSignal=: keep everything in its fd store, exit.
                _ = usr1.recv() => {
                    match &common.fd_store {
                        None => tracing::warn!("SIGUSR1 (restart keeping calls) needs systemd's fd store (FileDescriptorStoreMax=, systemd >= 254); ignored"),
                        Some(store) if !upgrading => match upgrade::keep_for_restart(&common, &ctx, store) {
                            Ok(n) => {
                                tracing::info!(allocations = n, "restart: sockets and state are in systemd's fd store; exiting");
                                return Ok(());
                            }
                            Err(e) => tracing::error!(error = %e, "restart: cannot keep the state; going on serving"),
                        },
                        Some(_) => tracing::warn!("SIGUSR1 during an upgrade: ignored"),
                    }
                }
                _ = usr2.recv() => {
                    if !upgrading {
                        upgrading = true;
                        start_upgrade(&common, &ctx, done_tx.clone());
                    }
                }
                Some(req) = control.requests.recv() => {
                    waiting.push(req.reply);
                    if !upgrading {
                        upgrading = true;
                        start_upgrade(&common, &ctx, done_tx.clone());
                    }
                }
                Some(result) = done_rx.recv() => {
                    upgrading = false;
                    let answer = result.as_ref().map(|r: &upgrade::Report| serde_json::to_string(r).unwrap_or_default()).map_err(Clone::clone);
                    for w in waiting.drain(..) {
                        let _ = w.send(answer.clone());
                    }
                    if let Ok(report) = result {
                        control.stop_listeners.store(true, std::sync::atomic::Ordering::Release);
                        common.shared.retire();
                        handed_over = Some(report);
                        break;
                    }
                }
                _ = term.recv() => break,
                _ = int.recv() => break,
                _ = watchdog.tick() => {
                    if wd.is_some() && common.metrics.workers_alive(Duration::from_secs(5)) {
                        let _ = notify::watchdog();
                    }
                }
            }
        }
        // Drain: refuse new allocations, let the live ones run until they end or the
        // drain timeout passes, then exit. After an upgrade, the live ones are the TCP
        // and TLS clients' (the new process serves the rest and is the unit's main
        // process now: no STOPPING=1 from here).
        if let Some(r) = &handed_over {
            tracing::info!(
                pid = r.pid,
                allocations = r.allocations,
                pause_ms = r.pause_ms,
                kept = r.kept_stream_allocations,
                "upgraded: the new process serves; this one keeps its TCP/TLS clients until \
                 they end or the drain timeout passes"
            );
        } else {
            let _ = notify::stopping();
        }
        common.shared.set_draining(true);
        common.metrics.set_draining(true);
        let deadline = tokio::time::Instant::now() + drain_timeout;
        tracing::info!(
            allocations = common.shared.total_allocations(),
            timeout_secs = drain_timeout.as_secs(),
            "draining"
        );
        loop {
            let left = common.shared.total_allocations();
            if left == 0 {
                tracing::info!("drained: no allocation left; stopping");
                break;
            }
            if tokio::time::Instant::now() >= deadline {
                tracing::info!(allocations = left, "drain timeout passed; stopping");
                break;
            }
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_millis(200)) => {}
                _ = term.recv() => {
                    tracing::info!(allocations = left, "second SIGTERM: stopping now");
                    break;
                }
                _ = int.recv() => break,
                // Upgraded, then `systemctl restart`: the new process keeps its calls in
                // the fd store; this one must not hold up the restart.
                _ = usr1.recv(), if handed_over.is_some() => {
                    tracing::info!(allocations = left, "SIGUSR1 after an upgrade: stopping now");
                    break;
                }
            }
        }
        // The allocations still live end now, each writing its final usage record
        // (reason "shutdown"), kernel fast-path counts included: before the maps go.
        common.pool.begin_stop();
        let until = tokio::time::Instant::now() + STOP_WAIT;
        while !common.pool.all_stopped() && tokio::time::Instant::now() < until {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        if !common.pool.all_stopped() {
            tracing::warn!("stopping: not every worker wrote its usage records in time");
        }
        if let (Some(k), None) = (&common.fast_path, &handed_over) {
            k.lock().unwrap_or_else(|e| e.into_inner()).shutdown(&common.metrics);
            tracing::info!("kernel fast path detached and its maps emptied");
        }
        // Give workers a moment to flush logs.
        tokio::time::sleep(Duration::from_millis(20)).await;
        Ok(())
    })
}

/// Starts an upgrade on its own thread; its result goes to `done`.
fn start_upgrade(
    common: &Arc<Common>,
    ctx: &Arc<upgrade::Context>,
    done: tokio::sync::mpsc::UnboundedSender<Result<upgrade::Report, String>>,
) {
    let (common, ctx) = (common.clone(), ctx.clone());
    tracing::info!(binary = %ctx.exe.display(), "upgrade requested");
    let report = done.clone();
    let spawned = std::thread::Builder::new()
        .name("turnstone-upgrade".to_owned())
        .spawn(move || {
            let _ = report.send(upgrade::upgrade(&common, &ctx));
        });
    if let Err(e) = spawned {
        tracing::error!(error = %e, "upgrade: cannot start its thread");
        let _ = done.send(Err(format!("cannot start the upgrade's thread: {e}")));
    }
}

/// Changes the log filter at run time (`[log] level` on reload).
pub type LogLevelSetter = Box<dyn Fn(&str) -> Result<(), String> + Send + Sync>;

/// Reloads the configuration file; returns the new drain timeout on success. A file
/// that fails validation changes nothing and every problem is logged.
fn reload(
    common: &Common,
    path: Option<&std::path::Path>,
    nonce_secret: [u8; 32],
    log_level: Option<&LogLevelSetter>,
) -> Option<Duration> {
    let Some(path) = path else {
        tracing::warn!("SIGHUP: no configuration file to reload (started without --config)");
        return None;
    };
    match Config::load(path) {
        Ok(mut cfg) => {
            for w in cfg.warnings() {
                tracing::warn!(problem = %w, "configuration");
            }
            // The public address next ("auto"), then certificates: a reload whose
            // address cannot be found or whose certificate cannot be loaded changes
            // nothing.
            if let Err(e) = discover::resolve_external_addresses(&mut cfg) {
                tracing::error!(problem = %e, "reload refused; keeping the running configuration");
                common.metrics.reload(false);
                return None;
            }
            let tls = match load_tls(&cfg) {
                Ok(t) => t,
                Err(e) => {
                    tracing::error!(problem = %e, "reload refused; keeping the running configuration");
                    common.metrics.reload(false);
                    return None;
                }
            };
            if let Some(t) = tls {
                common
                    .cert_watch
                    .install(&common.tls, &common.metrics, t, "reload");
            }
            if cfg.relay.kernel_fast_path != KernelFastPath::Off && common.fast_path.is_none() {
                tracing::debug!("relay.kernel_fast_path: a reload does not load the kernel fast path; restart to use it");
            }
            let mut runtime = Runtime::from_config(&cfg, nonce_secret);
            runtime.kernel_fast_path =
                common.fast_path.is_some() && cfg.relay.kernel_fast_path != KernelFastPath::Off;
            common.shared.runtime.store(Arc::new(runtime));
            // Stream caps and timeouts: every worker takes them on its next tick. The
            // PROXY protocol settings stay those of the listeners bound at start (a
            // reload binds no listener): taken from the new file, a changed address would
            // leave a running proxy_protocol listener open to headerless connections.
            let mut limits = stream::StreamLimits::from_config(&cfg);
            if limits.proxy != common.stream_limits.proxy {
                tracing::warn!(
                    "listen: proxy_protocol and proxy_from changes take effect at restart, as \
                     listeners do; the running listeners keep theirs"
                );
            }
            limits.proxy = common.stream_limits.proxy.clone();
            common.conns.set_limits(limits);
            if let Some(set) = log_level {
                if std::env::var_os("RUST_LOG").is_none() {
                    if let Err(e) = set(&cfg.log.level) {
                        tracing::warn!(problem = %e, "log.level not applied");
                    }
                }
            }
            common.metrics.reload(true);
            tracing::info!(path = %path.display(), "configuration reloaded");
            Some(cfg.server.drain_timeout)
        }
        Err(errors) => {
            for e in &errors {
                tracing::error!(problem = %e, "reload refused; keeping the running configuration");
            }
            common.metrics.reload(false);
            None
        }
    }
}
