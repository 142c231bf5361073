"""dist_gradalign: GradAlign and FedGA (Dandi, Barba, Jaggi, AAAI 2022) with large-batch SGD,
FedAvg, FedProx and SCAFFOLD on torch.distributed."""

__version__ = "0.1.0"
