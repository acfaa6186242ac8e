//! ChannelData messages (RFC 8656 12.4) and demultiplexing by first byte (RFC 7983,
//! RFC 8656 12).

/// Length of the ChannelData header: channel number, length (RFC 8656 12.4).
pub const CHANNEL_DATA_HEADER: usize = 4;

/// First byte 0..=3 (top two bits zero) is STUN (RFC 7983 7, RFC 8489 5).
#[inline]
pub const fn is_stun(first_byte: u8) -> bool {
    first_byte < 0x40
}

/// First byte 0x40..=0x7F is ChannelData (RFC 7983 7 / RFC 8656 12). RFC 8656 12 only
/// allocates channels 0x4000-0x4FFF; 0x5000-0x7FFF (allowed by RFC 5766 11, and used by
/// coturn's uclient) are still parsed as ChannelData and the core decides.
#[inline]
pub const fn is_channel_data(first_byte: u8) -> bool {
    first_byte >= 0x40 && first_byte <= 0x7F
}

/// Parses a ChannelData message (RFC 8656 12.4): returns (channel number, application
/// data). `buf` may be longer than `4 + length` (padding on streams, RFC 8656 12.5, or
/// optional padding on UDP); the extra bytes are ignored. `None` when the first byte is
/// not 0x40..=0x7F or the data is truncated.
#[inline]
pub fn parse_channel_data(buf: &[u8]) -> Option<(u16, &[u8])> {
    match buf {
        [c0 @ 0x40..=0x7F, c1, l0, l1, rest @ ..] => {
            let len = usize::from(u16::from_be_bytes([*l0, *l1]));
            rest.get(..len)
                .map(|data| (u16::from_be_bytes([*c0, *c1]), data))
        }
        _ => None,
    }
}

/// Writes a ChannelData header: channel number, then data length, both big-endian
/// (RFC 8656 12.4).
#[inline]
pub fn write_channel_data_header(dst: &mut [u8; 4], channel: u16, len: u16) {
    let [c0, c1] = channel.to_be_bytes();
    let [l0, l1] = len.to_be_bytes();
    *dst = [c0, c1, l0, l1];
}
