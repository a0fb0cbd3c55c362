#!/bin/sh
# User-space instructions per request on the worker's hot path (hotpath.py),
# counted by callgrind: the same figure on every run, whatever the machine does.
# The hash seed is fixed: with a random one, dict probing varies by a few
# hundred instructions per request from run to run.
# Usage: tests/bench/instructions.sh [hello|flask] [hotpath.py options, e.g. --set ...]
set -eu
cd "$(dirname "$0")/../.."
app=${1:-hello}
[ $# -gt 0 ] && shift
count() {
    n=$1; shift
    PYTHONHASHSEED=0 valgrind --tool=callgrind --callgrind-out-file=/dev/null .venv/bin/python \
        tests/bench/hotpath.py --app "$app" --only --requests "$n" "$@" 2>&1 |
        sed -n 's/.*Collected : *\([0-9]*\).*/\1/p'
}
small=$(count 2000 "$@")
large=$(count 12000 "$@")
echo "$app: $(( (large - small) / 10000 )) instructions per request"
