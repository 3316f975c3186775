#!/usr/bin/env bash
# Fleet-wide revocation latency and bulk import on a three-node release cluster on loopback.
# Usage: bash benches/revocation.sh [--revocations N] [--import N] [--mass N]
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --locked -p rampart-node --bin rampart -p rampart-benches --bin revocation
exec target/release/revocation "$@"
