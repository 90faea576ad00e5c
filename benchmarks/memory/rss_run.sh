#!/usr/bin/env bash
# rss_run.sh NAME EPOCHS [VAR=value ...]: a fresh S9 run on CIFAR10_DIR, its main process's resident memory sampled every 10 s.
# Writes NAME.log (console) and NAME.rss (time, VmRSS) here; the run folder goes to /tmp/NAME.
set -euo pipefail
NAME=$1 EP=$2; shift 2
here=$(cd "$(dirname "$0")" && pwd)
cd "$here/../.."
env "$@" python recipes/s9_augmented.py --epochs "$EP" --out "/tmp/$NAME" --overwrite > "$here/$NAME.log" 2>&1 &
p=$!
while kill -0 $p 2>/dev/null; do echo "$(date +%T) $(grep VmRSS /proc/$p/status)"; sleep 10; done > "$here/$NAME.rss"
