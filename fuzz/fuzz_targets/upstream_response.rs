//! Bytes an upstream sends as its response: `checks::upstream_response`, the pieces the body
//! arrives in chosen from the input itself.
#![no_main]

#[allow(dead_code)] // each target uses its part
#[path = "../checks.rs"]
mod checks;

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    checks::upstream_response(data, &mut checks::Rng::from_bytes(data));
});
