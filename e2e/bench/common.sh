# What the benchmarks share; sourced after `cd` to the repository root, with BIN set.
# Usage: need_tools wrk curl; then start processes with `... & PIDS+=($!)`.

need_tools() {
  for tool in "$@"; do
    command -v "$tool" >/dev/null || { echo "missing $tool (apt-get install -y $*)" >&2; exit 1; }
  done
  [[ -x $BIN ]] || cargo build --release --locked
}

WORK=$(mktemp -d)
PIDS=()
cleanup() {
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$WORK"
}
trap cleanup EXIT

# wait_port <port> [host]: until something listens there (10 s at most).
wait_port() {
  for _ in $(seq 100); do
    (exec 3<>"/dev/tcp/${2:-127.0.0.1}/$1") 2>/dev/null && return 0
    sleep 0.1
  done
  echo "nothing listens on ${2:-127.0.0.1}:$1" >&2; exit 1
}

# The median of the numbers on stdin, one per line.
median() { sort -g | awk '{v[NR]=$1} END {print (NR % 2) ? v[(NR+1)/2] : (v[NR/2] + v[NR/2+1]) / 2}'; }
