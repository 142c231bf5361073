"""Every algorithm against numbers derived by hand, and the identities between algorithms.

The reference below is an independent numpy implementation of DESIGN.md section 1 for
multinomial logistic regression, whose gradient has the closed form (softmax(Wx+b) - e_y) x^T.
It reads the partition and the sampled clients from the run directory, so it checks the
algorithm math and not the partitioner or sampler (tested elsewhere).
"""
import json

import numpy as np
import pytest
import torch

from dist_gradalign.engine import Trainer

from util import base_config, load_params, run_dir_rows, write_npz


def _softmax(z):
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def ref_grad(W, X, Y, C):
    """Mean cross-entropy gradient of logistic regression; W is (C, D+1), last column = bias."""
    Xa = np.hstack([X, np.ones((len(X), 1))])
    P = _softmax(Xa @ W.T)
    P[np.arange(len(Y)), Y] -= 1.0
    return P.T @ Xa / len(X)


def _stream(seed, rnd, cid, purpose):
    return np.random.default_rng(np.random.SeedSequence([seed, rnd, cid, purpose]))


def ref_local_batches(seed, rnd, cid, n, steps, b):
    """Shard positions of each local step, from the spec in dist_gradalign/executor.py's docstring."""
    if b == "full" or b >= n:
        return [np.arange(n)] * steps
    r = _stream(seed, rnd, cid, 1)
    perm, pos, out = r.permutation(n), 0, []
    for _ in range(steps):
        if pos + b > n:
            perm, pos = r.permutation(n), 0
        out.append(perm[pos:pos + b])
        pos += b
    return out


def ref_grad_positions(a, seed, rnd, cid, n):
    """Shard positions of g_i: GradAlign's first local minibatch, else the ``full_grad_batch`` subsample."""
    if a["name"] in ("gradalign", "lbsgd"):  # one-step rules: g_i on the step's own minibatch
        return ref_local_batches(seed, rnd, cid, n, 1, a["local_batch_size"])[0]
    s = a["full_grad_batch"]
    return np.arange(n) if s == "full" or s >= n else np.sort(_stream(seed, rnd, cid, 2).permutation(n)[:s])


def ref_run(a, X, Y, C, shards, rounds_clients, seed=0, grad_positions=ref_grad_positions):
    """The algorithms of DESIGN.md section 1 in numpy float64, for rounds 1, 2, ... with the
    given clients; minibatches and the g_i samples re-derived by the functions above."""
    W = np.zeros((C, X.shape[1] + 1))
    mom, v = np.zeros_like(W), np.zeros_like(W)
    K = 1 if a["name"] in ("lbsgd", "gradalign") else a["local_steps"]
    variances = []
    # the displacement: fedga and gradalign have it (fresh, or previous with global_grad), any
    # rule takes it with algorithm.displacement
    disp = a.get("displacement") or ("fresh" if a["name"] in ("fedga", "gradalign") else "none")
    if disp == "fresh" and a.get("global_grad") == "previous":
        disp = "previous"
    previous = disp == "previous"
    one_step = a["name"] in ("lbsgd", "gradalign")
    direction = None  # global_grad = previous: the previous round's d
    stateful = a.get("control", "per_round") == "stateful"
    dyn, h, h_client = a["name"] == "feddyn", np.zeros_like(W), {}  # FedDyn: the server's h and each h_i
    c_server, c_client = np.zeros_like(W), {}  # stateful SCAFFOLD: c and c_i (absent = 0)
    total = sum(len(s) for s in shards)
    for rnd, clients in enumerate(rounds_clients, start=1):
        sizes = np.array([len(shards[c]) for c in clients], dtype=float)
        w = sizes / sizes.sum()
        sub = [shards[c][grad_positions(a, seed, rnd, c, len(shards[c]))] for c in clients]
        gi = [ref_grad(W, X[s], Y[s], C) for s in sub]
        g = sum(wi * gii for wi, gii in zip(w, gi))
        c_change = np.zeros_like(W)
        if stateful:
            g = None
        elif previous:
            g = direction
        else:
            variances.append(0.5 * sum(wi * ((gii - g) ** 2).sum() for wi, gii in zip(w, gi)))
        avg = np.zeros_like(W)
        for wi, c, gii in zip(w, clients, gi):
            y = W.copy()
            vi = None if g is None else g - gii
            if disp != "none" and vi is not None:
                y -= a["beta"] * vi
            for pos in ref_local_batches(seed, rnd, c, len(shards[c]), K, a["local_batch_size"]):
                at = W if previous and one_step else y  # one-step rules with previous: decay at x
                d = ref_grad(y, X[shards[c][pos]], Y[shards[c][pos]], C) + a["weight_decay"] * at
                if a["name"] == "fedprox":
                    d += a["mu"] * (y - W)
                if a["name"] == "scaffold":
                    d += c_server - c_client.get(c, 0.0) if stateful else g - gii
                if dyn:  # grad of f_i(y) - <h_i, y> + alpha/2 ||y - x||^2
                    d += -h_client.get(c, 0.0) + a["feddyn_alpha"] * (y - W)
                y = y - a["lr"] * d
            if previous and vi is not None:
                y = y + a["beta"] * vi  # u_i: the displacement undone
            if stateful:  # c_i+ = c_i - c + (x - y_K) / (K alpha); c moves by p_i (c_i+ - c_i)
                new = c_client.get(c, 0.0) - c_server + (W - y) / (K * a["lr"])
                c_change += len(shards[c]) / total * (new - c_client.get(c, 0.0))
                c_client[c] = new
            if dyn:
                h_client[c] = h_client.get(c, 0.0) - a["feddyn_alpha"] * (y - W)
            avg += wi * y
        c_server = c_server + c_change
        if previous:
            direction = (W - avg) / (a["lr"] * K)
            if one_step:
                direction = direction - a["weight_decay"] * W
        if dyn:  # h <- h - alpha sum_S p_i (y_i - x); the server's target is avg - h / alpha
            h = h - a["feddyn_alpha"] * (sizes.sum() / total) * (avg - W)
            avg = avg - h / a["feddyn_alpha"]
        opt, b1 = a.get("server_opt", "sgd"), a["server_momentum"]
        if opt == "sgd":
            mom = b1 * mom + (W - avg)
            W = W - a["server_lr"] * mom
            continue
        delta = avg - W
        mom = b1 * mom + (1 - b1) * delta
        b2 = a["server_beta2"]
        v = {"adagrad": v + delta ** 2, "adam": b2 * v + (1 - b2) * delta ** 2,
             "yogi": v - (1 - b2) * delta ** 2 * np.sign(v - delta ** 2)}[opt]
        W = W + a["server_lr"] * mom / (np.sqrt(v) + a["server_eps"])
    return W, variances


def _tiny(tmp_path):
    """12 samples, 3 features, 3 classes, as float (used exactly as stored)."""
    rng = np.random.default_rng(7)
    X = rng.normal(size=(12, 1, 3)).astype(np.float32).astype(np.float64)  # exact in float32
    Y = np.array([0, 1, 2] * 4, dtype=np.int64)
    return write_npz(tmp_path / "tiny.npz", X, Y, X, Y), X.reshape(12, 3), Y


def _fit_tiny(tmp_path, algo, rounds, clients_per_round, **train):
    """Train logistic regression on :func:`_tiny` (4 Dirichlet clients, float64). Returns the
    trainer, the metric rows, the shards, the round's clients and the final (C, D+1) weights."""
    path, X, Y = _tiny(tmp_path)
    cfg = base_config(tmp_path, source="npz", root=str(path), model={"name": "logreg"}, algorithm=algo,
                      partition={"scheme": "dirichlet", "num_clients": 4, "alpha": 0.3},
                      train={"rounds": rounds, "clients_per_round": clients_per_round, "precision": "float64", **train})
    t = Trainer(cfg)
    t.fit()
    rows = run_dir_rows(cfg.run_dir)
    shards = [np.array(v) for v in json.loads((tmp_path / "run" / "partition.json").read_text())["clients"].values()]
    sd = load_params(cfg.run_dir)
    W = np.hstack([sd["linear.weight"].numpy(), sd["linear.bias"].numpy()[:, None]])
    return t, rows, shards, [r["clients"] for r in rows], W


ALGOS = {
    "lbsgd": {},
    "feddyn": {"local_steps": 3, "feddyn_alpha": 0.5},
    "fedavg": {"local_steps": 3},
    "fedprox": {"local_steps": 3, "mu": 0.5},
    "scaffold": {"local_steps": 3},
    "fedga": {"local_steps": 3, "beta": 0.3},
    "gradalign": {"beta": 0.3},
}


@pytest.mark.parametrize("comm", ["bucketed", "flat"])
@pytest.mark.parametrize("name", ["fedga", "gradalign"])
def test_previous_global_grad_matches_numpy_reference(tmp_path, name, comm):
    """global_grad: previous: d from the previous round, v_i = d - g_i (0 in round 1), the
    displacement undone in the upload; one all-reduce per round."""
    algo = {"name": name, "lr": 0.4, "local_batch_size": "full", "full_grad_batch": "full", "weight_decay": 0.01,
            "server_lr": 0.7, "server_momentum": 0.5, "beta": 0.0, "mu": 0.0, "local_steps": 1,
            **ALGOS[name], "global_grad": "previous"}
    t, rows, shards, clients, W = _fit_tiny(tmp_path, algo, 4, 3, comm=comm)
    _, X, Y = _tiny(tmp_path)
    W_ref, var_ref = ref_run(algo, X, Y, 3, shards, clients)
    np.testing.assert_allclose(W, W_ref, rtol=1e-10, atol=1e-12)
    fresh = ref_run({**algo, "global_grad": "fresh"}, X, Y, 3, shards, clients)[0]
    assert np.abs(W - fresh).max() > 1e-6, "previous must differ from fresh on this problem"
    assert var_ref == [] and all("grad_variance" not in r for r in rows)
    n = W.size
    assert [r["comm_rounds"] for r in rows] == [1, 2, 3, 4]
    assert [r["bytes"] for r in rows] == [8 * (n + 4) * k for k in (1, 2, 3, 4)]  # as fedavg / lbsgd
    assert t.algo.direction is not None


@pytest.mark.parametrize("executor", ["sequential", "vectorized"])
def test_stateful_scaffold_matches_numpy_reference(tmp_path, executor):
    """control: stateful (Karimireddy et al. 2020, option II, sample weights) over 6 rounds of 2
    of 4 unequal clients, so clients are revisited with their c_i; one communication round that
    carries y and c_i+ - c_i (twice the model)."""
    algo = {"name": "scaffold", "lr": 0.4, "local_batch_size": 2, "full_grad_batch": "full", "weight_decay": 0.01,
            "server_lr": 0.7, "server_momentum": 0.5, "beta": 0.0, "mu": 0.0, "local_steps": 3, "control": "stateful"}
    t, rows, shards, clients, W = _fit_tiny(tmp_path, algo, 6, 2, executor=executor)
    _, X, Y = _tiny(tmp_path)
    assert len({len(s) for s in shards}) > 1, "the test needs unequal client sizes"
    seen = [c for r in clients for c in r]
    assert len(seen) > len(set(seen)), "the test needs a client sampled twice"
    W_ref, _ = ref_run(algo, X, Y, 3, shards, clients)
    np.testing.assert_allclose(W, W_ref, rtol=1e-10, atol=1e-12)
    per_round = ref_run({**algo, "control": "per_round"}, X, Y, 3, shards, clients)[0]
    assert np.abs(W - per_round).max() > 1e-6, "stateful must differ from per_round on this problem"
    n = W.size
    assert [r["comm_rounds"] for r in rows] == list(range(1, 7))
    assert [r["bytes"] for r in rows] == [8 * (2 * n + 4) * k for k in range(1, 7)]
    assert all("grad_variance" not in r for r in rows)
    # c = sum_i p_i c_i over all clients, with p_i = n_i / sum_j n_j
    p = {c: len(shards[c]) / sum(len(s) for s in shards) for c in range(4)}
    rows = t.algo.client_state()
    c_sum = sum(p[c] * rows[c] for c in rows)
    torch.testing.assert_close(t.algo.control.cpu(), c_sum, rtol=1e-10, atol=1e-12)
    assert sorted(rows) == sorted(set(seen))


@pytest.mark.parametrize("executor", ["sequential", "vectorized"])
def test_feddyn_matches_numpy_reference_with_revisited_clients(tmp_path, executor):
    """FedDyn (Acar et al. 2021, partial participation, sample weights) over 6 rounds of 2 of 4
    unequal clients, so clients come back with their h_i; one communication round of the
    model's size (the server's h needs only the average); h = -alpha sum_t fraction_t (avg_t - x_t)."""
    algo = {"name": "feddyn", "lr": 0.4, "local_batch_size": 2, "full_grad_batch": "full", "weight_decay": 0.01,
            "server_lr": 1.0, "server_momentum": 0.0, "beta": 0.0, "mu": 0.0, "local_steps": 3, "feddyn_alpha": 0.5}
    t, rows, shards, clients, W = _fit_tiny(tmp_path, algo, 6, 2, executor=executor)
    _, X, Y = _tiny(tmp_path)
    seen = [c for r in clients for c in r]
    assert len(seen) > len(set(seen)) and len({len(s) for s in shards}) > 1
    W_ref, _ = ref_run(algo, X, Y, 3, shards, clients)
    np.testing.assert_allclose(W, W_ref, rtol=1e-10, atol=1e-12)
    fedavg = ref_run({**algo, "name": "fedavg"}, X, Y, 3, shards, clients)[0]
    assert np.abs(W - fedavg).max() > 1e-6, "FedDyn must differ from FedAvg on this problem"
    n = W.size
    assert [r["bytes"] for r in rows] == [8 * (n + 4) * k for k in range(1, 7)]
    assert sorted(t.algo.client_state()) == sorted(set(seen))


@pytest.mark.parametrize("opt", ["adam", "yogi", "adagrad"])
@pytest.mark.parametrize("name", list(ALGOS))
def test_adaptive_server_optimizers_match_numpy_reference(tmp_path, name, opt):
    """Reddi et al. 2021 without bias correction, over 4 rounds that revisit clients."""
    algo = {"name": name, "lr": 0.4, "local_batch_size": "full", "full_grad_batch": "full", "weight_decay": 0.01,
            "server_lr": 0.05, "server_momentum": 0.9, "server_opt": opt, "server_beta2": 0.95, "server_eps": 1e-3,
            "beta": 0.0, "mu": 0.0, "local_steps": 1, **ALGOS[name]}
    _, rows, shards, clients, W = _fit_tiny(tmp_path, algo, 4, 3)
    _, X, Y = _tiny(tmp_path)
    W_ref, _ = ref_run(algo, X, Y, 3, shards, clients)
    np.testing.assert_allclose(W, W_ref, rtol=1e-10, atol=1e-12)
    others = [ref_run({**algo, "server_opt": o}, X, Y, 3, shards, clients)[0]
              for o in ("sgd", "adam", "yogi", "adagrad") if o != opt]
    assert all(np.abs(W - o).max() > 1e-6 for o in others), "the optimizers must differ on this problem"


@pytest.mark.parametrize("comm", ["bucketed", "flat"])
@pytest.mark.parametrize("server", [(1.0, 0.0), (0.7, 0.5)], ids=["plain", "server-momentum"])
@pytest.mark.parametrize("name", list(ALGOS))
def test_matches_numpy_reference(tmp_path, name, server, comm):
    algo = {"name": name, "lr": 0.4, "local_batch_size": "full", "full_grad_batch": "full",
            "weight_decay": 0.01, "server_lr": server[0], "server_momentum": server[1], "beta": 0.0, "mu": 0.0,
            "local_steps": 1, **ALGOS[name]}
    _, rows, shards, clients, W = _fit_tiny(tmp_path, algo, 3, 3, comm=comm)
    _, X, Y = _tiny(tmp_path)
    assert len({len(s) for s in shards}) > 1, "the test needs unequal client sizes (sample-size weights)"
    W_ref, var_ref = ref_run(algo, X, Y, 3, shards, clients)
    np.testing.assert_allclose(W, W_ref, rtol=1e-10, atol=1e-12)
    if name in ("scaffold", "fedga", "gradalign"):
        np.testing.assert_allclose([r["grad_variance"] for r in rows], var_ref, rtol=1e-9)
    else:
        assert "grad_variance" not in rows[0]
    assert [r["comm_rounds"] for r in rows] == [k * (2 if name in ("scaffold", "fedga", "gradalign") else 1)
                                               for k in (1, 2, 3)]
    assert [r["updates"] for r in rows] == [k * (1 if name in ("lbsgd", "gradalign") else 3) for k in (1, 2, 3)]
    # per round: x-sized (+4 scalars: loss, variance, stop and divergence flags), plus g for the
    # two-round algorithms, in float64, whether in one flat all-reduce or in buckets
    # (evaluation traffic is not training payload)
    n = W.size
    per_round = 8 * ((n + 4) + (n if name in ("scaffold", "fedga", "gradalign") else 0))
    assert [r["bytes"] for r in rows] == [per_round, 2 * per_round, 3 * per_round]


MINIBATCH = {"lr": 0.4, "local_batch_size": 4, "full_grad_batch": 5, "weight_decay": 0.01, "server_lr": 0.7,
             "server_momentum": 0.5, "beta": 0.0, "mu": 0.0, "local_steps": 1}


def _minibatch_run(tmp_path, name, comm="bucketed", executor="auto", rule=None, **extra):
    """A float64 run of ``name`` (with ``rule``'s settings, default its own, and ``extra``
    algorithm keys) with minibatches of 4 and g_i subsamples of 5 on 40 samples in 4 dirichlet
    shards of at least 6: returns what ref_run needs and the trainer's W and rows."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(7)
    X = rng.normal(size=(40, 1, 3)).astype(np.float32).astype(np.float64)
    Y = np.arange(40) % 3
    path = write_npz(tmp_path / "small.npz", X, Y, X, Y)
    algo = {"name": name, **MINIBATCH, **ALGOS[rule or name], **extra}
    cfg = base_config(tmp_path, source="npz", root=str(path), model={"name": "logreg"}, algorithm=algo, seed=3,
                      partition={"scheme": "dirichlet", "num_clients": 4, "alpha": 0.3, "min_size": 6},
                      train={"rounds": 3, "clients_per_round": 3, "precision": "float64", "comm": comm,
                             "executor": executor})
    Trainer(cfg).fit()
    rows = run_dir_rows(cfg.run_dir)
    assert [r["round"] for r in rows] == [1, 2, 3]
    shards = [np.array(v) for v in json.loads((tmp_path / "run" / "partition.json").read_text())["clients"].values()]
    sd = load_params(cfg.run_dir)
    W = np.hstack([sd["linear.weight"].numpy(), sd["linear.bias"].numpy()[:, None]])
    return algo, X.reshape(40, 3), Y, shards, rows, W, cfg.seed


@pytest.mark.parametrize("comm", ["bucketed", "flat"])
@pytest.mark.parametrize("name", list(ALGOS))
def test_minibatch_run_matches_numpy_reference(tmp_path, name, comm):
    """With minibatches and g_i subsamples, the reference re-derives the index streams from the
    spec in executor.py's docstring: it catches g_i taken on the wrong samples."""
    algo, X, Y, shards, rows, W, seed = _minibatch_run(tmp_path, name, comm)
    sizes = {len(shards[c]) for r in rows for c in r["clients"]}
    assert len(sizes) > 1, "the test needs unequal client sizes (sample-size weights)"
    assert min(sizes) > 5, "minibatches and g_i subsamples smaller than every shard"
    assert any(n < 3 * 4 for n in sizes), "some client reshuffles its epoch within K = 3 steps"
    W_ref, var_ref = ref_run(algo, X, Y, 3, shards, [r["clients"] for r in rows], seed=seed)
    np.testing.assert_allclose(W, W_ref, rtol=1e-10, atol=1e-12)
    if name in ("scaffold", "fedga", "gradalign"):
        np.testing.assert_allclose([r["grad_variance"] for r in rows], var_ref, rtol=1e-9)
    else:
        assert "grad_variance" not in rows[0]


DISPLACED = {"fedavg-fresh": ("fedavg", "fresh"), "fedavg-previous": ("fedavg", "previous"),
             "fedprox-fresh": ("fedprox", "fresh"), "fedprox-previous": ("fedprox", "previous"),
             "scaffold-fresh": ("scaffold", "fresh"), "lbsgd-fresh": ("lbsgd", "fresh"),
             "lbsgd-previous": ("lbsgd", "previous"), "feddyn-fresh": ("feddyn", "fresh")}


@pytest.mark.parametrize("executor", ["sequential", "vectorized"])
@pytest.mark.parametrize("combo", list(DISPLACED))
def test_displacement_on_any_rule_matches_numpy_reference(tmp_path, combo, executor):
    """algorithm.displacement on fedavg, fedprox (the proximal term pulls towards x, not the
    displaced start), per-round scaffold (sharing the round's g and g_i with its correction) and
    lbsgd (g_i on the step's minibatch), fresh and previous, with minibatches and g_i subsamples."""
    name, displacement = DISPLACED[combo]
    algo, X, Y, shards, rows, W, seed = _minibatch_run(tmp_path, name, executor=executor, beta=0.3,
                                                       displacement=displacement)
    clients = [r["clients"] for r in rows]
    W_ref, var_ref = ref_run(algo, X, Y, 3, shards, clients, seed=seed)
    np.testing.assert_allclose(W, W_ref, rtol=1e-10, atol=1e-12)
    plain = ref_run({**algo, "displacement": "none"}, X, Y, 3, shards, clients, seed=seed)[0]
    assert np.abs(W - plain).max() > 1e-6, "the displacement must change this run"
    two = displacement == "fresh" or name == "scaffold"
    assert [r["comm_rounds"] for r in rows] == [k * (2 if two else 1) for k in (1, 2, 3)]
    if displacement == "fresh":
        np.testing.assert_allclose([r["grad_variance"] for r in rows], var_ref, rtol=1e-9)


@pytest.mark.parametrize("rule, named", [("fedavg", "fedga"), ("lbsgd", "gradalign")])
@pytest.mark.parametrize("displacement", ["fresh", "previous"])
def test_fedga_and_gradalign_are_their_rules_with_the_displacement_bitwise(tmp_path, rule, named, displacement):
    a = _minibatch_run(tmp_path / "rule", rule, beta=0.3, displacement=displacement)[-2]
    b = _minibatch_run(tmp_path / "named", named, rule=rule, beta=0.3, global_grad=displacement)[-2]
    assert np.array_equal(a, b)


@pytest.mark.parametrize("algorithm, match", [
    ({"name": "fedga", "displacement": "none"}, "which is fedavg with displacement 'fresh'"),
    ({"name": "gradalign", "displacement": "previous"}, "which is lbsgd with displacement 'fresh'"),
    ({"name": "scaffold", "displacement": "fresh", "control": "stateful"}, "stateful SCAFFOLD forms no g"),
    ({"name": "scaffold", "displacement": "previous"}, "previous would replace the g its correction needs"),
    ({"name": "fedavg", "displacement": "sideways"}, "displacement = 'sideways' is not allowed"),
])
def test_displacement_combinations_that_make_no_sense_are_config_errors(algorithm, match):
    from dist_gradalign.config import ConfigError, from_dict
    with pytest.raises(ConfigError, match=match):
        from_dict({"algorithm": algorithm})


def _next_round_batch(a, seed, rnd, cid, n):
    return ref_local_batches(seed, rnd + 1, cid, n, 1, a["local_batch_size"])[0]


def _subsample_of_batch_size(a, seed, rnd, cid, n):
    return np.sort(np.random.default_rng(np.random.SeedSequence([seed, rnd, cid, 2])).permutation(n)[:4])


def _second_batch(a, seed, rnd, cid, n):
    return ref_local_batches(seed, rnd, cid, n, 2, a["local_batch_size"])[1]


@pytest.mark.parametrize("wrong", [_next_round_batch, _subsample_of_batch_size, _second_batch])
def test_gradalign_g_i_on_another_minibatch_is_caught(tmp_path, wrong):
    """The check has teeth: a reference taking GradAlign's g_i on another minibatch of the same
    size (the next round's, a subsample stream's, the epoch's second) does not match the trainer."""
    algo, X, Y, shards, rows, W, seed = _minibatch_run(tmp_path, "gradalign", "flat")
    clients = [r["clients"] for r in rows]
    np.testing.assert_allclose(W, ref_run(algo, X, Y, 3, shards, clients, seed=seed)[0], rtol=1e-10, atol=1e-12)
    W_wrong, var_wrong = ref_run(algo, X, Y, 3, shards, clients, seed=seed, grad_positions=wrong)
    assert not np.allclose(W, W_wrong, rtol=1e-6, atol=0)
    assert not np.allclose([r["grad_variance"] for r in rows], var_wrong, rtol=1e-6)


def test_lbsgd_first_step_by_hand(tmp_path):
    """Two clients of one sample each, x0 = (1, 2) with label 0, x1 = (3, -1) with label 1.
    At W = 0 the softmax is (1/2, 1/2): g_0 = [[-0.5, -1], [0.5, 1]], g_1 = [[1.5, -0.5], [-1.5, 0.5]],
    bias gradients cancel; one step of lr 0.1 gives W = -0.1 (g_0 + g_1) / 2."""
    X = np.array([[[1.0, 2.0]], [[3.0, -1.0]]])
    Y = np.array([0, 1])
    path = write_npz(tmp_path / "two.npz", X, Y, X, Y)
    cfg = base_config(tmp_path, source="npz", root=str(path), model={"name": "logreg"},
                      algorithm={"name": "lbsgd", "lr": 0.1, "local_steps": 1, "local_batch_size": "full"},
                      partition={"scheme": "shards", "num_clients": 2},
                      train={"rounds": 1, "clients_per_round": 2, "precision": "float64"})
    Trainer(cfg).fit()
    sd = load_params(cfg.run_dir)
    np.testing.assert_allclose(sd["linear.weight"].numpy(), [[-0.05, 0.075], [0.05, -0.075]], atol=1e-15)
    np.testing.assert_allclose(sd["linear.bias"].numpy(), [0.0, 0.0], atol=1e-15)
    row = run_dir_rows(cfg.run_dir)[0]
    assert row["samples"] == 2 and row["updates"] == 1 and row["comm_rounds"] == 1


def test_fedga_displacement_by_hand(tmp_path):
    """Same two clients, FedGA with K = 1, lr 0.1, beta 1: v_0 = g - g_0 = [[1, 0.25], [-1, -0.25]],
    bias [0.5, -0.5], so client 0 starts at -v_0; the displacements cancel in the average, and
    with beta = 0 FedGA is the plain step of the previous test."""
    X = np.array([[[1.0, 2.0]], [[3.0, -1.0]]])
    Y = np.array([0, 1])
    path = write_npz(tmp_path / "two.npz", X, Y, X, Y)
    cfg = base_config(tmp_path, source="npz", root=str(path), model={"name": "logreg"},
                      algorithm={"name": "fedga", "lr": 0.1, "beta": 1.0, "local_steps": 1,
                                 "local_batch_size": "full"},
                      partition={"scheme": "shards", "num_clients": 2},
                      train={"rounds": 1, "clients_per_round": 2, "precision": "float64"})
    t = Trainer(cfg)
    t.run_round(1)
    # client 0 at W0 = -v_0: logits (W0 x0 + b0) = (-1.5 - 0.5, 1.5 + 0.5) = (-2, 2)
    W0, b0 = -np.array([[1.0, 0.25], [-1.0, -0.25]]), -np.array([0.5, -0.5])
    W1, b1 = -W0, -b0  # v_1 = -v_0 (equal weights)
    def grad(Wc, bc, x, y):
        p = _softmax((Wc @ x + bc)[None])[0]
        p[y] -= 1
        return np.outer(p, x), p
    gw0, gb0 = grad(W0, b0, X[0, 0], 0)
    gw1, gb1 = grad(W1, b1, X[1, 0], 1)
    W = ((W0 - 0.1 * gw0) + (W1 - 0.1 * gw1)) / 2
    b = ((b0 - 0.1 * gb0) + (b1 - 0.1 * gb1)) / 2
    flat = np.concatenate([W.ravel(), b])
    np.testing.assert_allclose(t.x.numpy(), flat, atol=1e-14)
    assert np.abs(flat - np.array([-0.05, 0.075, 0.05, -0.075, 0, 0])).max() > 1e-3, "beta had no effect"


def _final(tmp_path, sub, **kw):
    cfg = base_config(tmp_path / sub, **kw)
    t = Trainer(cfg)
    t.fit()
    return t.x, run_dir_rows(cfg.run_dir)


FED = dict(partition={"scheme": "shards", "num_clients": 6}, train={"rounds": 3, "clients_per_round": 4},
           model={"name": "mlp", "hidden": [16]})


def test_fedga_beta0_equals_fedavg(tmp_path):
    a = {"lr": 0.1, "local_steps": 4, "local_batch_size": 8, "weight_decay": 1e-3}
    x_ga, _ = _final(tmp_path, "ga", algorithm={"name": "fedga", "beta": 0.0, **a}, **FED)
    x_avg, _ = _final(tmp_path, "avg", algorithm={"name": "fedavg", **a}, **FED)
    assert torch.equal(x_ga, x_avg)


def test_fedga_k1_equals_gradalign(tmp_path):
    """Bit-exact with parameter averaging (comm flat); with the gradient form (bucketed) equal up
    to the rounding of sum_i w_i v_i = 0."""
    a = {"lr": 0.1, "local_steps": 1, "local_batch_size": "full", "full_grad_batch": "full", "beta": 0.2}
    flat = {**FED, "train": {**FED["train"], "comm": "flat"}}
    x_ga, _ = _final(tmp_path, "fedga", algorithm={"name": "fedga", **a}, **flat)
    x_gr, _ = _final(tmp_path, "gradalign", algorithm={"name": "gradalign", **a}, **flat)
    assert torch.equal(x_ga, x_gr)
    x_bucketed, _ = _final(tmp_path, "gradalign-bucketed", algorithm={"name": "gradalign", **a}, **FED)
    torch.testing.assert_close(x_bucketed, x_gr, rtol=1e-5, atol=1e-6)
    x_avg, _ = _final(tmp_path, "fedavg", algorithm={"name": "fedavg", **{**a, "beta": 0.0}}, **FED)
    assert not torch.allclose(x_gr, x_avg), "beta must change the result"


def test_scaffold_k1_full_equals_lbsgd(tmp_path):
    a = {"lr": 0.1, "local_steps": 1, "local_batch_size": "full", "full_grad_batch": "full", "weight_decay": 1e-3}
    x_sc, _ = _final(tmp_path, "scaffold", algorithm={"name": "scaffold", **a}, **FED)
    x_lb, _ = _final(tmp_path, "lbsgd", algorithm={"name": "lbsgd", **a}, **FED)
    torch.testing.assert_close(x_sc, x_lb, rtol=1e-5, atol=1e-6)


def test_gradalign_uses_the_local_minibatch_for_g_i(tmp_path):
    """Algorithm 1: g_i and the displaced gradient share the minibatch, so the samples counted
    per client are 2 x batch, and beta > 0 with minibatches differs from lbsgd."""
    a = {"lr": 0.1, "local_steps": 1, "local_batch_size": 8, "beta": 0.5}
    x_ga, rows = _final(tmp_path, "ga", algorithm={"name": "gradalign", **a}, **FED)
    x_lb, rows_lb = _final(tmp_path, "lb", algorithm={"name": "lbsgd", **a}, **FED)
    assert rows[0]["samples"] == 4 * 2 * 8 and rows_lb[0]["samples"] == 4 * 8
    assert not torch.allclose(x_ga, x_lb)
    x_b0, _ = _final(tmp_path, "ga0", algorithm={"name": "gradalign", **{**a, "beta": 0.0}}, **FED)
    torch.testing.assert_close(x_b0, x_lb, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", ["fedga", "gradalign"])
def test_previous_global_grad_approaches_fresh_as_steps_shrink(tmp_path, name):
    """d (the previous round's direction) stands in for g: the gap between the two runs,
    relative to how far x moved, shrinks as alpha and beta halve, at a rate that tends to linear
    (each halving at most 0.75x, the last at most 0.6x; exactly linear would be 0.5x)."""
    path, X, Y = _tiny(tmp_path)
    gaps = []
    for scale in (1.0, 0.5, 0.25, 0.125):
        finals = {}
        for mode in ("fresh", "previous"):
            algo = {"name": name, "lr": 0.4 * scale, "beta": 0.3 * scale, "local_batch_size": "full",
                    "local_steps": 3 if name == "fedga" else 1, "global_grad": mode}
            cfg = base_config(tmp_path / f"{scale}-{mode}", source="npz", root=str(path), model={"name": "logreg"},
                              algorithm=algo, partition={"scheme": "dirichlet", "num_clients": 4, "alpha": 0.3},
                              train={"rounds": 6, "clients_per_round": 4, "precision": "float64"})
            t = Trainer(cfg)
            x0 = t.x.clone()
            t.fit()
            finals[mode] = t.x
        gaps.append(float((finals["previous"] - finals["fresh"]).norm() / (finals["fresh"] - x0).norm()))
    assert gaps[0] > 1e-4, gaps  # the two differ at the largest steps
    ratios = [b / a for a, b in zip(gaps, gaps[1:])]
    assert all(r < 0.75 for r in ratios) and ratios[-1] < 0.6, (gaps, ratios)


def test_client_rows_are_written_in_place_in_blocks():
    from dist_gradalign.algorithms.base import ClientRows
    rows = ClientRows(block=2)
    assert rows.get(5) is None and len(rows) == 0
    for cid in (7, 3, 9):
        rows.set(cid, torch.full((4,), float(cid)))
    assert len(rows.blocks) == 2 and len(rows) == 3
    first = rows.get(7)
    rows.set(7, torch.full((4,), -1.0))  # in place: the same memory
    assert rows.get(7).data_ptr() == first.data_ptr() and rows.get(7).tolist() == [-1.0] * 4
    assert [c for c, _ in rows.items()] == [3, 7, 9] and rows.get(9).tolist() == [9.0] * 4
