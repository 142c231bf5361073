"""GradAlign, the paper's Algorithm 1: large-batch SGD with the displacement
(``displacement: fresh``): one update per round whose per-minibatch gradients are taken at
displaced points, x_i = x - alpha grad f_i(x - beta (g - g_i)).

g_i and the displaced gradient use the *same* minibatch (Algorithm 1, lines 3-6: large-batch
SGD's ``grad_batch = "local"``). Averaging x_i - beta v_i instead of x_i changes nothing, since
sum_i w_i v_i = 0. One round implicitly descends on f + beta r (Theorem 2). For the same reason
the round average is a gradient step, so the step can all-reduce the displaced gradients while
they are computed (``gradient_form``). ``global_grad: previous``: see :mod:`.lbsgd`."""
from .lbsgd import LBSGD


class GradAlign(LBSGD):
    name = "gradalign"
    default_displacement = "fresh"
