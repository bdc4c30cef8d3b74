"""The Comm port over torch.distributed: how the backend's processes share tallies, replicas and
control values. One worker per process: worker k lives on rank k.

Every tensor handed to a collective lives on the communication device: the rank's GPU under nccl
(which rejects CPU tensors), the CPU under gloo. Python values reach that device in one copy and
come back through `_host`, the one place where a communicated tensor is read on the host.

A round costs a fixed number of collectives, whatever the workers did:

- `gather_tallies`: one all_gather of a float64 row per rank: its stats and its observed per-sample
  losses (indices and losses; float64 holds indices exactly below 2**53), in room sized by the previous
  round's need; only a round that outgrows the room pays a second gather. No pickling.
- `arrivals_source`: the aggregator's Σ w_k x_k as ONE all_reduce of w_k·x_k; the replicas themselves
  (one all_gather) only for an aggregator that declared itself non-linear.
- A small model (all ranks' float64 rows of it at most `FUSE_BYTES`, under gloo) travels in the tally
  gather itself, once `attach` has told the comm where the replicas are: the round then costs ONE
  collective (two in a round whose observations outgrow their room, e.g. the first), and Σ w_k x_k
  and the replicas are computed from the gathered rows in every process alike (in ks order, one
  worker at a time, so every process gets the same bits whatever its thread count). The gather moves
  more bytes than an all_reduce would (world x float64 rows); for models this small the second
  collective's latency is what costs, not the bytes.

Example (in every process of a gloo group of 2)::

    comm = TorchComm(rank, 2, torch.device("cpu"))
    lr, = comm.agree([0.05])                     # rank 0's value, everywhere
    weighted_sum, _ = comm.arrivals_source([0, 1], core.replicas, linear=True)
    new_global = weighted_sum(np.array([0.5, 0.5]))
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import numpy as np
import torch
import torch.distributed as dist

from hetsim.protocol import Comm, Work
from hetsim.training import Tallies

# the columns of a rank's row in the stats tensor that gather_tallies all_gathers
_STEPS, _SAMPLES, _BIASED, _LOSS_SUM, _START, _FINISH, _N_OBS = range(7)
_COLUMNS = 7
#: a model whose float64 rows from every rank add up to at most this (bytes) rides in the tally gather
#: (`TorchComm.attach`)
FUSE_BYTES = 1 << 20


def _weights(w: np.ndarray, n: int) -> np.ndarray:
    """An aggregator's weights for n arrivals as float64, or a ValueError naming the shape it got."""
    w = np.asarray(w, dtype=np.float64)
    if w.shape != (n,):
        raise ValueError(f"weighted_sum: expected {n} weights (one per arrival), got shape {w.shape}")
    return w


def _host(t: torch.Tensor) -> np.ndarray:
    """A communicated tensor's values on the host (float64 numpy)."""
    return t.detach().to("cpu", torch.float64).numpy()


class TorchComm(Comm):
    """The Comm port on an initialised torch.distributed process group, worker k on rank k.

    rank, world: this process's rank and the group's size. device: the communication device (cuda:i
    under nccl, cpu under gloo); replicas are computed wherever they live and travel through it.
    """

    def __init__(self, rank: int, world: int, device: torch.device):
        self.rank, self.world = rank, world
        self.leader = rank == 0
        self.local = [rank]
        self.device = torch.device(device)
        self._obs_width = 0  # room for observations in the tally gather's rows (gather_tallies)
        self._replicas: Callable[[list[int]], torch.Tensor] | None = None  # attach()
        self._fused: tuple[tuple[int, ...], torch.Tensor] | None = None  # this round's gathered replicas

    def attach(self, replicas: Callable[[list[int]], torch.Tensor]) -> None:
        """Where this process's replicas are (the core's `replicas`): a small model then travels in the tally
        gather (module docstring), decided once here: when every rank's row of it (float64) adds up to at
        most FUSE_BYTES. Only under gloo: nccl's tensors live on the GPU, not in a host row."""
        if self.device.type == "cpu" and 8 * replicas([self.rank])[0].numel() * self.world <= FUSE_BYTES:
            self._replicas = replicas

    # -- control values -----------------------------------------------------------------------------

    def agree(self, values: Sequence[float]) -> list[float]:
        """The leader's `values` in every process (every process passes as many)."""
        return self._broadcast(values, 0)

    def share(self, worker: int, values: Sequence[float]) -> list[float]:
        """The values of the process that holds `worker` (e.g. its evaluation), in every process."""
        return self._broadcast(values, worker)

    def _broadcast(self, values: Sequence[float], src: int) -> list[float]:
        t = torch.tensor([float(v) for v in values], dtype=torch.float64, device=self.device)
        dist.broadcast(t, src)
        return _host(t).tolist()

    def barrier(self) -> None:
        if self.device.type == "cuda":  # nccl's barrier otherwise guesses the device from the rank
            dist.barrier(device_ids=[self.device.index if self.device.index is not None else 0])
        else:
            dist.barrier()

    # -- a round's tallies --------------------------------------------------------------------------

    def gather_tallies(self, ks: Sequence[int], tallies: Tallies, work: Work) -> tuple[Tallies, Work]:
        """Every participant's tally and work, in ks order, in every process; `tallies` and `work` hold
        this process's worker when it is among ks (else nothing).

        One all_gather a round: each rank's stats row followed by room for `_obs_width` observations
        (indices, then losses), the largest count any rank had in the previous gather (the same on every
        rank, as it is read from gathered data). Only a round whose observations outgrow that room pays a
        second, padded gather of them; the room then follows the last round's need (bounded by it)."""
        ks = [int(k) for k in ks]
        mine = self.rank in ks
        if len(tallies.workers) != int(mine) or len(work.steps) != int(mine):
            raise ValueError(f"gather_tallies: rank {self.rank} passed {len(tallies.workers)} tallies and work for "
                             f"{len(work.steps)} workers; it holds {int(mine)} of the participants {ks}")
        if not ks:
            return Tallies.of([], []), Work([], np.zeros(0), np.zeros(0))
        width = self._obs_width
        fuse = self._replicas is not None
        own = self._replicas([self.rank])[0] if fuse else None
        p = own.numel() if fuse else 0
        row = np.zeros(_COLUMNS + 2 * width + p)
        if fuse and mine:  # float64 holds float32 (and float64) values exactly
            row[_COLUMNS + 2 * width:] = own.detach().to("cpu", torch.float64).numpy()
        idx = loss = np.zeros(0)
        if mine:
            obs = [o for o in tallies.observations if len(o[0])]
            if obs:
                idx, loss = np.concatenate([o[0] for o in obs]), np.concatenate([o[1] for o in obs])
            row[:_COLUMNS] = (work.steps[0], tallies.samples[0], tallies.biased[0], tallies.loss_sum[0], work.start[0],
                              work.finish[0], len(idx))
            if len(idx) <= width:
                row[_COLUMNS:_COLUMNS + len(idx)] = idx
                row[_COLUMNS + width:_COLUMNS + width + len(idx)] = loss
        rows = _host(self._all_gather(torch.from_numpy(row).to(self.device)))  # [world, columns + 2 width + p]
        gathered = rows[ks]
        self._fused = ((tuple(ks), torch.from_numpy(gathered[:, _COLUMNS + 2 * width:]).to(own.device, own.dtype))
                       if fuse else None)  # where the replicas live (a GPU's under gloo)
        n_obs = gathered[:, _N_OBS].astype(np.int64)
        need = int(rows[:, _N_OBS].max())
        observations = []
        if need > width:  # outgrown: one padded gather of every rank's observations (indices, then losses)
            padded = np.zeros((2, need))
            padded[0, :len(idx)], padded[1, :len(idx)] = idx, loss
            everyone = _host(self._all_gather(torch.from_numpy(padded).to(self.device)))[ks]  # [len(ks), 2, need]
            observations = [(everyone[i, 0, :n].astype(np.int64), everyone[i, 1, :n].copy())
                            for i, n in enumerate(n_obs) if n]
        else:
            observations = [(gathered[i, _COLUMNS:_COLUMNS + n].astype(np.int64),
                             gathered[i, _COLUMNS + width:_COLUMNS + width + n].copy())
                            for i, n in enumerate(n_obs) if n]
        self._obs_width = need
        steps = gathered[:, _STEPS].astype(np.int64)
        out = Tallies(np.array(ks, dtype=np.int64), steps, gathered[:, _SAMPLES].astype(np.int64),
                      gathered[:, _BIASED].astype(np.int64), gathered[:, _LOSS_SUM].copy(), observations)
        return out, Work(steps.tolist(), gathered[:, _START].copy(), gathered[:, _FINISH].copy())

    # -- the replicas -------------------------------------------------------------------------------

    def arrivals_source(self, ks: Sequence[int], replicas: Callable[[list[int]], torch.Tensor], linear: bool
                        ) -> tuple[Callable[[np.ndarray], torch.Tensor], Callable[[], torch.Tensor] | None]:
        """The two callables `Arrivals` takes for participants ks (nothing travels until one is called;
        every process calls them alike, as the aggregator runs in every process).

        replicas(local_ks): this process's replicas as rows (the core's). weighted_sum(w) -> Σ_i w[i]
        x_{ks[i]} by one all_reduce; the second callable -> the participants' replicas [len(ks), P] by
        one all_gather, or None when `linear` (the aggregator only reads weighted sums). Both return
        tensors where the replicas live."""
        ks = [int(k) for k in ks]
        fused, self._fused = self._fused, None  # this round's only: a later combine gathers afresh
        # gathered with the tallies (the core's replicas, of these ks): no collective
        if fused is not None and fused[0] == tuple(ks) and replicas == self._replicas:
            rows = fused[1]

            def fused_sum(w: np.ndarray) -> torch.Tensor:
                w = _weights(w, len(ks))
                out = rows[0] * float(w[0])
                for i in range(1, len(ks)):
                    out += rows[i] * float(w[i])
                return out

            return fused_sum, (None if linear else (lambda: rows))
        mine = ks.index(self.rank) if self.rank in ks else None
        # a rank sitting the round out still takes part in the collectives, with zeros of the right shape
        own = replicas([self.rank])[0]

        def weighted_sum(w: np.ndarray) -> torch.Tensor:
            w = _weights(w, len(ks))
            if mine is None:
                x = torch.zeros(own.numel(), dtype=own.dtype, device=self.device)
            else:
                x = own.to(self.device) * float(w[mine])
            dist.all_reduce(x)
            return x.to(own.device)

        cache: list[torch.Tensor] = []

        def gathered() -> torch.Tensor:
            if not cache:  # gathered once: the aggregator may read them more than once
                x = own.to(self.device) if mine is not None else torch.zeros(own.numel(), dtype=own.dtype,
                                                                             device=self.device)
                cache.append(self._all_gather(x)[ks].to(own.device))
            return cache[0]

        return weighted_sum, (None if linear else gathered)

    def _all_gather(self, t: torch.Tensor) -> torch.Tensor:
        out = [torch.empty_like(t) for _ in range(self.world)]
        dist.all_gather(out, t)
        return torch.stack(out)

    # -- point to point -----------------------------------------------------------------------------

    def send(self, tensor: torch.Tensor, src: int, dst: int) -> None:
        """Send `tensor` of worker src (this process's) to the process of worker dst."""
        if src != self.rank:
            raise ValueError(f"send: worker {src} does not live on rank {self.rank}")
        dist.send(tensor.to(self.device), dst)

    def recv(self, tensor: torch.Tensor, src: int, dst: int) -> torch.Tensor:
        """Receive into `tensor` (its shape, dtype and device) what worker src sent to worker dst (this
        process's)."""
        if dst != self.rank:
            raise ValueError(f"recv: worker {dst} does not live on rank {self.rank}")
        buf = torch.empty_like(tensor, device=self.device)
        dist.recv(buf, src)
        tensor.copy_(buf)
        return tensor

    def summary_fields(self) -> dict[str, Any]:
        return {"backend": "nccl" if self.device.type == "cuda" else "gloo"}
