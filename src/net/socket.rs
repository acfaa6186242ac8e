//! Socket construction with socket2: listener sockets shared between workers with
//! `SO_REUSEPORT`, relay sockets on a given port, buffer sizes.

use std::io;
use std::net::{SocketAddr, UdpSocket};

use socket2::{Domain, Protocol, Socket, Type};

/// A non-blocking UDP listener socket; every worker binds its own on the same address.
/// `buffer` is asked for as receive and send buffer (the kernel may cap it).
pub fn udp_listener(addr: SocketAddr, buffer: usize) -> io::Result<UdpSocket> {
    let s = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP))?;
    if addr.is_ipv6() {
        s.set_only_v6(true)?;
    }
    s.set_reuse_address(true)?;
    s.set_reuse_port(true)?;
    s.set_nonblocking(true)?;
    let _ = s.set_recv_buffer_size(buffer);
    let _ = s.set_send_buffer_size(buffer);
    s.bind(&addr.into())?;
    Ok(s.into())
}

/// A non-blocking TCP listener; every worker binds its own on the same address and the
/// kernel spreads connections between them.
pub fn tcp_listener(addr: SocketAddr) -> io::Result<std::net::TcpListener> {
    let s = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    if addr.is_ipv6() {
        s.set_only_v6(true)?;
    }
    s.set_reuse_address(true)?;
    s.set_reuse_port(true)?;
    s.set_nonblocking(true)?;
    s.set_nodelay(true)?;
    s.bind(&addr.into())?;
    s.listen(1024)?;
    Ok(s.into())
}

/// A non-blocking UDP relay socket bound to `addr`, with buffers of `buffer` bytes.
pub fn udp_relay(addr: SocketAddr, buffer: usize) -> io::Result<UdpSocket> {
    let s = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP))?;
    if addr.is_ipv6() {
        s.set_only_v6(true)?;
    }
    s.set_nonblocking(true)?;
    let _ = s.set_recv_buffer_size(buffer);
    let _ = s.set_send_buffer_size(buffer);
    s.bind(&addr.into())?;
    Ok(s.into())
}

/// The buffer sizes the kernel granted (Linux reports twice what it allows for
/// bookkeeping, so halve it): (receive, send).
pub fn granted_buffers(sock: &UdpSocket) -> (usize, usize) {
    let s = socket2::SockRef::from(sock);
    (
        s.recv_buffer_size().unwrap_or(0) / 2,
        s.send_buffer_size().unwrap_or(0) / 2,
    )
}

/// A listening TCP relay socket for an RFC 6062 allocation. `SO_REUSEPORT` lets the
/// outgoing connections of Connect requests use the same relayed address.
pub fn tcp_relay_listener(addr: SocketAddr) -> io::Result<std::net::TcpListener> {
    let s = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    if addr.is_ipv6() {
        s.set_only_v6(true)?;
    }
    s.set_reuse_address(true)?;
    s.set_reuse_port(true)?;
    s.set_nonblocking(true)?;
    s.bind(&addr.into())?;
    s.listen(16)?;
    Ok(s.into())
}

/// Starts a non-blocking TCP connection from the relayed address `local` to `peer`
/// (RFC 6062 section 5.2); completion shows as writability.
pub fn tcp_connect_from(local: SocketAddr, peer: SocketAddr) -> io::Result<std::net::TcpStream> {
    let s = Socket::new(
        Domain::for_address(local),
        Type::STREAM,
        Some(Protocol::TCP),
    )?;
    if local.is_ipv6() {
        s.set_only_v6(true)?;
    }
    s.set_reuse_address(true)?;
    s.set_reuse_port(true)?;
    s.set_nonblocking(true)?;
    s.set_nodelay(true)?;
    s.bind(&local.into())?;
    match s.connect(&peer.into()) {
        Ok(()) => {}
        Err(e) if e.raw_os_error() == Some(nix::libc::EINPROGRESS) => {}
        Err(e) => return Err(e),
    }
    Ok(s.into())
}

/// Raises the soft limit on open files to the hard limit and returns the limit now in
/// force. Every allocation holds a relay socket (two while an EVEN-PORT reservation
/// waits), so the usual soft default of 1,024 would stop a server near 1,000 allocations
/// whatever `limits.max_allocations` says; coturn raises it the same way.
pub fn raise_open_file_limit() -> std::io::Result<u64> {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE)?;
    if soft < hard {
        setrlimit(Resource::RLIMIT_NOFILE, hard, hard)?;
    }
    Ok(soft.max(hard))
}
