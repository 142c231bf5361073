"""FedGA, the paper's Algorithm 2: FedAvg with the displacement (``displacement: fresh``).

Lines 3-6: g = sum_i w_i g_i; v_i = g - g_i; y_0 = x - beta v_i. Lines 7-9: K local SGD steps
as FedAvg. Line 11: weighted average. The displacements sum to zero under the weights, so
nothing is reverted; the round implicitly descends on f + beta K r (Theorem 4). The
displacement itself lives in the base class (``Algorithm.client_start``), so that any rule
takes it with ``algorithm.displacement``; FedGA is FedAvg with it on by default.

``algorithm.global_grad: previous`` (beyond the paper; the same as ``displacement: previous``)
drops the extra communication round: g is replaced by the previous round's mean direction
d = (x_prev - sum_i w_i u_i) / (alpha K), which every rank already has; g_i is still computed
locally. Each client uploads its displacement undone, u_i = y_K + beta v_i, so that a
displacement that no longer sums to zero does not move x at zeroth order (with ``fresh`` the
sum is zero: y_K is uploaded as it is, which is the same average). Round 1 has no d: v_i = 0."""
from .fedavg import FedAvg


class FedGA(FedAvg):
    name = "fedga"
    default_displacement = "fresh"
