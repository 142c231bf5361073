"""The Python entry point under torchrun: the same script on every rank.

    torchrun --nproc_per_node 2 examples/fit_api.py [RUN_DIR]

Builds the parts as Python objects (the sonnets dataset and the character LSTM of
examples/char_lm.py, the user algorithm of examples/local_momentum.py), passes them to
``dist_gradalign.fit`` with a config dict, and prints what ``fit`` returns, on rank 0.
"""
import os
import sys

import dist_gradalign as dg
from char_lm import char_lstm, sonnets  # this script's folder is on sys.path: its siblings import
from local_momentum import LocalMomentum

if __name__ == "__main__":  # DataLoader workers start from a forkserver: the guard is needed
    config = {
        "run_dir": sys.argv[1] if len(sys.argv) > 1 else "runs/examples/fit_api",
        "partition": {"scheme": "by_key", "num_clients": 6},
        "algorithm": {"lr": 0.5, "local_steps": 3, "local_batch_size": 16},
        "train": {"rounds": 20, "clients_per_round": 6, "eval_every": 5, "progress": False,
                  "executor": "sequential"},
    }
    result = dg.fit(config, *sys.argv[2:], model=char_lstm(embed=16, hidden=64), data=sonnets(),
                    algorithm=LocalMomentum)
    if os.environ.get("RANK", "0") == "0":
        last = result.metrics[-1]
        print(f"fit_api: {len(result.metrics)} rounds, test_loss {last['test_loss']:.4f}, test_acc "
              f"{last['test_acc']:.4f}, {sum(p.numel() for p in result.model.parameters())} parameters "
              f"-> {result.run_dir}")
