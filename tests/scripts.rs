//! Every bench-kit script answers `--help` with its usage and refuses unknown options with 64,
//! without starting anything.

use std::process::Command;

/// Every `scripts/*.sh`, so that a new script is covered without being listed here.
fn scripts() -> Vec<String> {
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/scripts");
    let mut all: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .filter(|n| n.ends_with(".sh"))
        .collect();
    all.sort();
    assert!(
        all.len() >= 7 && all.iter().any(|s| s == "scaling.sh"),
        "{all:?}"
    );
    all
}

#[test]
fn scripts_have_help_and_reject_unknown_options() {
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/scripts");
    let scripts = scripts();
    for script in scripts.iter().filter(|s| *s != "test.sh") {
        let out = Command::new("bash")
            .arg(format!("{dir}/{script}"))
            .arg("--help")
            .output()
            .unwrap();
        assert!(out.status.success(), "{script} --help");
        assert!(
            String::from_utf8_lossy(&out.stdout).contains("usage:"),
            "{script} prints its usage"
        );
        let bad = Command::new("bash")
            .arg(format!("{dir}/{script}"))
            .arg("--bogus")
            .output()
            .unwrap();
        assert_eq!(bad.status.code(), Some(64), "{script} --bogus");
    }
    for script in &scripts {
        let syntax = Command::new("bash")
            .args(["-n", &format!("{dir}/{script}")])
            .status()
            .unwrap();
        assert!(syntax.success(), "{script} parses");
    }
}
