"""One small file per algorithm over the shared base (DESIGN.md section 1); built-ins and a
user's algorithms are found the same way (``dist_gradalign.components.BUILTINS``)."""
from ..config import AlgorithmConfig
from .base import Algorithm, ClientState


def build_algorithm(cfg: AlgorithmConfig) -> Algorithm:
    """The algorithm ``cfg.name`` names (built-in or an import path), built from ``cfg``."""
    from ..components import load

    return load("algorithm.name", cfg.name)(cfg, **cfg.kwargs)


__all__ = ["Algorithm", "ClientState", "build_algorithm"]
