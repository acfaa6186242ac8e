//! The tokio shell: it binds sockets, moves bytes between them and the sans-I/O core,
//! and handles signals. It holds no protocol logic.
//!
//! One worker thread per core, each with its own current-thread runtime, its own
//! `SO_REUSEPORT` socket per UDP listen address, its own [`Server`] core and the relay
//! sockets of the allocations the kernel's hash sends to it. Nothing is shared between
//! workers on the relay path.

mod batch;
mod cert_watch;
pub mod discover;
pub mod fastpath;
mod ports;
mod socket;
pub mod stream;
pub mod tls;
mod worker;

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

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
}

/// Loads the kernel fast path as `relay.kernel_fast_path` asks: `None` when off or
/// ("auto") when it cannot be had; an error when "required" and it cannot. Logs one line
/// saying which path is active where, or why the kernel's is not.
fn load_fast_path(config: &Config) -> anyhow::Result<Option<fastpath::Kernel>> {
    let mode = config.relay.kernel_fast_path;
    if mode == KernelFastPath::Off {
        tracing::info!("kernel fast path off (relay.kernel_fast_path = \"off\")");
        return Ok(None);
    }
    match fastpath::Kernel::load(config) {
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
    let nonce_secret: [u8; 32] = rand::random();
    // Loaded (and so its maps empty: the core's Clear) before any worker serves.
    let kernel = load_fast_path(&config)?;
    let mut runtime = Runtime::from_config(&config, nonce_secret);
    runtime.kernel_fast_path = kernel.is_some();
    let shared = Shared::new(runtime);
    let tls_config = load_tls(&config)?;
    let workers = match config.server.workers {
        0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
        n => n,
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
        stream_limits: stream::StreamLimits::from_config(&config),
        metrics: metrics.clone(),
        pool: worker::Pool::new(workers, config.server.adaptive_workers)?,
        fast_path: kernel.map(Mutex::new),
    });

    if let Some(loaded) = tls_config {
        common
            .cert_watch
            .install(&common.tls, &metrics, loaded, "start");
        cert_watch::spawn(common.clone()).context("cannot start the certificate watcher")?;
    }

    // Bind every worker's sockets before announcing readiness, so a bad address is a
    // start-up error.
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
    for (i, socks) in sockets.into_iter().enumerate() {
        let common = common.clone();
        std::thread::Builder::new()
            .name(format!("turnstone-w{i}"))
            .spawn(move || worker::run(i, common, socks))?;
    }
    if let Some(addr) = config.metrics.listen {
        let m = metrics.clone();
        let health: crate::metrics::Health =
            Arc::new(move || m.workers_alive(Duration::from_secs(5)) && !m.is_draining());
        crate::metrics::serve(addr, metrics.clone(), health)
            .with_context(|| format!("metrics.listen: cannot bind {addr}"))?;
        tracing::info!(%addr, "metrics on http://{addr}/metrics and /health");
    }
    if let Some(url) = &config.store.url {
        crate::store::start(
            &crate::store::Target::node(url, config.store.ca_file.as_deref()),
            crate::store::node_id(&config),
            crate::store::advertise(&config),
            shared.clone(),
            metrics.clone(),
        )?;
    }
    for l in &config.listen {
        tracing::info!(address = %l.address, transport = ?l.transport, workers, "listening");
    }
    if let Err(e) = notify::ready() {
        tracing::warn!(error = %e, "cannot notify systemd (NOTIFY_SOCKET)");
    }
    signals(
        sig,
        common,
        launch.path,
        nonce_secret,
        config.server.drain_timeout,
        launch.log_level,
    )
}

/// The main thread waits for signals: SIGHUP reloads, SIGTERM/SIGINT stop.
/// The signal handlers, installed before any worker starts or systemd hears READY=1, so
/// an early SIGHUP or SIGTERM is never taken with its default (fatal) action.
pub(crate) struct Signals {
    rt: tokio::runtime::Runtime,
    hup: tokio::signal::unix::Signal,
    term: tokio::signal::unix::Signal,
    int: tokio::signal::unix::Signal,
}

impl Signals {
    fn install() -> anyhow::Result<Signals> {
        use tokio::signal::unix::{signal, SignalKind};
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let (hup, term, int) = {
            let _enter = rt.enter();
            (
                signal(SignalKind::hangup())?,
                signal(SignalKind::terminate())?,
                signal(SignalKind::interrupt())?,
            )
        };
        Ok(Signals { rt, hup, term, int })
    }
}

fn signals(
    sig: Signals,
    common: Arc<Common>,
    path: Option<PathBuf>,
    nonce_secret: [u8; 32],
    mut drain_timeout: Duration,
    log_level: Option<LogLevelSetter>,
) -> anyhow::Result<()> {
    let Signals {
        rt,
        mut hup,
        mut term,
        mut int,
    } = sig;
    rt.block_on(async move {
        // systemd's watchdog: ping at half its interval while every worker is alive.
        let wd = notify::watchdog_interval();
        let mut watchdog =
            tokio::time::interval(wd.map_or(Duration::from_secs(3600), |d| (d / 2).max(Duration::from_millis(100))));
        // Memory back to the kernel after a wave of allocations ends.
        let mut trim = crate::sys::MemoryTrim::default();
        let mut trim_tick = tokio::time::interval(Duration::from_millis(500));
        let (mut entries, mut entries_ticks) = (0usize, 0u32);
        loop {
            tokio::select! {
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
        // drain timeout passes, then exit.
        let _ = notify::stopping();
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
        if let Some(k) = &common.fast_path {
            k.lock().unwrap_or_else(|e| e.into_inner()).shutdown(&common.metrics);
            tracing::info!("kernel fast path detached and its maps emptied");
        }
        // Give workers a moment to flush logs.
        tokio::time::sleep(Duration::from_millis(20)).await;
        Ok(())
    })
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
