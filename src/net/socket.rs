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
