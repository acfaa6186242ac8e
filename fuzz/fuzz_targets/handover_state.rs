//! Fuzz target `handover_state`: see `turnstone_fuzz::check_handover_state` (fuzz/src/checks.rs).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| turnstone_fuzz::check_handover_state(data));
