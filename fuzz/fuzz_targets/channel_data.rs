//! Fuzz target `channel_data`: see `turnstone_fuzz::check_channel_data` (fuzz/src/checks.rs).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| turnstone_fuzz::check_channel_data(data));
