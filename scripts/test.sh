#!/usr/bin/env bash
# The whole test suite, as CI runs it: formatting, lints, unit + integration tests (the real
# binary on loopback), and the loom model checks of the per-IP table, the limit counters, the
# request rate, the per-IP overrides' reload and the circuit breaker, then a fixed run of each
# fuzz target (scripts/fuzz.sh --runs: the same inputs every time) where cargo-fuzz is installed.
set -euo pipefail
cd "$(dirname "$0")/.."

echo "== cargo fmt --check"
cargo fmt --all -- --check
echo "== cargo clippy --all-targets -- -D warnings"
cargo clippy --all-targets -- -D warnings
echo "== tests"
if cargo nextest --version >/dev/null 2>&1; then
  cargo nextest run --no-fail-fast
else
  cargo test --no-fail-fast
fi
echo "== loom model checks (per-IP table, limit counters, request rate, overrides, circuit breaker)"
RUSTFLAGS="--cfg loom" CARGO_TARGET_DIR=target/loom cargo test --release --lib loom
echo "== fuzz targets, 300 000 inputs each from a fixed seed (scripts/fuzz.sh --runs)"
if cargo fuzz --version >/dev/null 2>&1; then
  scripts/fuzz.sh --runs 300000
elif [ -n "${CI:-}" ]; then
  echo "cargo-fuzz is missing; .ci/run installs it" >&2
  exit 1
else
  echo "SKIPPED: cargo-fuzz is missing (cargo install --locked cargo-fuzz)"
fi
