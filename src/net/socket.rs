//! Socket construction with socket2: listener sockets shared between workers with
//! `SO_REUSEPORT`, relay sockets on a given port, buffer sizes.

use std::io;
use std::net::{SocketAddr, UdpSocket};

use socket2::{Domain, Protocol, Socket, Type};

/// Socket buffer size asked for on listeners (the kernel caps it at net.core.rmem_max).
pub const LISTENER_BUFFER: usize = 4 << 20;

/// A non-blocking UDP listener socket; every worker binds its own on the same address.
pub fn udp_listener(addr: SocketAddr) -> io::Result<UdpSocket> {
    let s = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP))?;
    if addr.is_ipv6() {
        s.set_only_v6(true)?;
    }
    s.set_reuse_address(true)?;
    s.set_reuse_port(true)?;
    s.set_nonblocking(true)?;
    let _ = s.set_recv_buffer_size(LISTENER_BUFFER);
    let _ = s.set_send_buffer_size(LISTENER_BUFFER);
    s.bind(&addr.into())?;
    Ok(s.into())
}

/// A non-blocking UDP relay socket bound to `addr`.
pub fn udp_relay(addr: SocketAddr) -> io::Result<UdpSocket> {
    let s = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP))?;
    if addr.is_ipv6() {
        s.set_only_v6(true)?;
    }
    s.set_nonblocking(true)?;
    s.bind(&addr.into())?;
    Ok(s.into())
}
