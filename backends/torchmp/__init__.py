"""The real backend: one process per device (torch.multiprocessing spawn, or torchrun), models
exchanged with torch.distributed (gloo; nccl when every device is a GPU), the simulator's policies
and training core, the same run directory."""

from backends.torchmp.launcher import run
from backends.torchmp.worker import worker_main

__all__ = ["run", "worker_main"]
