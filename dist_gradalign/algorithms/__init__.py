"""One small file per algorithm over the shared base (DESIGN.md section 1)."""
from ..config import AlgorithmConfig
from .base import Algorithm, ClientState
from .fedavg import FedAvg
from .fedga import FedGA
from .fedprox import FedProx
from .gradalign import GradAlign
from .lbsgd import LBSGD
from .scaffold import Scaffold

REGISTRY: dict[str, type[Algorithm]] = {
    cls.name: cls for cls in (LBSGD, FedAvg, FedProx, Scaffold, FedGA, GradAlign)
}


def build_algorithm(cfg: AlgorithmConfig) -> Algorithm:
    return REGISTRY[cfg.name](cfg)


__all__ = ["Algorithm", "ClientState", "REGISTRY", "build_algorithm"]
