"""Batched emulation: the local steps of many replicas of one architecture as one computation.

Every replica's parameters are stacked along a new leading dimension; `torch.func.vmap` over
`grad(functional_call(model, params, x))` computes all replicas' gradients in one pass, and SGD with
momentum and weight decay is applied to the stacks exactly as `torch.optim.SGD` does per replica:

    d = g + wd * p;   buf = momentum * buf + d   (buf starts at 0, i.e. buf = d on the first step);
    p = p - lr * buf

A round runs step by step across workers (step s for every worker that still has steps to do); each
worker draws its batches from the same sampler, stream and augmentation generator as in the
per-replica loop, and the round's math does not depend on this order (see hetsim/training.py), so the
result equals the loop's up to float round-off (tested at 1e-5).

Models with BatchNorm keep running statistics in-place per replica, which vmap cannot batch; they use
the per-replica loop (`BatchedSteps.create` returns None and the summary says `batched: false`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, vmap

if TYPE_CHECKING:
    from hetsim.training import TrainingCore, Worker
    from hetsim.workloads import Workload


class BatchedSteps:
    def __init__(self, template: nn.Module, names: list[str]):
        self.template = template
        self.names = names

        def loss(params: dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor):
            losses = F.cross_entropy(functional_call(self.template, params, (x,)), y, reduction="none")
            return losses.mean(), losses

        self.grad_fn = vmap(grad(loss, has_aux=True))

    @classmethod
    def create(cls, workers: list["Worker"], workload: "Workload") -> "BatchedSteps | None":
        model = workers[0].model
        if any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules()):
            return None
        if any(b.numel() for b in model.buffers()):
            return None
        template = workload.make_model()
        return cls(template, [n for n, _ in model.named_parameters()])

    def run(self, core: "TrainingCore", steps: dict[int, int]) -> None:
        ks = [k for k, n in steps.items() if n > 0]
        if not ks:
            return
        workers = [core.workers[k] for k in ks]
        opt = core.spec.optim
        lr = workers[0].optimizer.param_groups[0]["lr"]
        params = {n: torch.stack([dict(w.model.named_parameters())[n].detach() for w in workers]) for n in self.names}
        bufs = {n: torch.stack([_momentum(w, n) for w in workers]) for n in self.names}
        counts = torch.tensor([steps[k] for k in ks])
        workload = core.workload
        for s in range(int(counts.max())):
            active = [i for i in range(len(ks)) if steps[ks[i]] > s]
            idx = torch.tensor(active)
            xs, ys, batches = [], [], []
            for i in active:
                k = ks[i]
                indices, n_biased = core.sample(k)
                t = torch.from_numpy(indices)
                xs.append(workload.prepare(workload.train_x[t], True, core.workers[k].gen))
                ys.append(workload.train_y[t])
                batches.append((k, indices, n_biased))
            sub = {n: p[idx] for n, p in params.items()} if len(active) < len(ks) else params
            grads, losses = self.grad_fn(sub, torch.stack(xs), torch.stack(ys))
            for n in self.names:
                p, g = sub[n], grads[n]
                d = g + opt.weight_decay * p if opt.weight_decay else g
                b = (opt.momentum * bufs[n][idx] + d) if opt.momentum else d
                if opt.momentum:
                    bufs[n][idx] = b
                params[n][idx] = p - lr * b
            for (k, indices, n_biased), l in zip(batches, losses.detach().numpy().astype(np.float64)):
                core.record(k, indices, n_biased, l)
        # write the replicas and their momentum back: the workers stay the source of truth
        with torch.no_grad():
            for i, w in enumerate(workers):
                for n, p in w.model.named_parameters():
                    p.copy_(params[n][i])
                    if opt.momentum:
                        w.optimizer.state[p]["momentum_buffer"] = bufs[n][i].clone()


def _momentum(w: "Worker", name: str) -> torch.Tensor:
    p = dict(w.model.named_parameters())[name]
    buf = w.optimizer.state.get(p, {}).get("momentum_buffer")
    return buf.detach() if buf is not None else torch.zeros_like(p)
