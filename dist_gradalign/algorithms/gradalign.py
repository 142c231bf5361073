"""GradAlign, the paper's Algorithm 1: one large-batch update per round whose per-minibatch
gradients are taken at displaced points, x_i = x - alpha grad f_i(x - beta (g - g_i)).

It is FedGA with K = 1 where g_i and the displaced gradient use the *same* minibatch
(Algorithm 1, lines 3-6). Averaging x_i - beta v_i instead of x_i changes nothing, since
sum_i w_i v_i = 0. One round implicitly descends on f + beta r (Theorem 2)."""
from .fedga import FedGA


class GradAlign(FedGA):
    name = "gradalign"
    grad_batch = "local"

    def local_steps(self) -> int:
        return 1
