"""``dist_gradalign.report``: plots and the seed-aggregated table, on real (short) runs."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from dist_gradalign.config import load_config
from dist_gradalign.engine import Trainer
from dist_gradalign.report import DDOF, group_runs, load_run, make_labels, report
from dist_gradalign.summary import read_metrics

REPO = Path(__file__).resolve().parents[1]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
ALGOS = ("fedavg", "fedga")
SEEDS = (0, 1)


def train(run_dir: Path, algo: str, seed: int, *overrides: str) -> str:
    cfg = load_config(str(REPO / "configs" / "quickstart" / f"{algo}.yaml"),
                      [f"seed={seed}", f"run_dir={run_dir}", "train.rounds=6", "train.eval_every=2",
                       "train.progress=false", *overrides])
    Trainer(cfg).fit()
    return str(run_dir)


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> list[str]:
    """2 seeds x (fedavg, fedga), 6 rounds each, interleaved so grouping has to sort them."""
    root = tmp_path_factory.mktemp("runs")
    return [train(root / f"{a}-s{s}", a, s) for s in SEEDS for a in ALGOS]


@pytest.fixture(scope="module")
def result(runs, tmp_path_factory):
    out = tmp_path_factory.mktemp("report")
    return out, report(runs, str(out), target=0.2)


def final_accs(run_dir: str) -> float:
    return [r["test_acc"] for r in read_metrics(run_dir) if "test_acc" in r][-1]


def test_pngs_written_and_valid(result):
    out, res = result
    names = {Path(p).name for p in res["plots"]}
    assert names == {"accuracy.png", "loss.png", "grad_variance.png"}  # fedga logs grad_variance
    for p in res["plots"]:
        data = Path(p).read_bytes()
        assert Path(p).parent == out and len(data) > 1000 and data[:8] == PNG_MAGIC


def test_grouping_puts_seeds_together(runs):
    groups = group_runs([load_run(d) for d in runs])
    assert [g.label for g in groups] == ["fedavg", "fedga"]  # only the algorithm differs
    for g, algo in zip(groups, ALGOS):
        assert sorted(run.config["seed"] for run in g.runs) == list(SEEDS)
        assert all(Path(run.path).name.startswith(algo) for run in g.runs)


def test_table_md_one_row_per_group(result):
    out, res = result
    assert res["table"] == str(out / "table.md")
    text = Path(res["table"]).read_text()
    rows = [line for line in text.splitlines() if line.startswith("| ") and "---" not in line][1:]
    assert [r.split("|")[1].strip() for r in rows] == list(ALGOS)
    for r in rows:
        cells = [c.strip() for c in r.split("|")[1:-1]]
        assert cells[1] == "2" and "+-" in cells[2] and "+-" in cells[3]
        assert cells[4].endswith("/2 reached")
    assert f"ddof={DDOF}" in text


def test_table_json_matches_numpy(runs, result):
    out, _ = result
    table = json.loads((out / "table.json").read_text())
    assert table["std_ddof"] == DDOF == 1  # sample std over seeds
    by_label = {g["label"]: g for g in table["groups"]}
    md = (out / "table.md").read_text()
    for algo in ALGOS:
        finals = [final_accs(d) for d in runs if Path(d).name.startswith(algo)]
        g = by_label[algo]
        assert g["num_runs"] == 2
        assert g["final_test_acc_mean"] == pytest.approx(np.mean(finals))
        assert g["final_test_acc_std"] == pytest.approx(np.std(finals, ddof=1))
        assert f"{100 * np.mean(finals):.2f} +- {100 * np.std(finals, ddof=1):.2f}" in md
        bests = [max(r["test_acc"] for r in read_metrics(d) if "test_acc" in r)
                 for d in runs if Path(d).name.startswith(algo)]
        assert g["best_test_acc_mean"] == pytest.approx(np.mean(bests))
        # updates to target: mean over the seeds that reached it
        ups = [u for u in g["updates_to_target"] if u is not None]
        assert g["reached"] == len(ups)
        assert g["updates_to_target_mean"] == (pytest.approx(np.mean(ups)) if ups else None)


def test_missing_dir_raises(tmp_path, runs):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        report([runs[0], str(tmp_path / "nope")], str(tmp_path / "out"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="run directory"):
        report([str(tmp_path / "empty")], str(tmp_path / "out"))


def test_single_seed_and_unevaluated_run(tmp_path, runs):
    """A run without evaluated rows is counted but gives no accuracy; one seed gives no std."""
    partial = tmp_path / "fedavg-partial"
    shutil.copytree(runs[0], partial)
    metrics = partial / "metrics.jsonl"
    metrics.write_text(metrics.read_text().splitlines()[0] + "\n")  # round 1: not evaluated
    res = report([runs[0], str(partial), runs[1]], str(tmp_path / "out"))
    assert {Path(p).name for p in res["plots"]} == {"accuracy.png", "loss.png", "grad_variance.png"}
    groups = {g["label"]: g for g in json.loads((tmp_path / "out" / "table.json").read_text())["groups"]}
    fedavg = groups["fedavg"]
    assert fedavg["num_runs"] == 2 and fedavg["num_evaluated"] == 1
    assert fedavg["final_test_acc_mean"] == pytest.approx(final_accs(runs[0]))
    assert fedavg["final_test_acc_std"] is None


def test_no_grad_variance_plot_without_it(tmp_path, runs):
    res = report([runs[0]], str(tmp_path / "out"))  # fedavg alone
    assert {Path(p).name for p in res["plots"]} == {"accuracy.png", "loss.png"}
    assert not (tmp_path / "out" / "grad_variance.png").exists()


def test_labels_name_the_differing_values():
    base = {"algorithm.name": "fedga", "algorithm.beta": 0.1, "algorithm.lr": 0.05, "model.name": "mlp"}
    configs = [base, {**base, "algorithm.beta": 0.05}, {**base, "algorithm.name": "fedavg", "algorithm.beta": 0.0}]
    assert make_labels(configs) == ["fedga beta=0.1", "fedga beta=0.05", "fedavg"]
    # keys with the same last component stay dotted
    configs = [base, {**base, "model.name": "logreg"}]
    assert make_labels(configs) == ["fedga model.name=mlp", "fedga model.name=logreg"]


def test_seed_run_dir_logging_progress_do_not_split_groups(runs):
    a, b = load_run(runs[0]), load_run(runs[2])  # fedavg seeds 0 and 1
    b.config = {**b.config, "logging.wandb": True, "train.progress": True}
    assert [len(g.runs) for g in group_runs([a, b])] == [2]
    b.config["algorithm.lr"] = 0.5
    assert [g.label for g in group_runs([a, b])] == ["fedavg lr=0.05", "fedavg lr=0.5"]


def test_validation_column_and_diagnostic_plot(tmp_path):
    """With a hold-out and diagnostics, the table shows final validation accuracy and the
    diagnostic r(x) of every algorithm (fedavg included) gets its own plot."""
    dirs = [train(tmp_path / f"{a}-s{s}", a, s, "data.val_fraction=0.2", "train.diagnostics_every=2")
            for a in ALGOS for s in SEEDS]
    res = report(dirs, str(tmp_path / "out"))
    assert "diag_grad_variance.png" in {Path(p).name for p in res["plots"]}
    assert (tmp_path / "out" / "diag_grad_variance.png").read_bytes().startswith(PNG_MAGIC)
    assert "final val acc (%)" in (tmp_path / "out" / "table.md").read_text()
    groups = {g["label"]: g for g in json.loads((tmp_path / "out" / "table.json").read_text())["groups"]}
    vals = [[r["val_acc"] for r in read_metrics(d) if "val_acc" in r][-1] for d in dirs[:2]]
    assert groups["fedavg"]["final_val_acc_mean"] == pytest.approx(np.mean(vals))


def test_grad_variance_pairs_plot_draws_a_panel_per_pair_where_both_log_it(tmp_path, runs):
    """The study's pairs figure: written when a pair has both curves, not when one lacks them."""
    from dist_gradalign.report import plot_grad_variance_pairs
    fedavg, fedga = group_runs([load_run(d) for d in runs])
    path = tmp_path / "pairs.png"
    assert not plot_grad_variance_pairs([(fedga, fedavg)], path, "grad_variance", "t")  # fedavg logs none
    assert not path.exists()
    assert plot_grad_variance_pairs([(fedga, fedga)], path, "grad_variance", "t")
    assert path.read_bytes().startswith(PNG_MAGIC)
