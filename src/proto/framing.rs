//! Stream framing for TURN over TCP/TLS (RFC 8656 12.5, RFC 6062 4): STUN messages and
//! ChannelData (padded to a multiple of 4) follow each other on the byte stream.

use super::channel::is_channel_data;
use super::HEADER_LEN;

/// What [`next_frame`] found at the front of a stream buffer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Frame {
    /// The buffer does not yet hold a whole frame: read more.
    NeedMore,
    /// A STUN message of this many bytes (20 + header length) is at the front of the
    /// buffer and entirely present.
    Stun(usize),
    /// A ChannelData message is at the front of the buffer and entirely present.
    ChannelData {
        /// 4 + length, rounded up to a multiple of 4 (the stream padding, RFC 8656 12.5).
        total: usize,
    },
    /// The stream is not STUN/ChannelData (first byte neither 0..=0x3F nor 0x40..=0x7F,
    /// STUN length not a multiple of 4) or the frame is longer than `max_frame`: close
    /// the connection.
    Invalid,
}

/// How long is the next frame at the front of `buf`? A STUN frame is 20 + length bytes
/// (RFC 8489 5); a ChannelData frame is 4 + length rounded up to a multiple of 4
/// (RFC 8656 12.5). Returns `Stun` / `ChannelData` only when `buf` holds the whole frame,
/// so `buf[..n]` is then in bounds. `Invalid` is returned as soon as the 4-byte prefix
/// shows a frame longer than `max_frame`.
pub fn next_frame(buf: &[u8], max_frame: usize) -> Frame {
    let (first, len) = match buf {
        [] => return Frame::NeedMore,
        [b, ..] if !(*b < 0x40 || is_channel_data(*b)) => return Frame::Invalid,
        [b0, _, l0, l1, ..] => (*b0, usize::from(u16::from_be_bytes([*l0, *l1]))),
        _ => return Frame::NeedMore,
    };
    let total = if first < 0x40 {
        if len % 4 != 0 {
            return Frame::Invalid;
        }
        HEADER_LEN + len
    } else {
        (4 + len + 3) & !3
    };
    if total > max_frame {
        Frame::Invalid
    } else if buf.len() < total {
        Frame::NeedMore
    } else if first < 0x40 {
        Frame::Stun(total)
    } else {
        Frame::ChannelData { total }
    }
}
