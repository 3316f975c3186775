#!/usr/bin/env bash
# Runs the same load scenarios against Rampart and Mosquitto on this machine, one fresh broker
# per scenario, and writes a table of results and Rampart/Mosquitto ratios to
# docs/performance.md (between the compare markers). Both brokers get the same listener type and
# the same certificates (made here with openssl).
#
#   bash benches/compare.sh                 # full run (tcp and tls), a few minutes
#   bash benches/compare.sh --quick         # smoke run, seconds
#   bash benches/compare.sh --transports tcp,tls,mtls --scenarios fan-in-qos0,latency
#   bash benches/compare.sh --transports mtls --scenarios connect-storm --connections 5000 --section idle
# The table goes between the `<!-- compare:begin/end -->` markers, or those of `--section NAME`
# (a section of its own, added at the end of the file the first time), so a partial run does
# not replace the full table.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)
# Thousands of held connections need as many descriptors, in the brokers and the load generator.
ulimit -n 1048576 2>/dev/null || ulimit -n "$(ulimit -Hn)"

transports="tcp,tls"
scenarios="fan-in-qos0,fan-in-devices,fan-in-qos1,fan-in-qos1-offline,fan-out-qos0,latency,connect-storm"
quick=0
connections=5000
marker=compare
command_line="bash benches/compare.sh $*"
while [ $# -gt 0 ]; do
  case "$1" in
    --transports) transports="$2"; shift 2 ;;
    --scenarios) scenarios="$2"; shift 2 ;;
    --quick) quick=1; shift ;;
    --connections) connections="$2"; shift 2 ;;
    --section) marker="$2"; shift 2 ;;
    *) echo "compare.sh: unknown option $1" >&2; exit 2 ;;
  esac
done

if [ "$connections" -gt $(( $(ulimit -n) - 100 )) ]; then
  echo "compare.sh: --connections $connections needs more descriptors than this shell may open ($(ulimit -n), the hard limit); at most $(( $(ulimit -n) - 100 )) here" >&2
  exit 2
fi
target_dir=${CARGO_TARGET_DIR:-$root/target}
echo "==> building release binaries"
cargo build --release --locked -p rampart-node -p rampart-benches
rampart="$target_dir/release/rampart"
loadgen="$target_dir/release/loadgen"
mosquitto=$(command -v mosquitto || echo /usr/sbin/mosquitto)
[ -x "$mosquitto" ] || { echo "compare.sh: mosquitto not found (apt-get install mosquitto)" >&2; exit 2; }

work=$(mktemp -d)
broker_pid=""
stop_broker() {
  if [ -n "$broker_pid" ]; then
    kill "$broker_pid" 2>/dev/null || true
    wait "$broker_pid" 2>/dev/null || true
    broker_pid=""
  fi
}
cleanup() { stop_broker; rm -rf "$work"; }
trap cleanup EXIT

echo "==> certificates (openssl, ECDSA P-256)"
(
  cd "$work"
  openssl ecparam -name prime256v1 -genkey -noout -out ca.key
  openssl req -x509 -new -key ca.key -sha256 -days 2 -subj "/CN=Bench CA" -out ca.pem
  openssl ecparam -name prime256v1 -genkey -noout -out server.key
  openssl req -new -key server.key -subj "/CN=localhost" -out server.csr
  printf 'subjectAltName=DNS:localhost,IP:127.0.0.1\nextendedKeyUsage=serverAuth\n' > server.ext
  openssl x509 -req -in server.csr -CA ca.pem -CAkey ca.key -CAcreateserial -days 2 -sha256 -extfile server.ext -out server.pem
  mkdir clients
  printf 'extendedKeyUsage=clientAuth\n' > client.ext
  for i in $(seq 1 8); do
    openssl ecparam -name prime256v1 -genkey -noout -out "clients/bench-client-$i.key"
    openssl req -new -key "clients/bench-client-$i.key" -subj "/CN=bench-client-$i" -out client.csr
    openssl x509 -req -in client.csr -CA ca.pem -CAkey ca.key -CAcreateserial -days 2 -sha256 -extfile client.ext -out "clients/bench-client-$i.pem"
  done
) >/dev/null 2>&1

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

wait_port() {
  for _ in $(seq 1 100); do
    if (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; then return 0; fi
    sleep 0.05
  done
  echo "compare.sh: broker did not open port $1" >&2
  return 1
}

# start_broker NAME TRANSPORT PORT SCENARIO: starts a fresh broker, sets broker_pid. For
# fan-in-qos1-offline both brokers queue up to a million messages for the offline subscriber;
# Rampart makes it an APPLICATION client, so its session is durable (written to disk before the
# publisher's PUBACK); Mosquitto keeps its queue in memory (persistence off, as in every row).
start_broker() {
  local name=$1 transport=$2 port=$3 scenario=$4
  case "$name" in
    mosquitto)
      {
        echo "listener $port 127.0.0.1"
        echo "allow_anonymous true"
        echo "persistence false"
        echo "user $(id -un)"
        echo "log_dest file $work/mosquitto.log"
        if [ "$transport" != tcp ]; then
          echo "cafile $work/ca.pem"; echo "certfile $work/server.pem"; echo "keyfile $work/server.key"
        fi
        [ "$transport" = mtls ] && echo "require_certificate true"
        [ "$scenario" = fan-in-qos1-offline ] && echo "max_queued_messages 1000000"
      } > "$work/mosquitto.conf"
      "$mosquitto" -c "$work/mosquitto.conf" >/dev/null 2>&1 &
      ;;
    rampart)
      {
        printf '[log]\nlevel = "warn"\n[http]\nenabled = false\n'
        if [ "$transport" = tcp ]; then
          printf '[listeners.tcp]\nbind = "127.0.0.1:%s"\n' "$port"
        else
          printf '[listeners.tcp]\nenabled = false\n[listeners.tls]\nbind = "127.0.0.1:%s"\ncert_file = "%s/server.pem"\nkey_file = "%s/server.key"\n' "$port" "$work" "$work"
        fi
        if [ "$transport" = mtls ]; then
          printf 'client_certificate = "required"\nca_file = "%s/ca.pem"\n[auth]\nclient_id_policy = "any"\n' "$work"
        fi
        if [ "$scenario" = fan-in-qos1-offline ]; then
          [ "$transport" = mtls ] || printf '[auth]\n'
          printf 'state_file = "%s/durable.toml"\n[node]\ndata_dir = "%s/data-%s"\n' "$work" "$work" "$port"
          printf '[defaults]\nanonymous = true\nclient_type = "APPLICATION"\nunknown_certificate = "default_rules"\nrules = [{ access = "readWrite", pattern = "#" }]\nanonymous_rules = [{ access = "readWrite", pattern = "#" }]\n' > "$work/durable.toml"
        elif [ "$transport" = mtls ]; then
          # As a fleet runs: every device certificate gets topic rules (compiled per connection).
          printf 'state_file = "%s/fleet.toml"\n' "$work"
          printf '[defaults]\nunknown_certificate = "default_rules"\nrules = [{ access = "readWrite", pattern = "#" }]\n' > "$work/fleet.toml"
        fi
        # The load generator shares 8 client certificates among all its connections.
        printf '[limits]\nmax_sessions_per_identity = 1000000\nmax_connections = 1000000\n'
        if [ "$scenario" = fan-in-qos1-offline ]; then printf 'application_max_queued_messages = 1000000\n'; fi
      } > "$work/rampart.toml"
      "$rampart" serve --config "$work/rampart.toml" 2>>"$work/rampart.log" &
      ;;
  esac
  broker_pid=$!
  wait_port "$port"
}

# Scenario → loadgen arguments.
scenario_args() {
  local n_fast=200000 n_fanout=50000 n_lat=50000 conns=$connections
  [ "$quick" = 1 ] && { n_fast=10000; n_fanout=5000; n_lat=5000; conns=100; }
  case "$1" in
    fan-in-qos0) echo "--scenario fan-in --qos 0 --publishers 4 --messages $((n_fast / 4))" ;;
    # Devices: ten publishers, each PUBLISH in its own TLS record (no client-side batching).
    fan-in-devices) echo "--scenario fan-in --qos 0 --publishers 10 --messages $((n_fast / 10)) --publish-each" ;;
    fan-in-qos1) echo "--scenario fan-in --qos 1 --publishers 4 --messages $((n_fast / 4))" ;;
    fan-in-qos1-offline) echo "--scenario fan-in --qos 1 --publishers 4 --messages $((n_fast / 4)) --offline-subscriber" ;;
    fan-out-qos0) echo "--scenario fan-out --qos 0 --subscribers 8 --messages $n_fanout" ;;
    latency) echo "--scenario fan-in --qos 0 --publishers 4 --messages $((n_lat / 4 * 5)) --rate 50000" ;;
    # Past 20 000 connections, from several loopback addresses (each has about 28 000 ports).
    connect-storm) echo "--scenario connect-storm --connections $conns --concurrency 32 --source-ips $(( (conns + 19999) / 20000 ))" ;;
    *) echo "compare.sh: unknown scenario $1" >&2; return 1 ;;
  esac
}

json_field() { python3 -c 'import json,sys; v=json.loads(sys.argv[1]).get(sys.argv[2]); print("" if v is None else v)' "$1" "$2"; }

results="$work/results.tsv"
: > "$results"
IFS=, read -ra transport_list <<< "$transports"
IFS=, read -ra scenario_list <<< "$scenarios"
for transport in "${transport_list[@]}"; do
  for scenario in "${scenario_list[@]}"; do
    for broker in rampart mosquitto; do
      port=$(free_port)
      if ! start_broker "$broker" "$transport" "$port" "$scenario"; then stop_broker; continue; fi
      args=$(scenario_args "$scenario")
      tls_args=""
      [ "$transport" != tcp ] && tls_args="--transport $transport --ca $work/ca.pem"
      [ "$transport" = mtls ] && tls_args="$tls_args --cert-dir $work/clients"
      echo "==> $broker $transport $scenario"
      # shellcheck disable=SC2086
      out=$("$loadgen" --port "$port" $tls_args $args --broker-pid "$broker_pid" --timeout-secs 120 --json || true)
      stop_broker
      [ -n "$out" ] || { echo "   (no result)"; continue; }
      echo "   $out"
      printf '%s\t%s\t%s\t%s\n' "$transport" "$scenario" "$broker" "$out" >> "$results"
    done
  done
done

table=$(python3 - "$results" <<'PY'
import json, sys
rows = {}
for line in open(sys.argv[1]):
    transport, scenario, broker, data = line.rstrip("\n").split("\t", 3)
    rows.setdefault((transport, scenario), {})[broker] = json.loads(data)
def fmt(v, unit=""):
    return "–" if v is None else (f"{v:,.0f}{unit}" if isinstance(v, (int, float)) else str(v))
def ratio(a, b, lower_is_better=False):
    if a is None or b in (None, 0) or a == 0:
        return "–"
    r = (b / a) if lower_is_better else (a / b)
    return f"{r:.2f}×"
print("| transport | scenario | metric | Rampart | Mosquitto | Rampart advantage |")
print("|---|---|---|---|---|---|")
for (transport, scenario), by in rows.items():
    r, m = by.get("rampart", {}), by.get("mosquitto", {})
    if scenario == "connect-storm":
        metrics = [("connects/s", "connects_per_sec", False), ("RSS per connection (KiB)", "rss_per_connection_kib", True),
                   ("p50 latency (µs) to one more client while all are held, 500 msg/s", "p50_us", True),
                   ("p99 latency (µs) to one more client while all are held, 500 msg/s", "p99_us", True)]
    elif scenario == "fan-in-qos1-offline":
        metrics = [("acknowledged msg/s, subscriber offline", "msgs_per_sec", False), ("lost messages", "lost", True)]
    elif scenario == "latency":
        metrics = [("p50 latency (µs) at 50k msg/s", "p50_us", True), ("p99 latency (µs) at 50k msg/s", "p99_us", True), ("lost messages", "lost", True)]
    else:
        metrics = [("delivered msg/s", "msgs_per_sec", False), ("lost messages", "lost", True), ("p99 latency (µs)", "p99_us", True)]
    for label, key, lower in metrics:
        a, b = r.get(key), m.get(key)
        adv = ratio(a, b, lower) if key != "lost" else ("none lost" if a == 0 else "–")
        print(f"| {transport} | {scenario} | {label} | {fmt(a)} | {fmt(b)} | {adv} |")
PY
)

mosquitto_version=$("$mosquitto" -h 2>&1 | head -1 || true)
cpu=$(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ *//' || echo unknown)
commit=$(git rev-parse --short HEAD 2>/dev/null || echo unknown)
section=$(cat <<MD
<!-- $marker:begin -->
Measured $(date -u +%Y-%m-%d) with \`$command_line\` on $(nproc) cores ($cpu), $mosquitto_version,
Rampart commit $commit, one fresh broker per row, load generator on one thread, 64-byte payloads.
"Rampart advantage" is Rampart/Mosquitto for rates and Mosquitto/Rampart for latency and memory
(above 1× means Rampart is better).

$table
<!-- $marker:end -->
MD
)
doc=docs/performance.md
python3 - "$doc" "$section" "$marker" <<'PY'
import sys, re
path, section, marker = sys.argv[1], sys.argv[2], sys.argv[3]
try:
    text = open(path).read()
except FileNotFoundError:
    text = "# Performance\n"
begin, end = f"<!-- {marker}:begin -->", f"<!-- {marker}:end -->"
if begin not in text:
    text += f"\n## Side by side with Mosquitto: {marker}\n\n{begin}\n{end}\n"
text = re.sub(re.escape(begin) + r".*?" + re.escape(end), lambda _: section, text, flags=re.S)
open(path, "w").write(text)
PY
echo "==> results written to $doc"
echo "$table"
