"""Large-batch SGD: x <- x - alpha (sum_i w_i grad f_i(x; batch_i) + lambda x).

One update per round over the union of the clients' minibatches; the datacenter baseline
that GradAlign is compared with by update count (paper, Figure 2)."""
from .base import Algorithm


class LBSGD(Algorithm):
    name = "lbsgd"
    gradient_form = True  # y_i = x - alpha (grad_i + lambda x): average the gradients

    def local_steps(self) -> int:
        return 1
