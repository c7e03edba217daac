#!/usr/bin/env bash
# Router overhead on 127.0.0.1: wrk against engine-sim directly, through `spillway router`, and
# through nginx as a plain keep-alive reverse proxy to the same engine-sim, in one run.
#
#   e2e/bench/router.sh                      # builds the release binary if needed
#   DURATION=20s LOADS="8 64" ROUNDS=5 e2e/bench/router.sh
#   PAIRED=1 DURATION=3s WARMUP=1s LOADS=16 ROUNDS=60 e2e/bench/router.sh
#
# PAIRED=1 measures only the router and nginx, alternating which goes first: with short
# measurements each round is a close pair, so the round-by-round ratios move less with the
# machine than the medians do.
#
# Each measurement also reads the CPU time the target's processes (the router; nginx's master
# and workers) spent over the measured run, reported as CPU microseconds per request.
#
# Needs wrk and nginx (Debian: apt-get install -y wrk nginx). Requests are small and not
# streamed: POST /v1/completions with max_tokens 1, engine-sim with no artificial delay.
set -euo pipefail

cd "$(dirname "$0")/../.."
BIN=${SPILLWAY_BIN:-target/release/spillway}
DURATION=${DURATION:-10s}
WARMUP=${WARMUP:-3s}
LOADS=${LOADS:-"4 64"}          # concurrent connections: moderate, then high
THREADS=${THREADS:-1}
ROUNDS=${ROUNDS:-6}             # the median of these is reported
ENGINE_PORT=${ENGINE_PORT:-18000}
ROUTER_PORT=${ROUTER_PORT:-18080}
NGINX_PORT=${NGINX_PORT:-18081}
ROUTER_THREADS=${ROUTER_THREADS:-}   # empty: the router's default
# VERBOSE=1 prints every measurement to stderr.

# shellcheck source=e2e/bench/common.sh
source e2e/bench/common.sh
need_tools wrk nginx

"$BIN" --log-level warn engine-sim --port "$ENGINE_PORT" --model bench --prefill-ms 0 \
  --tokens-per-second 1000000000 --max-concurrency 100000 --max-queue 100000 \
  --max-connections 100000 &
PIDS+=($!)

cat >"$WORK/router.yaml" <<YAML
listen: 127.0.0.1:$ROUTER_PORT
backends: ["127.0.0.1:$ENGINE_PORT"]
maxConcurrencyPerBackend: 100000
queue: {limit: 100000, timeoutSeconds: 30}
burst: {mode: Never}
YAML
"$BIN" --log-level warn router --config "$WORK/router.yaml" ${ROUTER_THREADS:+--threads "$ROUTER_THREADS"} &
ROUTER_PID=$!
PIDS+=($ROUTER_PID)

mkdir -p "$WORK/nginx"
cat >"$WORK/nginx.conf" <<NGINX
daemon off;
worker_processes auto;
pid $WORK/nginx/nginx.pid;
error_log $WORK/nginx/error.log warn;
events { worker_connections 8192; }
http {
  access_log off;
  client_body_temp_path $WORK/nginx/body;
  proxy_temp_path $WORK/nginx/proxy;
  fastcgi_temp_path $WORK/nginx/fastcgi;
  uwsgi_temp_path $WORK/nginx/uwsgi;
  scgi_temp_path $WORK/nginx/scgi;
  upstream engine {
    server 127.0.0.1:$ENGINE_PORT;
    keepalive 256;
  }
  server {
    listen 127.0.0.1:$NGINX_PORT;
    location / {
      proxy_pass http://engine;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
    }
  }
}
NGINX
nginx -c "$WORK/nginx.conf" -p "$WORK/nginx" &
NGINX_PID=$!
PIDS+=($NGINX_PID)

wait_port "$ENGINE_PORT"; wait_port "$ROUTER_PORT"; wait_port "$NGINX_PORT"

cat >"$WORK/post.lua" <<'LUA'
wrk.method = "POST"
wrk.body = '{"model":"bench","prompt":"hi","max_tokens":1}'
wrk.headers["Content-Type"] = "application/json"
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format("RESULT %.1f %.1f %.1f %d %d\n",
    summary.requests / (summary.duration / 1e6),
    latency:percentile(50), latency:percentile(99),
    e.connect + e.read + e.write + e.timeout + e.status, summary.requests))
end
LUA

# CPU time (user + system, in clock ticks) of a target's processes: nginx's workers count.
cpu_ticks() {
  local pids
  case $1 in
    direct) echo 0; return 0 ;;
    router) pids=$ROUTER_PID ;;
    nginx) pids="$NGINX_PID $(pgrep -P "$NGINX_PID" | paste -sd' ')" ;;
  esac
  for p in $pids; do cat "/proc/$p/stat"; done | awk '{t += $14 + $15} END {print t + 0}'
}
TICK_US=$(( 1000000 / $(getconf CLK_TCK) ))

# One measurement: prints "rps p50_us p99_us errors requests cpu_us_per_request".
measure() {
  local target=$1 conns=$2 port before after
  port=$(port_of "$target")
  wrk -t"$THREADS" -c"$conns" -d"$WARMUP" -s "$WORK/post.lua" "http://127.0.0.1:$port/v1/completions" >/dev/null
  before=$(cpu_ticks "$target")
  wrk -t"$THREADS" -c"$conns" -d"$DURATION" -s "$WORK/post.lua" "http://127.0.0.1:$port/v1/completions" \
    | awk '/^RESULT/ {print $2, $3, $4, $5, $6}' | {
      read -r r a b e n
      after=$(cpu_ticks "$target")
      echo "$r $a $b $e $n $(echo "($after - $before) * $TICK_US / $n" | bc -l)"
    }
}

port_of() {
  case $1 in
    direct) echo "$ENGINE_PORT" ;;
    router) echo "$ROUTER_PORT" ;;
    nginx) echo "$NGINX_PORT" ;;
  esac
}

echo "wrk: $THREADS thread(s), $DURATION per measurement after $WARMUP warm-up, median of $ROUNDS rounds (each round a different order)"
printf '%-8s %-6s %12s %10s %10s %12s %8s\n' target conns "req/s" "p50 ms" "p99 ms" "CPU us/req" errors
TARGETS=(direct router nginx)
# A run can leave traces for the next (engine-sim's allocator, sockets), so each target must
# follow each other one as often: a plain rotation keeps the cyclic order and always puts the
# router after direct. Round r takes the r-th of the six orders.
ORDERS=("0 1 2" "0 2 1" "1 0 2" "1 2 0" "2 0 1" "2 1 0")
if [[ -n ${PAIRED:-} ]]; then
  TARGETS=(router nginx)
  ORDERS=("0 1" "1 0")
fi
for conns in $LOADS; do
  declare -A R A B C E
  for round in $(seq "$ROUNDS"); do
    for i in ${ORDERS[$(( (round - 1) % ${#ORDERS[@]} ))]}; do
      t=${TARGETS[$i]}
      read -r r a b errs _n c < <(measure "$t" "$conns")
      if [[ -n ${VERBOSE:-} ]]; then echo "  round $round $t: $r req/s, p50 $a us, p99 $b us, CPU $c us/req" >&2; fi
      R[$t]+="$r "; A[$t]+="$a "; B[$t]+="$b "; C[$t]+="$c "; E[$t]=$(( ${E[$t]:-0} + errs ))
    done
  done
  declare -A rps p50 p99 cpu
  for t in "${TARGETS[@]}"; do
    rps[$t]=$(tr ' ' '\n' <<<"${R[$t]}" | grep . | median)
    p50[$t]=$(tr ' ' '\n' <<<"${A[$t]}" | grep . | median)
    p99[$t]=$(tr ' ' '\n' <<<"${B[$t]}" | grep . | median)
    cpu[$t]=$(tr ' ' '\n' <<<"${C[$t]}" | grep . | median)
    printf '%-8s %-6s %12.0f %10.3f %10.3f %12.1f %8s\n' "$t" "$conns" "${rps[$t]}" \
      "$(echo "${p50[$t]} / 1000" | bc -l)" "$(echo "${p99[$t]} / 1000" | bc -l)" "${cpu[$t]}" "${E[$t]}"
  done
  for via in router nginx; do
    [[ -n ${p50[direct]:-} ]] || break
    printf '  %-6s added latency at %s conns: p50 %+.3f ms, p99 %+.3f ms; throughput %.0f%% of direct\n' \
      "$via" "$conns" \
      "$(echo "(${p50[$via]} - ${p50[direct]}) / 1000" | bc -l)" \
      "$(echo "(${p99[$via]} - ${p99[direct]}) / 1000" | bc -l)" \
      "$(echo "100 * ${rps[$via]} / ${rps[direct]}" | bc -l)"
  done
  # Round by round: the router and nginx ran minutes apart at most, so their ratio moves less
  # with the machine than either figure does.
  paired() {  # paired <router values> <nginx values> -> "median_ratio rounds_router_lower"
    paste -d' ' <(tr ' ' '\n' <<<"$1" | grep .) <(tr ' ' '\n' <<<"$2" | grep .) |
      awk '{print $1 / $2}' | { mapfile -t q; printf '%s\n' "${q[@]}" | median
        printf '%s\n' "${q[@]}" | awk '$1 < 1 {n++} END {print n + 0}'; } | paste -sd' '
  }
  read -r rr rl < <(paired "${R[router]}" "${R[nginx]}")
  read -r ar al < <(paired "${A[router]}" "${A[nginx]}")
  read -r pr pl < <(paired "${B[router]}" "${B[nginx]}")
  read -r cr cl < <(paired "${C[router]}" "${C[nginx]}")
  printf '  router/nginx round by round at %s conns: req/s x%.3f (ahead in %d of %d), p50 x%.3f (lower in %d of %d), p99 x%.3f (lower in %d of %d), CPU/req x%.3f (lower in %d of %d)\n' \
    "$conns" "$rr" $(( ROUNDS - rl )) "$ROUNDS" "$ar" "$al" "$ROUNDS" "$pr" "$pl" "$ROUNDS" "$cr" "$cl" "$ROUNDS"
  unset R A B C E rps p50 p99 cpu
done
echo "router RSS: $(awk '/VmRSS/ {print $2, $3}' /proc/$ROUTER_PID/status), peak $(awk '/VmHWM/ {print $2, $3}' /proc/$ROUTER_PID/status)"
