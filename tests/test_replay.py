"""The trainer against its own stored study runs (bench/results): the first rounds of committed
runs, replayed from their stored configs, give the stored rows (6 significant digits). Any
change to the algorithms, the data path or the executors that moves a trajectory fails here
(the study's runs must stay comparable with new ones)."""
import json
import lzma

import pytest

from dist_gradalign.api import fit
from dist_gradalign.config import from_dict
from util import REPO, SHARED_DATA

RESULTS = REPO / "bench" / "results"
RUNS = ["emnist-het-mb/fedga_lr=0.05_beta=0.05_s0", "emnist-het-mb/fedga-previous_lr=0.05_beta=0.05_s0",
        "emnist-het-mb/scaffold_*_s0", "emnist-het-mb/fedprox_*_s0", "emnist-dc/gradalign_lr=0.4_beta=0.025_s0",
        "emnist-dc/gradalign-previous_lr=0.2_beta=0.025_s0", "emnist-dc/lbsgd_lr=0.4_s0_R1200"]
ROUNDS = 4
KEYS = ("round", "comm_rounds", "updates", "samples", "bytes", "train_loss", "grad_variance", "diag_grad_variance")


def _stored(name):
    matches = sorted(RESULTS.glob(name + ".json.xz"))
    if not matches:
        pytest.skip(f"no stored run {name}")
    return json.loads(lzma.open(matches[0]).read())


@pytest.mark.skipif(not (SHARED_DATA / "emnist47").is_dir(), reason="needs ../shared/data/emnist47")
@pytest.mark.parametrize("name", RUNS)
def test_stored_runs_replay(tmp_path, name):
    stored = _stored(name)
    d = stored["config"]
    d["run_dir"] = str(tmp_path / "run")
    d["data"]["root"] = str(REPO / d["data"]["root"])
    d["train"].update(rounds=ROUNDS, eval_every=10**6, checkpoint_every=0, progress=False)
    d["train"]["diagnostics_every"] = min(d["train"]["diagnostics_every"], 3) if d["train"]["diagnostics_every"] else 0
    rows = fit(from_dict(d)).metrics
    want = {r["round"]: r for r in stored["rows"]}
    compared = 0
    for row in rows:
        for key in KEYS:
            if key in row and key in want[row["round"]] and not (key == "diag_grad_variance" and row["round"] != 1):
                assert row[key] == pytest.approx(want[row["round"]][key], rel=2e-5), (name, row["round"], key)
                compared += 1
    assert compared >= 5 * ROUNDS
