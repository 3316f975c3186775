#!/usr/bin/env bash
# CI-only: the docker-compose cluster end to end, following the walkthrough at the top of
# deploy/docker-compose.yml. Builds the image with the documented offline command
# (scripts/build-image: the release binary and deploy/Dockerfile.prebuilt, nothing pulled),
# starts the compose file, checks that no node container holds the CA key, waits for a leader,
# connects device-1 with mosquitto_sub to node 2, revokes its certificate through node 1's admin
# API, checks that node 2 drops it and node 3 refuses it while device-2 still gets in, and that
# `admin revocations` lists it and `admin unrevoke 1` lets it back in.
# Works with `docker compose` and `docker-compose` v1. Always removes the containers and volumes
# it made.
set -euo pipefail
cd "$(dirname "$0")/.."
project=rampart-ci
if docker compose version >/dev/null 2>&1; then
  compose=(docker compose -p "$project" -f deploy/docker-compose.yml)
else
  compose=(docker-compose -p "$project" -f deploy/docker-compose.yml)
fi
work=$(mktemp -d)
sub_pid=""
cleanup() {
  [ -n "$sub_pid" ] && kill "$sub_pid" 2>/dev/null || true
  "${compose[@]}" down -v --timeout 10 >/dev/null 2>&1 || true
  rm -rf "$work"
}
trap cleanup EXIT
fail() { echo "compose-test: FAIL: $*" >&2; "${compose[@]}" logs --tail 40 >&2 || true; exit 1; }

echo "==> compose-test: scripts/build-image"
scripts/build-image
rampart=${CARGO_TARGET_DIR:-target}/release/rampart

echo "==> compose-test: starting three nodes"
"${compose[@]}" up -d --no-build >/dev/null 2>&1 || fail "docker compose up failed"
pki_container=$(docker ps -aq --filter "label=com.docker.compose.project=$project" --filter label=com.docker.compose.service=pki | head -1)
docker cp "$pki_container:/pki" "$work/pki"
pki=$work/pki
node1_container=$(docker ps -aq --filter "label=com.docker.compose.project=$project" --filter label=com.docker.compose.service=node1 | head -1)
docker cp "$node1_container:/pki" "$work/node1-pki"
node1_files=$(cd "$work/node1-pki" && ls | tr '\n' ' ')
[ "$node1_files" = "ca.pem node.key node.pem server.key server.pem " ] || fail "node 1 sees /pki: $node1_files"
echo "    node 1 holds only its bundle: $node1_files"
admin() {
  "$rampart" admin --endpoint "https://localhost:$1" --ca-file "$pki/ca.pem" \
    --cert-file "$pki/admins/admin.pem" --key-file "$pki/admins/admin.key" "${@:2}"
}
leader=0
for _ in $(seq 1 90); do
  status=$(admin 9443 --output json cluster status 2>/dev/null || true)
  leader=$(printf '%s' "$status" | python3 -c 'import json,sys
try:
    s = json.load(sys.stdin); print(s["leader_id"] if len(s["members"]) == 3 and all(m["reachable"] for m in s["members"]) else 0)
except Exception:
    print(0)')
  [ "$leader" != 0 ] && break
  sleep 1
done
[ "$leader" != 0 ] || fail "no leader with three reachable members within 90 s"
echo "    leader: node $leader"

tls() { echo "-h localhost -p $1 --cafile $pki/ca.pem --cert $pki/devices/$2.pem --key $pki/devices/$2.key -V mqttv5"; }
# shellcheck disable=SC2046
mosquitto_sub $(tls 8884 device-1) -i device-1 -t 'devices/device-1/#' >"$work/sub.log" 2>&1 &
sub_pid=$!
sleep 2
kill -0 "$sub_pid" 2>/dev/null || fail "device-1 could not subscribe on node 2: $(cat "$work/sub.log")"
echo "==> compose-test: device-1 subscribed on node 2; publishing on node 1"
delivered=""
for attempt in $(seq 1 20); do
  # shellcheck disable=SC2046
  mosquitto_pub $(tls 8883 device-1) -i device-1-pub -q 1 -t devices/device-1/hello -m "hello from node 1 ($attempt)" >/dev/null 2>&1
  sleep 0.5
  if grep -q "hello from node 1" "$work/sub.log"; then delivered=yes; break; fi
done
[ -n "$delivered" ] || fail "a publish on node 1 never reached the subscriber on node 2: $(cat "$work/sub.log")"
echo "    node 2 delivered: $(grep -m1 'hello from node 1' "$work/sub.log")"
echo "==> compose-test: revoking device-1 through node 1"
admin 9443 revoke --certificate "$pki/devices/device-1.pem" --reason keyCompromise --wait >/dev/null
for _ in $(seq 1 50); do kill -0 "$sub_pid" 2>/dev/null || break; sleep 0.1; done
kill -0 "$sub_pid" 2>/dev/null && fail "node 2 did not drop device-1 within 5 s of the revocation"
sub_pid=""
echo "    node 2 dropped device-1: $(tail -n 1 "$work/sub.log")"
# shellcheck disable=SC2046
if mosquitto_pub $(tls 8885 device-1) -i device-1 -t devices/device-1/x -m revoked >"$work/pub.log" 2>&1; then
  fail "node 3 accepted the revoked device-1"
fi
echo "    node 3 refuses device-1: $(tr '\n' ' ' <"$work/pub.log")"
# shellcheck disable=SC2046
mosquitto_pub $(tls 8885 device-2) -i device-2 -t devices/device-2/x -m still-allowed || fail "node 3 refused device-2"
echo "    node 3 still accepts device-2"
echo "==> compose-test: rampart admin revocations; rampart admin unrevoke 1"
serial=$(openssl x509 -in "$pki/devices/device-1.pem" -noout -serial | cut -d= -f2 | sed 's/../&:/g; s/:$//')
admin 9443 revocations | grep -q "$serial" || fail "admin revocations does not list device-1 ($serial): $(admin 9443 revocations)"
admin 9443 unrevoke 1 >/dev/null || fail "admin unrevoke 1 failed"
readmitted=""
for _ in $(seq 1 20); do
  # shellcheck disable=SC2046
  if mosquitto_pub $(tls 8885 device-1) -i device-1 -t devices/device-1/x -m back >/dev/null 2>&1; then readmitted=yes; break; fi
  sleep 0.5
done
[ -n "$readmitted" ] || fail "node 3 still refuses device-1 after unrevoke 1"
echo "    node 3 accepts device-1 again"
echo "==> compose-test: ok"
