#!/usr/bin/env bash
# Idempotent set-up: a local virtualenv (.venv) with the pinned requirements and this
# package installed in editable mode. Re-running it only reinstalls when requirements.txt
# or setup.cfg changed. Source it (". launch/setup.sh") to get the venv on PATH.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${DIST_GRADALIGN_VENV:-$root/.venv}"
python="${PYTHON:-python3}"
if [ ! -x "$venv/bin/python" ]; then
  echo "[setup] creating $venv" >&2
  "$python" -m venv "$venv"
fi
stamp="$venv/.dist_gradalign-installed"
want="$(cat "$root/requirements.txt" "$root/setup.cfg" | sha256sum | cut -d' ' -f1)"
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  echo "[setup] installing requirements into $venv (first run takes a few minutes)" >&2
  "$venv/bin/python" -m pip install -q --disable-pip-version-check -r "$root/requirements.txt" 2> >(grep -v "is ignored: it is neither" >&2)
  "$venv/bin/python" -m pip install -q --disable-pip-version-check --no-build-isolation --no-deps -e "$root"
  echo "$want" > "$stamp"
fi
export PATH="$venv/bin:$PATH"
export VIRTUAL_ENV="$venv"
