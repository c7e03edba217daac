#!/usr/bin/env bash
# What sharing limits between routers costs, on 127.0.0.1 (router::peers, router::exchange):
#
# 1. Steady load: wrk against one router alone and against a router with a live peer (the
#    second router, idle, on 127.0.0.2), both in front of engine-sim with a large limit:
#    req/s, latency, the router's CPU time per request and the reports sent per second.
# 2. A burst at a small limit: N streaming requests at once to one router in front of an engine
#    of N slots (N = 8): how many ran on the engine and the slowest time to first byte, alone
#    with a live peer (which must acknowledge the busy router's steps), and with a peer that
#    never answers (the fixed share: the rest wait in the queue, as `burst.mode: Never` here).
#
#   e2e/bench/peers.sh                        # builds the release binary if needed
#   DURATION=10s ROUNDS=5 e2e/bench/peers.sh
#
# Needs wrk and curl.
set -euo pipefail

cd "$(dirname "$0")/../.."
BIN=${SPILLWAY_BIN:-target/release/spillway}
DURATION=${DURATION:-5s}
CONNS=${CONNS:-16}
ROUNDS=${ROUNDS:-3}
BURST=${BURST:-8}
BASE=${BASE_PORT:-19100}

# shellcheck source=e2e/bench/common.sh
source e2e/bench/common.sh
need_tools wrk curl

# engine <port> <limit> <tokens per second>
engine() {
  "$BIN" --log-level warn engine-sim --host 127.0.0.1 --port "$1" --model bench --prefill-ms 0 \
    --tokens-per-second "$3" --max-concurrency "$2" --max-queue 100000 --max-connections 100000 &
  PIDS+=($!)
  wait_port "$1"
}

# router <name> <ip> <port> <engine port> <limit> [peer ip]: peers on UDP port+1.
router() {
  local name=$1 ip=$2 port=$3 eport=$4 limit=$5 peer=${6:-}
  {
    echo "listen: $ip:$port"
    echo "backends: [\"127.0.0.1:$eport\"]"
    echo "maxConcurrencyPerBackend: $limit"
    echo "queue: {limit: 100000, timeoutSeconds: 30}"
    echo "burst: {mode: Never}"
    if [[ -n $peer ]]; then
      echo "peers: {replicas: 2, port: $((port + 1)), addresses: [\"$peer:$((port + 1))\"]}"
    fi
  } >"$WORK/$name.yaml"
  POD_NAME=$name "$BIN" --log-level warn router --config "$WORK/$name.yaml" &
  PIDS+=($!)
  eval "PID_$name=$!"
  wait_port "$port" "$ip"
}

udp_out() { awk '/^Udp:/ {n++; if (n == 2) print $5}' /proc/net/snmp; }
ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }
TICK_US=$(( 1000000 / $(getconf CLK_TCK) ))

cat >"$WORK/post.lua" <<'LUA'
wrk.method = "POST"
wrk.body = '{"model":"bench","prompt":"hi","max_tokens":1}'
wrk.headers["Content-Type"] = "application/json"
done = function(summary, latency, requests)
  io.write(string.format("RESULT %.1f %.1f %.1f %d\n",
    summary.requests / (summary.duration / 1e6),
    latency:percentile(50), latency:percentile(99), summary.requests))
end
LUA

# --- 1. steady load -----------------------------------------------------------------------
E1=$BASE
engine "$E1" 100000 1000000000
router solo 127.0.0.1 $((BASE + 10)) "$E1" 100000
router busy 127.0.0.1 $((BASE + 20)) "$E1" 100000 127.0.0.2
router idle 127.0.0.2 $((BASE + 20)) "$E1" 100000 127.0.0.1
sleep 1

# measure <name> <port>: "rps p50_us p99_us cpu_us_per_req reports_per_s"
measure() {
  local pid before after u0 u1 out
  pid=$(eval echo "\$PID_$1")
  wrk -t1 -c"$CONNS" -d1s -s "$WORK/post.lua" "http://127.0.0.1:$2/v1/completions" >/dev/null
  before=$(ticks "$pid"); u0=$(udp_out)
  out=$(wrk -t1 -c"$CONNS" -d"$DURATION" -s "$WORK/post.lua" "http://127.0.0.1:$2/v1/completions" | awk '/^RESULT/ {print $2, $3, $4, $5}')
  after=$(ticks "$pid"); u1=$(udp_out)
  read -r rps p50 p99 n <<<"$out"
  echo "$rps $p50 $p99 $(echo "($after - $before) * $TICK_US / $n" | bc -l) $(echo "($u1 - $u0) / ${DURATION%s}" | bc -l)"
}

echo "1. steady load: wrk -c$CONNS, $DURATION per run, median of $ROUNDS alternating rounds"
printf '%-16s %10s %9s %9s %11s %10s\n' router "req/s" "p50 ms" "p99 ms" "CPU us/req" "reports/s"
declare -A R A P C U
for round in $(seq "$ROUNDS"); do
  order="solo busy"; (( round % 2 == 0 )) && order="busy solo"
  for t in $order; do
    port=$((BASE + 10)); [[ $t == busy ]] && port=$((BASE + 20))
    read -r r a p c u < <(measure "$t" "$port")
    R[$t]+="$r "; A[$t]+="$a "; P[$t]+="$p "; C[$t]+="$c "; U[$t]+="$u "
  done
done
for t in solo busy; do
  label="alone"; [[ $t == busy ]] && label="with a peer"
  m() { tr ' ' '\n' <<<"$1" | grep . | median; }
  printf '%-16s %10.0f %9.3f %9.3f %11.1f %10.0f\n' "$label" "$(m "${R[$t]}")" \
    "$(echo "$(m "${A[$t]}") / 1000" | bc -l)" "$(echo "$(m "${P[$t]}") / 1000" | bc -l)" \
    "$(m "${C[$t]}")" "$(m "${U[$t]}")"
done

# --- 2. a burst at a small limit ------------------------------------------------------------
E2=$((BASE + 1))
engine "$E2" "$BURST" 50
router solo8 127.0.0.1 $((BASE + 30)) "$E2" "$BURST"
router busy8 127.0.0.1 $((BASE + 40)) "$E2" "$BURST" 127.0.0.2
router idle8 127.0.0.2 $((BASE + 40)) "$E2" "$BURST" 127.0.0.1
# A peer that never answers: the router keeps to its fixed share, as routers did before.
router fixed8 127.0.0.1 $((BASE + 50)) "$E2" "$BURST" 127.0.0.3
sleep 1

# burst <port>: "max_ttfb_ms local_requests"
burst() {
  local body='{"model":"bench","prompt":"hi","max_tokens":50,"stream":true}'
  local before after
  before=$(curl -s "127.0.0.1:$1/metrics" | awk '/^spillway_router_requests_total\{destination="local"/ {s += $2} END {print s + 0}')
  for _ in $(seq "$BURST"); do
    curl -s -o /dev/null -w '%{time_starttransfer}\n' -H 'content-type: application/json' \
      -d "$body" "http://127.0.0.1:$1/v1/completions" &
  done | sort -g | tail -1 | awk '{printf "%.1f ", $1 * 1000}'
  wait
  after=$(curl -s "127.0.0.1:$1/metrics" | awk '/^spillway_router_requests_total\{destination="local"/ {s += $2} END {print s + 0}')
  echo $((after - before))
}

echo
echo "2. $BURST streams at once to one router, engine of $BURST slots (median of $ROUNDS)"
printf '%-16s %16s %10s\n' router "slowest TTFB ms" "local"
for t in solo8 busy8 fixed8; do
  case $t in solo8) port=$((BASE + 30)) ;; busy8) port=$((BASE + 40)) ;; fixed8) port=$((BASE + 50)) ;; esac
  ttfbs=""; locals=""
  for _ in $(seq "$ROUNDS"); do
    read -r ms n < <(burst "$port")
    ttfbs+="$ms "; locals+="$n "
    sleep 1.5
  done
  case $t in solo8) label="alone" ;; busy8) label="with a peer" ;; fixed8) label="fixed share" ;; esac
  printf '%-16s %16.1f %10s\n' "$label" "$(tr ' ' '\n' <<<"$ttfbs" | grep . | median)" \
    "$(tr ' ' '\n' <<<"$locals" | grep . | median)/$BURST"
done
