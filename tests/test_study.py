"""The study harness (bench/study.py): its search brackets the optimum, its statistics are right.

The search is driven here by a synthetic objective written into result files, so that the
optimum is known; the real runs of the study are its own evidence (BENCHMARKS.md)."""
import dataclasses
import math
import sys

import numpy as np
import pytest

from util import REPO

sys.path.insert(0, str(REPO / "bench"))
import study  # noqa: E402


def _fake(spec, val, status="finished"):
    """A result file as run_one writes it, with one evaluated row at the end of each round budget."""
    R = spec.rounds
    last = R if status == "finished" else R // 2  # a diverged run stops before its last round
    comm = 2 if spec.method.algorithm in ("fedga", "scaffold", "gradalign") else 1
    rows = [{"round": r, "comm_rounds": comm * r, "updates": r, "samples": 10 * r, "time": float(r),
             "val_acc": val, "test_acc": val + 0.01 * (r > study.SETTINGS[spec.setting].rounds)}
            for r in range(10, last + 1, 10)]
    study.store(spec.result_path, {"name": spec.name, "label": spec.method.label, "params": spec.params,
                                   "seed": spec.seed, "rounds": spec.rounds, "args": spec.args(), "status": status,
                                   "rows": rows, "config": {"seed": spec.seed}})


def _drive(setting, objective, max_waves=30, longer=None):
    """Run the study's waves with ``objective(method, exps) -> val acc`` in place of training
    (``longer(method, exps, rounds)`` for the tuning runs of the baseline's longer budgets)."""
    for _ in range(max_waves):
        specs, chosen = study.plan(setting)
        todo = [s for s in specs if study.load_result(s) is None]
        if not todo:
            return chosen
        for s in todo:
            if longer and s.rounds != setting.rounds and s.seed in study.TUNE_SEEDS:
                val = longer(s.method, dict(s.point), s.rounds)
            else:
                val = objective(s.method, dict(s.point))
            _fake(s, 0.0, "diverged") if val is None else _fake(s, val)
    raise AssertionError("the search did not finish")


@pytest.fixture
def setting(tmp_path, monkeypatch):
    """emnist-het-mb with the paper's methods (those of issue 12 tune other parameters)."""
    monkeypatch.setattr(study, "RESULTS", tmp_path / "results")
    paper_only = dataclasses.replace(study.SETTINGS["emnist-het-mb"], methods=study.FED, pairs=())
    monkeypatch.setitem(study.SETTINGS, "emnist-het-mb", paper_only)
    return paper_only


def test_search_brackets_an_optimum_outside_the_first_grid(setting):
    """fedga's optimum lies at lr x2^1 and beta x2^-3 (beta off the first grid); an lr of x2^2
    or more diverges. The search must find it with every neighbour run, and no more than needed."""
    def objective(method, e):
        if e["lr"] >= 2:
            return None
        return 0.8 - 0.01 * (e["lr"] - 1) ** 2 - 0.01 * (e.get("beta", 0) + 3) ** 2 - 0.01 * (e.get("mu", 0) - 1) ** 2

    off_path = study.Spec(setting.name, setting.methods[0], (("lr", -4),), 100, setting.rounds)
    _fake(off_path, 0.1)  # a run of an earlier, wider search: it stays in the table
    _fake(study.Spec(setting.name, setting.methods[0], (("lr", -4),), 101, setting.rounds), 0.1)
    _fake(study.Spec(setting.name, setting.methods[0], (("lr", 3),), 100, setting.rounds), 0.2)  # one seed only
    chosen = _drive(setting, objective)
    table = study.tuning_table(setting)
    assert "| fedavg | lr 0.003125 | 10.00 | 10.00 | 10.00 |" in table
    assert "| fedavg | lr 0.4 | 20.00 | - | - |" in table, "a point with one tuning seed is listed, not scored"
    assert chosen["fedga"] == (("lr", 1), ("beta", -3))
    assert chosen["fedprox"] == (("lr", 1), ("mu", 1))
    assert chosen["fedavg"] == (("lr", 1),)
    _, scores, best = study.search(setting, setting.methods[3])
    for nb in [(("lr", 0), ("beta", -3)), (("lr", 2), ("beta", -3)), (("lr", 1), ("beta", -4)), (("lr", 1), ("beta", -2))]:
        assert nb in scores, f"neighbour {nb} of the chosen point was not run"
    assert np.mean(scores[(("lr", 2), ("beta", 0))]) == pytest.approx(setting.chance), "a diverged point scores chance"
    table = study.tuning_table(setting)
    assert "**lr 0.1, beta 0.003125**" in table and " d |" in table


def test_a_monotone_objective_stops_at_the_cap_and_says_so(setting):
    chosen = _drive(setting, lambda m, e: 0.5 + 0.01 * e["lr"])
    assert chosen["fedavg"] == (("lr", study.CAP),)
    assert "not bracketed" in study.tuning_table(setting)


def test_paired_difference_and_confidence_interval():
    a, b = [0.80, 0.82, 0.81, 0.79, 0.83], [0.78, 0.80, 0.80, 0.78, 0.80]
    d = np.subtract(a, b)
    half = 2.776 * d.std(ddof=1) / math.sqrt(5)  # t(0.975, 4)
    mean, lo, hi = study.paired(a, b)
    assert mean == pytest.approx(d.mean()) and lo == pytest.approx(d.mean() - half) and hi == pytest.approx(d.mean() + half)


def test_report_counts_every_run_and_uses_the_baseline_at_both_lengths(setting):
    """The baseline's 2R-round runs give both its R-round and its 2R-round numbers; a diverged
    reporting run stays in its row, scored at chance."""
    def objective(method, e):
        return 0.7 + 0.01 * (method.label == "fedga") - 0.01 * sum(abs(k) for k in e.values())
    chosen = _drive(setting, objective)
    fedga = next(m for m in setting.methods if m.label == "fedga")
    _fake(study.Spec(setting.name, fedga, chosen["fedga"], 4, setting.rounds), 0.0, "diverged")
    text, data = study.report_tables(setting)
    accs = data["summary"]["methods"]["fedga"]["test_acc"]
    assert accs == pytest.approx([0.71] * 4 + [setting.chance]) and data["summary"]["methods"]["fedga"]["diverged"] == 1
    assert "| fedga |" in text and "1/5" in text
    assert data["summary"]["methods"]["fedavg"]["test_acc"] == pytest.approx([0.70] * 5)
    assert data["summary"]["methods"][f"fedavg ({2 * setting.rounds} rounds)"]["test_acc"] == pytest.approx([0.71] * 5)
    fedprox = data["summary"]["methods"]["fedprox"]["axes"]
    # one-round FedProx: equal communication is equal rounds; the same samples as well
    for axis in ("rounds", "communication", "compute"):
        assert fedprox[axis]["diff"][0] == pytest.approx(0.0) and fedprox[axis]["verdict"] == "not resolved"
    # two-round FedGA (all 0.71; its diverged seed at chance): at equal communication against
    # FedAvg's 2R runs (0.71 past R in _fake), at equal rounds against its R-round numbers (0.70)
    fedga = data["summary"]["methods"]["fedga"]["axes"]
    assert fedga["rounds"]["diff"][0] == pytest.approx((4 * 0.01 + setting.chance - 0.70) / 5)
    assert fedga["communication"]["diff"][0] == pytest.approx((setting.chance - 0.71) / 5)
    assert "tuned for 2000" in fedga["communication"]["against"]


def test_a_result_made_with_other_arguments_is_not_reused(setting):
    """Changing a setting (say its rounds) makes its stored results stale: they are run again."""
    spec = study.Spec(setting.name, setting.methods[0], (("lr", 0),), 100, setting.rounds)
    _fake(spec, 0.5)
    assert study.load_result(spec)["rows"][-1]["val_acc"] == 0.5
    longer = study.Spec(setting.name, setting.methods[0], (("lr", 0),), 100, setting.rounds + 10)
    longer_path = longer.result_path
    assert longer_path != spec.result_path
    data = study.load_result(spec)
    study.store(spec.result_path, {**data, "args": longer.args()})
    assert study.load_result(spec) is None


def test_first_format_results_are_read_and_migrated(setting):
    """Results of the first runs (gzip, every float, client ids) count as they are and are
    rewritten as xz with 6 significant digits and no client ids."""
    import gzip
    import json
    spec = study.Spec(setting.name, setting.methods[0], (("lr", 0),), 100, setting.rounds)
    old = spec.result_path.with_name(spec.name + ".json.gz")
    old.parent.mkdir(parents=True)
    rows = [{"round": setting.rounds, "val_acc": 0.123456789, "test_acc": 0.5, "clients": [1, 2]}]
    with gzip.open(old, "wt") as f:
        json.dump({"name": spec.name, "label": "fedavg", "params": spec.params, "seed": 100,
                   "rounds": setting.rounds, "args": spec.args(), "status": "finished", "rows": rows}, f)
    assert study.load_result(spec)["rows"][0]["val_acc"] == 0.123456789
    study.migrate(setting.name)
    assert not old.exists() and spec.result_path.is_file()
    assert study.load_result(spec)["rows"] == [{"round": setting.rounds, "val_acc": 0.123457, "test_acc": 0.5}]


def test_scores_within_the_tolerance_tie_and_the_tie_goes_to_the_paper(setting):
    """FedProx whose mu barely matters (as mu -> 0 it is FedAvg): scores that creep up by less
    than TOL as mu shrinks must not walk the search to the cap."""
    def objective(method, e):
        return 0.6 - 0.02 * (e["lr"] - 1) ** 2 - 0.0005 * e.get("mu", 0)
    chosen = _drive(setting, objective)
    assert chosen["fedprox"] == (("lr", 1), ("mu", 0))
    _, scores, _ = study.search(setting, next(m for m in setting.methods if m.label == "fedprox"))
    # the neighbours of the choice and the span, nothing more
    assert {k for pt in scores for p, k in pt if p == "mu"} == {-3, -1, 0, 1, 3, 7}


def test_ties_are_the_other_points_within_tolerance():
    scores = {(("lr", -1),): [0.70, 0.70], (("lr", 0),): [0.735, 0.736], (("lr", 1),): [0.736, 0.738],
              (("lr", 2),): [0.05, 0.06], (("lr", 3),): [0.70, None]}
    assert study.ties(scores, (("lr", 0),)) == [(("lr", 1),)]
    assert study.ties(scores, (("lr", 1),)) == [(("lr", 0),)]


def test_issue12_methods_tune_their_own_parameter_and_further_pairs_are_reported(tmp_path, monkeypatch):
    """A method that tunes only the server lr searches along it (its first line, then the
    neighbours), and the setting's further comparisons read the other method at f x R rounds."""
    monkeypatch.setattr(study, "RESULTS", tmp_path / "results")
    setting = study.SETTINGS["emnist-het-mb"]

    def objective(method, e):
        if "server_lr" in e:
            return 0.7 - 0.01 * (e["server_lr"] + 2) ** 2  # optimum at server_lr x 2^-2, off the first line
        return 0.7 - 0.01 * e["lr"] ** 2 - 0.01 * e.get("beta", 0) ** 2 - 0.01 * e.get("mu", 0) ** 2

    chosen = _drive(setting, objective)
    assert chosen["fedavg-adam"] == (("server_lr", -2),) and chosen["fedga-adam"] == (("server_lr", -2),)
    assert chosen["fedga-previous"] == (("lr", 0), ("beta", 0))
    tables, data = study.report_tables(setting)
    assert "Further paired comparisons" in tables
    assert "| fedga-previous (1000 rounds) | fedga (500 rounds) | +0.00 [" in tables
    assert "| scaffold-stateful (1000 rounds) | scaffold (1000 rounds) |" in tables
    assert set(data["summary"]["pairs"]) == {f"{a}@1000 - {b}@{int(f * 1000)}" for a, b, f in setting.pairs}


def test_plan_prints_progress_choices_and_the_runs_needed_now(setting):
    """``--plan``: what a later session reads before resuming a study."""
    first = study.progress(setting).splitlines()
    assert first[0] == f"{setting.name}: 0 runs stored; needed now: 24 runs"  # 4 methods x 3 lrs x 2 seeds
    assert "  to run: fedga_lr=0.025_beta=0.025_s100" in first and not any("chosen" in l for l in first)
    _drive(setting, lambda m, e: 0.7 - 0.01 * sum(abs(k) for k in e.values()))
    done = study.progress(setting).splitlines()
    assert done[0].endswith("needed now: 0 runs") and "  chosen: fedga at lr 0.05, beta 0.025" in done


def test_the_runner_starts_the_next_needed_run_on_a_free_core_and_finishes_every_plan(tmp_path, monkeypatch, capsys):
    """run_study, with a synthetic training in place of run_one, on two settings at once. One
    tuning run of the first setting holds its core until the second setting has started (a
    runner that waited for a batch to end would never start it: the run times out), then fails.
    At the end both plans are complete but for the failed run, which was not retried; no run
    started twice; never more than ``jobs`` at once."""
    import threading
    monkeypatch.setattr(study, "RESULTS", tmp_path / "results")
    a = dataclasses.replace(study.SETTINGS["emnist-het-mb"], methods=study.FED[:2], pairs=())
    b = dataclasses.replace(study.SETTINGS["emnist-iid-mb"], methods=study.FED[:1], pairs=())
    monkeypatch.setitem(study.SETTINGS, a.name, a)
    monkeypatch.setitem(study.SETTINGS, b.name, b)
    held = study.Spec(a.name, a.methods[1], study._point(a.methods[1], lr=1), 101, a.rounds)
    b_started, lock, started, now, peak, held_saw_b = threading.Event(), threading.Lock(), [], [0], [0], []

    def fake_run(spec, core):
        with lock:
            started.append(spec)
            now[0] += 1
            peak[0] = max(peak[0], now[0])
        if spec.setting == b.name:
            b_started.set()
        try:
            if spec == held:
                held_saw_b.append(b_started.wait(timeout=30))  # False: the second setting waited for this run
                return "FAILED (rc 1)"
            _fake(spec, 0.7 - 0.01 * sum(abs(k) for _, k in spec.point))
            return "finished"
        finally:
            with lock:
                now[0] -= 1

    monkeypatch.setattr(study, "run_one", fake_run)
    study.run_study([(a, ()), (b, ())], jobs=2, deadline=math.inf)
    assert held_saw_b == [True] and peak[0] == 2
    assert len(started) == len(set(started)), "a run started twice"
    assert started.count(held) == 1 and study.load_result(held) is None
    assert [s for s in study.plan(a)[0] if study.load_result(s) is None] == [held]
    assert [s for s in study.plan(b)[0] if study.load_result(s) is None] == []
    assert "  chosen: fedavg at lr 0.05" in study.progress(a).splitlines()
    assert "  chosen: fedavg at lr 0.05" in study.progress(b).splitlines()
    ends = [line for line in capsys.readouterr().out.splitlines() if " ended in this invocation" in line]
    assert len(ends) == len(started)  # each end says how far the study is
    assert ends[-1].endswith(f"{len(started)} ended in this invocation, 0 running, 0 more needed now")


def test_a_run_directory_that_cannot_be_made_stops_the_study_before_any_run(setting, tmp_path, monkeypatch):
    """A ``runs`` link left dangling (a fresh checkout of the worktree it points into) made every
    run fail in turn; the runner now stops first, naming where the link leads."""
    (tmp_path / "runs").symlink_to(tmp_path / "gone")
    monkeypatch.setattr(study, "RUNS", tmp_path / "runs" / "study")
    monkeypatch.setattr(study, "run_one", lambda spec, core: pytest.fail("a run started"))
    with pytest.raises(SystemExit, match=r"cannot make the run directory .*gone/study\): no run started"):
        study.run_study([(setting, ())], jobs=2, deadline=math.inf)


def test_the_runner_starts_nothing_after_the_deadline(setting, monkeypatch):
    monkeypatch.setattr(study, "run_one", lambda spec, core: pytest.fail("a run started after the deadline"))
    study.run_study([(setting, ())], jobs=2, deadline=0.0)


def test_gradient_variance_is_each_runs_mean_over_the_last_30_percent_then_the_geometric_mean(setting):
    """r(x) logged every 10 rounds: early values (and those past R, from the baseline's 2R runs)
    must not count; a method that logged no r(x) gets no entry."""
    def run(seed):
        rows = [{"round": r, study.GRAD_VARIANCE: (seed + 1) * (1.0 if 700 < r <= 1000 else 100.0) * (1 + (r % 20 == 0))}
                for r in range(10, 2001, 10)]
        return {"rows": rows}
    results = {"fedavg": [run(s) for s in range(5)], "fedga": [{"rows": [{"round": 1000}]}] * 5}
    summary = {"methods": {"fedavg": {}, "fedga": {}}}
    lines = study.grad_variance_line(setting, results, summary)
    expected = 1.5 * 120 ** (1 / 5)  # each run: (seed + 1) x mean(1, 2); geometric mean of 1..5 = 120^(1/5)
    assert summary["methods"]["fedavg"]["grad_variance"] == pytest.approx(expected)
    assert "grad_variance" not in summary["methods"]["fedga"]
    assert lines[-1].endswith(f"rounds 701-1000, each method at its chosen step: the mean of each run's logged "
                              f"values, geometric mean over the reporting seeds: fedavg {expected:.3g}.")


def test_equal_compute_compares_against_the_baseline_where_it_has_used_as_many_samples(setting):
    """FedGA that used 10% more samples by round R is compared with FedAvg at round 1.1 R, read from
    FedAvg's runs tuned for 2R; a method whose samples FedAvg never reaches within its longest
    tuned budget gets '-' with the reason."""
    chosen = _drive(setting, lambda m, e: 0.7 - 0.01 * sum(abs(k) for k in e.values()))
    R = setting.rounds
    for label, factor in (("fedga", 1.1), ("scaffold", 2.5)):
        m = next(x for x in setting.methods if x.label == label)
        for seed in study.REPORT_SEEDS:
            spec = study.Spec(setting.name, m, chosen[label], seed, R)
            data = study.load_result(spec)
            for row in data["rows"]:
                row["samples"] = int(factor * row["samples"])
            study.store(spec.result_path, data)
    tables, data = study.report_tables(setting)
    fedga = data["summary"]["methods"]["fedga"]["axes"]["compute"]
    assert fedga["against"] == f"fedavg round {int(1.1 * R)}, lr 0.05 tuned for {2 * R}"
    assert fedga["diff"][0] == pytest.approx(0.70 - 0.71)  # the baseline's test acc past R is 0.71 in _fake
    scaffold = data["summary"]["methods"]["scaffold"]["axes"]["compute"]
    assert scaffold == {"missing": f"fedavg would need 2.5x its round-{R} samples, past its longest tuned budget "
                                   f"({2 * R} rounds)"}
    assert f"(fedavg round {int(1.1 * R)}, lr 0.05 tuned for {2 * R}) |" in tables


def test_the_baseline_is_tuned_again_for_the_longer_budget(setting):
    """At 2R the baseline's optimum moves to lr x2^-1 (off its R-round choice x2^0): its own line,
    centred on the R-round choice, finds and brackets it, reports it on the fresh seeds, and the
    two-round methods meet it there at equal communication."""
    def objective(method, e):
        return 0.7 - 0.01 * sum(abs(k) for k in e.values())

    def longer(method, e, rounds):
        return 0.8 - 0.01 * abs(e["lr"] + 1)

    chosen = _drive(setting, objective, longer=longer)
    R, fedavg = setting.rounds, setting.methods[0]
    assert chosen["fedavg"] == (("lr", 0),) and chosen[study.budget_key("fedavg", 2 * R)] == (("lr", -1),)
    tuned = set(study.stored_points(setting, fedavg, 2 * R))
    assert tuned == {(("lr", k),) for k in (-2, -1, 0, 1)}  # the first line around 0, then -2 to bracket -1
    assert all(study.load_result(study.Spec(setting.name, fedavg, (("lr", -1),), s, 2 * R))
               for s in study.REPORT_SEEDS)
    text, data = study.report_tables(setting)
    assert "| fedavg (2000 rounds, tuned for 2000) | lr 0.025 |" in text
    assert "| fedavg (2000 rounds) | lr 0.025 |" in study.tuning_table(setting).replace("**", "")
    assert data["summary"]["methods"]["fedga"]["axes"]["communication"]["against"] == "fedavg round 2000, lr 0.025 tuned for 2000"


def test_fedprox_mu_line_spans_the_usual_range_at_the_chosen_lr(setting):
    """Besides its neighbours, FedProx's mu is run at 0.00125, 0.08 and 1.28 (the span) at its chosen
    lr; an optimum at 0.08 is then bracketed by 0.04 and 0.16."""
    def objective(method, e):
        return 0.7 - 0.01 * abs(e["lr"]) - 0.01 * abs(e.get("mu", 0) - 3)

    chosen = _drive(setting, objective)
    fedprox = next(m for m in setting.methods if m.label == "fedprox")
    assert chosen["fedprox"] == (("lr", 0), ("mu", 3))
    mus = {fedprox.value("mu", k) for _, k in (pt[1] for pt in study.stored_points(setting, fedprox, setting.rounds))}
    assert {0.00125, 0.04, 0.08, 0.16, 1.28} <= mus and max(mus) == 1.28


def test_verdicts_are_computed_from_the_interval():
    assert study.verdict(0.001, 0.02) == "above zero"
    assert study.verdict(-0.02, -0.001) == "below zero"
    assert study.verdict(-0.001, 0.02) == study.verdict(0.0, 0.02) == "not resolved"


def test_queue_entries_restrict_a_setting_to_its_named_methods(setting):
    s, labels = study.parse_entry("emnist-het-mb:fedavg,fedga")
    assert s.name == "emnist-het-mb" and labels == ("fedavg", "fedga")
    spec = study.next_spec([(s, ("fedga",))], set())
    assert spec.method.label == "fedga"
    with pytest.raises(Exception, match="has no method lbsgd"):
        study.parse_entry("emnist-het-mb:lbsgd")
    with pytest.raises(Exception, match="unknown setting"):
        study.parse_entry("emnist-xyz")


def test_reporting_runs_outside_every_table_are_listed(setting):
    """A reporting run at a point the search left (e.g. a re-centred grid) still counts: listed."""
    chosen = _drive(setting, lambda m, e: 0.7 - 0.01 * sum(abs(k) for k in e.values()))
    scaffold = next(m for m in setting.methods if m.label == "scaffold")
    for seed in (0, 1):
        _fake(study.Spec(setting.name, scaffold, (("lr", 3),), seed, setting.rounds), 0.05)
    text, _ = study.report_tables(setting)
    assert "| scaffold | lr 0.4 | 1000 | 0, 1 | 5.00 +- 0.00 | 0/2 |" in text


def test_claims_take_their_verdicts_from_the_intervals(setting, monkeypatch):
    """The claims table and the README's bullets are built from the summaries: the verdict on the
    paper's axis (communication, for the federated settings) and the paper's gap inside or outside."""
    monkeypatch.setitem(study.CLAIMS, "emnist-het-mb", ("fedga", "communication", "the paper", 3.05, 1.28))
    _drive(setting, lambda m, e: 0.7 + 0.02 * (m.label == "fedga") - 0.01 * sum(abs(k) for k in e.values()))
    _, data = study.report_tables(setting)
    table = study.claims_table({"emnist-het-mb": data["summary"]})
    assert "| `emnist-het-mb` | the paper | fedga - fedavg, equal communication: **+1.00 [+1.00, +1.00] above zero; " \
           "the paper's +3.05 is outside it** |" in table
    bullets = study.claims_summary({"emnist-het-mb": data["summary"]})
    assert bullets.startswith("- `emnist-het-mb`: fedga - fedavg at equal communication (the paper's axis) +1.00 "
                              "[+1.00, +1.00] above zero; the paper's +3.05 is outside it; equal rounds +2.00")


def test_a_method_whose_line_is_extended_stays_reported_as_provisional(setting):
    """A search reopened after its method was reported (here: a span point of FedProx's mu not run
    yet) keeps the method in the tables at its leading point, marked provisional, and schedules
    no reporting run for it until the search ends."""
    chosen = _drive(setting, lambda m, e: 0.7 - 0.01 * sum(abs(k) for k in e.values()))
    fedprox = next(m for m in setting.methods if m.label == "fedprox")
    study.Spec(setting.name, fedprox, (("lr", 0), ("mu", 7)), 101, setting.rounds).result_path.unlink()
    specs, now = study.plan(setting)
    assert "fedprox" not in now and all(s.seed in study.TUNE_SEEDS for s in specs if s.method is fedprox)
    text, data = study.report_tables(setting)
    assert f"| fedprox | lr 0.05, mu 0.01 (provisional: its search is not finished) |" in text
    assert "| fedprox (provisional) | +0.00 [" in text and data["summary"]["methods"]["fedprox"]["provisional"]
    assert "Other reporting-seed runs" not in text


def test_until_the_longer_line_ends_equal_communication_is_against_the_untuned_baseline_and_says_so(setting):
    _drive(setting, lambda m, e: 0.7 - 0.01 * sum(abs(k) for k in e.values()))
    R, fedavg = setting.rounds, setting.methods[0]
    study.Spec(setting.name, fedavg, (("lr", 1),), 101, 2 * R).result_path.unlink()
    _, data = study.report_tables(setting)
    comm = data["summary"]["methods"]["fedga"]["axes"]["communication"]
    assert comm["untuned"] and comm["against"] == f"fedavg round {2 * R}, lr 0.05 tuned for {R} only: its {2 * R}-round line is not finished"
    assert "(the baseline's lr not yet tuned for this budget)" in study._claim_cell(comm)


@pytest.mark.parametrize("name", list(study.SETTINGS))
def test_every_method_of_every_setting_is_a_valid_config(name):
    """A bad override (a key, a value, a combination the algorithm refuses) fails here, not hours
    into a study: each method's first tuning run loads as a config."""
    from dist_gradalign.config import load_config
    setting = study.SETTINGS[name]
    for method in setting.methods:
        spec = study.Spec(name, method, tuple((p, 0) for p in method.tune), study.TUNE_SEEDS[0], setting.rounds)
        path, *overrides = spec.args()
        cfg = load_config(str(REPO / path), overrides)
        assert cfg.algorithm.name == method.algorithm


def test_a_held_parameter_is_named_never_searched_and_its_earlier_runs_count(setting, monkeypatch):
    """A parameter held at its base value (``caps`` 0: FedDyn's alpha in its displaced variant)
    gets no neighbours and no "not bracketed" flag; runs stored at another value of it (an earlier
    protocol) stay in the tuning table and may be chosen."""
    held = study.Method("feddyn-ga", "feddyn", ("lr", "beta", "feddyn_alpha"),
                        (("lr", 0.05), ("beta", 0.05), ("feddyn_alpha", 0.08)),
                        ("algorithm.displacement=fresh",), caps=(("feddyn_alpha", 0),))
    monkeypatch.setitem(study.SETTINGS, setting.name, dataclasses.replace(setting, methods=[held]))
    setting = study.SETTINGS[setting.name]
    earlier = (("lr", 0), ("beta", 0), ("feddyn_alpha", -3))
    for seed in study.TUNE_SEEDS:
        _fake(study.Spec(setting.name, held, earlier, seed, setting.rounds), 0.5)
    chosen = _drive(setting, lambda m, e: 0.6 - 0.01 * (e["lr"] - 1) ** 2 - 0.01 * e["beta"] ** 2)
    assert chosen["feddyn-ga"] == (("lr", 1), ("beta", 0), ("feddyn_alpha", 0))
    _, scores, _ = study.search(setting, held)
    assert {k for pt in scores for p, k in pt if p == "feddyn_alpha"} == {0, -3}
    table = study.tuning_table(setting)
    assert "| feddyn-ga | lr 0.05, beta 0.05, feddyn_alpha 0.01 | 50.00 | 50.00 | 50.00 |" in table
    assert "**lr 0.1, beta 0.05, feddyn_alpha 0.08**" in table and "not bracketed" not in table
