"""The paper's models (DESIGN.md section 3) and two simple baselines.

No model has buffers (no batch norm: the paper uses none, and federated averaging of running
statistics is ill-defined), so a model's whole state is its parameter vector.
"""
from __future__ import annotations

from typing import Iterable

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.func import functional_call, grad_and_value

from .config import ConfigError, ModelConfig


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


def build_model(cfg: ModelConfig, input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    """Build the configured model for inputs of shape (C, H, W), or (D,) for the
    :data:`FEATURE_MODELS`. Initialization uses torch's global RNG: seed it first (the engine
    does) so every rank starts from the same x."""
    if len(input_shape) == 1:
        if cfg.name not in FEATURE_MODELS:
            raise ConfigError(f"model.name = {cfg.name!r} needs images (N, C, H, W), but the data are feature "
                              f"vectors (N, {input_shape[0]}): use model.name = "
                              + " or ".join(repr(m) for m in FEATURE_MODELS))
        input_shape = (1, 1, input_shape[0])
    c, h, w = input_shape
    if cfg.name in ("cnn_emnist", "cnn_cifar"):
        if h != w or h < 16:
            raise ValueError(f"model.name = {cfg.name!r} needs square images of side >= 16, got {h}x{w}")
        cls = CNNEmnist if cfg.name == "cnn_emnist" else CNNCifar
        return cls(c, h, num_classes)
    if cfg.name == "resnet18":
        return ResNet18(c, num_classes)
    if cfg.name == "mlp":
        return MLP(c * h * w, list(cfg.hidden), num_classes, cfg.activation)
    if cfg.name == "logreg":
        return LogReg(c * h * w, num_classes)
    raise ValueError(f"unknown model {cfg.name!r}")


def num_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _check_no_buffers(model: nn.Module) -> None:
    if any(True for _ in model.buffers()):
        raise ValueError("models with buffers (e.g. batch norm) are not supported")


class FlatModel:
    """A model whose parameters are views into one flat vector ``params``, and whose
    gradients are views into one flat vector ``grads``.

    Algorithms then work on plain vectors (x, g_i, displacements) with no per-tensor loops,
    and every communication is one all-reduce of one flat buffer.
    """

    def __init__(self, module: nn.Module, autocast: bool = False, compile: bool = False):
        _check_no_buffers(module)
        self.module = module
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
        assert offset == n, "shared parameters are not supported"
        self.numel = n
        self._names = [name for name, _ in module.named_parameters()]
        self._shapes = [p.shape for p in module.parameters()]
        self._sizes = [p.numel() for p in module.parameters()]
        # train.compile: (flat params, x, y) -> (flat gradient, loss) as one torch.compile graph
        self.compiled = torch.compile(grad_and_value(self.functional_loss)) if compile else None

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


def forward_loss(fm: FlatModel, x: torch.Tensor, y: torch.Tensor, reduction: str = "mean",
                 forward=None) -> torch.Tensor:
    """Cross-entropy of ``forward(x)`` (default: the module) under the model's autocast setting,
    computed in the parameters' precision."""
    with autocast(fm):
        logits = (forward or fm.module)(x)
    return F.cross_entropy(logits.float() if fm.autocast else logits, y, reduction=reduction)


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b) if b else a


def num_chunks(n: int, micro_batch: int | None) -> int:
    """Micro-batches (backward passes) that :func:`loss_and_grad` uses for a batch of ``n``."""
    return 1 if not micro_batch else max(1, _ceil_div(n, micro_batch))


def loss_and_grad(fm: FlatModel, x: torch.Tensor, y: torch.Tensor, micro_batch: int | None = None,
                  hooks: bool = False) -> torch.Tensor:
    """Mean cross-entropy of the batch at the current ``fm.params``; its gradient is left in
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
    """[correct, summed loss, count] of the model at ``fm.params`` over the (x, y) ``batches``, in float64."""
    out = torch.zeros(3, dtype=torch.float64, device=fm.params.device)
    for xb, yb in batches:
        with autocast(fm):
            logits = fm.module(xb).float() if fm.autocast else fm.module(xb)
        out[0] += (logits.argmax(1) == yb).sum()
        out[1] += F.cross_entropy(logits, yb, reduction="sum").double()
        out[2] += yb.numel()
    return out


__all__ = ["build_model", "FlatModel", "loss_and_grad", "evaluate_sums", "num_parameters"]
