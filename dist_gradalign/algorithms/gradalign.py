"""GradAlign, the paper's Algorithm 1: one large-batch update per round whose per-minibatch
gradients are taken at displaced points, x_i = x - alpha grad f_i(x - beta (g - g_i)).

It is FedGA with K = 1 where g_i and the displaced gradient use the *same* minibatch
(Algorithm 1, lines 3-6). Averaging x_i - beta v_i instead of x_i changes nothing, since
sum_i w_i v_i = 0. One round implicitly descends on f + beta r (Theorem 2).

For the same reason the round average is a gradient step,
sum_i w_i y_i = x - alpha (sum_i w_i grad f_i(x - beta v_i) + lambda x) (weight decay at the
displaced point also averages to lambda x), so the step can all-reduce the displaced gradients
while they are computed (``gradient_form``)."""
from .fedga import FedGA


class GradAlign(FedGA):
    name = "gradalign"
    grad_batch = "local"
    gradient_form = True

    def local_steps(self) -> int:
        return 1
