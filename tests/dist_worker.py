"""Run under torchrun by test_distributed.py: train every config in a JSON list in one process
group, so one launch per world size covers all algorithms. It exits 3 if the process group
outlives Backend.shutdown (its threads would then race the interpreter's exit)."""
import gc
import json
import sys
import weakref

import torch.distributed as dist

from dist_gradalign.backend import Backend
from dist_gradalign.config import from_dict
from dist_gradalign.api import fit

if __name__ == "__main__":
    configs = json.loads(open(sys.argv[1]).read())
    backend = Backend.from_env("cpu")
    group = weakref.ref(dist.group.WORLD) if backend.distributed else lambda: None
    try:
        for d in configs:
            fit(from_dict(d), backend=backend)
    finally:
        backend.shutdown()
    gc.collect()
    if group() is not None:
        print("error: the process group is still referenced after Backend.shutdown", file=sys.stderr)
        sys.exit(3)
