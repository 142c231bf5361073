#!/usr/bin/env bash
# Set up (idempotent) and run the whole test suite on CPU with gloo; then, when called without
# arguments (as CI does), the W&B tests again against the newest wandb release.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
. launch/setup.sh
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
python -m pytest -q tests "$@"
[ "$#" -eq 0 ] || exit 0

# .venv-wandb-latest: the newest wandb (and whichever of its requirements .venv lacks or has too
# old) installed in a venv of its own, which sees everything else (torch, pytest, this package)
# in .venv through a .pth file listed after its own site-packages, so its wandb shadows the
# pinned one and torch is not installed twice. Rebuilt once a day (the stamp holds the date) and
# when requirements.txt or setup.cfg change; a pip failure fails the run.
latest="$PWD/.venv-wandb-latest"
main_site="$(python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
stamp="$latest/.wandb-latest-installed"
want="$(date -u +%F) $(cat requirements.txt setup.cfg | sha256sum | cut -d' ' -f1) $main_site"
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  echo "[test] installing the newest wandb into $latest" >&2
  rm -rf "$latest"
  python -m venv "$latest"
  latest_site="$("$latest/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
  echo "import site; site.addsitedir('$main_site')" > "$latest_site/zz-dist-gradalign-main-venv.pth"
  pip_q=("$latest/bin/python" -m pip install -q --disable-pip-version-check)
  # --ignore-installed: into this venv even when .venv's pinned wandb is already the newest
  "${pip_q[@]}" --ignore-installed --no-deps wandb 2> >(grep -v "is ignored: it is neither" >&2)
  "${pip_q[@]}" wandb 2> >(grep -v "is ignored: it is neither" >&2)
  echo "$want" > "$stamp"
fi
"$latest/bin/python" - <<'PY'
import sys, wandb
assert wandb.__file__.startswith(sys.prefix), f"{wandb.__file__}: the newest wandb does not shadow .venv's"
print(f"[test] W&B tests with wandb {wandb.__version__} ({sys.prefix})", file=sys.stderr)
PY
exec "$latest/bin/python" -m pytest -q tests/test_wandb.py
