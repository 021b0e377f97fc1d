//! A WebSocket client's frames: `checks::websocket_frames`, the pieces they arrive in and the
//! message size chosen from the input itself.
#![no_main]

#[allow(dead_code)] // each target uses its part
#[path = "../checks.rs"]
mod checks;

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    checks::websocket_frames(data, &mut checks::Rng::from_bytes(data));
});
