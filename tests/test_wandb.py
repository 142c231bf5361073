"""W&B in offline mode, checked by reading back what the run recorded (no mocks).

How the read-back works, and why so. An offline run keeps everything it would upload in
``wandb/offline-run-*/run-<id>.wandb``, the transaction log that ``wandb sync`` uploads: the run
(id, project, group, tags, config), every history row, the summary and the exit code. The tests
read that file with :func:`wandb_records`, a small parser of its documented format, and
``wandb.proto.wandb_internal_pb2.Record``, the protobuf message each log record holds. Both
are the same in the releases tested (0.17.2, 0.22.3, 0.31.0); the alternatives were not:

- ``wandb.sdk.internal.datastore`` (the reader the SDK itself used) is gone in 0.31;
- ``wandb sync --view --verbose`` prints the records in 0.22.3 and is gone in 0.31
  ("No such option '--view'");
- offline runs write no ``files/wandb-summary.json`` or ``files/config.yaml`` (0.22.3 and
  0.31.0: ``files/`` holds only ``requirements.txt``).

Differences between releases that the reader absorbs: history items name their key in ``key``
or, as a path, in ``nested_key``; the step is read from the ``_step`` item (0.17 leaves
``history.step.num`` at 0); 0.17 writes one summary record at the end where later releases
write one per ``log``, so summary records are applied in order, as updates; 0.17 writes its last
history row and the summary after the exit record, and W&B's service process may still be
writing after ``finish`` returns, so :func:`read_wandb_log` polls until the log is complete.
"""
import json
import os
import random
import re
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch

from dist_gradalign.config import ConfigError, dump_config, load_config
from dist_gradalign.engine import Trainer
from dist_gradalign.tracking import ID_FILE, WandbTracker, new_run_id

from util import REPO, base_config, run_dir_rows

wandb = pytest.importorskip("wandb")
from wandb.proto import wandb_internal_pb2 as pb  # noqa: E402

# The .wandb file: a 7-byte header (b":W&B", uint16 0xBEE1, uint8 version 0), then LevelDB's log
# format (github.com/google/leveldb/blob/main/doc/log_format.md): 32 KiB blocks of records, each
# a 7-byte header (uint32 checksum, uint16 length, uint8 type; little-endian) and its data; a
# payload too long for the block goes in FIRST, MIDDLE..., LAST pieces; a block's tail shorter
# than a header is zero padding. W&B's checksum is zlib's CRC-32 of the type byte then the data
# (not LevelDB's masked CRC-32C). Each payload is one serialized wandb_internal_pb2.Record.
W_HEADER, W_BLOCK = struct.pack("<4sHB", b":W&B", 0xBEE1, 0), 32768
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def wandb_records(path: Path):
    """The Records of one .wandb file, in order; stops before a record still being written."""
    data = path.read_bytes()
    if len(data) < len(W_HEADER):
        return
    assert data[:len(W_HEADER)] == W_HEADER, f"{path}: not a W&B transaction log"
    pos, pieces = len(W_HEADER), []
    while pos + 7 <= len(data):
        left = W_BLOCK - pos % W_BLOCK
        if left < 7:
            pos += left
            continue
        checksum, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        body = data[pos + 7:pos + 7 + length]
        if len(body) < length:
            return
        assert kind in (FULL, FIRST, MIDDLE, LAST), f"{path}: record type {kind} at offset {pos}"
        assert zlib.crc32(body, zlib.crc32(bytes([kind]))) == checksum, f"{path}: bad checksum at offset {pos}"
        pos += 7 + length
        pieces = [body] if kind in (FULL, FIRST) else pieces + [body]
        if kind in (FULL, LAST):
            rec = pb.Record()
            rec.ParseFromString(b"".join(pieces))
            yield rec


def _items(items) -> dict:
    return {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in items}


def _scan(run_dir: Path) -> dict:
    out = {"runs": [], "config": {}, "history": [], "summary": {}, "exits": []}
    for path in sorted(Path(run_dir).glob("wandb/offline-run-*/run-*.wandb")):
        for rec in wandb_records(path):
            kind = rec.WhichOneof("record_type")
            if kind == "run":
                out["runs"].append(rec.run)
                out["config"].update(_items(rec.run.config.update))
            elif kind == "config":
                out["config"].update(_items(rec.config.update))
            elif kind == "history":
                out["history"].append(_items(rec.history.item))
            elif kind == "summary":
                out["summary"].update(_items(rec.summary.update))
            elif kind == "exit":
                out["exits"].append(rec.exit.exit_code)
    return out


def read_wandb_log(run_dir: Path, done=lambda log: bool(log["exits"]), timeout: float = 60.0) -> dict:
    """What the offline run(s) in run_dir/wandb recorded: ``runs`` (the Run messages), ``config``,
    ``history`` (one dict per logged row, ``_step`` included), ``summary`` and ``exits`` (exit
    codes), once ``done(log)`` holds, or as it is after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        log = _scan(run_dir)
        if done(log) or time.monotonic() > deadline:
            return log
        time.sleep(0.2)


def _cfg(tmp_path, data=None, train=None, **wb):
    return base_config(tmp_path, algorithm={"name": "fedga", "beta": 0.05, "local_steps": 2},
                       data=data or {}, train={"rounds": 3, "eval_every": 2, **(train or {})},
                       logging={"wandb": {"enabled": True, "mode": "offline", "project": "test", "group": "g1",
                                          "tags": ["a", "b"], **wb}})


def test_offline_run_records_config_and_every_row(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_SILENT", "true")
    cfg = _cfg(tmp_path, data={"val_fraction": 0.2}, train={"diagnostics_every": 2})
    Trainer(cfg).fit()
    run_dir = Path(cfg.run_dir)
    rows = run_dir_rows(cfg.run_dir)
    summary = json.loads((run_dir / "summary.json").read_text())
    log = read_wandb_log(run_dir, lambda log: log["exits"] and len(log["history"]) == len(rows)
                         and "algorithm" in log["summary"])
    assert log["exits"] == [0] and len(log["runs"]) == 1
    run = log["runs"][0]
    assert run.run_id == (run_dir / ID_FILE).read_text().strip()
    assert run.project == "test" and run.run_group == "g1" and list(run.tags) == ["a", "b"]
    assert run.display_name == run_dir.name
    assert log["config"]["algorithm"]["beta"] == 0.05 and log["config"]["train"]["rounds"] == 3
    assert log["config"]["data"]["val_fraction"] == 0.2
    hist = log["history"]
    assert [h["_step"] for h in hist] == [r["updates"] for r in rows] == [2, 4, 6]  # step = updates
    for items, row in zip(hist, rows):
        assert "clients" not in items
        for key, value in row.items():  # every other key of the metrics row, with its value
            if key != "clients":
                assert items[key] == pytest.approx(value), key
    # accuracy at every evaluation (round 2 by eval_every, round 3 as the last), validation with it
    evals = [i for i, r in enumerate(rows) if "test_acc" in r]
    assert evals == [i for i, h in enumerate(hist) if "test_acc" in h] == [1, 2]
    for i in evals:
        for key in ("test_acc", "test_loss", "val_acc", "val_loss"):
            assert hist[i][key] == pytest.approx(rows[i][key]), key
    # the diagnostic r(x) at round 1 and every diagnostics_every rounds
    assert [i for i, h in enumerate(hist) if "diag_grad_variance" in h] == [0, 1]
    assert hist[1]["diag_grad_variance"] == pytest.approx(rows[1]["diag_grad_variance"])
    assert log["summary"]["algorithm"] == summary["algorithm"] == "fedga"
    for key in ("test_acc", "val_acc", "updates"):
        assert log["summary"][key] == pytest.approx(summary[key]), key
    assert "api" not in json.dumps(log["config"]).lower()


def test_run_ids_are_wandb_style_and_leave_the_seeded_rngs_alone():
    states = random.getstate(), np.random.get_state()[1].copy(), torch.get_rng_state()
    ids = {new_run_id() for _ in range(50)}
    assert len(ids) == 50 and all(re.fullmatch(r"[a-z0-9]{8}", i) for i in ids)
    assert random.getstate() == states[0] and (np.random.get_state()[1] == states[1]).all()
    assert torch.equal(torch.get_rng_state(), states[2])


def test_restart_in_same_run_dir_continues_the_run_id(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_SILENT", "true")
    cfg = _cfg(tmp_path)
    run_dir = Path(cfg.run_dir)
    run_dir.mkdir(parents=True)
    (run_dir / ID_FILE).write_text("keepme123\n")  # left by an earlier start of this run
    Trainer(cfg).fit()
    assert read_wandb_log(run_dir)["runs"][0].run_id == "keepme123"
    Trainer(cfg).fit(overwrite=True)  # --overwrite is a new run
    new_id = (run_dir / ID_FILE).read_text().strip()
    assert new_id != "keepme123" and re.fullmatch(r"[a-z0-9]{8}", new_id)
    assert new_id in {run.run_id for run in read_wandb_log(run_dir, lambda log: len(log["exits"]) == 2)["runs"]}


def test_disabled_or_off_writes_nothing(tmp_path):
    cfg = _cfg(tmp_path, mode="disabled")
    Trainer(cfg).fit()
    assert not (Path(cfg.run_dir) / "wandb").exists() and not (Path(cfg.run_dir) / ID_FILE).exists()


def _warnings(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.startswith("warning: W&B")]


def test_wandb_rejecting_its_settings_leaves_a_two_rank_run_alone(tmp_path):
    """The failure of issue 10 for real: under torchrun with 2 ranks, wandb raises in ``init`` on
    rank 0 (here: WANDB_MODE set to a mode wandb's settings validation rejects, whatever mode the
    config passes). Rank 0 warns once and trains on; the other rank never notices."""
    cfg_path = tmp_path / "run.yaml"
    cfg_path.write_text(dump_config(_cfg(tmp_path, data={"val_fraction": 0.2})))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_SILENT": "true", "WANDB_MODE": "no-such-mode"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           "-m", "dist_gradalign", "train", str(cfg_path)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    warnings = _warnings(proc.stderr)
    assert len(warnings) == 1, proc.stderr[-3000:]
    assert "W&B init failed" in warnings[0] and "no-such-mode" in warnings[0]
    assert "tracking is off for the rest of this run" in warnings[0]
    run_dir = tmp_path / "run"
    rows = run_dir_rows(run_dir)
    assert [r["round"] for r in rows] == [1, 2, 3] and "val_acc" in rows[-1]
    assert json.loads((run_dir / "summary.json").read_text())["round"] == 3
    assert (run_dir / "model.pt").is_file() and not list(run_dir.glob("wandb/offline-run-*"))
    assert "fedga: 3 rounds" in proc.stdout


def test_unwritable_wandb_dir_warns_once_and_the_run_finishes(tmp_path, monkeypatch, capfd):
    """wandb cannot make its directory (run_dir/wandb is a file): ``init`` raises; the run goes on."""
    monkeypatch.setenv("WANDB_SILENT", "true")
    cfg = _cfg(tmp_path)
    run_dir = Path(cfg.run_dir)
    run_dir.mkdir(parents=True)
    (run_dir / "wandb").write_text("in the way\n")
    summary = Trainer(cfg).fit()
    err = capfd.readouterr().err
    warnings = _warnings(err)
    assert len(warnings) == 1, err
    assert "W&B init failed (NotADirectoryError" in warnings[0] and "tracking is off" in warnings[0]
    rows = run_dir_rows(cfg.run_dir)
    assert [r["round"] for r in rows] == [1, 2, 3] and "test_acc" in rows[-1]
    assert json.loads((run_dir / "summary.json").read_text()) == summary and summary["round"] == 3
    assert (run_dir / "model.pt").is_file()


@pytest.mark.parametrize("stage", ["log", "finish"])
def test_wandb_failing_later_warns_once_and_stops_tracking(tmp_path, monkeypatch, capfd, stage):
    """wandb's own errors from ``log`` (a key that is not a string) and from the summary update in
    ``finish`` (a value that is not JSON): one warning, then every later call is a no-op."""
    monkeypatch.setenv("WANDB_SILENT", "true")
    cfg = _cfg(tmp_path)
    run_dir = Path(cfg.run_dir)
    run_dir.mkdir(parents=True)
    tracker = WandbTracker(cfg, run_dir, fresh=True)
    run = tracker.run
    assert run is not None
    try:
        tracker.log({"updates": 1, "train_loss": 0.5})
        if stage == "log":
            tracker.log({"updates": 2, 3: 0.5})
            assert tracker.run is None
            tracker.log({"updates": 3, "train_loss": 0.25})
        tracker.finish({"updates": 3, "bad": object()} if stage == "finish" else {"updates": 3})
        assert tracker.run is None
        tracker.finish({"updates": 3})
    finally:
        run.finish()  # the run that tracking gave up on, so that the next test's init starts afresh
    warnings = _warnings(capfd.readouterr().err)
    assert len(warnings) == 1 and f"W&B {stage} failed" in warnings[0], warnings
    assert "tracking is off" in warnings[0]


@pytest.mark.parametrize("key", ["api_key", "API_KEY", "token"])
def test_secrets_are_refused_in_config(key):
    with pytest.raises(ConfigError, match="secrets are never read from config files.*WANDB_API_KEY"):
        load_config(None, [f"logging.wandb.{key}=abc"])
