// One-off: messages built exactly as the webrtc-rs turn client (turn 0.17, client/mod.rs
// and client/relay_conn.rs) builds them, written as fuzz seeds.
use std::net::SocketAddr;
use stun::agent::TransactionId;
use stun::attributes::{ATTR_NONCE, ATTR_REALM, ATTR_USERNAME};
use stun::fingerprint::FINGERPRINT;
use stun::integrity::MessageIntegrity;
use stun::message::*;
use stun::textattrs::TextAttribute;
use stun::xoraddr::XorMappedAddress;
use turn::proto::{channum::ChannelNumber, chandata::ChannelData, data::Data, lifetime::Lifetime,
    peeraddr::PeerAddress, reqtrans::RequestedTransport, PROTO_UDP};

fn main() {
    let out = std::env::args().nth(1).unwrap();
    let user = TextAttribute::new(ATTR_USERNAME, "alice".into());
    let realm = TextAttribute::new(ATTR_REALM, "turnstone.fuzz".into());
    let nonce = TextAttribute::new(ATTR_NONCE, "6a0bb1c0a1b2c3d4e5f60718".into());
    let integ = MessageIntegrity::new_long_term_integrity("alice".into(), "turnstone.fuzz".into(), "wonderland".into());
    let peer: SocketAddr = "127.0.0.1:9000".parse().unwrap();
    let peer6: SocketAddr = "[2001:db8::1]:9000".parse().unwrap();
    let pa = |a: SocketAddr| PeerAddress { ip: a.ip(), port: a.port() };
    let mut msgs: Vec<(&str, Vec<Box<dyn Setter>>)> = vec![
        ("allocate-anon", vec![Box::new(TransactionId::new()), Box::new(MessageType::new(METHOD_ALLOCATE, CLASS_REQUEST)), Box::new(RequestedTransport { protocol: PROTO_UDP }), Box::new(FINGERPRINT)]),
        ("allocate-auth", vec![Box::new(TransactionId::new()), Box::new(MessageType::new(METHOD_ALLOCATE, CLASS_REQUEST)), Box::new(RequestedTransport { protocol: PROTO_UDP }), Box::new(user.clone()), Box::new(realm.clone()), Box::new(nonce.clone()), Box::new(integ.clone()), Box::new(FINGERPRINT)]),
        ("createpermission", vec![Box::new(TransactionId::new()), Box::new(MessageType::new(METHOD_CREATE_PERMISSION, CLASS_REQUEST)), Box::new(pa(peer)), Box::new(pa(peer6)), Box::new(user.clone()), Box::new(realm.clone()), Box::new(nonce.clone()), Box::new(integ.clone()), Box::new(FINGERPRINT)]),
        ("refresh", vec![Box::new(TransactionId::new()), Box::new(MessageType::new(METHOD_REFRESH, CLASS_REQUEST)), Box::new(Lifetime(std::time::Duration::from_secs(600))), Box::new(user.clone()), Box::new(realm.clone()), Box::new(nonce.clone()), Box::new(integ.clone()), Box::new(FINGERPRINT)]),
        ("refresh-zero", vec![Box::new(TransactionId::new()), Box::new(MessageType::new(METHOD_REFRESH, CLASS_REQUEST)), Box::new(Lifetime(std::time::Duration::from_secs(0))), Box::new(user.clone()), Box::new(realm.clone()), Box::new(nonce.clone()), Box::new(integ.clone()), Box::new(FINGERPRINT)]),
        ("channelbind", vec![Box::new(TransactionId::new()), Box::new(MessageType::new(METHOD_CHANNEL_BIND, CLASS_REQUEST)), Box::new(pa(peer)), Box::new(ChannelNumber(0x4001)), Box::new(user.clone()), Box::new(realm.clone()), Box::new(nonce.clone()), Box::new(integ.clone()), Box::new(FINGERPRINT)]),
        ("send", vec![Box::new(TransactionId::new()), Box::new(MessageType::new(METHOD_SEND, CLASS_INDICATION)), Box::new(Data(b"hello peer".to_vec())), Box::new(pa(peer)), Box::new(FINGERPRINT)]),
        ("binding", vec![Box::new(TransactionId::new()), Box::new(BINDING_REQUEST), Box::new(FINGERPRINT)]),
        ("binding-success", vec![Box::new(TransactionId::new()), Box::new(MessageType::new(METHOD_BINDING, CLASS_SUCCESS_RESPONSE)), Box::new(XorMappedAddress { ip: peer6.ip(), port: 7 }), Box::new(FINGERPRINT)]),
    ];
    for (name, setters) in msgs.drain(..) {
        let mut m = Message::new();
        m.build(&setters).unwrap();
        std::fs::write(format!("{out}/webrtc-rs-{name}.bin"), &m.raw).unwrap();
    }
    let mut cd = ChannelData { number: turn::proto::channum::ChannelNumber(0x4001), data: b"hello peer!".to_vec(), raw: vec![] };
    cd.encode();
    std::fs::write(format!("{out}/webrtc-rs-channeldata.bin"), &cd.raw).unwrap();
}
