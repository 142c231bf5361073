"""Plots and a seed-aggregated table for finished runs (the paper's Figure 2, Figures 9/10
and Table 1 layouts).

``report(run_dirs, out_dir, target)`` reads each run's ``config.yaml`` and ``metrics.jsonl``,
groups runs whose configs differ only in ``seed`` (and ``run_dir``, ``logging``,
``train.progress``), and writes to ``out_dir``:

- ``accuracy.png``: test accuracy against communication rounds (left) and updates (right);
- ``loss.png``: test loss, same layout;
- ``grad_variance.png``: ``grad_variance`` (r(x)) against round on a log scale, for the groups
  that log it (scaffold, fedga, gradalign); not written when none does;
- ``diag_grad_variance.png``: the same for the diagnostic r(x) that every algorithm logs with
  ``train.diagnostics_every`` (the paper's Figures 9/10); not written when none does;
- ``table.md`` and ``table.json``: per group, the number of seeds, final and best test accuracy
  and, with a validation hold-out, final validation accuracy (mean +- std over seeds, in
  percent) and, with ``target``, the updates and communication rounds to first reach it.

Statistics over seeds: the mean, and the *sample* standard deviation (``ddof=1``); with a
single seed the std is undefined (``null`` in JSON, no ``+-`` in the table, no band in plots).
Curves are aligned by ``round`` within a group, on the evaluated rounds common to all of its
runs; a run with no evaluated rows is counted but contributes no accuracy. The grad-variance
curve is the geometric mean over seeds with a band of one geometric std (mean +- std of
log r), which stays positive on the log axis.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
import yaml

from dist_gradalign.summary import first_reaching, read_metrics

DDOF = 1  # sample standard deviation over seeds
IGNORED_KEYS = ("seed", "run_dir", "logging", "train.progress")  # never split groups


@dataclass
class Run:
    """One run directory: its flattened config and its metrics rows."""

    path: Path
    config: dict  # flattened: {"algorithm.beta": 0.1, ...}
    rows: list[dict]

    @property
    def evals(self) -> list[dict]:
        return [r for r in self.rows if "test_acc" in r]


@dataclass
class Group:
    """Runs whose configs are equal once seed, run_dir, logging and progress are removed."""

    key: str
    config: dict
    runs: list[Run] = field(default_factory=list)
    label: str = ""


# ---------------------------------------------------------------- loading and grouping

def flatten(d: dict, prefix: str = "") -> dict:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}`` (lists are kept as values)."""
    out = {}
    for k, v in d.items():
        name = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, name + "."))
        else:
            out[name] = v
    return out


def load_run(run_dir: str | Path) -> Run:
    """Read a run directory; ``FileNotFoundError`` if it is not one."""
    path = Path(run_dir)
    if not path.is_dir():
        raise FileNotFoundError(f"run directory {str(path)!r} does not exist")
    cfg_path = path / "config.yaml"
    if not cfg_path.is_file():
        raise FileNotFoundError(f"{str(cfg_path)!r} not found: is {str(path)!r} a run directory?")
    rows = read_metrics(path)  # raises FileNotFoundError without metrics.jsonl
    config = flatten(yaml.safe_load(cfg_path.read_text()) or {})
    return Run(path=path, config=config, rows=rows)


def group_key(config: dict) -> str:
    """The config with the seed-like keys removed, as a canonical JSON string."""
    kept = {k: v for k, v in config.items()
            if not any(k == ig or k.startswith(ig + ".") for ig in IGNORED_KEYS)}
    return json.dumps(kept, sort_keys=True, default=str)


def group_runs(runs: list[Run]) -> list[Group]:
    """Group runs that differ only in seed, in order of first appearance, and label them."""
    groups: dict[str, Group] = {}
    for run in runs:
        key = group_key(run.config)
        if key not in groups:
            groups[key] = Group(key=key, config=json.loads(key))
        groups[key].runs.append(run)
    result = list(groups.values())
    for g, label in zip(result, make_labels([g.config for g in result])):
        g.label = label
    return result


def _fmt_value(v) -> str:
    if isinstance(v, float):
        return f"{v:g}"
    if isinstance(v, list):
        return "[" + ",".join(_fmt_value(x) for x in v) + "]"
    return str(v)


def _short_names(keys: list[str], all_keys: set[str]) -> dict[str, str]:
    """``algorithm.beta`` -> ``beta`` unless another config key has the same last component
    (``model.name`` stays dotted: ``algorithm.name`` exists)."""
    leaves = [k.rsplit(".", 1)[-1] for k in sorted(all_keys | set(keys))]
    return {k: k.rsplit(".", 1)[-1] if leaves.count(k.rsplit(".", 1)[-1]) == 1 else k for k in keys}


def differing_keys(configs: list[dict]) -> list[str]:
    """The keys (except algorithm.name) whose values are not all equal across ``configs``."""
    keys = sorted({k for c in configs for k in c} - {"algorithm.name"})
    return [k for k in keys if len({json.dumps(c.get(k), default=str) for c in configs}) > 1]


def make_labels(configs: list[dict]) -> list[str]:
    """Short labels: the algorithm name plus the values that differ between the groups *of
    the same algorithm* (``fedga beta=0.05``). Differences that go with the algorithm (e.g.
    the federated vs the datacenter quickstart settings) are not repeated in every label;
    ``config_diff`` in table.json lists them all."""
    algos = [str(c.get("algorithm.name", "?")) for c in configs]
    all_keys = {k for c in configs for k in c}
    labels = []
    for c, algo in zip(configs, algos):
        same = [o for o, a in zip(configs, algos) if a == algo]
        keys = differing_keys(same)
        names = _short_names(keys, all_keys)
        labels.append(" ".join([algo] + [f"{names[k]}={_fmt_value(c.get(k))}" for k in keys]))
    return labels


def hidden_keys(groups: list[Group]) -> list[str]:
    """Keys that differ between groups but appear in no label (they go with the algorithm)."""
    shown = set()
    for g in groups:
        algo = g.config.get("algorithm.name")
        shown |= set(differing_keys([o.config for o in groups if o.config.get("algorithm.name") == algo]))
    return [k for k in differing_keys([g.config for g in groups]) if k not in shown]


# ---------------------------------------------------------------- statistics

def mean_std(values: list[float]) -> tuple[Optional[float], Optional[float]]:
    """Mean and sample std (``ddof=1``); (None, None) for no values, std None for one."""
    if not values:
        return None, None
    arr = np.asarray(values, dtype=float)
    std = float(np.std(arr, ddof=DDOF)) if len(arr) > DDOF else None
    return float(arr.mean()), std


COUNTERS = ("round", "comm_rounds", "updates", "samples", "time")


def aligned(group: Group, key: str) -> tuple[np.ndarray, dict[str, np.ndarray], np.ndarray]:
    """Values of ``key`` per round over the group's runs, on the rounds where every run that
    logs ``key`` has it. Returns (rounds, {counter: x values} for the :data:`COUNTERS` (``time``:
    the mean over the runs), values with shape (runs, rounds)); empty arrays when no run logs
    ``key``."""
    per_run = [{r["round"]: r for r in run.rows if r.get(key) is not None} for run in group.runs]
    per_run = [d for d in per_run if d]
    if not per_run:
        return np.array([]), {c: np.array([]) for c in COUNTERS}, np.zeros((0, 0))
    rounds = sorted(set.intersection(*(set(d) for d in per_run)))
    first = per_run[0]
    xs = {c: np.array([first[r][c] for r in rounds], dtype=float) for c in COUNTERS if c != "time"}
    xs["time"] = np.array([np.mean([d[r].get("time", np.nan) for d in per_run]) for r in rounds], dtype=float)
    values = np.array([[d[r][key] for r in rounds] for d in per_run], dtype=float)
    return np.array(rounds), xs, values


def group_stats(group: Group, target: Optional[float]) -> dict:
    """The table row of a group (accuracies as fractions; the table prints percent)."""
    finals = [run.evals[-1]["test_acc"] for run in group.runs if run.evals]
    bests = [max(r["test_acc"] for r in run.evals) for run in group.runs if run.evals]
    final_mean, final_std = mean_std(finals)
    best_mean, best_std = mean_std(bests)
    vals = [run.evals[-1]["val_acc"] for run in group.runs if run.evals and "val_acc" in run.evals[-1]]
    row = {
        "label": group.label,
        "algorithm": group.config.get("algorithm.name"),
        "seeds": [run.config.get("seed") for run in group.runs],
        "num_runs": len(group.runs),
        "num_evaluated": len(finals),
        "run_dirs": [str(run.path) for run in group.runs],
        "final_test_acc": finals,
        "final_test_acc_mean": final_mean,
        "final_test_acc_std": final_std,
        "best_test_acc": bests,
        "best_test_acc_mean": best_mean,
        "best_test_acc_std": best_std,
    }
    if vals:
        row["final_val_acc"] = vals
        row["final_val_acc_mean"], row["final_val_acc_std"] = mean_std(vals)
    if target is not None:
        ups = [first_reaching(run.rows, target, "updates") for run in group.runs]
        comms = [first_reaching(run.rows, target, "comm_rounds") for run in group.runs]
        reached = [u for u in ups if u is not None]
        row.update({
            "target": target,
            "reached": len(reached),
            "updates_to_target": ups,
            "comm_rounds_to_target": comms,
            "updates_to_target_mean": mean_std(reached)[0],
            "comm_rounds_to_target_mean": mean_std([c for c in comms if c is not None])[0],
        })
    return row


# ---------------------------------------------------------------- table

def _pct(mean: Optional[float], std: Optional[float]) -> str:
    if mean is None:
        return "-"
    return f"{100 * mean:.2f}" + (f" +- {100 * std:.2f}" if std is not None else "")


def _count(v: Optional[float]) -> str:
    return "-" if v is None else f"{v:.0f}" if float(v).is_integer() else f"{v:.1f}"


def _target_name(target: float) -> str:
    return f"{100 * target:g}%"


def markdown_table(rows: list[dict], target: Optional[float], hidden: list[str] = ()) -> str:
    """The paper's Table 1 layout: one row per group. ``hidden``: config keys that differ
    between groups but are not shown in the labels (they go with the algorithm)."""
    with_val = any("final_val_acc" in row for row in rows)
    head = ["group", "seeds", "final test acc (%)", "best test acc (%)"] + (["final val acc (%)"] if with_val else [])
    if target is not None:
        t = _target_name(target)
        head += [f"target {t}", f"updates to {t}", f"comm rounds to {t}"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in rows:
        cells = [row["label"], str(row["num_runs"]),
                 _pct(row["final_test_acc_mean"], row["final_test_acc_std"]),
                 _pct(row["best_test_acc_mean"], row["best_test_acc_std"])]
        if with_val:
            cells.append(_pct(row.get("final_val_acc_mean"), row.get("final_val_acc_std")))
        if target is not None:
            cells += [f"{row['reached']}/{row['num_runs']} reached",
                      _count(row["updates_to_target_mean"]), _count(row["comm_rounds_to_target_mean"])]
        lines.append("| " + " | ".join(cells) + " |")
    notes = [f"Mean +- sample std (ddof={DDOF}) over seeds; final = last evaluation of each run."]
    if target is not None:
        notes.append(f"Updates / comm rounds to {_target_name(target)}: mean over the seeds that reached it.")
    if hidden:
        notes.append("Groups also differ in (see config_diff in table.json): " + ", ".join(hidden) + ".")
    return "\n".join(lines) + "\n\n" + "\n\n".join(notes) + "\n"


# ---------------------------------------------------------------- plots

def _pyplot():
    """matplotlib.pyplot on the non-interactive Agg backend (no display needed)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def _colors(n: int) -> list:
    cmap = _pyplot().get_cmap("tab10")
    return [cmap(i % 10) for i in range(n)]


def _band(ax, x, values, color, label, log: bool = False) -> None:
    """Mean line (geometric mean if ``log``) and a +-1 std band when there are >= 2 runs."""
    data = np.log(np.where(values > 0, values, np.nan)) if log else values
    mean = np.nanmean(data, axis=0)
    marker = "o" if len(x) < 3 else None  # a lone evaluation would otherwise be invisible
    ax.plot(x, np.exp(mean) if log else mean, color=color, label=label, lw=1.6, marker=marker)
    if values.shape[0] >= 2:
        std = np.nanstd(data, axis=0, ddof=DDOF)
        lo, hi = mean - std, mean + std
        if log:
            lo, hi = np.exp(lo), np.exp(hi)
        ax.fill_between(x, lo, hi, color=color, alpha=0.2, lw=0)


def _seed_note(groups: list[Group]) -> str:
    """The plots' subtitle: how many seeds a curve averages, and what the band is."""
    counts = sorted({len(g.runs) for g in groups})
    if counts == [1]:
        return "1 seed per group"
    return f"mean over {'/'.join(map(str, counts))} seeds, band = +-1 std"


def _figure_legend(fig, ax) -> None:
    """One legend below the panels, as many columns (<= 4) as fit the figure's width."""
    handles, labels = ax.get_legend_handles_labels()
    if not handles:
        return
    entry_pt = 6.5 * max(len(lab) for lab in labels) + 45  # rough width of one entry at 10 pt
    ncol = max(1, min(len(labels), 4, int(fig.get_figwidth() * 72 // entry_pt)))
    fig.legend(handles, labels, loc="outside lower center", ncol=ncol, frameon=False)


AXES = {"round": "rounds", "comm_rounds": "communication rounds",
        "updates": "updates (sequential parameter steps)", "samples": "samples (gradient evaluations)",
        "time": "training wall time (s)"}


def plot_metric(groups: list[Group], key: str, ylabel: str, title: str, path: Path,
                scale: float = 1.0, xkeys: tuple[str, ...] = ("comm_rounds", "updates"),
                ylim: Optional[tuple] = None) -> None:
    """One panel per x axis in ``xkeys`` (counters of :data:`AXES`): ``key`` against it."""
    plt = _pyplot()
    ncols = min(3, len(xkeys))
    nrows = -(-len(xkeys) // ncols)
    fig, grid = plt.subplots(nrows, ncols, figsize=(5.5 * ncols, 4.2 * nrows + 0.6), layout="constrained",
                             squeeze=False)
    axes = grid.flatten()
    for ax in axes[len(xkeys):]:
        ax.set_visible(False)
    for g, color in zip(groups, _colors(len(groups))):
        _, xs, values = aligned(g, key)
        if values.size == 0:
            continue
        for ax, xkey in zip(axes, xkeys):
            _band(ax, xs[xkey], scale * values, color, g.label)
    for ax, xkey in zip(axes, xkeys):
        ax.set_xlabel(AXES[xkey])
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.set_xlim(left=0)
        if ylim:
            ax.set_ylim(*ylim)
        ax.set_title(f"by {AXES[xkey].split(' (')[0]}")
    fig.suptitle(f"{title} ({_seed_note(groups)})")
    _figure_legend(fig, axes[0])
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _plain_log_formatter(**kwargs):
    """Log-axis tick labels as plain numbers (0.6, 3, 20) rather than 6e-01 or 3x10^0; which
    ticks get a label is still matplotlib's LogFormatter decision."""
    from matplotlib.ticker import LogFormatter

    class PlainLogFormatter(LogFormatter):
        def __call__(self, x, pos=None):
            return f"{x:g}" if super().__call__(x, pos) else ""

    return PlainLogFormatter(**kwargs)


def _logs(group: Group, key: str) -> bool:
    return any(r.get(key) is not None for run in group.runs for r in run.rows)


def _draw_grad_variance(ax, logged: list, key: str) -> None:
    """(group, color) curves of ``key`` against round on ``ax``, log y."""
    for g, color in logged:
        rounds, _, values = aligned(g, key)
        _band(ax, rounds, values, color, g.label, log=True)
    ax.set_yscale("log")
    ax.yaxis.set_major_formatter(_plain_log_formatter())
    ax.yaxis.set_minor_formatter(_plain_log_formatter(labelOnlyBase=False, minor_thresholds=(2, 0.4)))
    ax.grid(alpha=0.3, which="major")
    ax.grid(alpha=0.1, which="minor")
    ax.set_xlim(left=0)


def _variance_note(groups: list[Group]) -> str:
    return _seed_note(groups).replace("mean", "geometric mean").replace("std", "geometric std")


R_LABEL = r"gradient variance $r(x) = \frac{1}{2}\sum_i w_i \|g_i - g\|^2$"


def plot_grad_variance(groups: list[Group], path: Path, key: str = "grad_variance", title: str | None = None) -> bool:
    """``key`` (``grad_variance`` or the diagnostic ``diag_grad_variance``) against round, log y;
    False (nothing written) if no group logs it. Colors follow the order of ``groups``; ``title``
    replaces the first line of the default title."""
    plt = _pyplot()
    logged = [(g, c) for g, c in zip(groups, _colors(len(groups))) if _logs(g, key)]
    if not logged:
        return False
    fig, ax = plt.subplots(figsize=(7.5, 4.8), layout="constrained")
    _draw_grad_variance(ax, logged, key)
    ax.set_xlabel("round")
    ax.set_ylabel(R_LABEL)
    what = "diagnostic, every algorithm" if key.startswith("diag") else "from each algorithm's own g_i"
    ax.set_title(f"{title or f'Gradient variance across clients ({what})'}\n({_variance_note([g for g, _ in logged])})")
    _figure_legend(fig, ax)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def plot_grad_variance_pairs(pairs: list[tuple[Group, Group]], path: Path, key: str, title: str) -> bool:
    """One panel per (method, baseline) pair: both curves of ``key`` against round, log y, the
    first in the first color; False (nothing written) when no pair has both logged."""
    plt = _pyplot()
    pairs = [(a, b) for a, b in pairs if _logs(a, key) and _logs(b, key)]
    if not pairs:
        return False
    ncols = min(3, len(pairs))
    nrows = -(-len(pairs) // ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(4.2 * ncols, 3.0 * nrows + 0.6), layout="constrained",
                             squeeze=False)
    for ax, (a, b) in zip(axes.flat, pairs):
        _draw_grad_variance(ax, list(zip((a, b), _colors(2))), key)
        ax.set_xlim(0, min(aligned(g, key)[0].max() for g in (a, b)))  # over the shorter run
        ax.set_title(f"{a.label} against {b.label}", fontsize=10)
        ax.legend(fontsize=8, frameon=False)
    for ax in axes.flat[len(pairs):]:
        ax.set_visible(False)
    fig.supxlabel("round")
    fig.supylabel(R_LABEL)
    fig.suptitle(f"{title}\n({_variance_note([g for pair in pairs for g in pair])})")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


# ---------------------------------------------------------------- entry point

def report(run_dirs: list[str], out_dir: str, target: float | None = None) -> dict:
    """Write accuracy.png, loss.png, grad_variance.png (when logged), table.md and table.json
    for ``run_dirs`` into ``out_dir``; returns ``{"plots": [paths], "table": path}``."""
    if not run_dirs:
        raise ValueError("report needs at least one run directory")
    unique = list(dict.fromkeys(str(Path(d).resolve()) for d in run_dirs))  # a dir given twice counts once
    runs = [load_run(d) for d in unique]
    groups = group_runs(runs)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)

    plots = []
    for name, key, ylabel, title, scale in (
            ("accuracy.png", "test_acc", "test accuracy (%)", "Test accuracy", 100.0),
            ("loss.png", "test_loss", "test loss", "Test loss", 1.0)):
        path = out / name
        plot_metric(groups, key, ylabel, title, path, scale)
        plots.append(str(path))
    for key in ("grad_variance", "diag_grad_variance"):
        if plot_grad_variance(groups, out / f"{key}.png", key):
            plots.append(str(out / f"{key}.png"))

    rows = [group_stats(g, target) for g in groups]
    diff = differing_keys([g.config for g in groups])
    for row, g in zip(rows, groups):
        row["config_diff"] = {k: g.config.get(k) for k in diff}
    table = out / "table.md"
    table.write_text(markdown_table(rows, target, hidden_keys(groups)))
    (out / "table.json").write_text(json.dumps(
        {"std_ddof": DDOF, "target": target, "groups": rows}, indent=2, default=str) + "\n")
    return {"plots": plots, "table": str(table)}
