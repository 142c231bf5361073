"""A user algorithm in one file: FedAvg whose clients take heavy-ball momentum steps.

Each client starts every round with a fresh velocity (v_0 = 0) and takes K local steps
    v_k = m v_{k-1} + (grad f_i(y_{k-1}; zeta_k) + lambda y_{k-1}),   y_k = y_{k-1} - lr v_k,
then the server averages the y_K as FedAvg does (Wang et al. 2020, "SlowMo", local momentum
with the buffers reset each round). Plugs in by import path:
    algorithm: {name: examples.local_momentum:LocalMomentum, kwargs: {momentum: 0.9}}
"""
from dist_gradalign import Algorithm, ClientState


class LocalMomentum(Algorithm):
    name = "local_momentum"

    def __init__(self, cfg, momentum: float = 0.9):
        super().__init__(cfg)
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"momentum = {momentum} must be in [0, 1)")
        self.momentum = momentum

    def client_start(self, c: ClientState, y) -> None:
        super().client_start(c, y)  # the displacement, with algorithm.displacement: fresh | previous
        c.velocity = None  # per client and round: the hooks see the same ClientState all round

    def local_direction(self, c: ClientState, y, grad) -> None:
        super().local_direction(c, y, grad)  # + weight decay at y
        if c.velocity is None:
            c.velocity = grad.clone()
        else:
            c.velocity.mul_(self.momentum).add_(grad)
        grad.copy_(c.velocity)  # the step is y <- y - lr v
