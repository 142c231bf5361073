"""Large-batch SGD: x <- x - alpha (sum_i w_i grad f_i(x; batch_i) + lambda x).

One update per round over the union of the clients' minibatches; the datacenter baseline
that GradAlign is compared with by update count (paper, Figure 2). With the displacement
(``algorithm.displacement``; GradAlign) g_i is taken on the step's own minibatch, and
sum_i w_i y_i = x - alpha (sum_i w_i grad f_i(x - beta v_i) + lambda x) (weight decay at the
displaced point also averages to lambda x).

``displacement: previous`` (``global_grad: previous`` for gradalign): g is replaced by d, the
previous update's all-reduced mean displaced gradient (without weight decay); one all-reduce
per update. The displacements no longer sum to zero, so the upload is
u_i = x - alpha (grad f_i(x - beta v_i) + lambda x): weight decay at x and the displacement
undone, whichever way the all-reduce carries it."""
from .base import Algorithm, ClientState


class LBSGD(Algorithm):
    name = "lbsgd"
    grad_batch = "local"  # g_i (with the displacement) on the step's own minibatch
    gradient_form = True  # y_i = x - alpha (grad_i + lambda x): average the gradients

    def local_steps(self) -> int:
        return 1

    def local_direction(self, c: ClientState, y, grad) -> None:
        if self.displacement == "previous" and self.cfg.weight_decay:
            grad.add_(c.x, alpha=self.cfg.weight_decay)  # at x: the upload is a gradient step from x
            return
        super().local_direction(c, y, grad)

    def after_round(self, x, avg, uploads=None, fraction=1.0) -> None:
        if self.displacement == "previous":  # d = (x - sum_i w_i u_i) / alpha - lambda x
            self.direction = (x - avg).div_(self.lr).sub_(x, alpha=self.cfg.weight_decay)
