#!/usr/bin/env bash
# The GPU check (issue 27; docs/performance.md, "GPU check"): one command on a lent GPU machine.
#
#     bash benchmarks/gpu_check.sh [benchmarks/gpu_check.py options]      (or: make gpu-check)
#
# The machine has Python 3.12 with torch, but no network and no Ray: this installs the wheelhouse
# gpu-wheels/ (built where pip reaches the registry by `make gpu-wheels`, and carried along) into a
# temporary folder with `pip install --no-index --no-deps --target`, puts it first on PYTHONPATH (the
# preinstalled torch stays in use), then runs benchmarks/gpu_check.py under a temporary HOME (Ray 2.60
# writes its auth token there; the job's Ray listens on 127.0.0.1 only). Its files go to $OUT when set
# (else out/gpu-check/): summary.md, summary.json and the logs.
#
# Environment: PYTHON (default: .venv/bin/python when present, else python3), GPU_WHEELS (default
# gpu-wheels). Without a wheelhouse for this Python, an installed Ray is used as it is.
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$PWD
if [ -z "${PYTHON:-}" ]; then
    if [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
wheels=${GPU_WHEELS:-gpu-wheels}
out=${OUT:-$repo/out/gpu-check}
mkdir -p "$out"
work=$(mktemp -d "${TMPDIR:-/tmp}/unioncam-gpu-check.XXXXXX")
trap 'rm -rf "$work"' EXIT
tag=$("$PYTHON" -c 'import sys; print(f"cp{sys.version_info[0]}{sys.version_info[1]}")')
start=$(date +%s)
if compgen -G "$wheels/ray-*-$tag-*.whl" >/dev/null; then
    echo "[gpu-check] installing $wheels/ ($(du -sh "$wheels" | cut -f1)) into $work/site: no network"
    "$PYTHON" -m pip install --no-index --no-deps --no-compile --no-cache-dir --disable-pip-version-check \
        --target "$work/site" "$wheels"/*.whl >"$out/install.log" 2>&1 || {
        cat "$out/install.log" >&2
        echo "gpu_check.sh: installing the wheelhouse failed" >&2
        exit 2
    }
    export PYTHONPATH="$work/site:$repo${PYTHONPATH:+:$PYTHONPATH}"
    echo "[gpu-check] installed in $(($(date +%s) - start)) s: $(cd "$wheels" && ls *.whl | tr '\n' ' ')"
elif "$PYTHON" -c 'import ray' 2>/dev/null; then
    echo "[gpu-check] no $tag wheelhouse in $wheels/: using the installed Ray"
    export PYTHONPATH="$repo${PYTHONPATH:+:$PYTHONPATH}"
else
    echo "gpu_check.sh: no Ray here and no $tag wheelhouse in $wheels/: run 'make gpu-wheels' where pip reaches" \
        "the package registry, and carry $wheels/ along" >&2
    exit 2
fi
mkdir -p "$work/home"
unset RAY_ADDRESS
export HOME="$work/home" RAY_USAGE_STATS_ENABLED=0 PYTHONUNBUFFERED=1 OUT="$out"
"$PYTHON" -c 'import ray, sys; print(f"[gpu-check] ray {ray.__version__} from {ray.__file__}; python {sys.version.split()[0]}")'
set +e
"$PYTHON" benchmarks/gpu_check.py --out-dir "$out" "$@"
rc=$?
set -e
echo "[gpu-check] exit $rc after $(($(date +%s) - start)) s; files in $out: $(cd "$out" && ls | tr '\n' ' ')"
exit $rc
