"""FedProx (Li et al. 2020): FedAvg with the proximal term mu/2 ||y - x||^2 in each local
objective, so every local gradient gains mu (y - x). (The authors' code dropped this term's
gradient, making its FedProx a FedAvg; DESIGN.md section 3.)"""
from .base import Algorithm, ClientState


class FedProx(Algorithm):
    name = "fedprox"

    def local_direction(self, c: ClientState, y, grad) -> None:
        super().local_direction(c, y, grad)
        if self.cfg.mu:
            grad.add_(y - c.x, alpha=self.cfg.mu)
