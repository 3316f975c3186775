#!/usr/bin/env bash
# Cross-node benchmark: a three-node release cluster on loopback, clients over mutual TLS. Each
# scenario runs twice in one run — everything on node 1, then publishers on node 1 and
# subscribers on node 2 (every message crosses a QUIC forwarding link) — and the table of both,
# with cross-node/single-node ratios, goes to docs/performance.md (between the cluster markers).
# Throughput scenarios run three rounds, alternating the placements, and report each placement's
# median round: single runs on this shared machine vary by up to 1.6x.
#
#   bash benches/cluster.sh            # full run, a few minutes
#   bash benches/cluster.sh --quick    # smoke run
set -euo pipefail
cd "$(dirname "$0")/.."

quick=0
command_line="bash benches/cluster.sh${*:+ $*}"
case "${1:-}" in
  --quick) quick=1 ;;
  "") ;;
  *) echo "cluster.sh: unknown option $1" >&2; exit 2 ;;
esac

target_dir=${CARGO_TARGET_DIR:-$(pwd)/target}
echo "==> building release binaries"
cargo build --release --locked -p rampart-node -p rampart-benches
rampart="$target_dir/release/rampart"
loadgen="$target_dir/release/loadgen"

work=$(mktemp -d)
pids=()
cleanup() {
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  for pid in "${pids[@]}"; do wait "$pid" 2>/dev/null || true; done
  rm -rf "$work"
}
trap cleanup EXIT

echo "==> PKI (rampart pki) and three node configs"
clients=$(seq -s, -f 'bench-client-%g' 1 8)
"$rampart" pki --dir "$work/pki" ensure --server localhost --san localhost --san 127.0.0.1 \
  --nodes node-1,node-2,node-3 --devices "$clients" >/dev/null
mkdir -p "$work/clients"
for i in $(seq 1 8); do
  cp "$work/pki/devices/bench-client-$i.pem" "$work/pki/devices/bench-client-$i.key" "$work/clients/"
done
cat > "$work/auth.toml" <<'TOML'
[defaults]
unknown_certificate = "default_rules"
rules = [{ access = "readWrite", pattern = "bench/#" }]
TOML

free_tcp() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
free_udp() { python3 -c 'import socket; s=socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
declare -A mtls cluster quic http
members=""
for n in 1 2 3; do
  mtls[$n]=$(free_tcp); cluster[$n]=$(free_tcp); quic[$n]=$(free_udp); http[$n]=$(free_tcp)
  members+=$(printf '[[cluster.members]]\nid = %s\nraft_addr = "127.0.0.1:%s"\nquic_addr = "127.0.0.1:%s"\n' "$n" "${cluster[$n]}" "${quic[$n]}")$'\n'
done
for n in 1 2 3; do
  cat > "$work/node-$n.toml" <<TOML
[node]
data_dir = "$work/data-$n"
[log]
level = "warn"
[http]
bind = "127.0.0.1:${http[$n]}"
[auth]
state_file = "$work/auth.toml"
client_id_policy = "any"
[listeners.tcp]
enabled = false
[listeners.tls]
bind = "127.0.0.1:${mtls[$n]}"
cert_file = "$work/pki/servers/localhost.pem"
key_file = "$work/pki/servers/localhost.key"
client_certificate = "required"
ca_file = "$work/pki/ca.pem"
[cluster]
node_id = $n
bind = "127.0.0.1:${cluster[$n]}"
quic_bind = "127.0.0.1:${quic[$n]}"
cert_file = "$work/pki/nodes/node-$n.pem"
key_file = "$work/pki/nodes/node-$n.key"
ca_file = "$work/pki/ca.pem"
$members
TOML
done

echo "==> starting three nodes"
for n in 1 2 3; do
  "$rampart" serve --config "$work/node-$n.toml" 2>>"$work/node-$n.log" &
  pids+=($!)
done
tls_args="--transport mtls --ca $work/pki/ca.pem --cert-dir $work/clients"
ready=0
for _ in $(seq 1 120); do
  ready=1
  for n in 1 2 3; do
    # shellcheck disable=SC2086
    "$loadgen" --port "${mtls[$n]}" $tls_args --scenario connect-storm --connections 1 --concurrency 1 --timeout-secs 5 --json >/dev/null 2>&1 || ready=0
  done
  [ "$ready" = 1 ] && break
  sleep 0.5
done
[ "$ready" = 1 ] || { echo "cluster.sh: the cluster did not serve clients within 60 s" >&2; tail -n 5 "$work"/node-*.log >&2; exit 1; }

n_fast=400000; n_fanout=100000; n_lat=100000; n_routes=200; rounds=3
[ "$quick" = 1 ] && { n_fast=10000; n_fanout=5000; n_lat=5000; n_routes=20; rounds=1; }
scenario_args() {
  case "$1" in
    fan-in-qos0) echo "--scenario fan-in --qos 0 --publishers 4 --messages $((n_fast / 4))" ;;
    fan-in-qos1) echo "--scenario fan-in --qos 1 --publishers 4 --messages $((n_fast / 4))" ;;
    fan-out-qos0) echo "--scenario fan-out --qos 0 --subscribers 8 --messages $n_fanout" ;;
    latency) echo "--scenario fan-in --qos 0 --publishers 4 --messages $((n_lat / 4)) --rate 20000" ;;
    route-latency) echo "--scenario route-latency --messages $n_routes" ;;
  esac
}
results="$work/results.tsv"
: > "$results"
for scenario in fan-in-qos0 fan-in-qos1 fan-out-qos0 latency route-latency; do
  case "$scenario" in fan-*) scenario_rounds=$rounds ;; *) scenario_rounds=1 ;; esac
  for round in $(seq 1 "$scenario_rounds"); do
  for placement in single cross; do
    sub_port=${mtls[1]}
    [ "$placement" = cross ] && sub_port=${mtls[2]}
    echo "==> $scenario, $placement (round $round of $scenario_rounds)"
    # shellcheck disable=SC2086,SC2046
    out=$("$loadgen" --port "${mtls[1]}" --subscriber-port "$sub_port" --settle-ms 500 $tls_args \
      $(scenario_args "$scenario") --timeout-secs 120 --json || true)
    [ -n "$out" ] || { echo "   (no result)"; continue; }
    echo "   $out"
    printf '%s\t%s\t%s\n' "$scenario" "$placement" "$out" >> "$results"
  done
  done
done

table=$(python3 - "$results" <<'PY'
import json, sys
rounds = {}
for line in open(sys.argv[1]):
    scenario, placement, data = line.rstrip("\n").split("\t", 2)
    rounds.setdefault(scenario, {}).setdefault(placement, []).append(json.loads(data))
# Each placement's median round by throughput (the only round for latency scenarios).
rows = {s: {p: sorted(r, key=lambda d: d["msgs_per_sec"])[len(r) // 2] for p, r in by.items()} for s, by in rounds.items()}
print("| scenario | metric | single node | cross-node | cross / single |")
print("|---|---|---|---|---|")
for scenario, by in rows.items():
    s, c = by.get("single", {}), by.get("cross", {})
    if scenario == "latency":
        metrics = [("p50 latency (µs) at 20k msg/s", "p50_us"), ("p99 latency (µs) at 20k msg/s", "p99_us"), ("lost messages", "lost")]
    elif scenario == "route-latency":
        metrics = [("SUBACK to first delivery, p50 (µs)", "p50_us"), ("SUBACK to first delivery, p99 (µs)", "p99_us")]
    else:
        metrics = [("delivered msg/s", "msgs_per_sec"), ("lost messages", "lost"), ("p99 latency (µs)", "p99_us")]
    for label, key in metrics:
        a, b = s.get(key), c.get(key)
        fmt = lambda v: "–" if v is None else f"{v:,.0f}"
        if key == "lost":
            ratio = "none lost" if b == 0 else "–"
        elif key == "msgs_per_sec":
            ratio = f"{b / a:.2f}×" if a else "–"
        else:
            ratio = f"+{(b - a) / 1000:.2f} ms" if a is not None and b is not None else "–"
        print(f"| {scenario} | {label} | {fmt(a)} | {fmt(b)} | {ratio} |")
PY
)
cpu=$(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ *//' || echo unknown)
commit=$(git rev-parse --short HEAD 2>/dev/null || echo unknown)
section=$(cat <<MD
<!-- cluster:begin -->
Measured $(date -u +%Y-%m-%d) with \`$command_line\` on $(nproc) cores ($cpu), Rampart commit
$commit: three release nodes and the load generator (one thread) on one machine, clients over
mutual TLS, 64-byte payloads. *single node*: publishers and subscribers on node 1; *cross-node*:
publishers on node 1, subscribers on node 2. Throughput rows: the median of $rounds rounds per
placement, the placements alternating.

$table
<!-- cluster:end -->
MD
)
python3 - docs/performance.md "$section" <<'PY'
import sys, re
path, section = sys.argv[1], sys.argv[2]
text = open(path).read()
if "<!-- cluster:begin -->" not in text:
    text += "\n## Across the cluster\n\n<!-- cluster:begin -->\n<!-- cluster:end -->\n"
text = re.sub(r"<!-- cluster:begin -->.*?<!-- cluster:end -->", lambda _: section, text, flags=re.S)
open(path, "w").write(text)
PY
echo "==> results written to docs/performance.md"
echo "$table"
