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

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;

use crate::config::{Config, ListenTransport};
use crate::server::{Runtime, Shared};
pub use ports::PortPool;

/// How the process was started: the config and where it came from (for reload).
pub struct Launch {
    pub config: Config,
    pub path: Option<PathBuf>,
}

/// Runs the server until SIGTERM or SIGINT.
pub fn run(launch: Launch) -> anyhow::Result<()> {
    let config = launch.config;
    let nonce_secret: [u8; 32] = rand::random();
    let shared = Shared::new(Runtime::from_config(&config, nonce_secret));
    let ports = Arc::new(PortPool::new(
        &config.relay.addresses,
        config.relay.port_min,
        config.relay.port_max,
    ));
    let udp_listens: Vec<SocketAddr> = config
        .listen
        .iter()
        .filter(|l| matches!(l.transport, ListenTransport::Udp))
        .map(|l| l.address)
        .collect();
    if udp_listens.is_empty() {
        anyhow::bail!(
            "listen: no UDP listener configured (TCP and TLS listeners are not implemented yet)"
        );
    }
    for l in &config.listen {
        if !matches!(l.transport, ListenTransport::Udp) {
            tracing::warn!(address = %l.address, "TCP and TLS listeners are not implemented yet; ignoring");
        }
    }
    let workers = match config.server.workers {
        0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
        n => n,
    };

    // Bind every worker's sockets before announcing readiness, so a bad address is a
    // start-up error.
    let mut sockets = Vec::with_capacity(workers);
    for _ in 0..workers {
        let mut per_worker = Vec::new();
        for addr in &udp_listens {
            let s = socket::udp_listener(*addr, config.relay.socket_buffer)
                .with_context(|| format!("listen: cannot bind UDP {addr}"))?;
            per_worker.push(s);
        }
        sockets.push(per_worker);
    }
    if let Some(first) = sockets.first().and_then(|w| w.first()) {
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
    let buffer = config.relay.socket_buffer;
    let mut handles = Vec::new();
    for (i, socks) in sockets.into_iter().enumerate() {
        let shared = shared.clone();
        let ports = ports.clone();
        let h = std::thread::Builder::new()
            .name(format!("turnstone-w{i}"))
            .spawn(move || worker::run(i, shared, ports, socks, buffer))?;
        handles.push(h);
    }
    for addr in &udp_listens {
        tracing::info!(%addr, workers, "listening (udp)");
    }
    signals(shared, launch.path, nonce_secret)
}

/// The main thread waits for signals: SIGHUP reloads, SIGTERM/SIGINT stop.
fn signals(
    shared: Arc<Shared>,
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
                _ = hup.recv() => reload(&shared, path.as_deref(), nonce_secret),
                _ = term.recv() => break,
                _ = int.recv() => break,
            }
        }
        tracing::info!(allocations = shared.total_allocations(), "stopping");
        // Give workers a moment to flush logs.
        tokio::time::sleep(Duration::from_millis(10)).await;
        Ok(())
    })
}

fn reload(shared: &Shared, path: Option<&std::path::Path>, nonce_secret: [u8; 32]) {
    let Some(path) = path else {
        tracing::warn!("SIGHUP: no configuration file to reload (started without --config)");
        return;
    };
    match Config::load(path) {
        Ok(cfg) => {
            shared
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
