"""Write any data source as an ``npy`` directory, the array format ``data.storage: stream`` reads
memory-mapped::

    python -m dist_gradalign.data.convert --source cifar10 --root data --out data/cifar10-npy [--download]

The raw inputs are written as stored (uint8 images stay uint8, channels first), in chunks into
memory-mapped ``.npy`` files, so a source larger than memory converts too (an image folder is
decoded chunk by chunk). Train with ``data.source: npy`` and ``data.root: <out>``; the source's
default normalization (cifar10, emnist, ...) is not carried over: set ``data.normalize``.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
from numpy.lib.format import open_memmap

from ..config import SOURCES, ConfigError, DataConfig
from .sources import DEFAULT_NORMALIZE, DataError, open_source


def convert(cfg: DataConfig, out: Path, chunk: int = 4096) -> None:
    src = open_source(cfg)
    out.mkdir(parents=True, exist_ok=True)
    for name, split in (("train", src.train), ("test", src.test)):
        x = open_memmap(out / f"x_{name}.npy.part", mode="w+", dtype=split.dtype,
                        shape=(len(split), *split.input_shape))
        for start in range(0, len(split), chunk):
            x[start:start + chunk] = split.read(np.arange(start, min(start + chunk, len(split))))
            print(f"\r{name}: {min(start + chunk, len(split))}/{len(split)}", end="", file=sys.stderr, flush=True)
        print(file=sys.stderr)
        x.flush()
        del x
        (out / f"x_{name}.npy.part").rename(out / f"x_{name}.npy")
        np.save(out / f"y_{name}.npy", split.labels)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m dist_gradalign.data.convert", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--source", required=True, choices=[s for s in SOURCES if s != "npy"])
    p.add_argument("--root", default="data", help="data.root of the source")
    p.add_argument("--download", action="store_true", help="fetch a torchvision source first")
    p.add_argument("--out", required=True, type=Path, help="the npy directory to write")
    args = p.parse_args(argv)
    try:
        convert(DataConfig(source=args.source, root=args.root, download=args.download), args.out)
    except (DataError, ConfigError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    norm = DEFAULT_NORMALIZE.get(args.source)
    print(f"wrote {args.out}: train with data.source=npy data.root={args.out}"
          + (f" data.normalize='{[list(v) for v in norm]}'" if norm else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
