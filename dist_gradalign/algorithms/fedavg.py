"""FedAvg (McMahan et al. 2017): K local SGD steps from x, then a weighted average.

y_k = y_{k-1} - alpha (grad f_i(y_{k-1}; zeta_k) + lambda y_{k-1}), y_0 = x."""
from .base import Algorithm


class FedAvg(Algorithm):
    name = "fedavg"
