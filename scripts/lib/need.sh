# Sourced by the bench scripts: `need wrk nginx ...` installs, from Debian's packages, the commands
# that are missing (package name = command name), refreshing the package lists first.
need() {
  local missing=()
  for t in "$@"; do command -v "$t" >/dev/null || missing+=("$t"); done
  [ ${#missing[@]} -eq 0 ] && return 0
  echo "installing ${missing[*]} from Debian's packages" >&2
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq >/dev/null && apt-get install -y -qq "${missing[@]}" >/dev/null
}

# `build`: the release binaries the scripts run (target/release/mcp-gateway, mcp-loadgen). Built
# with cargo where it is installed; on a machine without Rust (a lent benchmark machine) binaries
# copied into target/release/ beforehand are used as they are.
build() {
  if command -v cargo >/dev/null; then
    cargo build --release --quiet
  else
    [ -x target/release/mcp-gateway ] || { echo "no cargo, and no target/release/mcp-gateway to run" >&2; return 1; }
  fi
}
