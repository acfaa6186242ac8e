//! Fuzz target `server_sequence`: see `turnstone_fuzz::check_server_sequence` (fuzz/src/checks.rs).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| turnstone_fuzz::check_server_sequence(data));
