//! An upstream's event stream: `checks::event_stream`, the pieces it arrives in and the message
//! size chosen from the input itself.
#![no_main]

#[allow(dead_code)] // each target uses its part
#[path = "../checks.rs"]
mod checks;

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    checks::event_stream(data, &mut checks::Rng::from_bytes(data));
});
