//! The floor forwarder: the least a userspace relay can do on this kernel. One socket
//! toward the client (bound to the listen address), one toward the peer (connected to
//! it); no TURN, no table: a datagram from the client goes to the peer, a datagram from
//! the peer goes back to the last client address seen. One packet per system call
//! (`recvfrom`/`sendto`), epoll (mio, edge-triggered; the two directions served
//! alternately, up to 32 datagrams at a time, each until EAGAIN), one thread.

use std::io;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use mio::net::UdpSocket;
use mio::{Events, Interest, Poll, Token};

use crate::util::{udp_socket, BIG_BUFFER};

const CLIENT: Token = Token(0);
const PEER: Token = Token(1);

pub fn run(listen: SocketAddr, peer: SocketAddr, max_secs: u64) -> io::Result<()> {
    let client_std = udp_socket(listen, BIG_BUFFER)?;
    client_std.set_nonblocking(true)?;
    // Unspecified address: the route to the peer picks the source (127.0.0.1 on loopback,
    // the peer-side address in the netns rig).
    let unspec: std::net::IpAddr = if peer.is_ipv4() {
        std::net::Ipv4Addr::UNSPECIFIED.into()
    } else {
        std::net::Ipv6Addr::UNSPECIFIED.into()
    };
    let peer_std = udp_socket(SocketAddr::new(unspec, 0), BIG_BUFFER)?;
    peer_std.connect(peer)?;
    peer_std.set_nonblocking(true)?;
    let mut client_sock = UdpSocket::from_std(client_std);
    let mut peer_sock = UdpSocket::from_std(peer_std);

    let mut poll = Poll::new()?;
    poll.registry()
        .register(&mut client_sock, CLIENT, Interest::READABLE)?;
    poll.registry()
        .register(&mut peer_sock, PEER, Interest::READABLE)?;
    let mut events = Events::with_capacity(64);
    let mut buf = vec![0u8; 65536];
    let mut last_client: Option<SocketAddr> = None;
    let (mut to_peer, mut to_client, mut dropped) = (0u64, 0u64, 0u64);
    let deadline = Instant::now() + Duration::from_secs(max_secs);
    eprintln!("floor: forwarding {listen} <-> {peer} (at most {max_secs} s)");

    // Edge-triggered: a socket stays "ready" until it returns EAGAIN. Both directions are
    // served alternately, at most BATCH datagrams at a time, so that a busy client side
    // cannot starve the peer side (and the reverse).
    const BATCH: usize = 32;
    let (mut client_ready, mut peer_ready) = (false, false);
    while Instant::now() < deadline {
        if !client_ready && !peer_ready {
            match poll.poll(&mut events, Some(Duration::from_millis(200))) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            }
            for ev in events.iter() {
                match ev.token() {
                    CLIENT => client_ready = true,
                    PEER => peer_ready = true,
                    _ => {}
                }
            }
        }
        if client_ready {
            for _ in 0..BATCH {
                match client_sock.recv_from(&mut buf) {
                    Ok((n, from)) => {
                        last_client = Some(from);
                        match peer_sock.send(buf.get(..n).unwrap_or_default()) {
                            Ok(_) => to_peer += 1,
                            Err(_) => dropped += 1,
                        }
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                        client_ready = false;
                        break;
                    }
                    Err(_) => {} // e.g. ECONNREFUSED reported on the socket: go on
                }
            }
        }
        if peer_ready {
            for _ in 0..BATCH {
                match peer_sock.recv(&mut buf) {
                    Ok(n) => match last_client {
                        Some(c) => match client_sock.send_to(buf.get(..n).unwrap_or_default(), c) {
                            Ok(_) => to_client += 1,
                            Err(_) => dropped += 1,
                        },
                        None => dropped += 1,
                    },
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                        peer_ready = false;
                        break;
                    }
                    Err(_) => {}
                }
            }
        }
    }
    eprintln!("floor: to_peer={to_peer} to_client={to_client} dropped={dropped}");
    Ok(())
}
