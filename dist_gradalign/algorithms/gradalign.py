"""GradAlign, the paper's Algorithm 1: one large-batch update per round whose per-minibatch
gradients are taken at displaced points, x_i = x - alpha grad f_i(x - beta (g - g_i)).

It is FedGA with K = 1 where g_i and the displaced gradient use the *same* minibatch
(Algorithm 1, lines 3-6). Averaging x_i - beta v_i instead of x_i changes nothing, since
sum_i w_i v_i = 0. One round implicitly descends on f + beta r (Theorem 2).

For the same reason the round average is a gradient step,
sum_i w_i y_i = x - alpha (sum_i w_i grad f_i(x - beta v_i) + lambda x) (weight decay at the
displaced point also averages to lambda x), so the step can all-reduce the displaced gradients
while they are computed (``gradient_form``).

``algorithm.global_grad: previous``: g is replaced by d, the previous update's all-reduced mean
displaced gradient (without weight decay); one all-reduce per update. The displacements no
longer sum to zero, so the upload is u_i = x - alpha (grad f_i(x - beta v_i) + lambda x): weight
decay at x and the displacement undone, whichever way the all-reduce carries it."""
from .base import ClientState
from .fedga import FedGA


class GradAlign(FedGA):
    name = "gradalign"
    grad_batch = "local"
    gradient_form = True

    def local_steps(self) -> int:
        return 1

    def local_direction(self, c: ClientState, y, grad) -> None:
        if self.previous and self.cfg.weight_decay:
            grad.add_(c.x, alpha=self.cfg.weight_decay)  # at x: the upload is a gradient step from x
            return
        super().local_direction(c, y, grad)

    def after_round(self, x, avg, uploads=None, fraction=1.0) -> None:
        if self.previous:  # d = (x - sum_i w_i u_i) / alpha - lambda x = sum_i w_i grad f_i(x - beta v_i)
            self.direction = (x - avg).div_(self.lr).sub_(x, alpha=self.cfg.weight_decay)
