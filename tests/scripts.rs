//! Every bench-kit script answers `--help` with its usage and refuses unknown options with 64,
//! without starting anything.

use std::process::Command;

const SCRIPTS: [&str; 6] = [
    "bench-http.sh",
    "capacity.sh",
    "compare.sh",
    "flood-fairness.sh",
    "idle-memory.sh",
    "test.sh",
];

#[test]
fn scripts_have_help_and_reject_unknown_options() {
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/scripts");
    for script in SCRIPTS.iter().filter(|s| **s != "test.sh") {
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
    for script in SCRIPTS {
        let syntax = Command::new("bash")
            .args(["-n", &format!("{dir}/{script}")])
            .status()
            .unwrap();
        assert!(syntax.success(), "{script} parses");
    }
}
