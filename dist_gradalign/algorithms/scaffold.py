"""SCAFFOLD as the paper analyses it (Theorem 5): control variates recomputed each round at x
over the sampled clients, c = g and c_i = g_i, so every local gradient gains (g - g_i):

y_k = y_{k-1} - alpha (grad f_i(y_{k-1}; zeta_k) + (g - g_i) + lambda y_{k-1})."""
from .base import Algorithm, ClientState


class Scaffold(Algorithm):
    name = "scaffold"
    needs_client_grads = True

    def client_start(self, c: ClientState, y) -> None:
        c.correction = c.g - c.g_i  # fixed for the round

    def local_direction(self, c: ClientState, y, grad) -> None:
        super().local_direction(c, y, grad)
        grad.add_(c.correction)
