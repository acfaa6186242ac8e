//! The new process's side of taking calls over: the state an upgrade's old process
//! hands over ([`receive`]) or systemd's fd store kept across a restart or crash
//! ([`restore`]), checked against this configuration, and the journal that keeps the
//! store's copy of the state current ([`keep_in_store`], [`write_journal`]).

use std::os::fd::AsFd;
use std::time::Duration;

use super::{fdstore, handover, upgrade, worker, Common, WorkerSockets};
use crate::config::{Config, ListenTransport};
use crate::server::Transport;

/// The configuration's listeners and the state's, as (transport, address) lists.
type Listeners = Vec<(String, std::net::SocketAddr)>;

fn listeners(config: &Config, state: &handover::Handover) -> (Listeners, Listeners) {
    let ours = config
        .listen
        .iter()
        .map(|l| (l.transport.as_str().to_owned(), l.address))
        .collect();
    let theirs = state
        .listeners
        .iter()
        .map(|l| (l.transport.clone(), l.address))
        .collect();
    (ours, theirs)
}

/// The state an upgrade's old process handed over (or the fd store kept), checked
/// against this configuration, with its sockets by number.
pub(super) struct Taken {
    pub(super) state: handover::Handover,
    pub(super) fds: Vec<Option<std::os::fd::OwnedFd>>,
}

/// Says hello to the old process and receives its state; refuses a state whose
/// listeners are not those of this configuration (an upgrade keeps the listening
/// sockets: a change of `[[listen]]` needs a restart).
pub(super) fn receive(ch: &handover::Channel, config: &Config) -> anyhow::Result<Taken> {
    ch.hello(&handover::Hello {
        pid: std::process::id(),
        reads: handover::READS.to_vec(),
        version: env!("CARGO_PKG_VERSION").to_owned(),
    })
    .map_err(anyhow::Error::msg)?;
    ch.set_timeout(Duration::from_secs(60))
        .map_err(anyhow::Error::msg)?;
    let (state, fds) = ch.recv_state().map_err(anyhow::Error::msg)?;
    let (ours, theirs) = listeners(config, &state);
    if ours != theirs {
        anyhow::bail!(
            "listen: the configuration's listeners {ours:?} are not the running server's \
             {theirs:?}; an upgrade keeps the listening sockets, so changing [[listen]] \
             needs a restart"
        );
    }
    if config.server.workers != 0 && config.server.workers != state.workers {
        tracing::warn!(
            configured = config.server.workers,
            running = state.workers,
            "server.workers: an upgrade keeps the running number of workers (each has its \
             own listening sockets); restart to change it"
        );
    }
    tracing::info!(
        from = state.from_pid,
        workers = state.workers,
        descriptors = state.fds,
        "upgrade: state received"
    );
    Ok(Taken {
        state,
        fds: fds.into_iter().map(Some).collect(),
    })
}

/// The state systemd's fd store kept across a restart or a crash, checked against this
/// configuration: allocations whose relay sockets are no longer there (they ended
/// after the journal was written) are left out, stored relay sockets no allocation
/// names (made after it) are closed and removed from the store. `None` (and the store
/// emptied of what is unusable) when there is no usable state or the listeners changed.
pub(super) fn restore(
    config: &Config,
    mut r: fdstore::Restored,
    state: fdstore::StoredState,
    store: Option<&fdstore::FdStore>,
) -> Option<Taken> {
    let mut state = match state {
        Ok((seq, h)) => {
            if let Some(s) = store {
                s.continue_from(seq);
            }
            h
        }
        Err(e) => {
            tracing::warn!(error = %e, "fd store: no usable state; starting afresh");
            fdstore::forget_rest(r, store, &Default::default());
            return None;
        }
    };
    let (ours, theirs) = listeners(config, &state);
    let mut fds: Vec<Option<std::os::fd::OwnedFd>> = (0..state.fds as usize)
        .map(|i| state.fd_names.get(i).and_then(|n| r.take(n)))
        .collect();
    let listeners_whole = state.listeners.iter().all(|l| {
        l.sockets
            .iter()
            .all(|&i| fds.get(i as usize).is_some_and(Option::is_some))
    });
    if ours != theirs || !listeners_whole {
        tracing::warn!(
            configured = ?ours,
            stored = ?theirs,
            "fd store: the stored listeners are not this configuration's (or not all \
             there); the allocations kept there are dropped"
        );
        for (i, fd) in fds.into_iter().enumerate() {
            if let (Some(_), Some(name), Some(s)) = (fd, state.fd_names.get(i), store) {
                s.remove(name);
            }
        }
        fdstore::forget_rest(r, store, &Default::default());
        return None;
    }
    let mut dropped = 0;
    for sh in &mut state.shards {
        let before = sh.allocations.len();
        sh.allocations.retain(|a| {
            a.relays()
                .all(|x| fds.get(x.socket as usize).is_some_and(Option::is_some))
        });
        sh.reservations
            .retain(|x| fds.get(x.socket as usize).is_some_and(Option::is_some));
        dropped += before - sh.allocations.len();
    }
    // Sockets of what was left out: closed, and out of the store.
    let used: std::collections::HashSet<u32> = state
        .shards
        .iter()
        .flat_map(crate::server::ShardState::sockets)
        .chain(
            state
                .listeners
                .iter()
                .flat_map(|l| l.sockets.iter().copied()),
        )
        // The control socket is bound again: its path went with the runtime directory.
        .chain(state.metrics)
        .collect();
    state.control = None;
    for (i, fd) in fds.iter_mut().enumerate() {
        if !used.contains(&(i as u32)) && fd.take().is_some() {
            if let (Some(name), Some(s)) = (state.fd_names.get(i), store) {
                s.remove(name);
            }
        }
    }
    let in_use: std::collections::HashSet<String> = fds
        .iter()
        .enumerate()
        .filter(|(_, fd)| fd.is_some())
        .filter_map(|(i, _)| state.fd_names.get(i).cloned())
        .collect();
    fdstore::forget_rest(r, store, &in_use);
    let kept: usize = state.shards.iter().map(|s| s.allocations.len()).sum();
    tracing::info!(
        allocations = kept,
        dropped,
        "fd store: restored the allocations kept across the restart"
    );
    Some(Taken { state, fds })
}

/// Puts the listeners, the metrics and control listeners and the journals in systemd's
/// fd store (the relay sockets go there as they are made), and writes the first state.
pub(super) fn keep_in_store(store: &fdstore::FdStore, common: &Common, ctx: &upgrade::Context) {
    store.add_journals();
    if let Some(l) = &ctx.metrics {
        store.add("metrics", l.as_fd());
    }
    if let Some(l) = &ctx.control {
        store.add("control", l.as_fd());
    }
    write_journal(store, common, ctx);
    tracing::info!("fd store: sockets and state kept by systemd across restarts and crashes");
}

/// Writes the workers' current state to the fd store's journal.
pub(super) fn write_journal(store: &fdstore::FdStore, common: &Common, ctx: &upgrade::Context) {
    let exports = match common
        .pool
        .upgrade(worker::UpgradeStep::Snapshot, Duration::from_secs(5))
    {
        Ok(e) => e,
        Err(e) => {
            tracing::warn!(error = %e, "fd store: no snapshot of the workers");
            return;
        }
    };
    match upgrade::build_state(ctx, &exports) {
        Ok((h, _)) => {
            if let Err(e) = store.write_state(&h) {
                tracing::warn!(error = %e, "fd store: cannot write the state journal");
            }
        }
        Err(e) => tracing::warn!(error = %e, "fd store: cannot build the state"),
    }
}

/// Every worker's listeners as the old process handed them over (same order as the
/// configuration, checked by [`receive`]).
pub(super) fn inherited_sockets(
    config: &Config,
    t: &mut Taken,
) -> anyhow::Result<Vec<WorkerSockets>> {
    let mut sockets = Vec::with_capacity(t.state.workers);
    for w in 0..t.state.workers {
        let mut ws = WorkerSockets {
            udp: Vec::new(),
            streams: Vec::new(),
        };
        for (l, st) in config.listen.iter().zip(&t.state.listeners) {
            let fd = st
                .sockets
                .get(w)
                .and_then(|&i| t.fds.get_mut(i as usize)?.take())
                .ok_or_else(|| {
                    anyhow::anyhow!("upgrade: listener {} of worker {w} missing", l.address)
                })?;
            match l.transport {
                ListenTransport::Udp => ws.udp.push(std::net::UdpSocket::from(fd)),
                ListenTransport::Tcp => ws
                    .streams
                    .push((std::net::TcpListener::from(fd), Transport::Tcp)),
                ListenTransport::Tls => ws
                    .streams
                    .push((std::net::TcpListener::from(fd), Transport::Tls)),
            }
        }
        sockets.push(ws);
    }
    Ok(sockets)
}
