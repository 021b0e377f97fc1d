//! `mcp-loadgen` against the real gateway: its report matches what the limits must do.

mod common;

use std::process::Command;

use common::*;

fn loadgen(args: &[&str]) -> std::collections::HashMap<String, f64> {
    let out = Command::new(env!("CARGO_BIN_EXE_mcp-loadgen"))
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .filter_map(|l| l.split_once(' '))
        .map(|(k, v)| (k.to_string(), v.parse().unwrap()))
        .collect()
}

#[test]
fn report_counts_admissions_and_rejections_per_door() {
    let gw = start("max_connections_per_ip: 10");
    let http = gw.http.to_string();
    let r = loadgen(&[
        "--target",
        &http,
        "--connections",
        "20",
        "--hold",
        "0.5",
        "--sources",
        "127.0.0.5",
    ]);
    assert_eq!(
        (r["connected"], r["rejected_per_ip"], r["errors"]),
        (10.0, 10.0, 0.0)
    );

    let r = loadgen(&[
        "--target",
        &http,
        "--protocol",
        "ws",
        "--connections",
        "30",
        "--hold",
        "0.4",
        "--interval",
        "0.1",
        "--sources",
        "127.0.0.6-127.0.0.8",
    ]);
    assert_eq!(
        (r["connected"], r["rejected_per_ip"], r["errors"]),
        (30.0, 0.0, 0.0)
    );
    assert!(r["messages"] >= 90.0, "{r:?}");

    let tcp = gw.tcp.unwrap().to_string();
    let r = loadgen(&[
        "--target",
        &tcp,
        "--protocol",
        "mcpb",
        "--connections",
        "12",
        "--hold",
        "0.5",
        "--sources",
        "127.0.0.9",
    ]);
    assert_eq!(
        (r["connected"], r["rejected_closed"], r["errors"]),
        (10.0, 2.0, 0.0)
    );
    gw.wait_all_closed();
}

#[test]
fn help_describes_the_load_generator_not_the_gateway() {
    let out = Command::new(env!("CARGO_BIN_EXE_mcp-loadgen"))
        .arg("--help")
        .output()
        .unwrap();
    assert!(out.status.success());
    let help = String::from_utf8(out.stdout).unwrap();
    let first = help.lines().next().unwrap_or_default();
    assert!(
        first.starts_with("Opens connections to an MCP gateway"),
        "{help}"
    );
    assert!(help.contains("--sources"), "{help}");
}
