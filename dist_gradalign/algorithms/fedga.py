"""FedGA, the paper's Algorithm 2: displace once, then K plain local steps.

Lines 3-6: g = sum_i w_i g_i; v_i = g - g_i; y_0 = x - beta v_i. Lines 7-9: K local SGD steps
as FedAvg. Line 11: weighted average. The displacements sum to zero under the weights, so
nothing is reverted; the round implicitly descends on f + beta K r (Theorem 4).

``algorithm.global_grad: previous`` (beyond the paper) drops the extra communication round: g
is replaced by the previous round's mean direction d = (x_prev - sum_i w_i u_i) / (alpha K),
which every rank already has; g_i is still computed locally. Each client uploads its
displacement undone, u_i = y_K + beta v_i, so that a displacement that no longer sums to zero
does not move x at zeroth order (with ``fresh`` the sum is zero: y_K is uploaded as it is,
which is the same average). Round 1 has no d: v_i = 0."""
from .base import Algorithm, ClientState


class FedGA(Algorithm):
    name = "fedga"
    needs_client_grads = True

    @property
    def previous(self) -> bool:
        return self.cfg.global_grad == "previous"

    @property
    def reduces_g(self) -> bool:
        return not self.previous

    def round_g(self, g):
        return self.direction if self.previous else g

    def client_start(self, c: ClientState, y) -> None:
        if self.beta and c.g is not None:
            y.sub_(c.g - c.g_i, alpha=self.beta)

    def client_upload(self, c: ClientState, y) -> None:
        if self.previous and self.beta and c.g is not None:
            y.add_(c.g - c.g_i, alpha=self.beta)

    def after_round(self, x, avg, uploads=None, fraction=1.0) -> None:
        if self.previous:  # d = (x - sum_i w_i u_i) / (alpha K)
            self.direction = (x - avg).div_(self.lr * self.local_steps())
