//! Property tests of the sans-I/O core (proptest): any interleaving of Allocate, Refresh,
//! CreatePermission, ChannelBind, Send/ChannelData, peer data and time jumps (with and
//! without `handle_timeout`) over four clients (UDP v4 x2, UDP v6, TCP) keeps the tables
//! consistent. The world and its invariants are those of the `server_sequence` fuzz
//! target (`fuzz/src/checks.rs`, included here): after every step
//! - allocation count == the shared quota count == created - ended events;
//! - relay handles released == allocations ended (no relay leaked or released twice);
//! - no channel number bound twice, no peer bound to two channels, at most
//!   max_channels / max_permissions per allocation, at most max_allocations (per user too);
//! - lifetimes never exceed max_lifetime (permissions 300 s, channels 600 s);
//! - after `handle_timeout`, nothing expired is left (reservations included);
//! - relayed data goes only to permitted, policy-allowed peers (or live relays), out of the
//!   sender's own relay.
//!
//! Here proptest generates the op sequences (and shrinks failures to a minimal one).

#[path = "../fuzz/src/checks.rs"]
mod checks;

use checks::{Cred, Op, PeerSel, Setup, World};
use proptest::prelude::*;

fn client() -> impl Strategy<Value = u8> {
    0u8..4
}

fn cred() -> impl Strategy<Value = Cred> {
    (
        prop_oneof![8 => 0u8..2, 1 => 2u8..5],
        prop_oneof![9 => Just(0u8), 1 => 1u8..4],
        any::<bool>(),
        any::<bool>(),
        prop::bool::weighted(0.05),
    )
        .prop_map(|(user, nonce, sha256, fingerprint, same_tid)| Cred {
            user,
            nonce,
            sha256,
            fingerprint,
            same_tid,
        })
}

fn peer() -> impl Strategy<Value = PeerSel> {
    prop_oneof![
        3 => (0u8..14).prop_map(PeerSel::Fixed),
        2 => (any::<u8>(), prop::bool::weighted(0.2)).prop_map(|(i, n)| PeerSel::Relay(i, n)),
    ]
}

fn lifetime() -> impl Strategy<Value = Option<u32>> {
    prop::option::of(prop_oneof![Just(0u32), 1u32..5000, Just(u32::MAX),])
}

fn channel() -> impl Strategy<Value = u16> {
    prop_oneof![9 => 0x4000u16..0x4006, 1 => any::<u16>()]
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        3 => (
            client(),
            cred(),
            lifetime(),
            prop::option::of(prop_oneof![Just(1u8), Just(2u8)]),
            prop::option::of(any::<bool>()),
            prop::bool::weighted(0.2),
        )
            .prop_map(|(client, cred, lifetime, family, even_port, use_token)| Op::Allocate {
                client,
                cred,
                lifetime,
                family,
                even_port,
                use_token,
                transport: 17,
            }),
        2 => (client(), cred(), lifetime())
            .prop_map(|(client, cred, lifetime)| Op::Refresh { client, cred, lifetime }),
        2 => (client(), cred(), prop::collection::vec(peer(), 1..4))
            .prop_map(|(client, cred, peers)| Op::Permission { client, cred, peers }),
        2 => (client(), cred(), channel(), peer()).prop_map(|(client, cred, number, peer)| {
            Op::ChannelBind {
                client,
                cred,
                number,
                peer,
            }
        }),
        1 => (client(), peer(), 0u16..64, any::<bool>()).prop_map(
            |(client, peer, len, fingerprint)| Op::Send {
                client,
                peer,
                len,
                fingerprint,
            }
        ),
        1 => (client(), channel(), 0u16..64, 0u8..4).prop_map(|(client, number, len, extra)| {
            Op::ChannelData {
                client,
                number,
                len,
                extra,
            }
        }),
        1 => (any::<u8>(), peer(), 0u16..64).prop_map(|(relay, from, len)| Op::Peer {
            relay,
            from,
            len,
        }),
        2 => (
            prop_oneof![0u32..5, Just(30), Just(299), Just(300), Just(600), Just(3600), 0u32..4000],
            prop::bool::weighted(0.8),
        )
            .prop_map(|(secs, timeout)| Op::Tick { secs, timeout }),
    ]
}

fn setup() -> impl Strategy<Value = Setup> {
    (
        (1usize..5, 1usize..4, 1usize..5, 1usize..5),
        prop_oneof![Just(60u64), Just(600)],
        prop_oneof![Just(600u64), Just(3600)],
        1u16..5,
        0u8..3,
        any::<bool>(),
    )
        .prop_map(
            |(
                (max_allocations, max_per_user, max_permissions, max_channels),
                dl,
                ml,
                p,
                policy,
                external,
            )| {
                Setup {
                    max_allocations,
                    max_per_user,
                    max_permissions,
                    max_channels,
                    default_lifetime: dl,
                    max_lifetime: ml,
                    ports: p * 2,
                    policy,
                    external,
                }
            },
        )
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: 512,
        max_shrink_iters: 2000,
        ..ProptestConfig::default()
    })]

    /// Every invariant holds after every step, and everything is released at the end.
    #[test]
    fn tables_stay_consistent(setup in setup(), ops in prop::collection::vec(op(), 1..60)) {
        let mut w = World::new(setup);
        for op in &ops {
            w.step(op);
            // A jump past the longest lifetime, with handle_timeout, empties the tables.
            if let Op::Tick { secs, timeout: true } = op {
                if u64::from(*secs) > setup.max_lifetime.max(setup.default_lifetime) {
                    prop_assert_eq!(w.server.allocation_count(), 0);
                    prop_assert!(w.server.poll_timeout().is_none());
                }
            }
        }
        prop_assert_eq!(w.created - w.ended, w.server.allocation_count());
        w.finish();
        prop_assert_eq!(w.created, w.ended);
        prop_assert_eq!(w.relay_releases, w.ended);
    }
}
