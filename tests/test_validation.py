"""The validation hold-out (``data.val_fraction``) and the r(x) diagnostic (``train.diagnostics_every``)."""
import json

import numpy as np
import pytest
import torch

from dist_gradalign.config import ConfigError
from dist_gradalign.data import holdout
from dist_gradalign.engine import Trainer
from dist_gradalign.models import evaluate_sums

from util import base_config, load_params, run_dir_rows


def test_holdout_is_stratified_seeded_and_disjoint():
    labels = np.repeat(np.arange(5), [10, 20, 30, 40, 7])
    val, rest = holdout(labels, 0.2, seed=3)
    assert [int((labels[val] == c).sum()) for c in range(5)] == [2, 4, 6, 8, 1]  # round(0.2 n_c)
    assert np.array_equal(np.sort(np.concatenate([val, rest])), np.arange(len(labels)))
    assert np.array_equal(val, np.sort(val)) and len(np.intersect1d(val, rest)) == 0
    assert np.array_equal(holdout(labels, 0.2, seed=3)[0], val)
    assert not np.array_equal(holdout(labels, 0.2, seed=4)[0], val)
    none, everything = holdout(labels, 0.0, seed=3)
    assert len(none) == 0 and np.array_equal(everything, np.arange(len(labels)))


def test_run_holds_out_validation_and_reports_it(tmp_path):
    cfg = base_config(tmp_path, data={"val_fraction": 0.2}, partition={"scheme": "shards", "num_clients": 10},
                      train={"rounds": 4, "clients_per_round": 5, "eval_every": 2})
    t = Trainer(cfg)
    t.fit()
    run = tmp_path / "run"
    val = json.loads((run / "val_indices.json").read_text())["indices"]
    shards = json.loads((run / "partition.json").read_text())["clients"].values()
    in_shards = np.concatenate([np.array(s) for s in shards])
    n_train = len(t.data.y)
    assert len(val) == pytest.approx(0.2 * n_train, abs=10)
    assert len(np.intersect1d(val, in_shards)) == 0, "validation samples leaked into a client's shard"
    assert np.array_equal(np.sort(np.concatenate([val, in_shards])), np.arange(n_train))
    rows = run_dir_rows(cfg.run_dir)
    assert ["val_acc" in r for r in rows] == [False, True, False, True]
    # the logged val_acc is the final model evaluated on exactly the held-out samples
    t.fm.module.load_state_dict(load_params(cfg.run_dir))
    t.fm.params.copy_(torch.cat([p.detach().reshape(-1) for p in t.fm.module.parameters()]))
    idx = torch.as_tensor(val)
    correct, loss, count = evaluate_sums(t.fm, [t.data.gather(idx)]).tolist()
    assert count == len(val)
    assert rows[-1]["val_acc"] == pytest.approx(correct / count, abs=1e-12)
    assert rows[-1]["val_loss"] == pytest.approx(loss / count, rel=1e-6)
    assert json.loads((run / "summary.json").read_text())["val_acc"] == rows[-1]["val_acc"]


def test_without_holdout_nothing_changes(tmp_path):
    a = base_config(tmp_path / "a")
    b = base_config(tmp_path / "b", data={"val_fraction": 0.0})
    Trainer(a).fit()
    Trainer(b).fit()
    assert not (tmp_path / "a" / "run" / "val_indices.json").exists()
    assert all("val_acc" not in r for r in run_dir_rows(a.run_dir))
    for key, value in load_params(a.run_dir).items():
        assert torch.equal(value, load_params(b.run_dir)[key])


def test_val_fraction_that_holds_out_nothing_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="holds out no sample"):
        Trainer(base_config(tmp_path, data={"val_fraction": 0.001}))
    with pytest.raises(ConfigError, match="data.val_fraction"):
        base_config(tmp_path, data={"val_fraction": 1.0})


DIAG = dict(partition={"scheme": "shards", "num_clients": 10}, data={"val_fraction": 0.1},
            train={"rounds": 4, "clients_per_round": 4, "eval_every": 2, "diagnostics_every": 2})


def _run(tmp_path, sub, algo, **train):
    cfg = base_config(tmp_path / sub, algorithm=algo, **{**DIAG, "train": {**DIAG["train"], **train}})
    t = Trainer(cfg)
    t.fit()
    return t.x, run_dir_rows(cfg.run_dir)


def test_diagnostic_equals_fedga_own_variance_with_whole_shards(tmp_path):
    """fedga computes r(x) from its own g_i (whole shards here): the diagnostic, computed
    separately at the same x over the same clients, gives the same number."""
    _, rows = _run(tmp_path, "ga", {"name": "fedga", "beta": 0.1, "local_batch_size": 16, "full_grad_batch": "full"})
    diag = [r for r in rows if "diag_grad_variance" in r]
    assert [r["round"] for r in diag] == [1, 2, 4]
    for r in diag:
        assert r["diag_grad_variance"] == pytest.approx(r["grad_variance"], rel=1e-5)
        assert r["diag_grad_variance_normalized"] == pytest.approx(r["grad_variance_normalized"], rel=1e-5)


def test_diagnostic_for_fedavg_changes_nothing_and_costs_no_traffic(tmp_path):
    """At round 1 every algorithm sits at the same x with the same clients: fedavg's diagnostic
    equals fedga's r(x). Diagnostics change neither the trajectory nor the counted traffic."""
    algo = {"name": "fedavg", "local_batch_size": 16}
    x_on, on = _run(tmp_path, "on", algo)
    x_off, off = _run(tmp_path, "off", algo, diagnostics_every=0)
    assert torch.equal(x_on, x_off)
    for a, b in zip(on, off):
        for key in ("bytes", "comm_rounds", "updates", "samples", "train_loss"):
            assert a[key] == b[key], key
    assert "grad_variance" not in on[0] and "diag_grad_variance" not in off[0]
    _, ga = _run(tmp_path, "ga", {"name": "fedga", "beta": 0.1, "local_batch_size": 16, "full_grad_batch": "full"})
    assert on[0]["diag_grad_variance"] == pytest.approx(ga[0]["grad_variance"], rel=1e-5)
    assert on[1]["diag_grad_variance"] != pytest.approx(ga[1]["diag_grad_variance"], rel=1e-3)


def test_diagnostic_subsample_is_fixed_per_client(tmp_path):
    """diagnostics_batch: the same positions of a client every time it is evaluated, so two
    algorithms at the same x agree, and the subsample differs from the whole shard."""
    algo = {"name": "fedavg", "local_batch_size": 16}
    _, sub = _run(tmp_path, "sub", algo, diagnostics_batch=20)
    _, sub2 = _run(tmp_path, "sub2", {"name": "fedprox", "mu": 0.1, "local_batch_size": 16}, diagnostics_batch=20)
    _, full = _run(tmp_path, "full", algo)
    assert sub[0]["diag_grad_variance"] == pytest.approx(sub2[0]["diag_grad_variance"], rel=1e-6)
    assert sub[0]["diag_grad_variance"] != pytest.approx(full[0]["diag_grad_variance"], rel=1e-3)
