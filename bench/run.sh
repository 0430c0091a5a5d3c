#!/usr/bin/env bash
# keybroker benchmarks against named peers in the same run (bench/README.md).
#
#   bench/run.sh           full run (about two minutes); writes bench/out/results.md
#   bench/run.sh --smoke   a few seconds per part, to keep the scripts working (CI runs this)
#
# Tools, installed if missing: nginx-light, hyperfine and jq (Debian), oha (cargo install, into
# ~/.cache/keybroker-bench). Everything runs on this machine, over Unix sockets in a temp directory.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
smoke=0
[ "${1:-}" = "--smoke" ] && smoke=1

# Serve-path loads and cold bursts repeat `rounds` times, keybroker and its peer interleaved, and
# the report gives the median of the rounds: one load on two shared cores moves by 10-30%.
if [ $smoke = 1 ]; then dur=1; rounds=1; runs=5; burst=200; starts=3; else dur=5; rounds=5; runs=200; burst=1000; starts=15; fi

# ---- tools ------------------------------------------------------------------------------
need_apt=()
command -v nginx >/dev/null || need_apt+=(nginx-light)
command -v hyperfine >/dev/null || need_apt+=(hyperfine)
command -v jq >/dev/null || need_apt+=(jq)
if [ ${#need_apt[@]} -gt 0 ]; then
  sudo=""; [ "$(id -u)" -eq 0 ] || sudo="sudo"
  echo "==> installing ${need_apt[*]}"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${need_apt[@]}" >/dev/null
fi
tools=${XDG_CACHE_HOME:-$HOME/.cache}/keybroker-bench
oha=$tools/bin/oha
if [ ! -x "$oha" ]; then
  echo "==> building oha (cargo install, once)"
  cargo install oha --locked --quiet --root "$tools"
fi
echo "==> release build (scripts/build-release.sh: static on glibc)"
kb=$(scripts/build-release.sh)
peer=$(scripts/build-release.sh --example cold_peer)

# ---- a daemon with ten dev profiles ----------------------------------------------------
work=$(mktemp -d)
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; rm -rf "$work"; }
trap cleanup EXIT
sock=$work/keybroker.sock
{
  echo "[server]"
  echo "socket = \"$sock\""
  echo "state_dir = \"$work/state\""
  for i in $(seq 0 9); do printf '[profiles.p%s]\nprovider = "dev"\n' "$i"; done
  for i in $(seq 1 $((2 * rounds))); do printf '[profiles.cold%s]\nprovider = "dev"\nprewarm = false\nmint_delay = "200ms"\n' "$i"; done
  printf '[profiles.lazy]\nprovider = "dev"\nprewarm = false\n'
  # Up to 100 profiles in all, as a shared node carries: the rest wait for a first request.
  for i in $(seq 1 $((100 - 2 * rounds - 11))); do printf '[profiles.idle%s]\nprovider = "dev"\nprewarm = false\n' "$i"; done
} > "$work/keybroker.toml"

start_daemon() {
  RUST_LOG=warn "$kb" serve --config "$work/keybroker.toml" 2>>"$work/daemon.log" &
  daemon=$!
  pids+=("$daemon")
  for _ in $(seq 1 500); do curl -sf --unix-socket "$sock" http://kb/healthz >/dev/null 2>&1 && return; sleep 0.01; done
  echo "daemon did not start: $(cat "$work/daemon.log")" >&2; exit 1
}
stop_daemon() { kill -TERM "$daemon"; wait "$daemon" || true; }
rss_kib() { awk '/^VmRSS:/ {print $2}' "/proc/$1/status"; }
hwm_kib() { awk '/^VmHWM:/ {print $2}' "/proc/$1/status"; }

start_daemon
sleep 0.5
idle_rss=$(rss_kib "$daemon")
curl -sf --unix-socket "$sock" http://kb/v1/credentials/p0 > "$work/p0.json"

# ---- nginx serving the same bytes from a Unix socket ------------------------------------
nsock=$work/nginx.sock
cat > "$work/nginx.conf" <<NGINX
user root;
worker_processes auto;
daemon off;
pid $work/nginx.pid;
error_log stderr error;
events { worker_connections 4096; }
http {
  access_log off;
  keepalive_requests 10000000;
  server {
    listen unix:$nsock backlog=4096;
    location = /v1/credentials/p0 {
      default_type application/json;
      add_header Cache-Control no-store;
      alias $work/p0.json;
    }
  }
}
NGINX
nginx -c "$work/nginx.conf" -p "$work" 2>>"$work/nginx.log" &
pids+=($!)
for _ in $(seq 1 200); do [ -S "$nsock" ] && break; sleep 0.01; done
cmp -s <(curl -sf --unix-socket "$nsock" http://kb/v1/credentials/p0) "$work/p0.json" || { echo "nginx does not serve the same bytes" >&2; exit 1; }

# ---- serve path: oha, 64 connections ------------------------------------------------------
load() { # socket, extra oha flags... -> "rps p50_ms p99_ms"
  local s=$1; shift
  "$oha" --no-tui --output-format json -c 64 -z "${dur}s" --unix-socket "$s" "$@" http://kb/v1/credentials/p0 > "$work/oha.json"
  jq -r '[.summary.requestsPerSec, (.latencyPercentiles.p50*1000), (.latencyPercentiles.p99*1000), (.statusCodeDistribution["200"] // 0)] | @tsv' "$work/oha.json"
}
echo "==> serve path ($rounds rounds of $dur s per server and mode, interleaved)"
# One unrecorded second each first, so that no round starts on a cold server.
dur=1 load "$sock" > /dev/null; dur=1 load "$nsock" > /dev/null
: > "$work/serve.tsv"
for r in $(seq 1 "$rounds"); do
  order="kb ng"; [ $((r % 2)) = 0 ] && order="ng kb"  # neither always runs first
  for mode in ka nc; do
    for who in $order; do
      s=$sock; [ $who = ng ] && s=$nsock
      flags=(); [ $mode = nc ] && flags=(--disable-keepalive)
      read -r rps p50 p99 ok < <(load "$s" "${flags[@]}") || { echo "the $mode load against $who gave no result" >&2; exit 1; }
      [ "$ok" -gt 0 ] || { echo "a load run against $who got no 200s" >&2; exit 1; }
      printf '%s\t%s\t%s\t%s\t%s\t%s\n' "$mode" "$who" "$r" "$rps" "$p50" "$p99" >> "$work/serve.tsv"
    done
  done
done
load_hwm=$(hwm_kib "$daemon")
median_of() { sort -g | awk '{a[NR]=$1} END {print (NR % 2) ? a[(NR+1)/2] : (a[NR/2] + a[NR/2+1]) / 2}'; }
# The median over the rounds of one column (4 req/s, 5 p50, 6 p99) for a mode and server.
med() { awk -F'\t' -v m="$1" -v w="$2" -v c="$3" '$1 == m && $2 == w {print $c}' "$work/serve.tsv" | median_of; }
for mode in ka nc; do
  for who in kb ng; do
    for col in 4:rps 5:p50 6:p99; do printf -v "${who}_${mode}_${col#*:}" '%s' "$(med "$mode" "$who" "${col%%:*}")"; done
  done
done
# keybroker's req/s over nginx's, round by round, to show the spread behind the medians.
round_ratios() { awk -F'\t' -v m="$1" '$1 == m {v[$3 "," $2] = $4; if ($3 > n) n = $3} END {for (r = 1; r <= n; r++) printf "%s%.2f", (r > 1 ? " " : ""), v[r ",kb"] / v[r ",ng"]}' "$work/serve.tsv"; }

# ---- client path: hyperfine ---------------------------------------------------------------
echo "==> client path ($runs runs each)"
hyperfine -N --warmup 10 --runs "$runs" --export-json "$work/hf.json" \
  -n keybroker "$kb credential-process --profile p0 --socket $sock" \
  -n cat "cat $work/p0.json" \
  -n curl "curl -s --unix-socket $sock http://kb/v1/credentials/p0" >/dev/null
median() { jq -r --arg n "$1" '.results[] | select(.command == $n) | .median * 1000' "$work/hf.json"; }
kb_med=$(median keybroker); cat_med=$(median cat); curl_med=$(median curl)

# ---- cold burst: concurrent first requests share one mint -------------------------------
# Each burst goes to a profile nobody has asked for yet (cold1, cold2, ...), and the same burst
# to cold_peer (examples/cold_peer.rs; who goes first alternates): a server that does nothing but
# hold every request until 200 ms after the first and write fixed bytes, the floor for such a
# burst on this machine whatever the server. Two load generators, because they make different
# bursts:
#   oha   counts each request's time from before its connect, and as its runtime schedules
#         1000 tasks, all of them connect before the first sends its request (seen with perf
#         syscall tracepoints): the first request leaves only once every connection is up.
#   curl  N parallel transfers (4 processes of N/4: curl caps one process at 300), each sending
#         its request as soon as its connection is up, as N separate clients would; each
#         transfer's time_total also counts from before its connect.
echo "==> cold burst ($rounds rounds of $burst clients with oha and with curl, dev mint_delay 200 ms; against cold_peer too)"
oha_burst() { # socket, profile -> "p99_ms answered_200"
  "$oha" --no-tui --output-format json -n "$burst" -c "$burst" --unix-socket "$1" "http://kb/v1/credentials/$2" |
    jq -r '[(.latencyPercentiles.p99*1000), (.statusCodeDistribution["200"] // 0)] | @tsv'
}
curl_burst() { # socket, profile -> "p99_ms answered_200"
  local each=$((burst / 4)) k cs=()
  for k in 1 2 3 4; do
    curl -s --unix-socket "$1" -Z --parallel-max "$each" --parallel-immediate -o /dev/null \
      -w '%{time_total} %{http_code}\n' "http://kb/v1/credentials/$2?[1-$each]" > "$work/curl$k.txt" 2>/dev/null &
    cs+=($!)
  done
  wait "${cs[@]}" || true
  # p99 as oha computes it: the sorted times' element floor(0.99 n), from 0, of the transfers
  # that got an answer (curl's code 000: none).
  cat "$work"/curl?.txt | awk '$2 != "000"' | sort -g |
    awk '{t[NR] = $1 * 1000; if ($2 == 200) ok++} END {i = int(NR * 0.99) + 1; if (i > NR) i = NR; printf "%.3f\t%d\n", t[i], ok + 0}'
}
start_peer() { # -> cold_peer listening on $psock, its pid in $peer_pid
  rm -f "$psock" "$work/peer.out"
  "$peer" "$psock" "$work/p0.json" 200 > "$work/peer.out" 2>>"$work/peer.log" &
  peer_pid=$!
  pids+=("$peer_pid")
  for _ in $(seq 1 200); do grep -q listening "$work/peer.out" 2>/dev/null && return; sleep 0.01; done
  echo "cold_peer did not start: $(cat "$work/peer.log")" >&2; exit 1
}
: > "$work/cold.tsv"
burst_mints=()
psock=$work/cold_peer.sock
for r in $(seq 1 "$rounds"); do
  order="kb peer"; [ $((r % 2)) = 0 ] && order="peer kb"
  for gen in oha curl; do
    for who in $order; do
      if [ $who = kb ]; then
        profile=cold$r; [ $gen = curl ] && profile=cold$((rounds + r))
        read -r p99 ok < <("${gen}_burst" "$sock" "$profile") || { echo "the $gen burst against keybroker gave no result" >&2; exit 1; }
        burst_mints+=("$(curl -sf --unix-socket "$sock" http://kb/v1/status | jq -r --arg p "$profile" '.profiles[] | select(.name == $p) | .counters.mints')")
      else
        start_peer
        read -r p99 ok < <("${gen}_burst" "$psock" p0) || { echo "the $gen burst against cold_peer gave no result" >&2; exit 1; }
        kill "$peer_pid" 2>/dev/null || true; wait "$peer_pid" 2>/dev/null || true
      fi
      printf '%s\t%s\t%s\t%s\n' "$gen" "$who" "$p99" "$ok" >> "$work/cold.tsv"
    done
  done
done
[ "$(wc -l < "$work/cold.tsv")" = $((4 * rounds)) ] || { echo "cold bursts: some burst gave no result" >&2; cat "$work/cold.tsv" >&2; exit 1; }
cold_p99s() { awk -F'\t' -v g="$1" -v w="$2" '$1 == g && $2 == w {print $3}' "$work/cold.tsv"; }
cold_median() { cold_p99s "$1" "$2" | median_of; }
cold_list() { cold_p99s "$1" "$2" | awk '{printf "%s%.0f", (NR > 1 ? " " : ""), $1}'; }
cold_answered() { awk -F'\t' -v w="$1" '$2 == w {n += $4} END {print n + 0}' "$work/cold.tsv"; }
all_one=1; for m in "${burst_mints[@]}"; do [ "$m" = 1 ] || all_one=0; done
burst_ok=$(cold_answered kb); peer_ok=$(cold_answered peer); bursts_total=$((2 * rounds * burst))
# The same burst once the key is ready, against keybroker and nginx: what N simultaneous new
# connections cost on this machine with no mint to wait for.
warm_p99() { oha_burst "$1" "$2" | cut -f1; }
warm_kb_p99=$(warm_p99 "$sock" cold1)
warm_ng_p99=$(warm_p99 "$nsock" p0)
stop_daemon

# ---- start-up: exec to a served request (no prewarm wait: profile "lazy") ---------------
echo "==> start-up ($starts runs)"
times=()
for _ in $(seq 1 "$starts"); do
  t0=$(date +%s%N)
  RUST_LOG=warn "$kb" serve --config "$work/keybroker.toml" 2>>"$work/daemon.log" &
  daemon=$!
  pids+=("$daemon")
  # Polled with keybroker's own client (under 1 ms a try; curl takes 7-10).
  tries=0
  until "$kb" credential-process --profile lazy --socket "$sock" >/dev/null 2>&1; do
    tries=$((tries + 1))
    [ $tries -lt 5000 ] || { echo "daemon served nothing: $(tail -5 "$work/daemon.log")" >&2; exit 1; }
  done
  t1=$(date +%s%N)
  times+=($(( (t1 - t0) / 1000 )))
  stop_daemon
done
startup_ms=$(printf '%s\n' "${times[@]}" | sort -n | awk '{a[NR]=$1} END {printf "%.1f", a[int((NR+1)/2)]/1000}')

# ---- report -----------------------------------------------------------------------------
ratio() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.2f", a / b }'; }
verdict() { awk -v ok="$1" 'BEGIN { print (ok ? "yes" : "**no**") }'; }
mkdir -p bench/out
out=bench/out/results.md
{
  echo "# keybroker benchmark results"
  echo
  echo "$( [ $smoke = 1 ] && echo 'Smoke run (numbers are not meaningful).' || echo 'Full run.') $(date -u +%Y-%m-%dT%H:%MZ), $(nproc) cores, $(awk '/MemTotal/ {printf "%.0f GiB", $2/1048576}' /proc/meminfo), $(uname -sr), keybroker $(git rev-parse --short HEAD 2>/dev/null || echo '?'), $(nginx -v 2>&1 | sed 's/.*: //'), oha $("$oha" --version | awk '{print $2}'), hyperfine $(hyperfine --version | awk '{print $2}')."
  echo
  echo "| serve path, 64 connections, median of $rounds rounds | keybroker req/s | nginx req/s | ratio | keybroker p50 / p99 ms | nginx p50 / p99 ms | target met |"
  echo "|---|---|---|---|---|---|---|"
  printf '| keep-alive (target: at least 1.0x) | %.0f | %.0f | %s | %.3f / %.3f | %.3f / %.3f | %s |\n' "$kb_ka_rps" "$ng_ka_rps" "$(ratio "$kb_ka_rps" "$ng_ka_rps")" "$kb_ka_p50" "$kb_ka_p99" "$ng_ka_p50" "$ng_ka_p99" "$(verdict "$(awk -v a="$kb_ka_rps" -v b="$ng_ka_rps" 'BEGIN{print (a>=b)}')")"
  printf '| new connection per request (target: at least 0.9x) | %.0f | %.0f | %s | %.3f / %.3f | %.3f / %.3f | %s |\n' "$kb_nc_rps" "$ng_nc_rps" "$(ratio "$kb_nc_rps" "$ng_nc_rps")" "$kb_nc_p50" "$kb_nc_p99" "$ng_nc_p50" "$ng_nc_p99" "$(verdict "$(awk -v a="$kb_nc_rps" -v b="$ng_nc_rps" 'BEGIN{print (a>=0.9*b)}')")"
  echo
  echo "keybroker's req/s over nginx's, round by round: keep-alive $(round_ratios ka); new connection $(round_ratios nc)."
  echo
  echo "| client path (median of $runs) | ms | vs cat | vs curl | target met |"
  echo "|---|---|---|---|---|"
  printf '| keybroker credential-process | %.3f | %sx | %sx faster | %s |\n' "$kb_med" "$(ratio "$kb_med" "$cat_med")" "$(ratio "$curl_med" "$kb_med")" "$(verdict "$(awk -v k="$kb_med" -v c="$cat_med" -v u="$curl_med" 'BEGIN{print (k<=1.3*c)}')")"
  printf '| cat of the same JSON (floor) | %.3f | 1.00x | | |\n' "$cat_med"
  printf '| curl --unix-socket | %.3f | %sx | | |\n' "$curl_med" "$(ratio "$curl_med" "$cat_med")"
  echo
  echo "| other | value | target | met |"
  echo "|---|---|---|---|"
  printf '| cold bursts of %s: mints in each | %s | exactly 1 | %s |\n' "$burst" "${burst_mints[*]}" "$(verdict "$all_one")"
  for gen in oha curl; do
    kb_p99=$(cold_median "$gen" kb); peer_p99=$(cold_median "$gen" peer)
    if [ "$gen" = curl ]; then
      target="within 15 ms of cold_peer"; met=$(verdict "$(awk -v p="$kb_p99" -v q="$peer_p99" 'BEGIN{print (p<=q+15)}')")
    else
      target="(for information)"; met=""
    fi
    printf '| cold burst of %s (%s): p99 ms, median of %s bursts (mint takes 200 ms) | %.1f (%s) | %s | %s |\n' "$burst" "$gen" "$rounds" "$kb_p99" "$(cold_list "$gen" kb)" "$target" "$met"
    printf '| the same %s bursts against cold_peer (the floor: holds each request 200 ms, writes fixed bytes) | %.1f (%s); keybroker %+.1f ms | | |\n' "$gen" "$peer_p99" "$(cold_list "$gen" peer)" "$(awk -v a="$kb_p99" -v b="$peer_p99" 'BEGIN{print a-b}')"
  done
  printf '| cold bursts: HTTP 200 answers, keybroker / cold_peer | %s / %s of %s | all | %s |\n' "$burst_ok" "$peer_ok" "$bursts_total" "$(verdict "$([ "$burst_ok" = "$bursts_total" ] && echo 1 || echo 0)")"
  printf '| a burst of %s with the key ready: keybroker / nginx p99 ms | %.1f / %.1f | (new connections alone) | |\n' "$burst" "$warm_kb_p99" "$warm_ng_p99"
  printf '| idle RSS, %s profiles (10 prewarmed) | %.1f MiB | under 10 MiB | %s |\n' "100" "$(awk -v k="$idle_rss" 'BEGIN{print k/1024}')" "$(verdict "$(awk -v k="$idle_rss" 'BEGIN{print (k<10240)}')")"
  printf '| peak RSS under the serve-path load | %.1f MiB | under 20 MiB | %s |\n' "$(awk -v k="$load_hwm" 'BEGIN{print k/1024}')" "$(verdict "$(awk -v k="$load_hwm" 'BEGIN{print (k<20480)}')")"
  printf '| start-up: exec to a served request (median of %s) | %s ms | | |\n' "$starts" "$startup_ms"
} > "$out"
# Scale: 10,000 dev profiles on one daemon (bench/scale.sh fails on a profile missing from
# status or a key left at stop; speed and memory are reported).
{ echo; bench/scale.sh "$kb"; } >> "$out"
cat "$out"
# The one hard check, even in a smoke run: a cold burst is one mint, and every client is answered.
[ "$all_one" = 1 ] && [ "$burst_ok" = "$bursts_total" ] && [ "$peer_ok" = "$bursts_total" ] ||
  { echo "cold bursts: mints ${burst_mints[*]}; keybroker answered $burst_ok and cold_peer $peer_ok of $bursts_total" >&2; exit 1; }
