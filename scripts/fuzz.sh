#!/usr/bin/env bash
# Runs the coverage-guided fuzz targets in fuzz/ for a while each: cargo-fuzz (libFuzzer) on the
# stable toolchain, `--sanitizer none` (no sanitizer needs nightly; the targets are safe Rust,
# built with debug assertions, so a panic, an overflow or a broken property is what they find).
#
# Targets: client_bytes (every front-door parser), upstream_response (an upstream's response
# head and body, whole and in pieces), event_stream (an upstream's server-sent events),
# websocket_frames (a WebSocket client's frames, whole and in pieces), configuration (a YAML or
# TOML file). Each starts from its seeds in fuzz/corpus/TARGET (the
# configuration target from config/ too) and keeps what it finds in target/fuzz-corpus/TARGET,
# so a later run goes on from there. A failing input is saved under fuzz/artifacts/TARGET/ and
# the script exits 1; `cargo fuzz run -s none TARGET FILE` replays it.
set -euo pipefail
cd "$(dirname "$0")/.."

usage() {
  cat <<USAGE
usage: scripts/fuzz.sh [--seconds N | --runs N] [TARGET...]
  --seconds N  how long each target runs (default 20), going on from what earlier runs found
  --runs N     instead: N inputs each from the seeds alone, with a fixed random seed, so the
               run is the same every time (what scripts/test.sh, and so CI, runs)
  TARGET       client_bytes, upstream_response, event_stream, websocket_frames,
               configuration (default: all)
USAGE
}
seconds=20
runs=""
targets=()
while [ $# -gt 0 ]; do
  case "$1" in
    --seconds) seconds=$2; shift 2 ;;
    --runs) runs=$2; shift 2 ;;
    -h|--help) usage; exit 0 ;;
    client_bytes|upstream_response|event_stream|websocket_frames|configuration) targets+=("$1"); shift ;;
    *) usage; exit 64 ;;
  esac
done
[ ${#targets[@]} -gt 0 ] || targets=(client_bytes upstream_response event_stream websocket_frames configuration)

if ! cargo fuzz --version >/dev/null 2>&1; then
  echo "cargo-fuzz is missing: cargo install --locked cargo-fuzz" >&2
  exit 2
fi

cargo fuzz build -s none
for t in "${targets[@]}"; do
  work="target/fuzz-corpus/$t"
  limit=(-max_total_time="$seconds")
  said="${seconds}s"
  if [ -n "$runs" ]; then
    # A fresh work corpus and a fixed seed: the same inputs every time.
    work="target/fuzz-corpus/fixed/$t"
    rm -rf "$work"
    limit=(-runs="$runs" -seed=1)
    said="$runs runs, seed 1"
  fi
  mkdir -p "$work"
  seeds=("fuzz/corpus/$t")
  [ "$t" != configuration ] || seeds+=(config)
  log="target/fuzz-corpus/$t.log"
  if cargo fuzz run -s none "$t" "$work" "${seeds[@]}" -- \
      "${limit[@]}" -max_len=4096 >"$log" 2>&1; then
    stats=$(grep -E '#[0-9]+[[:space:]]+DONE' "$log" | tail -1 | sed 's/^#\([0-9]*\)[[:space:]]*DONE[[:space:]]*/\1 inputs, /')
    echo "fuzz $t: $said, $stats"
  else
    echo "fuzz $t FAILED:" >&2
    grep -E -A12 'panicked|ERROR|Test unit written' "$log" | head -40 >&2
    exit 1
  fi
done
