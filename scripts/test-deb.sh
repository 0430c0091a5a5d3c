#!/usr/bin/env bash
# The Debian package, checked the way an operator meets it (run by scripts/test.sh, as root):
# it builds, lintian finds no error or warning that is not overridden with a reason, it
# installs on a machine where systemd is not running, creates the keybroker user, puts a
# working /usr/bin/keybroker and units systemd-analyze accepts, and a purge leaves none of its
# files behind. It installs and purges the package on this machine, so it refuses to run
# where keybroker is already installed.
set -euo pipefail
cd "$(dirname "$0")/.."
sudo=""; [ "$(id -u)" -eq 0 ] || sudo="sudo"
if dpkg -s keybroker >/dev/null 2>&1 || [ -e /usr/bin/keybroker ]; then
  echo "test-deb: keybroker is already installed on this machine; this test installs and purges it, so it will not run here" >&2
  exit 1
fi
if ! command -v lintian >/dev/null; then
  echo "==> installing lintian"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends lintian >/dev/null
fi
deb=$(scripts/package-deb.sh)
echo "==> lintian $deb"
lintian --fail-on error,warning "$deb" 2> >(grep -v 'running with root privileges' >&2)

echo "==> dpkg -i"
$sudo dpkg -i "$deb" >/dev/null
trap '$sudo dpkg --purge keybroker >/dev/null 2>&1 || true' EXIT
getent passwd keybroker >/dev/null || { echo "test-deb: no keybroker user after install" >&2; exit 1; }
[ "$(stat -c %G /etc/keybroker/keybroker.toml)" = keybroker ] || { echo "test-deb: the config is not group keybroker" >&2; exit 1; }
/usr/bin/keybroker --version
grep -q '^ExecStart=/usr/bin/keybroker ' /lib/systemd/system/keybroker.service || { echo "test-deb: ExecStart does not run /usr/bin/keybroker" >&2; exit 1; }
systemd-analyze verify /lib/systemd/system/keybroker.service /lib/systemd/system/keybroker.socket
[ -e /usr/share/man/man1/keybroker.1.gz ] && [ -e /usr/share/bash-completion/completions/keybroker ] || { echo "test-deb: man page or completion missing" >&2; exit 1; }

echo "==> dpkg --purge"
files=$(mktemp)
dpkg -L keybroker > "$files"
$sudo dpkg --purge keybroker >/dev/null
trap - EXIT
left=()
while IFS= read -r f; do
  # Directories the package shares with others (/usr/share/doc, /lib/systemd/system...) stay.
  if [ -e "$f" ] && { [ ! -d "$f" ] || [ "$f" = /etc/keybroker ] || [ "$f" = /usr/share/doc/keybroker ]; }; then
    left+=("$f")
  fi
done < "$files"
rm -f "$files"
if [ ${#left[@]} -gt 0 ]; then
  echo "test-deb: left after purge: ${left[*]}" >&2
  exit 1
fi
echo "test-deb: ok"
