//! Fuzz target `stream_framing`: see `turnstone_fuzz::check_stream_framing` (fuzz/src/checks.rs).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| turnstone_fuzz::check_stream_framing(data));
