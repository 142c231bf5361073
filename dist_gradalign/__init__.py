"""dist_gradalign: GradAlign and FedGA (Dandi, Barba, Jaggi, AAAI 2022) with large-batch SGD,
FedAvg, FedProx and SCAFFOLD on torch.distributed.

``fit`` is the Python entry point (docs/extending.md); ``Algorithm`` the base of every algorithm,
built-in or a user's own. (Imported on first use: ``import dist_gradalign`` alone stays light.)"""

__version__ = "0.2.0"

_EXPORTS = {"fit": "api", "Result": "api", "Config": "config", "ConfigError": "config", "load_config": "config",
            "Algorithm": "algorithms", "ClientState": "algorithms", "CrossEntropy": "losses"}
__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        import importlib
        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
