//! Parses every captured message of `tests/corpus` (real clients and coturn 4.6.1, see
//! its README.md) with our codec and checks it against `index.tsv`: message type,
//! attribute order, MESSAGE-INTEGRITY with the long-term key of user `bench`, FINGERPRINT,
//! ChannelData channel/length/padding, and stream framing of the TCP captures.

use std::collections::BTreeMap;
use std::fs;
use std::path::Path;

use md5::{Digest, Md5};

mod common;
use common::corpus::{corpus_dir, index_rows};
use turnstone::proto::{attr, next_frame, parse_channel_data, Class, Frame, Message, ParseError};

const MAX_FRAME: usize = 65_536 + 20;

struct Entry {
    transport: String,
    kind: String,
    typ: String,
    attrs: Vec<u16>,
    notes: BTreeMap<String, String>,
}

fn load_index() -> BTreeMap<String, Entry> {
    let mut out = BTreeMap::new();
    for f in index_rows() {
        assert!(f.len() >= 8, "index.tsv: short line {f:?}");
        let attrs = f[6]
            .split_whitespace()
            .filter(|a| *a != "-")
            .map(|a| {
                let hex = a.split(':').next().unwrap().trim_start_matches("0x");
                u16::from_str_radix(hex, 16).unwrap_or_else(|_| panic!("bad attr {a:?}"))
            })
            .collect();
        let notes = f[7]
            .split_whitespace()
            .filter(|n| *n != "-")
            .map(|n| match n.split_once('=') {
                Some((k, v)) => (k.to_string(), v.to_string()),
                None => (n.to_string(), String::new()),
            })
            .collect();
        out.insert(
            f[0].clone(),
            Entry {
                transport: f[1].clone(),
                kind: f[3].clone(),
                typ: f[5].clone(),
                attrs,
                notes,
            },
        );
    }
    out
}

fn bench_key() -> [u8; 16] {
    Md5::digest(b"bench:bars.test:bench").into()
}

/// Every `*.bin` in the corpus folders, as "folder/file.bin".
fn bin_files(dir: &Path) -> Vec<String> {
    let mut files = Vec::new();
    for folder in fs::read_dir(dir).expect("read corpus dir") {
        let folder = folder.unwrap().path();
        if !folder.is_dir() {
            continue;
        }
        for f in fs::read_dir(&folder).unwrap() {
            let p = f.unwrap().path();
            if p.extension().is_some_and(|e| e == "bin") {
                let rel = p
                    .strip_prefix(dir)
                    .unwrap()
                    .to_string_lossy()
                    .replace('\\', "/");
                files.push(rel);
            }
        }
    }
    files.sort();
    files
}

fn check_channel_data(name: &str, bytes: &[u8], e: &Entry) {
    let (channel, data) =
        parse_channel_data(bytes).unwrap_or_else(|| panic!("{name}: not ChannelData"));
    let want_channel =
        u16::from_str_radix(e.notes["channel"].trim_start_matches("0x"), 16).unwrap();
    let want_len: usize = e.notes["datalen"].parse().unwrap();
    let pad: usize = e.notes["pad"].parse().unwrap();
    assert_eq!(channel, want_channel, "{name}: channel");
    assert_eq!(data.len(), want_len, "{name}: data length");
    assert_eq!(bytes.len(), 4 + want_len + pad, "{name}: padding");
    if e.transport == "tcp" {
        assert_eq!(bytes.len() % 4, 0, "{name}: TCP ChannelData is padded");
        assert_eq!(
            next_frame(bytes, MAX_FRAME),
            Frame::ChannelData { total: bytes.len() },
            "{name}"
        );
        assert_eq!(
            next_frame(&bytes[..bytes.len() - 1], MAX_FRAME),
            Frame::NeedMore
        );
    }
    if e.notes["payload"] == "stun" {
        let inner = Message::parse(data).unwrap_or_else(|err| panic!("{name}: inner STUN: {err}"));
        if inner.has_fingerprint() {
            assert_eq!(
                inner.verify_fingerprint(),
                Some(true),
                "{name}: inner FINGERPRINT"
            );
        }
    }
}

fn check_stun(name: &str, bytes: &[u8], e: &Entry, key: &[u8]) -> (bool, bool) {
    // The Debian `stun` client (folder stun-client) speaks RFC 3489: no magic cookie.
    let m = if e.notes.contains_key("rfc3489-no-cookie") {
        assert_eq!(
            Message::parse(bytes).unwrap_err(),
            ParseError::NotStun,
            "{name}"
        );
        let m = Message::parse_rfc3489(bytes).unwrap_or_else(|err| panic!("{name}: {err}"));
        assert!(m.is_rfc3489());
        m
    } else {
        Message::parse(bytes).unwrap_or_else(|err| panic!("{name}: {err}"))
    };
    assert_eq!(format!("{:#06x}", m.message_type()), e.typ, "{name}: type");

    // Attribute order: ours lists those before MESSAGE-INTEGRITY / FINGERPRINT.
    let special = [
        attr::MESSAGE_INTEGRITY,
        attr::MESSAGE_INTEGRITY_SHA256,
        attr::FINGERPRINT,
    ];
    let counted: Vec<u16> = e
        .attrs
        .iter()
        .copied()
        .filter(|a| !special.contains(a))
        .collect();
    let ours: Vec<u16> = m.attributes().map(|(t, _)| t).collect();
    assert_eq!(ours, counted, "{name}: attributes");
    assert_eq!(
        m.has(attr::MESSAGE_INTEGRITY),
        e.attrs.contains(&attr::MESSAGE_INTEGRITY),
        "{name}"
    );
    assert_eq!(
        m.has_fingerprint(),
        e.attrs.contains(&attr::FINGERPRINT),
        "{name}"
    );

    // Typed getters succeed on everything real clients and coturn send.
    m.username()
        .unwrap_or_else(|err| panic!("{name}: USERNAME {err}"));
    m.realm()
        .unwrap_or_else(|err| panic!("{name}: REALM {err}"));
    m.nonce()
        .unwrap_or_else(|err| panic!("{name}: NONCE {err}"));
    m.lifetime()
        .unwrap_or_else(|err| panic!("{name}: LIFETIME {err}"));
    m.even_port()
        .unwrap_or_else(|err| panic!("{name}: EVEN-PORT {err}"));
    m.requested_address_family().unwrap();
    m.xor_peer_addresses()
        .unwrap_or_else(|err| panic!("{name}: XOR-PEER-ADDRESS {err}"));
    for typ in [attr::XOR_MAPPED_ADDRESS, attr::XOR_RELAYED_ADDRESS] {
        m.xor_address(typ)
            .unwrap_or_else(|err| panic!("{name}: {typ:#06x} {err}"));
    }
    for typ in [
        attr::MAPPED_ADDRESS,
        attr::SOURCE_ADDRESS,
        attr::CHANGED_ADDRESS,
        attr::RESPONSE_ORIGIN,
    ] {
        m.address(typ)
            .unwrap_or_else(|err| panic!("{name}: {typ:#06x} {err}"));
    }
    if e.attrs.contains(&attr::REQUESTED_TRANSPORT) {
        assert_eq!(m.requested_transport().unwrap(), Some(17), "{name}");
    }
    if e.attrs.contains(&attr::CHANNEL_NUMBER) {
        let ch = m.channel_number().unwrap().unwrap();
        assert!((0x4000..=0x7FFF).contains(&ch), "{name}: channel {ch:#x}");
    }
    if e.kind.ends_with("-indication") {
        assert_eq!(m.class(), Class::Indication, "{name}");
        if !e.kind.starts_with("inner-") {
            assert!(m.data().is_some(), "{name}: DATA");
            assert!(
                m.xor_peer_address().unwrap().is_some(),
                "{name}: XOR-PEER-ADDRESS"
            );
        }
    }
    if let Some((_, code)) = e.kind.rsplit_once("-error-") {
        assert_eq!(m.class(), Class::Error, "{name}");
        let (got, _) = m.error_code().unwrap().expect("ERROR-CODE");
        assert_eq!(got.to_string(), code, "{name}: error code");
    }

    let mut mi_checked = false;
    if e.notes.get("MI").map(String::as_str) == Some("ok-longterm") {
        assert!(m.verify_integrity(key), "{name}: MESSAGE-INTEGRITY");
        assert!(!m.verify_integrity(b"wrong key"), "{name}");
        mi_checked = true;
    }
    let mut fp_checked = false;
    if e.notes.get("FP").map(String::as_str) == Some("ok") {
        assert_eq!(m.verify_fingerprint(), Some(true), "{name}: FINGERPRINT");
        fp_checked = true;
    }
    if e.transport == "tcp" {
        assert_eq!(
            next_frame(bytes, MAX_FRAME),
            Frame::Stun(bytes.len()),
            "{name}"
        );
    }
    (mi_checked, fp_checked)
}

#[test]
fn every_corpus_message_parses() {
    let dir = corpus_dir();
    let index = load_index();
    let files = bin_files(&dir);
    assert!(!files.is_empty(), "no .bin files under {}", dir.display());
    let key = bench_key();
    let (mut stun, mut chan, mut mi, mut fp) = (0, 0, 0, 0);
    for name in &files {
        let e = index
            .get(name)
            .unwrap_or_else(|| panic!("{name} is not listed in index.tsv"));
        let bytes = fs::read(dir.join(name)).unwrap();
        if name.contains("channeldata") {
            check_channel_data(name, &bytes, e);
            chan += 1;
        } else {
            let (m, f) = check_stun(name, &bytes, e, &key);
            stun += 1;
            mi += usize::from(m);
            fp += usize::from(f);
        }
    }
    assert_eq!(files.len(), index.len(), "every index.tsv row has its file");
    let want_mi = index
        .values()
        .filter(|e| e.notes.get("MI").is_some_and(|v| v == "ok-longterm"))
        .count();
    let want_fp = index
        .values()
        .filter(|e| e.notes.get("FP").is_some_and(|v| v == "ok"))
        .count();
    assert_eq!((mi, fp), (want_mi, want_fp));
    assert!(mi > 0 && fp > 0 && chan > 0 && stun > 0);
    eprintln!("corpus: {stun} STUN, {chan} ChannelData, {mi} MESSAGE-INTEGRITY, {fp} FINGERPRINT verified");
}

/// A TCP capture's frames, concatenated, split back by `next_frame`.
#[test]
fn tcp_stream_reframes() {
    let dir = corpus_dir();
    let index = load_index();
    let mut stream = Vec::new();
    let mut sizes = Vec::new();
    for name in bin_files(&dir) {
        if index[&name].transport == "tcp" {
            let b = fs::read(dir.join(&name)).unwrap();
            sizes.push(b.len());
            stream.extend_from_slice(&b);
        }
    }
    assert!(!sizes.is_empty());
    let mut rest = &stream[..];
    for want in sizes {
        let n = match next_frame(rest, MAX_FRAME) {
            Frame::Stun(n) | Frame::ChannelData { total: n } => n,
            other => panic!("unexpected {other:?}"),
        };
        assert_eq!(n, want);
        rest = &rest[n..];
    }
    assert!(rest.is_empty());
    assert_eq!(next_frame(rest, MAX_FRAME), Frame::NeedMore);
}
