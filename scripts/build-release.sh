#!/usr/bin/env bash
# Builds the release binary the way we ship it and prints its path.
#
#   scripts/build-release.sh                   -> target/<host triple>/release/keybroker
#   scripts/build-release.sh --example NAME    -> .../release/examples/NAME, built the same way
#                                                 (bench/run.sh's peers share the build's deps)
#
# On glibc Linux the binary is linked statically (`-C target-feature=+crt-static`), still
# position-independent (static-pie, so ASLR applies). aws-cli spawns `keybroker
# credential-process` for every command, so start-up is the client's whole cost: without the
# dynamic loader (and libgcc_s and libm) a Rust program starts about 0.25 ms sooner on our
# 2-core VM, a fifth of the client's run (bench/RESULTS.md). The flag needs an explicit
# `--target`, or it would also apply to proc-macros, which cannot be static.
#
# Name lookups still work: glibc 2.34 and later carry the `files` and `dns` NSS modules inside
# libc itself, which is all the daemon's provider endpoints need (/etc/hosts, then DNS). Other
# `hosts:` modules in /etc/nsswitch.conf (resolve, mdns, myhostname) are loaded at run time and
# must come from the same glibc version as the build; build on the release you deploy to.
# KEYBROKER_DYNAMIC=1 builds the ordinary dynamically linked binary instead.
set -euo pipefail
cd "$(dirname "$0")/.."
host=$(rustc -vV | sed -n 's/^host: //p')
what=(--bin keybroker); out=keybroker
if [ "${1:-}" = --example ]; then
  [ -n "${2:-}" ] || { echo "usage: $0 [--example NAME]" >&2; exit 64; }
  what=(--example "$2"); out="examples/$2"
fi
if [ "${KEYBROKER_DYNAMIC:-0}" != 1 ] && [[ $host == *-linux-gnu ]]; then
  RUSTFLAGS="${RUSTFLAGS:-} -C target-feature=+crt-static" cargo build --release --locked --quiet --target "$host" "${what[@]}" >&2
  echo "$PWD/target/$host/release/$out"
else
  cargo build --release --locked --quiet "${what[@]}" >&2
  echo "$PWD/target/release/$out"
fi
