//! Fuzz target `stun_message`: see `turnstone_fuzz::check_stun_message` (fuzz/src/checks.rs).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| turnstone_fuzz::check_stun_message(data));
