#!/bin/bash
# Flower 1.42 and `fedrec bench round` on the issue's two workloads, in one
# run, alternating, three passes; one JSON line per run, prefixed with the
# pass, the system and the workload. Needs a release build and the Flower
# virtual environment of scripts/README.md.
#   FEDREC=target/release/fedrec PY=/tmp/flwr-venv/bin/python scripts/flower_vs_fedrec.sh
set -euo pipefail
cd "$(dirname "$0")/.."
FEDREC=${FEDREC:-target/release/fedrec}
PY=${PY:-/tmp/flwr-venv/bin/python}
for pass in 1 2 3; do
  for w in "100 118592" "10 1000000"; do
    set -- $w
    echo "pass $pass flower $1x$2 $("$PY" scripts/flower_round.py --clients "$1" --dim "$2" --rounds 5 2>/dev/null | tail -1)"
    echo "pass $pass fedrec-f32 $1x$2 $("$FEDREC" bench round --clients "$1" --dim "$2" --rounds 5 --loopback 2>/dev/null | tail -1)"
    echo "pass $pass fedrec-q8 $1x$2 $("$FEDREC" bench round --clients "$1" --dim "$2" --rounds 5 --loopback --download-encoding q8 --upload-encoding q8 2>/dev/null | tail -1)"
  done
done
