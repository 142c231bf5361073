"""The paper's Theorems 2, 4 and 5, numerically, on a small smooth nonlinear model.

Left side: two runs of one round from the same x (full batches, so the expectation is exact).
Right side: the gradient of r(x) = 1/2 sum_i w_i ||g_i - g||^2 by double backprop
(with w_i = 1/n this is the paper's 1/(2n) sum_i ||g_i - g||^2). The relative error of the
expansion must fall about linearly as the step sizes halve.
"""
from dataclasses import replace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call

from dist_gradalign.algorithms import build_algorithm
from dist_gradalign.engine import Trainer

from util import base_config, write_npz

K = 3


@pytest.fixture(scope="module")
def trainer(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("theorems")
    rng = np.random.default_rng(3)
    X = rng.normal(size=(40, 1, 5)).astype(np.float32)
    Y = rng.integers(0, 4, size=40)
    path = write_npz(tmp / "small.npz", X, Y, X, Y)
    cfg = base_config(tmp, source="npz", root=str(path), model={"name": "mlp", "hidden": [8], "activation": "tanh"},
                      algorithm={"name": "fedavg", "lr": 0.1, "local_steps": 1, "local_batch_size": "full"},
                      partition={"scheme": "shards", "num_clients": 4},  # sorted by label: heterogeneous
                      train={"rounds": 1, "clients_per_round": 4, "precision": "float64"})
    return Trainer(cfg)


def one_round(t: Trainer, x0: torch.Tensor, **algo) -> torch.Tensor:
    t.algo = build_algorithm(replace(t.cfg.algorithm, **algo))
    t.x = x0.clone()
    t.run_round(1)
    return t.x.clone()


def grad_r(t: Trainer, x0: torch.Tensor) -> torch.Tensor:
    """grad_x of r(x) = 1/2 sum_i w_i ||g_i(x) - g(x)||^2, by double backprop."""
    module = t.fm.module
    named = [(n, p.shape, p.numel()) for n, p in module.named_parameters()]
    x = x0.clone().requires_grad_(True)
    params = {n: v.view(s) for (n, s, _), v in zip(named, x.split([k for _, _, k in named]))}
    sizes = torch.tensor(t.sizes, dtype=x.dtype)
    w = sizes / sizes.sum()
    gis = []
    for shard in t.shards_np:
        idx = torch.as_tensor(shard)
        loss = F.cross_entropy(functional_call(module, params, (t.data.x[idx],)), t.data.y[idx])
        gis.append(torch.autograd.grad(loss, x, create_graph=True)[0])
    g = sum(wi * gi for wi, gi in zip(w, gis))
    r = 0.5 * sum(wi * (gi - g).pow(2).sum() for wi, gi in zip(w, gis))
    return torch.autograd.grad(r, x)[0]


def rel_err(lhs: torch.Tensor, rhs: torch.Tensor) -> float:
    return float((lhs - rhs).norm() / rhs.norm())


def assert_linear(errs: list[float]) -> None:
    ratios = [a / b for a, b in zip(errs, errs[1:])]
    print("relative errors", [f"{e:.2e}" for e in errs], "ratios", [f"{q:.2f}" for q in ratios])
    assert all(1.6 < q < 2.5 for q in ratios), f"errors {errs} do not halve (ratios {ratios})"
    assert errs[-1] < 0.05, errs


def test_theorem2_gradalign_vs_gd(trainer):
    """x_GA - x_GD = -alpha beta grad r(x) + O(alpha beta^2)."""
    x0, alpha = trainer.x.clone(), 0.1
    gr = grad_r(trainer, x0)
    x_gd = one_round(trainer, x0, name="lbsgd", lr=alpha, local_steps=1)
    errs = []
    for beta in (0.4, 0.2, 0.1, 0.05):
        x_ga = one_round(trainer, x0, name="gradalign", lr=alpha, beta=beta, local_steps=1)
        errs.append(rel_err(x_ga - x_gd, -alpha * beta * gr))
    assert_linear(errs)


def test_theorem4_fedga_vs_fedavg(trainer):
    """x_FedGA - x_FedAvg = -alpha beta K grad r(x) + higher order; alpha and beta halve together."""
    x0 = trainer.x.clone()
    gr = grad_r(trainer, x0)
    errs = []
    for alpha, beta in ((0.2, 0.4), (0.1, 0.2), (0.05, 0.1), (0.025, 0.05)):
        x_ga = one_round(trainer, x0, name="fedga", lr=alpha, beta=beta, local_steps=K)
        x_avg = one_round(trainer, x0, name="fedavg", lr=alpha, local_steps=K)
        errs.append(rel_err(x_ga - x_avg, -alpha * beta * K * gr))
    assert_linear(errs)


def test_theorem5_scaffold_vs_fedavg(trainer):
    """x_SCAFFOLD - x_FedAvg = -(alpha^2 K (K-1) / 2) grad r(x) + O(alpha^3)
    (the paper's alpha^2 K (K-1) / 4n times grad sum_i ||g_i - g||^2)."""
    x0 = trainer.x.clone()
    gr = grad_r(trainer, x0)
    errs = []
    for alpha in (0.2, 0.1, 0.05, 0.025):
        x_sc = one_round(trainer, x0, name="scaffold", lr=alpha, local_steps=K)
        x_avg = one_round(trainer, x0, name="fedavg", lr=alpha, local_steps=K)
        errs.append(rel_err(x_sc - x_avg, -(alpha ** 2) * K * (K - 1) / 2 * gr))
    assert_linear(errs)


def test_grad_variance_logged_is_r(trainer):
    """The logged grad_variance is r(x) at the round's x."""
    x0 = trainer.x.clone()
    trainer.algo = build_algorithm(replace(trainer.cfg.algorithm, name="fedga", beta=0.1))
    trainer.x = x0.clone()
    row = trainer.run_round(1)
    gis = []
    for shard in trainer.shards_np:
        trainer.fm.params.copy_(x0)
        idx = torch.as_tensor(shard)
        from dist_gradalign.models import loss_and_grad
        loss_and_grad(trainer.fm, trainer.data.x[idx], trainer.data.y[idx])
        gis.append(trainer.fm.grads.clone())
    w = np.array(trainer.sizes) / sum(trainer.sizes)
    g = sum(wi * gi for wi, gi in zip(w, gis))
    r = 0.5 * sum(wi * float((gi - g).pow(2).sum()) for wi, gi in zip(w, gis))
    assert row["grad_variance"] == pytest.approx(r, rel=1e-9)
    assert row["grad_variance_normalized"] == pytest.approx(r / float(g.pow(2).sum()), rel=1e-9)


def global_grad(t: Trainer, x0: torch.Tensor, weight_decay: float) -> torch.Tensor:
    """grad of sum_i w_i f_i(x) + (weight_decay / 2) ||x||^2 over the clients' whole shards."""
    module = t.fm.module
    named = [(n, p.shape, p.numel()) for n, p in module.named_parameters()]
    x = x0.clone().requires_grad_(True)
    params = {n: v.view(s) for (n, s, _), v in zip(named, x.split([k for _, _, k in named]))}
    sizes = torch.tensor(t.sizes, dtype=x.dtype)
    loss = 0.5 * weight_decay * x.pow(2).sum()
    for wi, shard in zip(sizes / sizes.sum(), t.shards_np):
        idx = torch.as_tensor(shard)
        loss = loss + wi * F.cross_entropy(functional_call(module, params, (t.data.x[idx],)), t.data.y[idx])
    return torch.autograd.grad(loss, x)[0]


def test_scaffold_fixed_point_is_stationary(trainer):
    """Karimireddy et al. 2020: with every client in every round and exact gradients, SCAFFOLD's
    fixed point is a stationary point of the global objective despite heterogeneous clients;
    FedAvg with K > 1 local steps stops where the global gradient is not zero (client drift).
    Both control variants: the per-round one (c_i = g_i(x), the paper's Theorem 5) and the
    stateful one (c_i from the client's previous visit). Float64, 400 rounds, K = 5: measured
    |grad| / |grad(x0)| = 3.3e-6 (stateful), 9.7e-6 (per-round), 0.21 (FedAvg), run alone."""
    x0, wd = trainer.x.clone(), 0.1
    rel = {}
    g0 = float(global_grad(trainer, x0, wd).norm())
    for name, control in (("fedavg", "per_round"), ("scaffold", "per_round"), ("scaffold", "stateful")):
        trainer.algo = build_algorithm(replace(trainer.cfg.algorithm, name=name, control=control, lr=0.4,
                                               local_steps=5, weight_decay=wd))
        trainer.x = x0.clone()
        for rnd in range(1, 401):
            trainer.run_round(rnd)
        rel[name, control] = float(global_grad(trainer, trainer.x, wd).norm()) / g0
    assert rel["scaffold", "stateful"] < 1e-4 and rel["scaffold", "per_round"] < 1e-4, rel
    assert rel["fedavg", "per_round"] > 1e-2, rel


@pytest.mark.parametrize("control", ["per_round", "stateful"])
def test_scaffold_with_one_local_step_and_every_client_is_large_batch_sgd(trainer, control):
    """With K = 1 and every client in every round, SCAFFOLD's corrections -c_i + c average to zero
    over the clients (c is their weighted mean), so its update is large-batch SGD's exactly
    (Theorem 5's alpha^2 K (K - 1) / 2 term vanishes at K = 1): a SCAFFOLD run of Figure 2
    (bottom) can differ from SGD's only by rounding. Float64, minibatches of 3, 20 rounds."""
    x0, xs = trainer.x.clone(), {}
    for name in ("lbsgd", "scaffold"):
        trainer.algo = build_algorithm(replace(trainer.cfg.algorithm, name=name, control=control, lr=0.3,
                                               local_steps=1, local_batch_size=3, weight_decay=0.01))
        trainer.x = x0.clone()
        for rnd in range(1, 21):
            trainer.run_round(rnd)
        xs[name] = trainer.x.clone()
    assert float((xs["lbsgd"] - x0).norm()) > 0.1
    assert torch.allclose(xs["scaffold"], xs["lbsgd"], rtol=0, atol=1e-12), (xs["scaffold"] - xs["lbsgd"]).abs().max()


# The displacement on other rules (docs/algorithms.md, "What the displacement adds to each rule"):
# to first order in beta the mean update gains -alpha beta S grad r(x), S = sum_{k<K} (1 - alpha
# gamma)^k, where gamma is the slope of the rule's pull towards x (FedProx's mu, FedDyn's alpha),
# times the server's linear map of the mean update (server_lr; FedDyn's first round: 1 + the
# round's share of the samples, here 1 + 1).
@pytest.mark.parametrize("rule, extra, gamma, server", [
    ("fedprox", {"mu": 0.5}, 0.5, 1.0),
    ("scaffold", {}, 0.0, 1.0),
    ("feddyn", {"feddyn_alpha": 0.5}, 0.5, 2.0),
    ("fedavg", {"server_lr": 0.5, "server_momentum": 0.9}, 0.0, 0.5),
])
def test_the_displacement_adds_alpha_beta_S_grad_r_to_any_rule(trainer, rule, extra, gamma, server):
    x0 = trainer.x.clone()
    gr = grad_r(trainer, x0)
    errs, errs_k = [], []
    for alpha, beta in ((0.2, 0.4), (0.1, 0.2), (0.05, 0.1), (0.025, 0.05)):
        x_d = one_round(trainer, x0, name=rule, lr=alpha, beta=beta, local_steps=K, displacement="fresh", **extra)
        x_0 = one_round(trainer, x0, name=rule, lr=alpha, local_steps=K, **extra)
        s = sum((1 - alpha * gamma) ** k for k in range(K))
        errs.append(rel_err(x_d - x_0, -server * alpha * beta * s * gr))
        errs_k.append(rel_err(x_d - x_0, -server * alpha * beta * K * gr))
    print(rule, "with S:", [f"{e:.2e}" for e in errs], "with K:", [f"{e:.2e}" for e in errs_k])
    assert_linear(errs)
    if gamma:  # the pull's decay of the displacement is the leading correction
        assert all(e < ek for e, ek in zip(errs, errs_k)), (errs, errs_k)
