"""Run under torchrun by test_distributed.py: train every config in a JSON list in one process
group, so one launch per world size covers all algorithms."""
import json
import sys

from dist_gradalign.backend import Backend
from dist_gradalign.config import from_dict
from dist_gradalign.engine import train

if __name__ == "__main__":
    configs = json.loads(open(sys.argv[1]).read())
    backend = Backend.from_env("cpu")
    try:
        for d in configs:
            train(from_dict(d), backend=backend)
    finally:
        backend.shutdown()
