//! Fuzz target `config`: see `turnstone_fuzz::check_config` (fuzz/src/checks.rs).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| turnstone_fuzz::check_config(data));
