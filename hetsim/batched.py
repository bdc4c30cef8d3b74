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

Models with BatchNorm keep running statistics in-place per replica, and RNNs use fused kernels, which
vmap cannot batch; they use the per-replica loop (`BatchedSteps.create` returns None and the summary
says `batched: false`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import nn
from torch.func import functional_call, grad, vmap

if TYPE_CHECKING:
    from hetsim.training import TrainingCore, Worker
    from hetsim.workloads import Workload


class BatchedSteps:
    def __init__(self, template: nn.Module, names: list[str]):
        from hetsim.training import per_sample_loss

        self.template = template
        self.names = names

        def loss(params: dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor):
            losses = per_sample_loss(functional_call(self.template, params, (x,)), y)
            return losses.mean(), losses

        self.grad_fn = vmap(grad(loss, has_aux=True))

    @classmethod
    def create(cls, workers: list["Worker"], workload: "Workload") -> "BatchedSteps | None":
        model = workers[0].model
        if any(isinstance(m, (nn.modules.batchnorm._BatchNorm, nn.RNNBase)) for m in model.modules()):
            return None  # in-place running statistics, or fused RNN kernels that vmap does not batch
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
        wparams = [list(w.model.parameters()) for w in workers]
        params = {n: torch.stack([ps[j] for ps in wparams]).detach() for j, n in enumerate(self.names)}
        bufs = {n: torch.stack([_momentum(w, ps[j]) for w, ps in zip(workers, wparams)])
                for j, n in enumerate(self.names)}
        workload = core.workload
        keep = core.keep_scores
        for s in range(max(steps[k] for k in ks)):
            active = [i for i, k in enumerate(ks) if steps[k] > s]
            xs, ys, batches = [], [], []
            for i in active:
                k = ks[i]
                indices, n_biased = core.sample(k)
                t = torch.from_numpy(indices)
                xs.append(workload.prepare(workload.train_x[t], True, core.workers[k].gen))
                ys.append(workload.train_y[t])
                batches.append((k, indices, n_biased))
            everyone = len(active) == len(ks)
            idx = None if everyone else torch.tensor(active)
            sub = params if everyone else {n: p[idx] for n, p in params.items()}
            grads, losses = self.grad_fn(sub, torch.stack(xs), torch.stack(ys))
            with torch.no_grad():
                for n in self.names:
                    p, g = sub[n], grads[n]
                    d = g.add(p, alpha=opt.weight_decay) if opt.weight_decay else g
                    if opt.momentum:
                        b = (bufs[n] if everyone else bufs[n][idx]).mul(opt.momentum).add_(d)
                    else:
                        b = d
                    new = p.add(b, alpha=-lr)
                    if everyone:
                        params[n], bufs[n] = new, b
                    else:
                        params[n][idx], bufs[n][idx] = new, b
            per_sample = losses.detach().numpy().astype(np.float64)
            sums = per_sample.sum(axis=1).tolist()
            for (k, indices, n_biased), l, total in zip(batches, per_sample, sums):
                core.record(k, indices, n_biased, total, l if keep else None)
        # write the replicas and their momentum back: the workers stay the source of truth
        with torch.no_grad():
            for i, (w, ps) in enumerate(zip(workers, wparams)):
                for n, p in zip(self.names, ps):
                    p.copy_(params[n][i])
                    if opt.momentum:
                        w.optimizer.state[p]["momentum_buffer"] = bufs[n][i].clone()


def _momentum(w: "Worker", p: torch.Tensor) -> torch.Tensor:
    buf = w.optimizer.state.get(p, {}).get("momentum_buffer")
    return buf.detach() if buf is not None else torch.zeros_like(p)
