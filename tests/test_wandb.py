"""W&B in offline mode, checked by reading back the run's own transaction log (no mocks)."""
import json
import time
from pathlib import Path

import pytest

from dist_gradalign.config import ConfigError, load_config
from dist_gradalign.engine import Trainer
from dist_gradalign.tracking import ID_FILE

from util import base_config, run_dir_rows

wandb = pytest.importorskip("wandb")
from wandb.proto import wandb_internal_pb2 as pb  # noqa: E402
from wandb.sdk.internal.datastore import DataStore  # noqa: E402


def read_wandb_log(run_dir: Path, timeout: float = 60.0) -> dict:
    """Parse every record of the offline run's .wandb file(s) in run_dir/wandb, once each holds
    its exit record (W&B's writer process may still be flushing after ``finish`` returns)."""
    deadline = time.time() + timeout
    while True:
        try:
            out = _scan(run_dir)
        except AssertionError:  # a record being written: its header is there, its body not yet
            out = {"exits": 0, "files": 1}
        if out["exits"] == out["files"] > 0 or time.time() > deadline:
            return out
        time.sleep(0.2)


def _scan(run_dir: Path) -> dict:
    out = {"history": [], "config": {}, "runs": [], "exits": 0, "files": 0}
    for path in sorted(run_dir.glob("wandb/offline-run-*/run-*.wandb")):
        out["files"] += 1
        ds = DataStore()
        ds.open_for_scan(str(path))
        while (data := ds.scan_data()) is not None:
            rec = pb.Record()
            rec.ParseFromString(data)
            kind = rec.WhichOneof("record_type")
            if kind == "history":
                items = {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in rec.history.item}
                out["history"].append((rec.history.step.num, items))
            elif kind == "run":
                out["runs"].append(rec.run)
                for u in rec.run.config.update:
                    out["config"][u.key] = json.loads(u.value_json)
            elif kind == "exit":
                out["exits"] += 1
            elif kind == "config":
                for u in rec.config.update:
                    out["config"][u.key] = json.loads(u.value_json)
    return out


def _cfg(tmp_path, **wb):
    return base_config(tmp_path, algorithm={"name": "fedga", "beta": 0.05, "local_steps": 2},
                       train={"rounds": 3, "eval_every": 2},
                       logging={"wandb": {"enabled": True, "mode": "offline", "project": "test", "group": "g1",
                                          "tags": ["a", "b"], **wb}})


def test_offline_run_records_config_and_every_row(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_SILENT", "true")
    cfg = _cfg(tmp_path)
    Trainer(cfg).fit()
    run_dir = Path(cfg.run_dir)
    log = read_wandb_log(run_dir)
    rows = run_dir_rows(cfg.run_dir)
    run = log["runs"][0]
    assert run.run_id == (run_dir / ID_FILE).read_text().strip()
    assert run.project == "test" and run.run_group == "g1" and list(run.tags) == ["a", "b"]
    assert log["config"]["algorithm"]["beta"] == 0.05 and log["config"]["train"]["rounds"] == 3
    hist = log["history"]
    assert [step for step, _ in hist] == [r["updates"] for r in rows] == [2, 4, 6]
    for (_, items), row in zip(hist, rows):
        for key in ("round", "comm_rounds", "samples", "train_loss", "grad_variance"):
            assert items[key] == pytest.approx(row[key])
        assert "clients" not in items
    assert hist[1][1]["test_acc"] == pytest.approx(rows[1]["test_acc"])
    assert "api" not in json.dumps(log["config"]).lower()


def test_restart_in_same_run_dir_continues_the_run_id(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_SILENT", "true")
    cfg = _cfg(tmp_path)
    run_dir = Path(cfg.run_dir)
    run_dir.mkdir(parents=True)
    (run_dir / ID_FILE).write_text("keepme123\n")  # left by an earlier start of this run
    Trainer(cfg).fit()
    assert read_wandb_log(run_dir)["runs"][0].run_id == "keepme123"
    Trainer(cfg).fit(overwrite=True)  # --overwrite is a new run
    assert (run_dir / ID_FILE).read_text().strip() != "keepme123"


def test_disabled_or_off_writes_nothing(tmp_path):
    cfg = _cfg(tmp_path, mode="disabled")
    Trainer(cfg).fit()
    assert not (Path(cfg.run_dir) / "wandb").exists() and not (Path(cfg.run_dir) / ID_FILE).exists()


@pytest.mark.parametrize("key", ["api_key", "API_KEY", "token"])
def test_secrets_are_refused_in_config(key):
    with pytest.raises(ConfigError, match="secrets are never read from config files.*WANDB_API_KEY"):
        load_config(None, [f"logging.wandb.{key}=abc"])
