"""FedGA, the paper's Algorithm 2: displace once, then K plain local steps.

Lines 3-6: g = sum_i w_i g_i; v_i = g - g_i; y_0 = x - beta v_i. Lines 7-9: K local SGD steps
as FedAvg. Line 11: weighted average. The displacements sum to zero under the weights, so
nothing is reverted; the round implicitly descends on f + beta K r (Theorem 4)."""
from .base import Algorithm, ClientState


class FedGA(Algorithm):
    name = "fedga"
    needs_client_grads = True

    def client_start(self, c: ClientState, y) -> None:
        if self.cfg.beta:
            y.sub_(c.g - c.g_i, alpha=self.cfg.beta)
