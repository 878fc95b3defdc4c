"""Fake torch_npu.optim (see the package docstring)."""
import torch


class NpuFusedAdamW(torch.optim.AdamW):
    """Stands in for torch_npu.optim.NpuFusedAdamW (plain AdamW underneath)."""

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2, amsgrad=False):
        from . import CALLS

        CALLS.append(("NpuFusedAdamW", dict(lr=lr, weight_decay=weight_decay)))
        super().__init__(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, amsgrad=amsgrad)
