#!/usr/bin/env bash
# Builds the Debian package from the shipped static build and prints its path:
#   target/debian/keybroker_<version>_<arch>.deb
# cargo-deb is installed once (cargo install --locked) into the tools cache if it is missing.
# The package's contents are listed in Cargo.toml ([package.metadata.deb]); its maintainer
# scripts are in deploy/debian/.
set -euo pipefail
cd "$(dirname "$0")/.."
tools=${XDG_CACHE_HOME:-$HOME/.cache}/keybroker-bench
deb=$(command -v cargo-deb || echo "$tools/bin/cargo-deb")
if [ ! -x "$deb" ]; then
  echo "==> installing cargo-deb (cargo install, once)" >&2
  cargo install cargo-deb --version 3.8.0 --locked --quiet --root "$tools" >&2
fi
bin=$(scripts/build-release.sh)
triple=$(basename "$(dirname "$(dirname "$bin")")")

# What the package installs that the binary and the repository generate.
extra=target/debian-extra
rm -rf "$extra"; mkdir -p "$extra/man"
for unit in keybroker.service keybroker.socket; do
  sed 's#/usr/local/bin/keybroker#/usr/bin/keybroker#g' "systemd/$unit" > "$extra/$unit"
done
"$bin" man --dir "$extra/man" >/dev/null
gzip -9n "$extra"/man/*.1
"$bin" completions bash > "$extra/keybroker.bash"
"$bin" completions zsh > "$extra/_keybroker"
"$bin" completions fish > "$extra/keybroker.fish"

"$deb" --no-build --target "$triple" --output target/debian/ --quiet >&2
ls -t target/debian/keybroker_*.deb | head -1
