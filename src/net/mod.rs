//! The tokio shell: it binds sockets, moves bytes between them and the sans-I/O core,
//! and handles signals. It holds no protocol logic.
//!
//! One worker thread per core, each with its own current-thread runtime, its own
//! `SO_REUSEPORT` socket per UDP listen address, its own [`Server`] core and the relay
//! sockets of the allocations the kernel's hash sends to it. Nothing is shared between
//! workers on the relay path.

mod batch;
mod ports;
mod socket;
pub mod stream;
pub mod tls;
mod worker;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;

use arc_swap::ArcSwapOption;

use crate::config::{Config, ListenTransport};
use crate::server::{Runtime, Shared, Transport};
pub use ports::PortPool;

/// How the process was started: the config and where it came from (for reload).
pub struct Launch {
    pub config: Config,
    pub path: Option<PathBuf>,
}

/// What every worker shares with the others and with the main thread.
pub(crate) struct Common {
    pub shared: Arc<Shared>,
    pub ports: PortPool,
    /// Socket buffer size for relay sockets.
    pub buffer: usize,
    /// The TLS configuration for `tls` listeners, swapped whole on reload.
    pub tls: ArcSwapOption<rustls::ServerConfig>,
    pub conns: Arc<stream::ConnCounter>,
    pub stream_limits: stream::StreamLimits,
}

/// One worker's own listener sockets.
pub(crate) struct WorkerSockets {
    pub udp: Vec<std::net::UdpSocket>,
    pub streams: Vec<(std::net::TcpListener, Transport)>,
}

fn load_tls(config: &Config) -> anyhow::Result<Option<Arc<rustls::ServerConfig>>> {
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
    tls::server_config(cert, key)
        .map(Some)
        .map_err(|e| anyhow::anyhow!("tls: {e}"))
}

/// Runs the server until SIGTERM or SIGINT.
pub fn run(launch: Launch) -> anyhow::Result<()> {
    let config = launch.config;
    let nonce_secret: [u8; 32] = rand::random();
    let shared = Shared::new(Runtime::from_config(&config, nonce_secret));
    let tls_config = load_tls(&config)?;
    let common = Arc::new(Common {
        shared: shared.clone(),
        ports: PortPool::new(
            &config.relay.addresses,
            config.relay.port_min,
            config.relay.port_max,
        ),
        buffer: config.relay.socket_buffer,
        tls: ArcSwapOption::new(tls_config),
        conns: Arc::new(stream::ConnCounter::new()),
        stream_limits: stream::StreamLimits::default(),
    });
    let workers = match config.server.workers {
        0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
        n => n,
    };

    // Bind every worker's sockets before announcing readiness, so a bad address is a
    // start-up error.
    let mut sockets = Vec::with_capacity(workers);
    for worker in 0..workers {
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
                // TCP and TLS clients are served by worker 0 alone: an RFC 6062 data
                // connection must reach the worker that holds its allocation.
                ListenTransport::Tcp | ListenTransport::Tls if worker > 0 => {}
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
    for l in &config.listen {
        tracing::info!(address = %l.address, transport = ?l.transport, workers, "listening");
    }
    signals(common, launch.path, nonce_secret)
}

/// The main thread waits for signals: SIGHUP reloads, SIGTERM/SIGINT stop.
fn signals(
    common: Arc<Common>,
    path: Option<PathBuf>,
    nonce_secret: [u8; 32],
) -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async move {
        use tokio::signal::unix::{signal, SignalKind};
        let mut hup = signal(SignalKind::hangup())?;
        let mut term = signal(SignalKind::terminate())?;
        let mut int = signal(SignalKind::interrupt())?;
        loop {
            tokio::select! {
                _ = hup.recv() => reload(&common, path.as_deref(), nonce_secret),
                _ = term.recv() => break,
                _ = int.recv() => break,
            }
        }
        tracing::info!(allocations = common.shared.total_allocations(), "stopping");
        // Give workers a moment to flush logs.
        tokio::time::sleep(Duration::from_millis(10)).await;
        Ok(())
    })
}

fn reload(common: &Common, path: Option<&std::path::Path>, nonce_secret: [u8; 32]) {
    let Some(path) = path else {
        tracing::warn!("SIGHUP: no configuration file to reload (started without --config)");
        return;
    };
    match Config::load(path) {
        Ok(cfg) => {
            // Certificates first: a reload whose certificate cannot be loaded changes
            // nothing.
            let tls = match load_tls(&cfg) {
                Ok(t) => t,
                Err(e) => {
                    tracing::error!(problem = %e, "reload refused; keeping the running configuration");
                    return;
                }
            };
            if let Some(t) = tls {
                common.tls.store(Some(t));
            }
            common
                .shared
                .runtime
                .store(Arc::new(Runtime::from_config(&cfg, nonce_secret)));
            tracing::info!(path = %path.display(), "configuration reloaded");
        }
        Err(errors) => {
            for e in &errors {
                tracing::error!(problem = %e, "reload refused; keeping the running configuration");
            }
        }
    }
}
