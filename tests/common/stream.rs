//! TCP and TLS connections carrying STUN/ChannelData frames (RFC 8656 12.5 framing).

use std::io::Read;
use std::net::{IpAddr, SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use super::server::TestCert;

/// Read/write timeout of the stream clients below.
pub const STREAM_TIMEOUT: Duration = Duration::from_secs(5);

/// A TCP connection to `server`, from `source` (an IP of this host, e.g. 127.0.0.2)
/// if given; read/write timeouts of [`STREAM_TIMEOUT`].
pub fn tcp_connect_from(source: Option<IpAddr>, server: SocketAddr) -> std::io::Result<TcpStream> {
    let domain = socket2::Domain::for_address(server);
    let s = socket2::Socket::new(domain, socket2::Type::STREAM, Some(socket2::Protocol::TCP))?;
    if let Some(ip) = source {
        s.bind(&SocketAddr::new(ip, 0).into())?;
    }
    s.connect_timeout(&server.into(), STREAM_TIMEOUT)?;
    let t: TcpStream = s.into();
    t.set_read_timeout(Some(STREAM_TIMEOUT))?;
    t.set_write_timeout(Some(STREAM_TIMEOUT))?;
    t.set_nodelay(true)?;
    Ok(t)
}

/// A rustls client configuration (ring) that trusts only `cert`, offers `versions`
/// and the ALPN protocols `alpn` (none if empty).
pub fn tls_client_config(
    cert: &TestCert,
    versions: &[&'static rustls::SupportedProtocolVersion],
    alpn: &[&[u8]],
) -> std::sync::Arc<rustls::ClientConfig> {
    tls_client_config_trusting(&[cert], versions, alpn)
}

/// [`tls_client_config`] trusting each of `certs`.
pub fn tls_client_config_trusting(
    certs: &[&TestCert],
    versions: &[&'static rustls::SupportedProtocolVersion],
    alpn: &[&[u8]],
) -> std::sync::Arc<rustls::ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in certs {
        roots
            .add(rustls::pki_types::CertificateDer::from(
                cert.cert_der.clone(),
            ))
            .expect("trust the test certificate");
    }
    let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
    let mut cfg = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(versions)
        .expect("TLS versions")
        .with_root_certificates(roots)
        .with_no_client_auth();
    cfg.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    std::sync::Arc::new(cfg)
}

/// A TLS client stream.
pub type TlsStream = rustls::StreamOwned<rustls::ClientConnection, TcpStream>;

/// Connects to `server` over TLS (server name `name`, e.g. "localhost") and completes
/// the handshake.
pub fn tls_connect(
    server: SocketAddr,
    name: &str,
    cfg: std::sync::Arc<rustls::ClientConfig>,
) -> Result<TlsStream, String> {
    let tcp =
        tcp_connect_from(None, server).map_err(|e| format!("TCP connect to {server}: {e}"))?;
    tls_handshake(tcp, name, cfg)
}

/// Completes a TLS handshake (server name `name`) on the connection `tcp`, for example
/// after a PROXY protocol header written on it.
pub fn tls_handshake(
    mut tcp: TcpStream,
    name: &str,
    cfg: std::sync::Arc<rustls::ClientConfig>,
) -> Result<TlsStream, String> {
    let server = tcp
        .peer_addr()
        .map_err(|e| format!("TLS: not connected: {e}"))?;
    let sni = rustls::pki_types::ServerName::try_from(name.to_string())
        .map_err(|e| format!("server name {name}: {e}"))?;
    let mut conn = rustls::ClientConnection::new(cfg, sni).map_err(|e| e.to_string())?;
    let deadline = Instant::now() + STREAM_TIMEOUT;
    while conn.is_handshaking() {
        if Instant::now() >= deadline {
            return Err(format!(
                "TLS handshake with {server} not done in {STREAM_TIMEOUT:?}"
            ));
        }
        conn.complete_io(&mut tcp)
            .map_err(|e| format!("TLS handshake with {server}: {e}"))?;
    }
    Ok(rustls::StreamOwned::new(conn, tcp))
}

/// A TCP or TLS connection carrying STUN/ChannelData frames.
pub enum Stream {
    Tcp(TcpStream),
    Tls(Box<TlsStream>),
}

impl Stream {
    pub fn tcp(&self) -> &TcpStream {
        match self {
            Stream::Tcp(t) => t,
            Stream::Tls(t) => &t.sock,
        }
    }
}

impl Read for Stream {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        match self {
            Stream::Tcp(t) => t.read(buf),
            Stream::Tls(t) => t.read(buf),
        }
    }
}

impl std::io::Write for Stream {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        match self {
            Stream::Tcp(t) => t.write(buf),
            Stream::Tls(t) => t.write(buf),
        }
    }
    fn flush(&mut self) -> std::io::Result<()> {
        match self {
            Stream::Tcp(t) => t.flush(),
            Stream::Tls(t) => t.flush(),
        }
    }
}

/// The length of the frame that starts with `head` (at least 4 bytes): (the frame
/// without padding, with padding). STUN: 20 + length; ChannelData: 4 + length, padded
/// to a multiple of 4 on streams.
pub fn frame_len(head: &[u8]) -> (usize, usize) {
    let len = usize::from(u16::from_be_bytes([head[2], head[3]]));
    if head[0] < 0x40 {
        (20 + len, 20 + len)
    } else {
        (4 + len, 4 + len.div_ceil(4) * 4)
    }
}

/// Reads one frame from a stream: a STUN message (20 + length) or a ChannelData
/// message (4 + length, plus the padding to 4 bytes, which is stripped).
pub fn read_frame(r: &mut impl Read) -> std::io::Result<Vec<u8>> {
    let mut frame = vec![0u8; 4];
    r.read_exact(&mut frame)?;
    let (body, padded) = frame_len(&frame);
    frame.resize(padded, 0);
    r.read_exact(&mut frame[4..])?;
    frame.truncate(body);
    Ok(frame)
}
