"""Models as DESIGN.md section 3 fixes them, and the flat parameter/gradient vectors."""
import pytest
import torch
import torch.nn.functional as F

from dist_gradalign.config import ConfigError, ModelConfig
from dist_gradalign.models import FlatModel, build_model, evaluate_sums, loss_and_grad, num_parameters


def _count(*layers):
    return sum(a * b + b for a, b in layers)


@pytest.mark.parametrize("name,shape,classes,expected", [
    # Conv(1->32,k5) + Conv(32->64,k5) + Linear(1024->47)
    ("cnn_emnist", (1, 28, 28), 47, _count((25, 32), (32 * 25, 64), (1024, 47))),
    # Conv(3->6,k5) + Conv(6->16,k5) + 400->120->84->10
    ("cnn_cifar", (3, 32, 32), 10, _count((75, 6), (150, 16), (400, 120), (120, 84), (84, 10))),
    ("mlp", (1, 8, 8), 10, _count((64, 200), (200, 200), (200, 10))),
    ("logreg", (3, 4, 4), 5, _count((48, 5))),
    ("mlp", (64,), 10, _count((64, 200), (200, 200), (200, 10))),  # feature vectors (D,)
    ("logreg", (12,), 5, _count((12, 5))),
])
def test_architectures(name, shape, classes, expected):
    torch.manual_seed(0)
    m = build_model(ModelConfig(name=name), shape, classes)
    assert num_parameters(m) == expected
    assert m(torch.randn(3, *shape)).shape == (3, classes)


@pytest.mark.parametrize("name", ["cnn_emnist", "cnn_cifar", "resnet18"])
def test_convolutional_models_refuse_feature_vectors(name):
    with pytest.raises(ConfigError, match=rf"model.name = '{name}' needs images \(N, C, H, W\), but the data are "
                                          r"feature vectors \(N, 784\): use model.name = 'mlp' or 'logreg'"):
        build_model(ModelConfig(name=name), (784,), 10)


def test_cnn_emnist_layers_exactly():
    m = build_model(ModelConfig(name="cnn_emnist"), (1, 28, 28), 47)
    assert (m.conv1.in_channels, m.conv1.out_channels, m.conv1.kernel_size) == (1, 32, (5, 5))
    assert (m.conv2.in_channels, m.conv2.out_channels, m.conv2.kernel_size) == (32, 64, (5, 5))
    assert (m.fc.in_features, m.fc.out_features) == (1024, 47)


def test_resnet18_cifar_variant_without_buffers():
    m = build_model(ModelConfig(name="resnet18"), (3, 32, 32), 10)
    assert m.stem[0].kernel_size == (3, 3) and m.stem[0].stride == (1, 1)  # CIFAR stem, no max-pool
    assert not list(m.buffers()), "no batch-norm running statistics"
    assert 11_000_000 < num_parameters(m) < 11_300_000
    assert m(torch.randn(2, 3, 32, 32)).shape == (2, 10)


def test_logreg_zero_init():
    m = build_model(ModelConfig(name="logreg"), (1, 2, 2), 3)
    assert all(torch.count_nonzero(p) == 0 for p in m.parameters())


def test_seeded_init_is_reproducible():
    torch.manual_seed(5)
    a = FlatModel(build_model(ModelConfig(name="cnn_cifar"), (3, 32, 32), 10)).params
    torch.manual_seed(5)
    b = FlatModel(build_model(ModelConfig(name="cnn_cifar"), (3, 32, 32), 10)).params
    assert torch.equal(a, b)


def test_flat_model_views_and_gradients():
    torch.manual_seed(0)
    fm = FlatModel(build_model(ModelConfig(name="mlp", hidden=[7]), (1, 3, 3), 4))
    x, y = torch.randn(10, 1, 3, 3), torch.randint(0, 4, (10,))
    with torch.no_grad():
        fm.params.mul_(2.0)  # writing the flat vector moves the module's parameters
    assert torch.equal(fm.module.layers[0].weight.flatten(), fm.params[:63])
    loss = loss_and_grad(fm, x, y)
    ref_loss = F.cross_entropy(fm.module(x), y)
    ref = torch.autograd.grad(ref_loss, list(fm.module.parameters()))
    torch.testing.assert_close(loss, ref_loss.detach())
    torch.testing.assert_close(fm.grads, torch.cat([g.flatten() for g in ref]))
    # gradients are overwritten, not accumulated, and micro-batching gives the same gradient
    full = fm.grads.clone()
    loss_mb = loss_and_grad(fm, x, y, micro_batch=3)
    torch.testing.assert_close(loss_mb, loss)
    torch.testing.assert_close(fm.grads, full)
    # accumulated into the .grad views (firing the bucketed all-reduce's hooks): the same again
    fm.grads.fill_(7.0)
    torch.testing.assert_close(loss_and_grad(fm, x, y, hooks=True), loss)
    torch.testing.assert_close(fm.grads, full)


def test_evaluate_sums():
    fm = FlatModel(build_model(ModelConfig(name="logreg"), (1, 1, 2), 2))
    with torch.no_grad():
        fm.params.copy_(torch.tensor([1.0, 0.0, -1.0, 0.0, 0.0, 0.0]))  # class 0 iff x[0] > 0
    x = torch.tensor([[1.0, 0.0], [-1.0, 0.0], [2.0, 0.0]]).view(3, 1, 1, 2)
    y = torch.tensor([0, 1, 1])
    correct, loss, count = evaluate_sums(fm, [(x[:2], y[:2]), (x[2:], y[2:])]).tolist()
    assert (correct, count) == (2, 3)
    expected = F.cross_entropy(fm.module(x), y, reduction="sum").item()
    assert loss == pytest.approx(expected, rel=1e-6)


def test_float_buffers_are_views_into_one_vector_and_integer_buffers_are_listed():
    module = torch.nn.Sequential(torch.nn.Linear(2, 3), torch.nn.BatchNorm1d(3))
    fm = FlatModel(module)
    bn = module[1]
    assert fm.buffers.numel() == 6  # running_mean and running_var, 3 each
    assert [t is bn.num_batches_tracked for t in fm.int_buffers] == [True]
    fm.buffers.fill_(0.5)  # the module reads the flat vector
    assert torch.equal(bn.running_mean, torch.full((3,), 0.5)) and torch.equal(bn.running_var, torch.full((3,), 0.5))
    module(torch.randn(4, 2))  # a train-mode forward pass updates the statistics in place, in the vector
    assert not torch.equal(fm.buffers[:3], torch.full((3,), 0.5)) and int(bn.num_batches_tracked) == 1
