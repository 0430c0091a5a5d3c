#!/usr/bin/env bash
# Scale: one daemon with 10,000 prewarmed dev profiles (bench/README.md). Prints a table:
# how soon /healthz answers and every profile is ready, the resident memory, whether
# `status --json` lists them all, and how long the stop takes to revoke every key.
#
#   bench/scale.sh KEYBROKER_BINARY
#
# Fails only on what is not a matter of speed: a profile missing from status, a key left
# unrevoked, or a stop past shutdown_timeout.
set -euo pipefail
kb=$1
profiles=10000
work=$(mktemp -d)
daemon=""
cleanup() { [ -n "$daemon" ] && kill -KILL "$daemon" 2>/dev/null; rm -rf "$work"; }
trap cleanup EXIT
sock=$work/keybroker.sock
{
  echo "[server]"
  echo "socket = \"$sock\""
  echo "state_dir = \"$work/state\""
  echo "shutdown_timeout = \"20s\""
  for i in $(seq 0 $((profiles - 1))); do printf '[profiles.p%s]\nprovider = "dev"\n' "$i"; done
} > "$work/keybroker.toml"

now_ms() { echo $(($(date +%s%N) / 1000000)); }
probe() { "$kb" probe "$1" --socket "$sock" >/dev/null 2>&1; }
t0=$(now_ms)
RUST_LOG=info "$kb" serve --config "$work/keybroker.toml" 2>"$work/daemon.log" &
daemon=$!
until probe live; do
  kill -0 "$daemon" 2>/dev/null || { echo "scale: the daemon died: $(tail -3 "$work/daemon.log")" >&2; exit 1; }
  [ $(($(now_ms) - t0)) -lt 30000 ] || { echo "scale: /healthz never answered" >&2; exit 1; }
done
live_ms=$(($(now_ms) - t0))
until probe ready; do
  [ $(($(now_ms) - t0)) -lt 60000 ] || { echo "scale: not every profile was ready after 60 s" >&2; exit 1; }
  sleep 0.02
done
ready_ms=$(($(now_ms) - t0))
rss=$(awk '/^VmRSS:/ {print $2}' "/proc/$daemon/status")
hwm=$(awk '/^VmHWM:/ {print $2}' "/proc/$daemon/status")
listed=$("$kb" status --json --socket "$sock" | jq '.profiles | length')
status_bytes=$("$kb" status --json --socket "$sock" | wc -c)
t1=$(now_ms)
kill -TERM "$daemon"
code=0; wait "$daemon" || code=$?
daemon=""
stop_ms=$(($(now_ms) - t1))
stopped=$(grep -o 'stopped revoked=[0-9]* unrevoked=[0-9]*' "$work/daemon.log" || echo "no stop line")

mib() { awk -v k="$1" 'BEGIN { printf "%.1f MiB", k / 1024 }'; }
met() { awk -v ok="$1" 'BEGIN { print (ok ? "yes" : "**no**") }'; }
echo "| $profiles dev profiles, all prewarmed | value | target | met |"
echo "|---|---|---|---|"
echo "| start to /healthz answering | $live_ms ms | within 100 ms | $(met $((live_ms <= 100))) |"
echo "| start to every profile ready (/readyz 200) | $ready_ms ms | within 5 s | $(met $((ready_ms <= 5000))) |"
echo "| resident memory once ready (peak) | $(mib "$rss") ($(mib "$hwm")) | under 64 MiB | $(met $((hwm < 65536))) |"
echo "| status --json | $listed profiles, $((status_bytes / 1024)) KiB | all $profiles | $(met $((listed == profiles))) |"
echo "| SIGTERM to exit, revoking every key | $stop_ms ms, exit $code, $stopped | within shutdown_timeout (20 s), none left | $(met $((stop_ms <= 20000 && code == 0))) |"

[ "$listed" = "$profiles" ] || { echo "scale: status listed $listed of $profiles profiles" >&2; exit 1; }
[ "$code" = 0 ] && [ "$stopped" = "stopped revoked=$profiles unrevoked=0" ] && [ "$stop_ms" -le 20000 ] ||
  { echo "scale: the stop took $stop_ms ms, exit $code: $stopped" >&2; exit 1; }
