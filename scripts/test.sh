#!/usr/bin/env bash
# Runs the whole test suite on a fresh machine: makes the Python virtualenv the end-to-end
# tests use (cached in .venv between runs), then checks formatting, lints and runs every test.
set -euo pipefail
cd "$(dirname "$0")/.."

venv=.venv
requirements=tests/requirements.txt
stamp="$venv/.installed-$(sha256sum "$requirements" | cut -c1-16)"
if [ ! -f "$stamp" ]; then
  echo "==> creating $venv with $(tr '\n' ' ' < "$requirements")"
  rm -rf "$venv"
  python3 -m venv "$venv"
  "$venv/bin/pip" install --quiet --disable-pip-version-check -r "$requirements"
  touch "$stamp"
fi
export KEYBROKER_TEST_PYTHON="$PWD/$venv/bin/python"

sudo=""; [ "$(id -u)" -eq 0 ] || sudo="sudo"
# The unit-file test runs systemd-analyze, from Debian's systemd package.
if ! command -v systemd-analyze >/dev/null; then
  echo "==> installing systemd (for systemd-analyze)"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends systemd >/dev/null
fi

echo "==> cargo fmt --check"
cargo fmt --all --check
echo "==> dependency check"
# ring builds three times faster than aws-lc-rs on two cores; keep it out.
if cargo tree --locked -e all -i aws-lc-rs >/dev/null 2>&1; then
  echo "aws-lc-rs is in the dependency tree: $(cargo tree --locked -e all -i aws-lc-rs | tail -n +2 | head -3)" >&2
  exit 1
fi
# Every dependency and dev-dependency in Cargo.toml is used: cargo-machete reads the sources,
# no nightly needed. Built once (about a minute on two cores) into the benchmark tools' cache.
# --with-metadata also checks dev-dependencies; it runs `cargo metadata`, which would quietly
# update a stale Cargo.lock, so the lock is checked first.
cargo metadata --locked --format-version 1 >/dev/null
tools=${XDG_CACHE_HOME:-$HOME/.cache}/keybroker-bench
machete=$(command -v cargo-machete || echo "$tools/bin/cargo-machete")
if [ ! -x "$machete" ]; then
  echo "==> building cargo-machete (cargo install, once)"
  cargo install cargo-machete --version 0.9.2 --locked --quiet --root "$tools"
fi
"$machete" --with-metadata
echo "==> promtool: alert rules (deploy/prometheus)"
# promtool comes from Debian's prometheus package, unpacked into the tools cache, not installed:
# installing it would also set up (and try to start) a Prometheus server.
promtool=$(command -v promtool || echo "$tools/bin/promtool")
if [ ! -x "$promtool" ]; then
  echo "==> fetching promtool (apt-get download prometheus, unpacked)"
  fetch=$(mktemp -d)
  (cd "$fetch" && { apt-get download prometheus 2>/dev/null || { $sudo apt-get update -qq && apt-get download prometheus 2>/dev/null; }; })
  dpkg-deb -x "$fetch"/prometheus_*.deb "$fetch/x"
  mkdir -p "$tools/bin"
  cp "$fetch/x/usr/bin/promtool" "$tools/bin/promtool"
  rm -rf "$fetch"
fi
"$promtool" check rules deploy/prometheus/keybroker-rules.yml
"$promtool" test rules deploy/prometheus/keybroker-rules.test.yml
echo "==> cargo clippy"
cargo clippy --all-targets --locked -- -D warnings
echo "==> release build (scripts/build-release.sh: the shipped binary, for tests/it/shipped.rs and the bench)"
KEYBROKER_SHIPPED_BIN=$(scripts/build-release.sh)
export KEYBROKER_SHIPPED_BIN
echo "==> cargo test"
log=$(mktemp)
trap 'rm -f "$log"' EXIT
cargo test --locked 2>&1 | tee "$log"
echo "==> Debian package (scripts/test-deb.sh)"
scripts/test-deb.sh
echo "==> benchmark smoke (bench/run.sh --smoke)"
bench/run.sh --smoke
# One closing line with the totals over every test binary.
awk '/^test result:/ { p += $4; f += $6; s += $8 } END { printf "%d passed, %d failed, %d skipped\n", p, f, s }' "$log"
