"""The paper's models (DESIGN.md section 3), two simple baselines, and the flat view of any model.

The built-in models have no buffers (the paper uses no batch norm); a user's model may
(:class:`FlatModel`, and DESIGN.md section 5 for what the round does with them).
"""
from __future__ import annotations

import math
from typing import Iterable

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.func import functional_call, grad_and_value

from .config import ConfigError, ModelConfig
from .losses import CrossEntropy


class CNNEmnist(nn.Module):
    """Conv(1->32, k5) ReLU MaxPool2, Conv(32->64, k5) ReLU MaxPool2, Linear(1024->classes)."""

    def __init__(self, in_channels: int, image_size: int, num_classes: int):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 32, 5)
        self.conv2 = nn.Conv2d(32, 64, 5)
        side = ((image_size - 4) // 2 - 4) // 2
        self.fc = nn.Linear(64 * side * side, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        return self.fc(x.flatten(1))


class CNNCifar(nn.Module):
    """Conv(3->6, k5) ReLU MaxPool2, Conv(6->16, k5) ReLU MaxPool2, 400->120->84->classes."""

    def __init__(self, in_channels: int, image_size: int, num_classes: int):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 6, 5)
        self.conv2 = nn.Conv2d(6, 16, 5)
        side = ((image_size - 4) // 2 - 4) // 2
        self.fc1 = nn.Linear(16 * side * side, 120)
        self.fc2 = nn.Linear(120, 84)
        self.fc3 = nn.Linear(84, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        x = F.relu(self.fc1(x.flatten(1)))
        return self.fc3(F.relu(self.fc2(x)))


class MLP(nn.Module):
    """Flatten, then Linear + activation per hidden width, then Linear to the classes."""

    def __init__(self, in_features: int, hidden: list[int], num_classes: int, activation: str = "relu"):
        super().__init__()
        self.act = torch.tanh if activation == "tanh" else F.relu
        widths = [in_features, *hidden]
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(widths, widths[1:]))
        self.out = nn.Linear(widths[-1], num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.flatten(1)
        for layer in self.layers:
            x = self.act(layer(x))
        return self.out(x)


class LogReg(nn.Module):
    """Multinomial logistic regression: one linear layer on the flattened input, zero init."""

    def __init__(self, in_features: int, num_classes: int):
        super().__init__()
        self.linear = nn.Linear(in_features, num_classes)
        nn.init.zeros_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x.flatten(1))


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.norm1 = nn.GroupNorm(2, cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.norm2 = nn.GroupNorm(2, cout)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.GroupNorm(2, cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.norm1(self.conv1(x)))
        out = self.norm2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class ResNet18(nn.Module):
    """ResNet-18, CIFAR variant (3x3 stem, no max-pool), GroupNorm(2 groups) instead of batch norm
    so that the model has no running statistics to average across clients."""

    def __init__(self, in_channels: int, num_classes: int):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(in_channels, 64, 3, 1, 1, bias=False), nn.GroupNorm(2, 64), nn.ReLU())
        blocks, cin = [], 64
        for cout, stride in [(64, 1), (128, 2), (256, 2), (512, 2)]:
            blocks += [BasicBlock(cin, cout, stride), BasicBlock(cout, cout, 1)]
            cin = cout
        self.blocks = nn.Sequential(*blocks)
        self.fc = nn.Linear(512, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.blocks(self.stem(x))
        return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))


#: The models that take feature vectors (D,) as well as images (C, H, W).
FEATURE_MODELS = ("mlp", "logreg")


def _image_shape(name: str, input_shape: tuple[int, ...]) -> tuple[int, int, int]:
    if len(input_shape) != 3:
        data = (f"the data are feature vectors (N, {input_shape[0]})" if len(input_shape) == 1
                else f"one input has shape {tuple(input_shape)}")
        raise ConfigError(f"model.name = {name!r} needs images (N, C, H, W), but {data}: use model.name = "
                          + " or ".join(repr(m) for m in FEATURE_MODELS))
    return input_shape


def _features(input_shape: tuple[int, ...]) -> int:
    return int(math.prod(input_shape))


# The built-in factories (dist_gradalign.components.BUILTINS names them): (input_shape, num_classes).
def cnn_emnist(input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    c, h, w = _image_shape("cnn_emnist", input_shape)
    if h != w or h < 16:
        raise ConfigError(f"model.name = 'cnn_emnist' needs square images of side >= 16, got {h}x{w}")
    return CNNEmnist(c, h, num_classes)


def cnn_cifar(input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    c, h, w = _image_shape("cnn_cifar", input_shape)
    if h != w or h < 16:
        raise ConfigError(f"model.name = 'cnn_cifar' needs square images of side >= 16, got {h}x{w}")
    return CNNCifar(c, h, num_classes)


def resnet18(input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    return ResNet18(_image_shape("resnet18", input_shape)[0], num_classes)


def mlp(input_shape: tuple[int, ...], num_classes: int, hidden=(200, 200), activation: str = "relu") -> nn.Module:
    return MLP(_features(input_shape), list(hidden), num_classes, activation)


def logreg(input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    return LogReg(_features(input_shape), num_classes)


def build_model(cfg: ModelConfig, input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    """The built-in model ``cfg.name`` for inputs of ``input_shape``: (C, H, W), or (D,) for the
    :data:`FEATURE_MODELS`. Initialization uses torch's global RNG: seed it first (the engine
    does) so every rank starts from the same x."""
    factory = {f.__name__: f for f in (cnn_emnist, cnn_cifar, resnet18, mlp, logreg)}.get(cfg.name)
    if factory is None:
        raise ValueError(f"unknown built-in model {cfg.name!r}")
    if cfg.name == "mlp":
        return mlp(input_shape, num_classes, cfg.hidden, cfg.activation)
    return factory(input_shape, num_classes)


def num_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


class FlatModel:
    """A model whose parameters are views into one flat vector ``params``, whose gradients are
    views into one flat vector ``grads``, and whose floating-point buffers (batch-norm running
    statistics) are views into one flat vector ``buffers``; integer buffers
    (``num_batches_tracked``) are listed in ``int_buffers``.

    Algorithms then work on plain vectors (x, g_i, displacements) with no per-tensor loops,
    and every communication is one all-reduce of one flat buffer. ``loss`` maps
    (output, target) to per-sample losses (:mod:`dist_gradalign.losses`).
    """

    def __init__(self, module: nn.Module, autocast: bool = False, compile: bool = False, loss=None):
        self.module = module
        self.loss = loss or CrossEntropy()
        self.autocast = autocast  # forward/backward under bfloat16 autocast (train.precision: bf16)
        ref = next(module.parameters())
        n = num_parameters(module)
        self.params = torch.empty(n, dtype=ref.dtype, device=ref.device)
        self.grads = torch.zeros(n, dtype=ref.dtype, device=ref.device)
        offset, self.param_list = 0, []  # param_list: the parameters in flat order
        for mod in list(module.modules()):
            for name, p in list(mod.named_parameters(recurse=False)):
                k = p.numel()
                self.params[offset:offset + k].copy_(p.detach().flatten())
                newp = nn.Parameter(self.params[offset:offset + k].view_as(p))
                newp.grad = self.grads[offset:offset + k].view_as(p)
                setattr(mod, name, newp)
                self.param_list.append(newp)
                offset += k
        if offset != n:
            raise ValueError("shared (tied) parameters are not supported")
        self.numel = n
        floats = [(mod, name, b) for mod in module.modules() for name, b in mod.named_buffers(recurse=False)
                  if b is not None and b.dtype.is_floating_point]
        self.buffers = torch.empty(sum(b.numel() for _, _, b in floats), dtype=ref.dtype, device=ref.device)
        offset = 0
        for mod, name, b in floats:  # the module's float buffers become views into `buffers`
            k = b.numel()
            self.buffers[offset:offset + k].copy_(b.detach().flatten())
            mod._buffers[name] = self.buffers[offset:offset + k].view_as(b)
            offset += k
        self.int_buffers = [b for b in module.buffers() if not b.dtype.is_floating_point]
        self._names = [name for name, _ in module.named_parameters()]
        self._shapes = [p.shape for p in module.parameters()]
        self._sizes = [p.numel() for p in module.parameters()]
        # train.compile: (flat params, x, y) -> (flat gradient, loss) as one torch.compile graph
        self.compiled = torch.compile(grad_and_value(self.functional_loss)) if compile else None

    @property
    def has_buffers(self) -> bool:
        return self.buffers.numel() > 0 or bool(self.int_buffers)

    def functional_loss(self, flat: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """The mean loss of the module with parameters read from ``flat`` (not ``params``): the
        pure function that ``torch.func`` transforms (vmap over clients, compile)."""
        tensors = {name: t.view(shape) for name, t, shape in zip(self._names, flat.split(self._sizes), self._shapes)}
        return forward_loss(self, x, y, forward=lambda inputs: functional_call(self.module, tensors, (inputs,)))

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().clone().cpu() for k, v in self.module.state_dict().items()}


def autocast(fm: FlatModel) -> torch.autocast:
    """bfloat16 autocast for the model's forward pass when ``fm.autocast`` (else a no-op)."""
    return torch.autocast(fm.params.device.type, dtype=torch.bfloat16, enabled=fm.autocast)


def _output(fm: FlatModel, x: torch.Tensor, forward=None) -> torch.Tensor:
    """``forward(x)`` (default: the module) under the model's autocast setting, returned in the
    parameters' precision."""
    with autocast(fm):
        out = (forward or fm.module)(x)
    return out.float() if fm.autocast and out.dtype == torch.bfloat16 else out


def forward_loss(fm: FlatModel, x: torch.Tensor, y: torch.Tensor, reduction: str = "mean",
                 forward=None) -> torch.Tensor:
    """The loss of ``forward(x)`` (default: the module): the mean (or the sum) of the per-sample losses."""
    return reduce_loss(fm.loss, _output(fm, x, forward), y, reduction)


def reduce_loss(loss, output: torch.Tensor, target: torch.Tensor, reduction: str) -> torch.Tensor:
    """The mean or the sum of ``loss``'s per-sample losses (its ``reduce`` where it has one)."""
    if hasattr(loss, "reduce"):
        return loss.reduce(output, target, reduction)
    losses = loss(output, target)
    return losses.sum() if reduction == "sum" else losses.mean()


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b) if b else a


def num_chunks(n: int, micro_batch: int | None) -> int:
    """Micro-batches (backward passes) that :func:`loss_and_grad` uses for a batch of ``n``."""
    return 1 if not micro_batch else max(1, _ceil_div(n, micro_batch))


def loss_and_grad(fm: FlatModel, x: torch.Tensor, y: torch.Tensor, micro_batch: int | None = None,
                  hooks: bool = False) -> torch.Tensor:
    """Mean loss of the batch at the current ``fm.params``; its gradient is left in
    ``fm.grads`` (overwritten, not accumulated). Large batches are split into micro-batches of
    at most ``micro_batch`` samples whose gradients add up to the full-batch gradient.
    ``hooks``: accumulate into the parameters' ``.grad`` views so that their post-accumulate
    hooks fire (the bucketed all-reduce); otherwise one batch costs one ``autograd.grad`` and
    one concatenation into ``fm.grads``, the fewest operators.
    Returns the loss as a 0-dim tensor (no host sync)."""
    n = x.shape[0]
    chunks = num_chunks(n, micro_batch)
    if chunks == 1 and not hooks and fm.compiled is not None:
        grads, loss = fm.compiled(fm.params, x, y)
        fm.grads.copy_(grads)
        return loss.detach()
    if chunks == 1 and not hooks:
        loss = forward_loss(fm, x, y)
        grads = torch.autograd.grad(loss, fm.param_list)
        torch.cat([g.reshape(-1) for g in grads], out=fm.grads)
        return loss.detach()
    fm.grads.zero_()
    total = torch.zeros((), dtype=fm.params.dtype, device=fm.params.device)
    for xb, yb in zip(x.chunk(chunks), y.chunk(chunks)):
        loss = forward_loss(fm, xb, yb, reduction="sum") / n
        loss.backward()
        total += loss.detach()
    return total


@torch.no_grad()
def evaluate_sums(fm: FlatModel, batches: Iterable[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    """[correct, summed loss, count] of the model at ``fm.params`` over the (x, y) ``batches``, in
    float64, in eval mode (batch norm with its running statistics). ``correct`` sums the loss's
    ``correct`` (0 when it has none)."""
    out = torch.zeros(3, dtype=torch.float64, device=fm.params.device)
    correct = getattr(fm.loss, "correct", None)
    fm.module.eval()
    try:
        for xb, yb in batches:
            output = _output(fm, xb)
            if correct is not None:
                out[0] += correct(output, yb).sum().double()
            out[1] += reduce_loss(fm.loss, output, yb, "sum").double()
            out[2] += len(yb)
    finally:
        fm.module.train()
    return out


__all__ = ["build_model", "FlatModel", "loss_and_grad", "evaluate_sums", "num_parameters"]
