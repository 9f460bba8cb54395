#!/usr/bin/env bash
# Resilience overhead: the full resilience stack enabled but never triggering
# (benches/resilience-envoy.yaml) against the bare route (benches/bare-envoy.yaml,
# a copy of ../shared/bench/configs/envoy.yaml), under mesh and Envoy, h1 and h2c
# with a 2-byte body, through ../shared/bench/suite.sh (interleaved rounds).
#
# usage: benches/resilience.sh [ROUNDS]      (default 5)
# env:   MESH (default $CARGO_TARGET_DIR/release/mesh or target/release/mesh),
#        BENCH_OUT (default target/bench), ENVOY_BIN (the real envoy binary)
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
MESH=${MESH:-${CARGO_TARGET_DIR:-$ROOT/target}/release/mesh}
export BENCH_OUT=${BENCH_OUT:-$ROOT/target/bench}
mkdir -p "$BENCH_OUT"
B=$ROOT/benches
SUITE=res-$(date +%Y%m%dT%H%M%S)
"$ROOT/../shared/bench/suite.sh" --suite "$SUITE" --rounds "${1:-5}" --scenarios "h1:small h2c:small" \
  --targets "direct" \
  --custom "envoy-bare=--envoy-yaml $B/bare-envoy.yaml" \
  --custom "envoy-res=--envoy-yaml $B/resilience-envoy.yaml" \
  --custom "mesh-bare=--cmd '$MESH run -c {CONFIG} --log-level warn' --envoy-yaml $B/bare-envoy.yaml" \
  --custom "mesh-res=--cmd '$MESH run -c {CONFIG} --log-level warn' --envoy-yaml $B/resilience-envoy.yaml"
"$B/pair_ratio.py" "$BENCH_OUT/results/runs.jsonl" "$SUITE" mesh-res/mesh-bare envoy-res/envoy-bare \
  envoy-bare/mesh-bare envoy-res/mesh-res
