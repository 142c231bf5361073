"""The Dockerfile, checked statically (no Docker engine runs here), and its entry point run for real."""
import json
import os
import re
import subprocess
import sys
from pathlib import Path

from util import REPO, run_dir_rows

DOCKERFILE = (REPO / "Dockerfile").read_text()


def _instructions(name: str) -> list[str]:
    return [line[len(name) + 1:].strip() for line in DOCKERFILE.splitlines() if line.startswith(name + " ")]


def test_base_image_is_official_python_pinned_to_the_tested_minor():
    (image,) = _instructions("FROM")
    repo, _, tag = image.partition(":")
    assert repo == "python" and re.fullmatch(r"3\.11-slim", tag), image
    assert "python_requires = >=3.11" in (REPO / "setup.cfg").read_text()


def test_image_installs_the_torch_and_torchvision_that_ci_tests():
    """The image's torch and torchvision are requirements.txt's pins, installed before the
    package so that `pip install .` keeps them."""
    pins = re.findall(r"^(torch(?:vision)?==\S+)$", (REPO / "requirements.txt").read_text(), re.M)
    assert len(pins) == 2, pins
    (install,) = [r for r in _instructions("RUN") if "pip install ." in r]
    assert install.startswith(f"pip install {' '.join(pins)} && pip install ."), install


def test_package_installed_and_copied_paths_exist():
    for copy in _instructions("COPY"):
        for src in copy.split()[:-1]:
            assert (REPO / src).exists(), src
    ignored = (REPO / ".dockerignore").read_text().split()
    for path in (".git", ".venv", "runs", "data", "wandb"):
        assert path in ignored


def test_entrypoint_runs_torchrun_as_documented(tmp_path):
    """Run the ENTRYPOINT exactly as the image would, with the README's arguments."""
    entry = json.loads(_instructions("ENTRYPOINT")[0])
    assert "torchrun" in entry[2] and "-m dist_gradalign" in entry[2]
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"run_dir: {tmp_path / 'run'}\ndata: {{source: digits}}\nmodel: {{name: mlp, hidden: [8]}}\n"
                   "partition: {num_clients: 4}\nalgorithm: {name: fedavg, local_steps: 1}\n"
                   "train: {rounds: 2, clients_per_round: 4, progress: false}\n")
    env = {**os.environ, "NPROC_PER_NODE": "2", "OMP_NUM_THREADS": "1",
           "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    proc = subprocess.run([*entry, "train", str(cfg)], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "2 rank(s)" in proc.stdout and len(run_dir_rows(tmp_path / "run")) == 2
    assert "docker run" in DOCKERFILE and "NPROC_PER_NODE" in (REPO / "README.md").read_text()
