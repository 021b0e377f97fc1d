//! Bytes a client sends, given to every front-door parser: `checks::client_bytes`.
#![no_main]

#[allow(dead_code)] // each target uses its part
#[path = "../checks.rs"]
mod checks;

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    checks::client_bytes(data, &mut checks::Accepted::default());
});
