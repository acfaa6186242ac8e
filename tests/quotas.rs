//! Allocation quotas under the default configuration: one static user shared by many
//! clients is not capped by a per-user limit (1,000 concurrent allocations of it
//! succeed), while a TURN REST username stops at `max_allocations_per_rest_user` (100)
//! with 486 Allocation Quota Reached, and `max_allocations_per_user`, once set, caps
//! static users with 486 too.

mod common;

use common::turn::TurnClient;
use common::{ServerOptions, TestServer, PASSWORD, SECRET, USER};
use turnstone::auth::{rest_password, rest_username};

/// Allocations of one credential from `n` clients (each its own UDP socket, kept open so
/// that all the allocations stay live together); panics unless every one succeeds.
fn allocate_many(server: &TestServer, user: &str, password: &str, n: usize) -> Vec<TurnClient> {
    (0..n)
        .map(|i| {
            let mut c = TurnClient::udp(server.addr, user, password);
            c.try_allocate()
                .unwrap_or_else(|e| panic!("allocation {} of {n} for {user}: {e}", i + 1));
            c
        })
        .collect()
}

/// A fresh client's Allocate for `user` must be refused with 486.
fn assert_quota_reached(server: &TestServer, user: &str, password: &str, what: &str) {
    let mut c = TurnClient::udp(server.addr, user, password);
    let a = c.allocate();
    assert_eq!(a.code(), Some(486), "{what}: {}", a.describe());
}

/// Raises this process's soft open-file limit to the hard one: the test holds one UDP
/// socket per allocation.
fn raise_open_files(need: u64) {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE).expect("getrlimit");
    if soft < hard {
        setrlimit(Resource::RLIMIT_NOFILE, hard, hard).expect("setrlimit");
    }
    assert!(
        hard >= need,
        "this test needs {need} open files; the hard limit is {hard} (raise it: ulimit -Hn)"
    );
}

#[test]
fn one_static_user_holds_1000_allocations_under_the_defaults() {
    raise_open_files(1_200);
    // The relay ports of one harness slot (500) are too few for 1,000 allocations.
    let server = TestServer::start(ServerOptions::default().relay_port_count(1_100));
    let clients = allocate_many(&server, USER, PASSWORD, 1_000);
    // All live at once: each still refreshes (an expired or dropped one would get 437).
    for (i, mut c) in clients.into_iter().enumerate().step_by(97) {
        c.try_refresh(600)
            .unwrap_or_else(|e| panic!("refresh of allocation {}: {e}", i + 1));
    }
}

#[test]
fn a_rest_username_stops_at_100_allocations_by_default() {
    raise_open_files(300);
    let server = TestServer::start_default();
    let unix = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let user = rest_username(unix + 3600, "leaked");
    let password = rest_password(SECRET, &user);
    let held = allocate_many(&server, &user, &password, 100);
    assert_quota_reached(
        &server,
        &user,
        &password,
        "101st allocation of one REST username",
    );
    // Another REST username and the static user are not affected.
    let other = rest_username(unix + 3600, "other");
    allocate_many(&server, &other, &rest_password(SECRET, &other), 1);
    allocate_many(&server, USER, PASSWORD, 1);
    // Ending one allocation frees one slot of the quota.
    let mut first = held.into_iter().next().unwrap();
    first.try_refresh(0).expect("Refresh 0");
    allocate_many(&server, &user, &password, 1);
}

#[test]
fn max_allocations_per_user_caps_static_users_when_set() {
    let server = TestServer::start(ServerOptions::default().max_allocations_per_user(3));
    let _held = allocate_many(&server, USER, PASSWORD, 3);
    assert_quota_reached(
        &server,
        USER,
        PASSWORD,
        "4th allocation with max_allocations_per_user = 3",
    );
}
