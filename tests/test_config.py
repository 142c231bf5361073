"""Config: YAML + dotted overrides into typed dataclasses; every error names key, value, rule."""
import subprocess
import sys

import pytest
import yaml

from dist_gradalign.cli import main
from dist_gradalign.config import Config, ConfigError, apply_overrides, dump_config, from_dict, load_config

from util import REPO

# (overrides, fragments the message must contain)
BAD = [
    (["algorithm.bta=0.1"], ["unknown key 'algorithm.bta'", "did you mean 'algorithm.beta'", "allowed keys"]),
    (["optimizer.lr=0.1"], ["unknown key 'optimizer'"]),
    (["algorithm.beta=-0.1"], ["algorithm.beta = -0.1", "out of range", ">= 0"]),
    (["algorithm.lr=0"], ["algorithm.lr = 0", "must be > 0"]),
    (["algorithm.lr=fast"], ["algorithm.lr = 'fast'", "wrong type", "a number"]),
    (["algorithm.local_steps=2.5"], ["algorithm.local_steps = 2.5", "an integer"]),
    (["algorithm.local_steps=0"], ["algorithm.local_steps = 0", ">= 1"]),
    (["algorithm.local_batch_size=all"], ["algorithm.local_batch_size = 'all'", "an integer or 'full'"]),
    (["algorithm.local_batch_size=0"], ["algorithm.local_batch_size = 0", ">= 1"]),
    (["algorithm.full_grad_batch=-3"], ["algorithm.full_grad_batch = -3", ">= 1"]),
    (["algorithm.name=sgd"], ["algorithm.name = 'sgd'", "lbsgd, fedavg, fedprox, scaffold, feddyn, fedga, gradalign"]),
    (["algorithm.server_momentum=1.0"], ["algorithm.server_momentum = 1.0", "< 1.0"]),
    (["algorithm.global_grad=previous"], ["algorithm.global_grad = 'previous'", "algorithm.name = 'fedavg'",
                                          "fedga and gradalign"]),
    (["algorithm.name=scaffold", "algorithm.global_grad=stale"], ["algorithm.global_grad = 'stale'", "fresh, previous"]),
    (["algorithm.name=fedga", "algorithm.control=stateful"], ["algorithm.control = 'stateful'",
                                                               "algorithm.name = 'fedga'", "SCAFFOLD"]),
    (["algorithm.name=scaffold", "algorithm.control=global"], ["algorithm.control = 'global'",
                                                               "per_round, stateful"]),
    (["algorithm.server_opt=lamb"], ["algorithm.server_opt = 'lamb'", "sgd, adam, yogi, adagrad"]),
    (["algorithm.name=gradalign", "algorithm.local_steps=5"], ["algorithm.local_steps = 5", "'gradalign'",
                                                               "local_steps=1"]),
    (["train.clients_per_round=11"], ["train.clients_per_round = 11", "partition.num_clients = 10"]),
    (["train.rounds=true"], ["train.rounds = True", "an integer"]),
    (["train.progress=1"], ["train.progress = 1", "true or false"]),
    (["train.device=tpu"], ["train.device = 'tpu'", "auto, cpu, cuda"]),
    (["data.source=imagenet"], ["data.source = 'imagenet'", "emnist, cifar10"]),
    (["data.normalize=[0.5]"], ["data.normalize = [0.5]", "[mean, std]"]),
    (["data.normalize=[0.5,0]"], ["data.normalize", "std must be > 0"]),
    (["data.normalize=[.nan,1]"], ["data.normalize", "every mean and std must be finite"]),
    (["data.normalize=[[0,0],[1,.inf]]"], ["data.normalize", "every mean and std must be finite"]),
    (["partition.scheme=random"], ["partition.scheme = 'random'", "iid, shards, percentage_iid, dirichlet"]),
    (["partition.iid_fraction=1.5"], ["partition.iid_fraction = 1.5", "<= 1.0"]),
    (["partition.alpha=0"], ["partition.alpha = 0", "> 0.0"]),
    (["model.name=vgg"], ["model.name = 'vgg'", "cnn_emnist"]),
    (["model.hidden=[0]"], ["model.hidden = [0]", ">= 1"]),
    (["model.hidden=64"], ["model.hidden = 64", "a list of an integer"]),
    (["seed=-1"], ["seed = -1", ">= 0"]),
    (["algorithm=3"], ["algorithm must be a mapping"]),
    (["algorithm.beta"], ["write it as key=value"]),
    (["algorithm.lr=0.1", "algorithm.lr.x=1"], ["'lr' is a value, not a section"]),
    (["algorithm.lr.x=1"], ["algorithm.lr = {'x': 1}", "wrong type"]),
]


@pytest.mark.parametrize("overrides,fragments", BAD, ids=[" ".join(o) for o, _ in BAD])
def test_bad_values_name_key_value_and_rule(overrides, fragments):
    with pytest.raises(ConfigError) as e:
        load_config(None, ["partition.num_clients=10", *overrides])
    for f in fragments:
        assert f in str(e.value), f"{f!r} not in {str(e.value)!r}"


def test_yaml_file_and_overrides_into_typed_dataclasses(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("algorithm:\n  name: fedga\n  lr: 1\n  local_batch_size: full\ntrain:\n  rounds: 7\n")
    cfg = load_config(p, ["algorithm.beta=0.05", "train.rounds=9", "model.hidden=[8, 4]"])
    assert isinstance(cfg, Config)
    assert cfg.algorithm.name == "fedga" and cfg.algorithm.beta == 0.05
    assert cfg.algorithm.lr == 1.0 and isinstance(cfg.algorithm.lr, float)  # int accepted for float
    assert cfg.algorithm.local_batch_size == "full"
    assert cfg.train.rounds == 9 and cfg.model.hidden == [8, 4]
    assert from_dict(yaml.safe_load(dump_config(cfg))) == cfg  # the resolved config round-trips


def test_file_errors(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("algorithm: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    lst = tmp_path / "list.yaml"
    lst.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(lst)
    unsafe = tmp_path / "unsafe.yaml"
    unsafe.write_text("seed: !!python/object/apply:os.system ['echo pwned']\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(unsafe)


def test_overrides_apply_in_order():
    d = apply_overrides({}, ["a.b=1", "a.b=2", "a.c=[1, 2]", "d=full"])
    assert d == {"a": {"b": 2, "c": [1, 2]}, "d": "full"}


def test_cli_reports_config_error_before_any_work(tmp_path, capsys):
    run_dir = tmp_path / "run"
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"run_dir: {run_dir}\n")
    assert main(["train", str(cfg), "algorithm.beta=-1"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("config error: algorithm.beta = -1") and "Traceback" not in err
    assert not run_dir.exists(), "nothing may be written for an invalid config"


def test_resolved_config_written_and_module_entry_point(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"run_dir: {tmp_path / 'run'}\npartition:\n  num_clients: 4\ntrain:\n  rounds: 2\n"
                   "  clients_per_round: 2\n  progress: false\nalgorithm:\n  local_steps: 1\n")
    proc = subprocess.run([sys.executable, "-m", "dist_gradalign", "train", str(cfg), "algorithm.lr=0.2"],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    written = load_config(tmp_path / "run" / "config.yaml")
    assert written.algorithm.lr == 0.2 and written.train.rounds == 2
    # the same command again finds the finished run's checkpoint and does nothing
    proc = subprocess.run([sys.executable, "-m", "dist_gradalign", "train", str(cfg), "algorithm.lr=0.2"],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "nothing to do" in proc.stdout
    # another config in the same run_dir is refused, naming the difference
    proc = subprocess.run([sys.executable, "-m", "dist_gradalign", "train", str(cfg)],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "another config (algorithm.lr: 0.2 in the checkpoint, 0.05 now)" in proc.stderr
    # without resuming it refuses to overwrite
    proc = subprocess.run([sys.executable, "-m", "dist_gradalign", "train", str(cfg), "--resume", "never"],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "already holds a run" in proc.stderr
