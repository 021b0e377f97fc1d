#!/usr/bin/env bash
# The whole test suite, as CI runs it: formatting, lints, unit + integration tests (the real
# binary on loopback), and the loom model checks of the per-IP table, the limit counters, the
# request rate, the per-IP overrides' reload and the circuit breaker, then a short run of each
# fuzz target (scripts/fuzz.sh) where cargo-fuzz is installed.
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
echo "== fuzz targets, 15 s each (scripts/fuzz.sh)"
if cargo fuzz --version >/dev/null 2>&1; then
  scripts/fuzz.sh --seconds 15
elif [ -n "${CI:-}" ]; then
  echo "cargo-fuzz is missing; .ci/run installs it" >&2
  exit 1
else
  echo "SKIPPED: cargo-fuzz is missing (cargo install --locked cargo-fuzz)"
fi
