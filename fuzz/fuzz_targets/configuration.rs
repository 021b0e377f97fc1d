//! A configuration document, read as YAML and as TOML: `checks::configuration`.
#![no_main]

#[allow(dead_code)] // each target uses its part
#[path = "../checks.rs"]
mod checks;

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = checks::configuration(text, false);
        let _ = checks::configuration(text, true);
    }
});
