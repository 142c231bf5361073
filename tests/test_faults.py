"""Bad input and full disks: one clear message each, nothing already written lost.

The table below is the record of inputs tried and the message each must produce (through the
real CLI, in-process)."""
import shutil
import subprocess

import numpy as np
import pytest
import torch

from dist_gradalign.cli import main

from util import load_params, run_dir_rows, write_npz, write_tiny_config



def _setup_missing_npz(tmp):
    return {"data": {"source": "npz", "root": str(tmp / "nope.npz")}}


def _setup_corrupt_npz(tmp):
    (tmp / "bad.npz").write_bytes(b"not a zip at all")
    return {"data": {"source": "npz", "root": str(tmp / "bad.npz")}}


def _setup_npz_missing_key(tmp):
    np.savez(tmp / "k.npz", x_train=np.zeros((4, 2, 2), np.uint8), y_train=np.zeros(4, np.int64))
    return {"data": {"source": "npz", "root": str(tmp / "k.npz")}}


def _setup_torchvision_absent(tmp):
    return {"data": {"source": "cifar10", "root": str(tmp / "empty")}}


def _setup_run_dir_is_a_file(tmp):
    (tmp / "afile").write_text("x")
    return {"run_dir": str(tmp / "afile" / "run")}


def _setup_too_many_clients(tmp):
    x = np.zeros((5, 2, 2), np.uint8)
    write_npz(tmp / "five.npz", x, np.arange(5) % 2, x, np.arange(5) % 2)
    return {"data": {"source": "npz", "root": str(tmp / "five.npz")}, "partition": {"num_clients": 6},
            "train": {"clients_per_round": 2}}


def _setup_other_config(tmp):
    assert main(["train", str(write_tiny_config(tmp))]) == 0
    return {"algorithm": {"lr": 0.3}}


# (name, setup(tmp) -> config changes, exit code, fragments of the one message on stderr)
TABLE = [
    ("missing npz", _setup_missing_npz, 2, ["error:", "nope.npz", "not found"]),
    ("corrupt npz", _setup_corrupt_npz, 2, ["error:", "bad.npz"]),
    ("npz without x_test/y_test", _setup_npz_missing_key, 2, ["error:", "k.npz", "x_test"]),
    ("torchvision data absent", _setup_torchvision_absent, 2, ["error:", "empty", "download=true"]),
    ("run_dir under a file", _setup_run_dir_is_a_file, 2, ["error: run_dir =", "not writable"]),
    ("more clients than samples", _setup_too_many_clients, 2, ["config error: partition.num_clients = 6",
                                                             "only N = 5 samples"]),
    ("checkpoint of another config", _setup_other_config, 2, ["error: checkpoint", "another config",
                                                             "algorithm.lr: 0.1 in the checkpoint, 0.3 now"]),
]




@pytest.mark.parametrize("name,setup,code,fragments", TABLE, ids=[t[0] for t in TABLE])
def test_bad_input_table(tmp_path, capsys, name, setup, code, fragments):
    changes = setup(tmp_path)
    capsys.readouterr()
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    assert main(["train", str(write_tiny_config(tmp_path, **changes))]) == code
    err = capsys.readouterr().err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    for f in fragments:
        assert f in err, f"{f!r} not in {err!r}"
    for p, data in before.items():  # nothing already written is lost or changed
        if p.name != "cfg.yaml":
            assert p.read_bytes() == data, p


@pytest.fixture
def tiny_fs(tmp_path):
    """A real 160 KiB filesystem (tmpfs) to fill up; skipped where mounting is not allowed."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=160k", "tmpfs", str(mnt)],
                      capture_output=True).returncode != 0:
        pytest.skip("cannot mount a small tmpfs here (needs root)")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def test_full_disk_stops_with_one_message_and_the_run_resumes_elsewhere(tmp_path, tiny_fs, capsys):
    changes = {"train": {"rounds": 60, "checkpoint_every": 1, "keep_checkpoints": 1000, "clients_per_round": 2}}
    ref = tmp_path / "ref"
    ref.mkdir()
    assert main(["train", str(write_tiny_config(ref, **changes))]) == 0
    capsys.readouterr()
    assert main(["train", str(write_tiny_config(tiny_fs, **changes))]) == 2
    err = capsys.readouterr().err
    assert "No space left on device" in err and "kept" in err and "Traceback" not in err, err
    # what was written survives: copy it to a disk with room and resume there
    moved = tmp_path / "moved"
    shutil.copytree(tiny_fs, moved)
    rows_before = run_dir_rows(moved / "run")
    assert 0 < len(rows_before) < 60
    assert main(["train", str(write_tiny_config(moved, **changes))]) == 0
    out = capsys.readouterr().out
    assert "resuming from" in out
    a, b = load_params(ref / "run"), load_params(moved / "run")
    assert all(torch.equal(a[k], b[k]) for k in a)
    strip = lambda rs: [{k: v for k, v in r.items() if k != "time"} for r in rs]  # noqa: E731
    assert strip(run_dir_rows(ref / "run")) == strip(run_dir_rows(moved / "run"))
