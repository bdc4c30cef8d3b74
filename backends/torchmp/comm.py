"""The Comm port over torch.distributed: how the backend's processes share tallies, replicas and
control values.

Every tensor handed to a collective lives on the communication device: the rank's GPU under nccl
(which rejects CPU tensors), the CPU under gloo. Python values reach that device in one copy and
come back through `_host`, the one place where a communicated tensor is read on the host.

A round costs a fixed number of collectives, whatever the workers did:

- `gather_tallies`: one all_gather of a fixed-size float64 stats tensor per rank, then, only when
  some worker observed per-sample losses, one padded all_gather of the observations (indices and
  losses; float64 holds indices exactly below 2**53). No pickling (`all_gather_object`).
- `arrivals_source`: the aggregator's Σ w_k x_k as ONE all_reduce of w_k·x_k summed over this rank's
  workers; the replicas themselves (one padded all_gather) only for an aggregator that declared
  itself non-linear.

Workers are placed on ranks by `owners` (worker k lives on rank owners[k]); the backend runs one
worker per process, worker k on rank k.

Example (in every process of a gloo group of 2, worker k on rank k)::

    comm = TorchComm(rank, 2, torch.device("cpu"))
    lr, = comm.agree([0.05])                     # rank 0's value, everywhere
    weighted_sum, _ = comm.arrivals_source([0, 1], {rank: replica}, linear=True)
    new_global = weighted_sum(np.array([0.5, 0.5]))
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch
import torch.distributed as dist

from hetsim.training import RoundTally

# the columns of a worker's row in the stats tensor gather_tallies all_gathers
_STEPS, _TALLY_STEPS, _SAMPLES, _BIASED, _LOSS_SUM, _START, _FINISH, _N_OBS = range(8)
_COLUMNS = 8


def _host(t: torch.Tensor) -> np.ndarray:
    """A communicated tensor's values on the host (float64 numpy)."""
    return t.detach().to("cpu", torch.float64).numpy()


class TorchComm:
    """The Comm port on an initialised torch.distributed process group.

    rank, world: this process's rank and the group's size. device: the communication device (cuda:i
    under nccl, cpu under gloo); replicas are computed wherever they live and moved here to travel.
    owners: the rank of each worker (default: worker k on rank k, one per process).
    """

    def __init__(self, rank: int, world: int, device: torch.device, owners: Sequence[int] | None = None):
        self.rank, self.world = rank, world
        self.leader = rank == 0
        self.device = torch.device(device)
        self.owners = list(range(world)) if owners is None else list(owners)
        if any(not 0 <= r < world for r in self.owners):
            raise ValueError(f"owners: every worker's rank must be in [0, {world}), got {self.owners}")
        self.local = [k for k, r in enumerate(self.owners) if r == rank]

    # -- control values -----------------------------------------------------------------------------

    def agree(self, values: Sequence[float]) -> list[float]:
        """The leader's `values` in every process (every process passes as many)."""
        return self._broadcast(values, 0)

    def share(self, worker: int, values: Sequence[float]) -> list[float]:
        """The values of the process that holds `worker` (e.g. its evaluation), in every process."""
        return self._broadcast(values, self.owners[worker])

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

    def _placement(self, ks: Sequence[int]) -> tuple[list[int], list[int], list[int]]:
        """For participants ks: each one's position among its rank's participants, how many
        participants each rank holds, and this rank's participants (in ks order)."""
        counts = [0] * self.world
        position = []
        for k in ks:
            r = self.owners[k]
            position.append(counts[r])
            counts[r] += 1
        return position, counts, [k for k in ks if self.owners[k] == self.rank]

    def gather_tallies(self, ks: Sequence[int], tallies: Mapping[int, RoundTally], work: Any
                       ) -> tuple[list[RoundTally], Any]:
        """Every participant's tally and work, in ks order, in every process.

        tallies: this process's participants' tallies (by worker); work: their Work (steps, start,
        finish), in ks order. Returns the tallies of all ks and a Work of the same type for all ks;
        each worker's loss observations arrive as one (indices, losses) pair."""
        position, counts, mine = self._placement(ks)
        if len(work.steps) != len(mine):
            raise ValueError(f"gather_tallies: work for {len(work.steps)} workers, this rank holds {len(mine)} "
                             f"of the participants {list(ks)}")
        rows = max(counts, default=0)
        if rows == 0:
            return [], dataclasses.replace(work, steps=[], start=np.zeros(0), finish=np.zeros(0))
        stats = np.zeros((rows, _COLUMNS))
        observations = []
        for i, k in enumerate(mine):
            t = tallies[k]
            obs = [o for o in t.observations if len(o[0])]
            stats[i, [_STEPS, _TALLY_STEPS, _SAMPLES, _BIASED, _LOSS_SUM, _START, _FINISH, _N_OBS]] = (
                work.steps[i], t.steps, t.samples, t.biased, t.loss_sum, work.start[i], work.finish[i],
                sum(len(o[0]) for o in obs))
            observations += obs
        gathered = _host(self._all_gather(torch.from_numpy(stats).to(self.device)))  # [world, rows, columns]
        n_obs = gathered[:, :, _N_OBS].astype(np.int64)
        per_rank = n_obs.sum(axis=1)
        width = int(per_rank.max())
        if width:  # one padded gather of every rank's observations (indices in row 0, losses in row 1)
            mine_obs = np.zeros((2, width))
            if observations:
                idx, losses = np.concatenate([o[0] for o in observations]), np.concatenate([o[1] for o in observations])
                mine_obs[0, :len(idx)], mine_obs[1, :len(idx)] = idx, losses
            all_obs = _host(self._all_gather(torch.from_numpy(mine_obs).to(self.device)))  # [world, 2, width]
        out, steps, start, finish = [], [], [], []
        for k, j in zip(ks, position):
            r = self.owners[k]
            row = gathered[r, j]
            obs = []
            n = int(n_obs[r, j])
            if n:
                offset = int(n_obs[r, :j].sum())
                obs = [(all_obs[r, 0, offset:offset + n].astype(np.int64), all_obs[r, 1, offset:offset + n].copy())]
            out.append(RoundTally(int(row[_TALLY_STEPS]), int(row[_SAMPLES]), int(row[_BIASED]),
                                  float(row[_LOSS_SUM]), obs))
            steps.append(int(row[_STEPS]))
            start.append(row[_START])
            finish.append(row[_FINISH])
        return out, dataclasses.replace(work, steps=steps, start=np.array(start), finish=np.array(finish))

    # -- the replicas -------------------------------------------------------------------------------

    def arrivals_source(self, ks: Sequence[int], local_replicas: Mapping[int, torch.Tensor], linear: bool
                        ) -> tuple[Callable[[np.ndarray], torch.Tensor], Callable[[], torch.Tensor]]:
        """The two callables `Arrivals` takes for participants ks (nothing travels until one is called;
        every process calls them alike, as the aggregator runs in every process).

        local_replicas: the flat replicas of this process's workers (non-participants among them only
        give the shape). weighted_sum(w) -> Σ_i w[i] x_{ks[i]} by one all_reduce; replicas() -> the
        participants' replicas [len(ks), P] by one all_gather, only when `linear` is False. Both return
        tensors on the replicas' device."""
        if not local_replicas:
            raise ValueError(f"arrivals_source: rank {self.rank} holds no replica")
        like = next(iter(local_replicas.values()))
        position, counts, _ = self._placement(ks)
        mine = [(i, k) for i, k in enumerate(ks) if self.owners[k] == self.rank]

        def weighted_sum(w: np.ndarray) -> torch.Tensor:
            w = np.asarray(w, dtype=np.float64)
            if w.shape != (len(ks),):
                raise ValueError(f"weighted_sum: expected {len(ks)} weights (one per arrival), got shape {w.shape}")
            x = torch.zeros(like.numel(), dtype=like.dtype, device=self.device)
            for i, k in mine:
                x += local_replicas[k].to(self.device) * float(w[i])
            dist.all_reduce(x)
            return x.to(like.device)

        cache: list[torch.Tensor] = []

        def replicas() -> torch.Tensor:
            if linear:
                raise RuntimeError("arrivals.replicas: the aggregator declared linear = True, so the backend "
                                   "only computes arrivals.weighted_sum(w); declare linear = False to read replicas")
            if not cache:  # gathered once: the aggregator may read them more than once
                if not ks:
                    return torch.zeros(0, like.numel(), dtype=like.dtype, device=like.device)
                buf = torch.zeros(max(counts), like.numel(), dtype=like.dtype, device=self.device)
                for j, (_, k) in enumerate(mine):
                    buf[j] = local_replicas[k].to(self.device)
                gathered = self._all_gather(buf)  # [world, rows, P]
                cache.append(torch.stack([gathered[self.owners[k], j] for k, j in zip(ks, position)]).to(like.device))
            return cache[0]

        return weighted_sum, replicas

    def _all_gather(self, t: torch.Tensor) -> torch.Tensor:
        out = [torch.empty_like(t) for _ in range(self.world)]
        dist.all_gather(out, t)
        return torch.stack(out)

    # -- point to point -----------------------------------------------------------------------------

    def send(self, tensor: torch.Tensor, dst: int) -> None:
        """Send `tensor` to the process that holds worker `dst`."""
        dist.send(tensor.to(self.device), self.owners[dst])

    def recv(self, tensor: torch.Tensor, src: int) -> torch.Tensor:
        """Receive into `tensor` (its shape, dtype and device) what the process of worker `src` sent."""
        buf = torch.empty_like(tensor, device=self.device)
        dist.recv(buf, self.owners[src])
        tensor.copy_(buf)
        return tensor
