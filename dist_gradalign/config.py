"""Typed configuration: the only schema of a run.

A run is described by a YAML file plus dotted command-line overrides
(``algorithm.beta=0.05``), resolved into the dataclasses below. Every key is checked for
existence, type and range before any work starts; a bad value raises :class:`ConfigError`
with a message that names the key, the value and what is allowed.
"""
from __future__ import annotations

import dataclasses
import difflib
import math
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional, Union

import yaml

# The built-in names of the parts a config chooses; each key also takes a user's import path
# "package.module:attribute" (dist_gradalign.components resolves both the same way).
SOURCES = ("emnist", "cifar10", "cifar100", "mnist", "fashionmnist", "npz", "npy", "imagefolder", "digits")
STREAMING_SOURCES = ("imagefolder", "npy")  # built-in sources that data.storage = stream reads lazily
SCHEMES = ("iid", "shards", "percentage_iid", "dirichlet", "by_key")
MODELS = ("cnn_emnist", "cnn_cifar", "resnet18", "mlp", "logreg")
LOSSES = ("cross_entropy",)
ALGORITHMS = ("lbsgd", "fedavg", "fedprox", "scaffold", "feddyn", "fedga", "gradalign")
IMPORT_PATH = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_][\w.]*$")


def is_import_path(name: str) -> bool:
    """``package.module:attribute`` (a user's part), as opposed to a built-in name."""
    return bool(IMPORT_PATH.match(name))


class ConfigError(ValueError):
    """A config key is unknown, of the wrong type, out of range or inconsistent."""


def _opt(default: Any, **rules: Any) -> Any:
    """A field with validation rules: choices=, names= (a built-in name or an import path),
    ge= (>=), gt= (>), lt= (<), le= (<=)."""
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata=rules)
    return field(default=default, metadata=rules)


@dataclass
class DataConfig:
    # a built-in source, or "package.module:factory" returning (train, test) map-style datasets
    source: str = _opt("digits", names=SOURCES)
    kwargs: dict = _opt({})  # keyword arguments of a user's data factory
    root: str = "data"
    download: bool = False
    normalize: Optional[list] = None  # [mean, std]: numbers or per-channel lists
    augment: str = _opt("none", choices=("none", "crop_flip"))
    # stratified, seeded hold-out of the training set (before partitioning), evaluated as val_acc/val_loss
    val_fraction: float = _opt(0.0, ge=0.0, lt=1.0)
    # memory: decode everything onto the device once; stream: read each batch from disk when needed
    # (imagefolder, npy); auto: stream when the decoded data exceeds memory_budget_gb
    storage: str = _opt("auto", choices=("auto", "memory", "stream"))
    memory_budget_gb: Optional[float] = _opt(None, gt=0.0)  # per node; null: half of the available memory
    workers: int = _opt(2, ge=0)  # stream: DataLoader worker processes per rank (0: read in the training process)
    prefetch: int = _opt(4, ge=1)  # stream: batches read ahead per worker
    on_corrupt: str = _opt("error", choices=("error", "skip"))  # an undecodable image: stop (exit 2), or drop it


@dataclass
class PartitionConfig:
    scheme: str = _opt("iid", choices=SCHEMES)
    num_clients: int = _opt(10, ge=1)
    iid_fraction: float = _opt(0.0, ge=0.0, le=1.0)
    alpha: float = _opt(0.5, gt=0.0)
    shards_per_client: int = _opt(1, ge=1)
    min_size: int = _opt(1, ge=1)


@dataclass
class ModelConfig:
    name: str = _opt("mlp", names=MODELS)  # a built-in model, or "package.module:factory" of an nn.Module
    kwargs: dict = _opt({})  # keyword arguments of a user's model factory
    # per-sample loss (output, target) -> (B,): cross_entropy, or "package.module:function_or_class"
    loss: str = _opt("cross_entropy", names=LOSSES)
    hidden: list[int] = _opt([200, 200])  # mlp only
    activation: str = _opt("relu", choices=("relu", "tanh"))  # mlp only; tanh is smooth


@dataclass
class AlgorithmConfig:
    name: str = _opt("fedavg", names=ALGORITHMS)  # a built-in, or "package.module:Class" (an Algorithm)
    kwargs: dict = _opt({})  # keyword arguments of a user's algorithm class, after the config
    lr: float = _opt(0.05, gt=0.0)
    local_steps: int = _opt(1, ge=1)
    local_batch_size: Union[int, Literal["full"]] = _opt(64, ge=1)
    full_grad_batch: Union[int, Literal["full"]] = _opt("full", ge=1)
    beta: float = _opt(0.0, ge=0.0)
    mu: float = _opt(0.0, ge=0.0)
    feddyn_alpha: float = _opt(0.01, gt=0.0)  # feddyn: the dynamic regularizer's alpha (Acar et al. 2021)
    weight_decay: float = _opt(0.0, ge=0.0)
    server_lr: float = _opt(1.0, gt=0.0)
    server_momentum: float = _opt(0.0, ge=0.0, lt=1.0)  # sgd: heavy ball (FedAvgM); adaptive: beta_1
    # fedga, gradalign: g from this round's extra all-reduce (the paper), or the previous round's direction
    global_grad: str = _opt("fresh", choices=("fresh", "previous"))
    # the displacement y_0 = x - beta (g - g_i) on any rule: none | fresh | previous (g: the
    # previous round's direction); null: the algorithm's own (fedga, gradalign: fresh)
    displacement: Optional[str] = _opt(None, choices=("none", "fresh", "previous"))
    # scaffold: control variates recomputed each round (the paper's Theorem 5) or kept per client
    control: str = _opt("per_round", choices=("per_round", "stateful"))
    # learning-rate schedule by round (dist_gradalign/algorithms/schedule.py): a factor s(t) on lr,
    # linear warmup over warmup_rounds, then constant (the paper) | step | cosine
    lr_schedule: str = _opt("constant", choices=("constant", "step", "cosine"))
    warmup_rounds: int = _opt(0, ge=0)
    lr_milestones: list[int] = _opt([])  # step: s(t) x lr_gamma after each of these rounds
    lr_gamma: float = _opt(0.1, gt=0.0, le=1.0)  # step
    lr_min_factor: float = _opt(0.0, ge=0.0, le=1.0)  # cosine: s(t) falls towards it at train.rounds
    schedule_server: bool = False  # s(t) also on server_lr
    beta_schedule: str = _opt("fixed", choices=("fixed", "scaled"))  # scaled: beta x s(t) (alpha beta ~ s(t)^2)
    server_opt: str = _opt("sgd", choices=("sgd", "adam", "yogi", "adagrad"))  # Reddi et al. 2021
    server_beta2: float = _opt(0.99, ge=0.0, lt=1.0)  # adam, yogi
    server_eps: float = _opt(1e-3, gt=0.0)  # tau of the adaptive server optimizers


@dataclass
class TrainConfig:
    rounds: int = _opt(100, ge=1)
    clients_per_round: int = _opt(10, ge=1)
    eval_every: int = _opt(5, ge=1)
    eval_batch_size: int = _opt(1000, ge=1)
    micro_batch_size: Optional[int] = _opt(None, ge=1)  # split large batches for memory
    device: str = _opt("auto", choices=("auto", "cpu", "cuda"))
    # vectorized: vmap over a rank's clients; auto: chosen from device, model and clients per rank
    executor: str = _opt("auto", choices=("auto", "sequential", "vectorized"))
    # torch.compile the local step's forward and backward as one graph (eager is the reference)
    compile: bool = _opt(False)
    # bf16: float32 parameters and all-reduces, forward/backward under bfloat16 autocast
    precision: str = _opt("float32", choices=("float32", "float64", "bf16"))
    # bucketed: gradient all-reduces in buckets overlapped with the backward pass (the g pass,
    # and the step of lbsgd/gradalign; sequential executor); flat: one all-reduce per pass
    comm: str = _opt("bucketed", choices=("bucketed", "flat"))
    bucket_mb: float = _opt(25.0, gt=0.0)  # bucket size for comm: bucketed
    progress: bool = True
    # a collective that waits longer ends the run with a clear error (a rank died or hangs);
    # the last checkpoint resumes it
    timeout_s: float = _opt(600.0, gt=0.0)
    checkpoint_every: int = _opt(25, ge=0)  # rounds between checkpoints (0: only at the end and on signals)
    keep_checkpoints: int = _opt(3, ge=1)
    # every N rounds, r(x) = 1/2 sum_i w_i ||g_i - g||^2 over the round's clients at x, for every
    # algorithm (0: off); not counted as training traffic or time
    diagnostics_every: int = _opt(0, ge=0)
    diagnostics_batch: Union[int, Literal["full"]] = _opt("full", ge=1)  # samples per client for it


@dataclass
class WandbConfig:
    enabled: bool = False
    project: str = "dist-gradalign"
    entity: Optional[str] = None
    group: Optional[str] = None
    tags: list[str] = _opt([])
    mode: str = _opt("online", choices=("online", "offline", "disabled"))


@dataclass
class LoggingConfig:
    wandb: WandbConfig = field(default_factory=WandbConfig)


@dataclass
class Config:
    seed: int = _opt(0, ge=0)
    run_dir: str = "runs/default"
    data: DataConfig = field(default_factory=DataConfig)
    partition: PartitionConfig = field(default_factory=PartitionConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    algorithm: AlgorithmConfig = field(default_factory=AlgorithmConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# ---------------------------------------------------------------- type and range checks

def _describe(tp: Any) -> str:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is bool:
        return "true or false"
    if tp is int:
        return "an integer"
    if tp is float:
        return "a number"
    if tp is str:
        return "a string"
    if origin is Literal:
        return " or ".join(repr(a) for a in args)
    if origin is Union:
        return " or ".join("null" if a is type(None) else _describe(a) for a in args)
    if origin is list:
        return f"a list of {_describe(args[0]) if args else 'values'}"
    if tp is dict or origin is dict:
        return "a mapping of names to values"
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any) -> Any:
    """Return value converted to tp, or raise TypeError."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif tp is str:
        if isinstance(value, str):
            return value
    elif origin is Literal:
        if value in args:
            return value
    elif origin is Union:
        for a in args:
            if a is type(None):
                if value is None:
                    return None
                continue
            try:
                return _coerce(value, a)
            except TypeError:
                pass
    elif origin is dict or tp is dict:
        if isinstance(value, dict) and all(isinstance(k, str) for k in value):
            return dict(value)
    elif origin is list or tp is list:
        if isinstance(value, list):
            return [_coerce(v, args[0]) for v in value] if args else value
    raise TypeError


def _check_rules(key: str, value: Any, rules: dict) -> None:
    if "names" in rules and value not in rules["names"] and not is_import_path(value):
        raise ConfigError(f"{key} = {value!r} is not allowed: choose one of {', '.join(rules['names'])}, or give "
                          "an import path 'package.module:attribute' of your own")
    if value is None or isinstance(value, (str, list, dict)) and "choices" not in rules:
        return
    if "choices" in rules and value not in rules["choices"]:
        allowed = ", ".join(rules["choices"])
        raise ConfigError(f"{key} = {value!r} is not allowed: choose one of {allowed}")
    bounds = [("ge", ">=", lambda v, b: v >= b), ("gt", ">", lambda v, b: v > b),
              ("le", "<=", lambda v, b: v <= b), ("lt", "<", lambda v, b: v < b)]
    for name, sym, ok in bounds:
        if name in rules and isinstance(value, (int, float)) and not ok(value, rules[name]):
            raise ConfigError(f"{key} = {value!r} is out of range: must be {sym} {rules[name]}")


def _from_dict(cls: type, data: Any, prefix: str) -> Any:
    section = prefix.rstrip(".") or "the top level"
    if not isinstance(data, dict):
        raise ConfigError(f"{section} must be a mapping of keys to values, got {data!r}")
    hints = typing.get_type_hints(cls)
    known = {f.name: f for f in dataclasses.fields(cls)}
    for key in data:
        if any(secret in str(key).lower() for secret in ("api_key", "apikey", "token", "password")):
            raise ConfigError(f"'{prefix}{key}' is not allowed: secrets are never read from config files (they would "
                              "be copied into config.yaml and logs); set WANDB_API_KEY in the environment or run "
                              "`wandb login`")
        if key not in known:
            close = difflib.get_close_matches(str(key), known, n=1)
            hint = f" (did you mean '{prefix}{close[0]}'?)" if close else ""
            raise ConfigError(f"unknown key '{prefix}{key}'{hint}; allowed keys in {section}: "
                              + ", ".join(known))
    kwargs = {}
    for name, f in known.items():
        if name not in data:
            continue
        tp, value, key = hints[name], data[name], prefix + name
        if dataclasses.is_dataclass(tp):
            kwargs[name] = _from_dict(tp, value, key + ".")
            continue
        try:
            kwargs[name] = _coerce(value, tp)
        except TypeError:
            raise ConfigError(f"{key} = {value!r} has the wrong type: expected {_describe(tp)}") from None
        _check_rules(key, kwargs[name], dict(f.metadata))
    return cls(**kwargs)


def _check_normalize(norm: Optional[list]) -> None:
    if norm is None:
        return
    def numbers(v: Any) -> bool:
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            return True
        return isinstance(v, list) and len(v) > 0 and all(numbers(x) and not isinstance(x, list) for x in v)
    if len(norm) != 2 or not all(numbers(v) for v in norm):
        raise ConfigError(f"data.normalize = {norm!r} is not allowed: expected [mean, std], each a number "
                          "or a list of per-channel numbers, e.g. [0.5, 0.5] or [[0.49, 0.48, 0.45], [0.2, 0.2, 0.2]]")
    if not all(math.isfinite(x) for v in norm for x in (v if isinstance(v, list) else [v])):
        raise ConfigError(f"data.normalize = {norm!r} is out of range: every mean and std must be finite")
    stds = norm[1] if isinstance(norm[1], list) else [norm[1]]
    if any(s <= 0 for s in stds):
        raise ConfigError(f"data.normalize = {norm!r} is out of range: every std must be > 0")


def validate(cfg: Config) -> Config:
    """Cross-field rules that no single key can check."""
    a, t, p = cfg.algorithm, cfg.train, cfg.partition
    _check_normalize(cfg.data.normalize)
    if t.clients_per_round > p.num_clients:
        raise ConfigError(f"train.clients_per_round = {t.clients_per_round} is out of range: must be <= "
                          f"partition.num_clients = {p.num_clients}")
    if a.global_grad != "fresh" and a.name not in ("fedga", "gradalign") and not is_import_path(a.name):
        raise ConfigError(f"algorithm.global_grad = {a.global_grad!r} is not allowed for algorithm.name = {a.name!r}: "
                          "it chooses how fedga and gradalign form g; remove it")
    if a.displacement is not None and a.name in ("fedga", "gradalign"):
        want = "previous" if a.global_grad == "previous" else "fresh"
        if a.displacement != want:
            raise ConfigError(f"algorithm.displacement = {a.displacement!r} is not allowed for algorithm.name = "
                              f"{a.name!r}, which is {'fedavg' if a.name == 'fedga' else 'lbsgd'} with displacement "
                              f"{want!r} (global_grad = {a.global_grad!r}); use that name with the displacement you "
                              "want, or remove the key")
    if a.displacement not in (None, "none") and a.name == "scaffold" and (a.control == "stateful"
                                                                         or a.displacement == "previous"):
        raise ConfigError(f"algorithm.displacement = {a.displacement!r} is not allowed for algorithm.name = 'scaffold' "
                          f"with control = {a.control!r}: the displacement shares per-round SCAFFOLD's fresh g and g_i "
                          "(stateful SCAFFOLD forms no g; previous would replace the g its correction needs); use "
                          "displacement=fresh with control=per_round")
    if a.control != "per_round" and a.name != "scaffold" and not is_import_path(a.name):
        raise ConfigError(f"algorithm.control = {a.control!r} is not allowed for algorithm.name = {a.name!r}: "
                          "it chooses SCAFFOLD's control variates; remove it")
    if a.name in ("lbsgd", "gradalign") and a.local_steps != 1:
        raise ConfigError(f"algorithm.local_steps = {a.local_steps} is not allowed for algorithm.name = "
                          f"{a.name!r}: it takes exactly one update per round; set local_steps=1")
    if a.lr_milestones and a.lr_schedule != "step":
        raise ConfigError(f"algorithm.lr_milestones = {a.lr_milestones!r} is not allowed with algorithm.lr_schedule = "
                          f"{a.lr_schedule!r}: milestones belong to the step schedule; set lr_schedule=step or remove them")
    if a.lr_schedule == "step" and (not a.lr_milestones or any(m < 1 for m in a.lr_milestones)
                                    or a.lr_milestones != sorted(set(a.lr_milestones))):
        raise ConfigError(f"algorithm.lr_milestones = {a.lr_milestones!r} is not allowed for algorithm.lr_schedule = "
                          "'step': give increasing rounds >= 1, e.g. [150, 225]")
    if a.lr_schedule == "cosine" and a.warmup_rounds >= t.rounds:
        raise ConfigError(f"algorithm.warmup_rounds = {a.warmup_rounds} is out of range for algorithm.lr_schedule = "
                          f"'cosine': must be < train.rounds = {t.rounds} (the decay runs after the warmup)")
    if t.executor == "vectorized" and t.micro_batch_size is not None:
        raise ConfigError(f"train.micro_batch_size = {t.micro_batch_size} is not allowed with train.executor = "
                          "'vectorized' (it runs whole batches); use the sequential executor or drop it")
    if any(h < 1 for h in cfg.model.hidden):
        raise ConfigError(f"model.hidden = {cfg.model.hidden!r} is out of range: every width must be >= 1")
    lazy = cfg.data.source in STREAMING_SOURCES or is_import_path(cfg.data.source)
    if cfg.data.storage == "stream" and not lazy:
        raise ConfigError(f"data.storage = 'stream' is not allowed for data.source = {cfg.data.source!r}: only "
                          f"{' and '.join(STREAMING_SOURCES)} are read lazily (and your own datasets); use "
                          "storage=memory, or store the data as an image folder or as .npy files "
                          "(python -m dist_gradalign.data.convert)")
    for key, value, builtin in (("data.kwargs", cfg.data.kwargs, cfg.data.source),
                                ("model.kwargs", cfg.model.kwargs, cfg.model.name),
                                ("algorithm.kwargs", cfg.algorithm.kwargs, cfg.algorithm.name)):
        if value and not is_import_path(builtin):
            raise ConfigError(f"{key} = {value!r} is not allowed for the built-in {builtin!r}: it is passed to a "
                              "factory of your own (an import path 'package.module:attribute'); remove it")
    if cfg.data.source in ("npz", "npy", "imagefolder") and not cfg.data.root:
        raise ConfigError(f"data.root = {cfg.data.root!r} is not allowed: data.source = "
                          f"{cfg.data.source!r} needs the path of its file or folder")
    return cfg


def from_dict(data: dict) -> Config:
    return validate(_from_dict(Config, data, ""))


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Apply ``a.b.c=value`` strings (value parsed as YAML) to a nested dict, in order."""
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"override {item!r} is not allowed: write it as key=value, e.g. algorithm.beta=0.05")
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError as e:
            raise ConfigError(f"override {item!r}: cannot parse the value: {e}") from None
        node = data
        parts = key.strip().split(".")
        for part in parts[:-1]:
            if not isinstance(node.setdefault(part, {}), dict):
                raise ConfigError(f"override {item!r}: '{part}' is a value, not a section")
            node = node[part]
        node[parts[-1]] = value
    return data


def load_config(path: Optional[str | Path], overrides: list[str] = ()) -> Config:
    """Read a YAML config (safe loader), apply dotted overrides, validate, return the Config."""
    data: Any = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file {str(p)!r} not found")
        try:
            data = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"config file {str(p)!r} is not valid YAML: {e}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"config file {str(p)!r} must hold a mapping of keys to values")
    return from_dict(apply_overrides(data, list(overrides)))


def dump_config(cfg: Config) -> str:
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)
