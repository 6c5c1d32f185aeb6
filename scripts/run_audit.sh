#!/usr/bin/env bash
# Audit + transfer + release (issue 5) on a finished `memcontrol demo` workdir.
#   bash scripts/run_audit.sh [WORKDIR] [PARAMS]
# WORKDIR defaults to the current directory, PARAMS to WORKDIR/params.yaml (else the repo's).
# Finished arm-seeds are reused: rerunning after a kill continues where it stopped.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
work="$(cd "${1:-.}" && pwd)"
params="${2:-$work/params.yaml}"
[ -f "$params" ] || params="$here/params.yaml"
bin="$here/.venv/bin"
[ -x "$bin/memcontrol" ] || bin="$(dirname "$(command -v memcontrol)")"
for need in data/reference/threshold.json models/base masks/selected.json models/final/seed0/mask.json; do
  [ -e "$work/$need" ] || { echo "run_audit: $work/$need is missing; run \`memcontrol demo\` there first" >&2; exit 1; }
done
cd "$work"
# shellcheck source=/dev/null
source "$here/scripts/env.sh"   # after cd: PREFECT_HOME defaults to $PWD/.prefect
t0=$SECONDS
for step in audit transfer release; do
  s=$SECONDS
  "$bin/memcontrol" "$step" --params "$params" --root "$work"
  echo "run_audit: $step took $((SECONDS - s)) s" >&2
done
echo "run_audit: done in $((SECONDS - t0)) s" >&2
echo "  reports/audit.md, reports/audit.html, reports/audit_metrics.json" >&2
echo "  transfer/reports/transfer.md, transfer/reports/transfer.html" >&2
echo "  release/manifest.csv, release/summary.json" >&2
