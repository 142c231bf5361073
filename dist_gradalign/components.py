"""Where a run's parts come from, and where a user's parts are checked: one place.

A config names each part by a built-in name or by an import path ``"package.module:attribute"``
of the user's own code; the built-in names are import paths too (:data:`BUILTINS`), so both go
through :func:`load`. :func:`dist_gradalign.fit` also takes the parts as Python objects (or
factories); :func:`build` turns either into a :class:`Parts`. Every failure here (a module that
does not import, a missing attribute, a factory that raises, an object of the wrong kind, a
first batch the model or the loss cannot take) is a :class:`~dist_gradalign.config.ConfigError`
naming the key: the CLI prints it as one ``config error:`` line and exits 2, before training.

The parts and what they must be:

- ``model.name``: a factory returning a :class:`torch.nn.Module`, called with ``model.kwargs``
  and, where its signature has them, ``input_shape`` (one input's shape) and ``num_classes``.
  Floating-point buffers (batch-norm statistics) are averaged like the parameters; integer
  buffers count local steps (DESIGN.md section 5, "Buffers"). Tied parameters are refused.
- ``data.source``: a factory returning ``(train, test)``, each a map-style dataset
  (``__len__``, ``__getitem__(i) -> (input, target)``), called with ``data.kwargs`` and, where
  its signature has them, ``root`` and ``download``.
- ``model.loss``: a function ``(output, target) -> per-sample losses (B,)``, or a class whose
  instances are one (instantiated without arguments); a ``correct(output, target) -> (B,)``
  method, if it has one, gives the accuracy.
- ``algorithm.name``: a subclass of :class:`~dist_gradalign.algorithms.Algorithm`, called with
  the ``algorithm`` config and ``algorithm.kwargs``.
"""
from __future__ import annotations

import difflib
import importlib
import inspect
import os
import sys
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch
import torch.nn as nn

from .config import Config, ConfigError, is_import_path

#: Built-in names and the import paths they stand for.
BUILTINS: dict[str, dict[str, str]] = {
    "model.name": {m: f"dist_gradalign.models:{m}" for m in ("cnn_emnist", "cnn_cifar", "resnet18", "mlp", "logreg")},
    "data.source": {s: f"dist_gradalign.data.sources:{s}" for s in
                    ("emnist", "cifar10", "cifar100", "mnist", "fashionmnist", "npz", "npy", "imagefolder", "digits")},
    "model.loss": {"cross_entropy": "dist_gradalign.losses:CrossEntropy"},
    "algorithm.name": {"lbsgd": "dist_gradalign.algorithms.lbsgd:LBSGD",
                       "fedavg": "dist_gradalign.algorithms.fedavg:FedAvg",
                       "fedprox": "dist_gradalign.algorithms.fedprox:FedProx",
                       "scaffold": "dist_gradalign.algorithms.scaffold:Scaffold",
                       "feddyn": "dist_gradalign.algorithms.feddyn:FedDyn",
                       "fedga": "dist_gradalign.algorithms.fedga:FedGA",
                       "gradalign": "dist_gradalign.algorithms.gradalign:GradAlign"},
}


def load(key: str, name: str) -> Any:
    """The object a config value names: a built-in, or ``package.module:attribute`` imported
    (the working directory first on the path, as ``python -m`` has it)."""
    table = BUILTINS[key]
    path = table.get(name, name)
    if not is_import_path(path):
        raise ConfigError(f"{key} = {name!r} is not allowed: choose one of {', '.join(table)}, or give an import "
                          "path 'package.module:attribute' of your own")
    module_name, _, attr = path.partition(":")
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        obj = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        if e.name and module_name.startswith(e.name):
            raise ConfigError(f"{key} = {name!r}: no module named {e.name!r} (looked in the working directory "
                              f"{os.getcwd()!r} and on sys.path); check the spelling, or install it") from None
        raise ConfigError(f"{key} = {name!r}: importing {module_name!r} failed: {e}") from None
    except Exception as e:  # the user's module raised while importing
        raise ConfigError(f"{key} = {name!r}: importing {module_name!r} raised {type(e).__name__}: {e}") from None
    for i, part in enumerate(attr.split(".")):
        if not hasattr(obj, part):
            where = module_name + "".join("." + p for p in attr.split(".")[:i])
            close = difflib.get_close_matches(part, [a for a in dir(obj) if not a.startswith("_")], n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ConfigError(f"{key} = {name!r}: {where!r} has no attribute {part!r}{hint}")
        obj = getattr(obj, part)
    return obj


def call(key: str, name: str, factory: Callable, kwargs: dict, offered: Optional[dict] = None,
         passthrough: tuple = ()) -> Any:
    """``factory(**kwargs)``, also passing each of ``offered`` that its signature names (and
    ``kwargs`` does not); anything it raises (but the ``passthrough`` types: a built-in source's
    DataError) becomes a ConfigError naming ``key``."""
    if not callable(factory):
        raise ConfigError(f"{key} = {name!r} is a {type(factory).__name__}, not a function or class to call")
    args = dict(kwargs)
    try:
        params = inspect.signature(factory).parameters
    except (TypeError, ValueError):
        params = {}
    for k, v in (offered or {}).items():
        if k in params and k not in args:
            args[k] = v
    try:
        return factory(**args)
    except (ConfigError, *passthrough):
        raise
    except Exception as e:
        shown = ", ".join(f"{k}={v!r}" for k, v in args.items() if k not in ("root", "download"))
        raise ConfigError(f"{key} = {name!r}: calling it with ({shown}) raised {type(e).__name__}: {e}") from None


def describe(obj: Any) -> str:
    """How ``components.json`` names a part given as an object: ``module:qualname`` of the
    function or class (of an instance: its class); a pair, both."""
    if isinstance(obj, (tuple, list)):
        return "(" + ", ".join(describe(o) for o in obj) + ")"
    target = obj if inspect.isclass(obj) or inspect.isfunction(obj) else type(obj)
    return f"{getattr(target, '__module__', '?')}:{getattr(target, '__qualname__', repr(target))}"


@dataclass
class Parts:
    """A run's parts, built: the data source (train and test splits), the model, the loss and
    the algorithm; ``record`` says where each came from (``components.json``)."""

    source: Any
    module: nn.Module
    loss: Callable
    algorithm: Any
    record: dict


def build_loss(cfg: Config, loss: Any = None) -> tuple[Callable, str]:
    """The loss given to ``fit``, or the one ``model.loss`` names (a class is instantiated)."""
    key, name = "model.loss", cfg.model.loss
    obj, where = (loss, describe(loss)) if loss is not None else (load(key, name), name)
    if inspect.isclass(obj):
        obj = call(key, where, obj, {})
    if not callable(obj):
        raise ConfigError(f"{key} = {where!r} is a {type(obj).__name__}: expected a function (output, target) -> "
                          "per-sample losses, or a class of such")
    return obj, where


def build_algorithm(cfg: Config, algorithm: Any = None) -> tuple[Any, str]:
    """The algorithm given to ``fit`` (an instance, or a class called with the config), or the
    class ``algorithm.name`` names, called with the ``algorithm`` config and ``algorithm.kwargs``."""
    from .algorithms import Algorithm

    key, name = "algorithm.name", cfg.algorithm.name
    if isinstance(algorithm, Algorithm):
        return algorithm, describe(algorithm)
    cls, where = (algorithm, describe(algorithm)) if algorithm is not None else (load(key, name), name)
    if not (inspect.isclass(cls) and issubclass(cls, Algorithm)):
        raise ConfigError(f"{key} = {where!r} is not a subclass of dist_gradalign.algorithms.Algorithm (got "
                          f"{cls!r}); subclass it (docs/extending.md)")
    obj = call(key, where, lambda **kw: cls(cfg.algorithm, **kw), cfg.algorithm.kwargs)
    return obj, where


def build_model(cfg: Config, input_shape: tuple, num_classes: Optional[int], model: Any = None) -> tuple[nn.Module, str]:
    """The model given to ``fit`` (a module, or a factory), or the factory ``model.name`` names,
    called with ``model.kwargs`` (and ``input_shape`` / ``num_classes`` where it takes them).
    Initialization uses torch's global RNG: the trainer seeds it, and rank 0's x is broadcast."""
    key, name = "model.name", cfg.model.name
    if isinstance(model, nn.Module):
        return check_module(model, describe(model)), describe(model)
    factory, where = (model, describe(model)) if model is not None else (load(key, name), name)
    kwargs = dict(cfg.model.kwargs)
    if name == "mlp" and model is None:
        kwargs.update(hidden=list(cfg.model.hidden), activation=cfg.model.activation)
    offered = {"input_shape": tuple(input_shape), "num_classes": num_classes}
    module = call(key, where, factory, kwargs, offered)
    return check_module(module, where), where


def check_module(module: Any, where: str) -> nn.Module:
    """A module the trainer can take: floating-point parameters, none tied to another."""
    key = "model.name"
    if not isinstance(module, nn.Module):
        raise ConfigError(f"{key} = {where!r} returned a {type(module).__name__}, not a torch.nn.Module")
    seen: dict[int, str] = {}
    for mod_name, mod in module.named_modules(remove_duplicate=False):
        for p_name, p in mod.named_parameters(recurse=False):
            full = f"{mod_name}.{p_name}" if mod_name else p_name
            if id(p) in seen and seen[id(p)] != full:
                raise ConfigError(f"{key} = {where!r}: parameter {full!r} is the same tensor as {seen[id(p)]!r} "
                                  "(tied parameters are not supported: each client's update would be applied to "
                                  "the tie twice); untie them (e.g. a separate output layer)")
            seen.setdefault(id(p), full)
    params = list(module.parameters())
    if not params:
        raise ConfigError(f"{key} = {where!r}: the module has no parameters to train")
    bad = [n for n, p in module.named_parameters() if not p.dtype.is_floating_point]
    if bad:
        raise ConfigError(f"{key} = {where!r}: parameter(s) {', '.join(bad)} are not floating point")
    return module


def check_batch(module: nn.Module, loss: Callable, x: torch.Tensor, y: torch.Tensor, where: dict) -> None:
    """One forward pass and loss on two training samples (eval mode, no gradient): a model or a
    loss that cannot take the data fails here, before training, naming the part."""
    was_training = module.training
    module.eval()
    try:
        with torch.no_grad():
            try:
                out = module(x)
            except Exception as e:
                raise ConfigError(f"model.name = {where['model']!r}: its forward pass on a batch of training inputs "
                                  f"{tuple(x.shape)} ({x.dtype}) from data.source = {where['data']!r} raised "
                                  f"{type(e).__name__}: {e}") from None
            try:
                value = loss(out, y)
            except Exception as e:
                raise ConfigError(f"model.loss = {where['loss']!r}: on the model's output "
                                  f"{tuple(getattr(out, 'shape', ()))} and targets {tuple(y.shape)} ({y.dtype}) "
                                  f"it raised {type(e).__name__}: {e}") from None
        if not isinstance(value, torch.Tensor) or tuple(value.shape) != (x.shape[0],):
            shape = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
            raise ConfigError(f"model.loss = {where['loss']!r} returned {shape} for a batch of {x.shape[0]}: it must "
                              f"return one loss per sample, shape ({x.shape[0]},) (reduction='none')")
    finally:
        module.train(was_training)


def build(cfg: Config, source: Any, first: tuple[torch.Tensor, torch.Tensor], user: dict,
          device: torch.device, dtype: torch.dtype) -> Parts:
    """The model, the loss and the algorithm, built-in or the user's (``user``: objects given to
    ``fit``), checked together on two training samples (``first``). Seeds torch's global RNG
    with ``cfg.seed`` first, so that every rank builds the same initial model."""
    unknown = set(user) - {"model", "data", "loss", "algorithm"}
    if unknown:
        raise ConfigError(f"unknown part(s) {', '.join(sorted(unknown))}: fit takes model, data, loss, algorithm")
    torch.manual_seed(cfg.seed)
    module, model_from = build_model(cfg, source.train.input_shape, source.num_classes, user.get("model"))
    module = module.to(device, dtype)
    loss, loss_from = build_loss(cfg, user.get("loss"))
    algorithm, algo_from = build_algorithm(cfg, user.get("algorithm"))
    record = {"model": model_from, "data": source.name, "loss": loss_from, "algorithm": algo_from}
    check_batch(module, loss, *first, record)
    if cfg.train.compile and any(True for _ in module.buffers()):
        raise ConfigError("train.compile = true is not supported for a model with buffers (batch norm): its "
                          "running statistics change inside the compiled graph; set train.compile=false")
    return Parts(source, module, loss, algorithm, record)
