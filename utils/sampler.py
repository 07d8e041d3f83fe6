"""Evaluation sampler that shards a dataset over ranks without padding (RN-08, fixed)."""

from __future__ import annotations

from collections.abc import Iterator, Sized

from torch.utils.data import Sampler

from utils.distributed import get_rank, get_world_size


class ShardedEvalSampler(Sampler[int]):
    """Give rank ``r`` of ``w`` the indices ``r, r + w, r + 2w, ...`` of the dataset, in order.

    Reference behaviour (RN-08, fixed on purpose): the reference evaluates through ``DistributedSampler``,
    which pads the index list by repetition to a multiple of the world size, so a few test images are
    counted twice and the metrics depend on the number of GPUs. Here the shards are disjoint and cover
    every index exactly once, whatever the number of processes; the confusion matrix summed over ranks
    is therefore the single-process one. The order inside a shard does not matter for the metrics, so
    there is no shuffling.

    Consequences for the caller: ranks may get one batch more or fewer than each other, so the
    evaluation loop must not run a collective per batch (keep reductions after the loop, and run the
    model under ``torch.no_grad()`` in eval mode, where DDP and synchronised batch norm communicate
    nothing); and per-image averages must divide by the global number of images (the metric's
    synchronised ``total_samples``), not by ``world * len(loader)``.

    Args:
        dataset: any sized dataset.
        num_replicas: number of shards; default the world size.
        rank: this process's shard; default its rank.
    """

    def __init__(self, dataset: Sized, num_replicas: int | None = None, rank: int | None = None) -> None:
        num_replicas = get_world_size() if num_replicas is None else int(num_replicas)
        rank = get_rank() if rank is None else int(rank)
        if num_replicas < 1:
            raise ValueError(f"num_replicas must be >= 1, got {num_replicas}")
        if not 0 <= rank < num_replicas:
            raise ValueError(f"rank must be in [0, {num_replicas}), got {rank}")
        self.dataset = dataset
        self.num_replicas = num_replicas
        self.rank = rank

    def _indices(self) -> range:
        return range(self.rank, len(self.dataset), self.num_replicas)

    @property
    def num_samples(self) -> int:
        """Number of indices of this shard (``ceil((N - rank) / world)``; shards differ by at most one)."""
        return len(self._indices())

    def __iter__(self) -> Iterator[int]:
        return iter(self._indices())

    def __len__(self) -> int:
        return self.num_samples

    def set_epoch(self, epoch: int) -> None:
        """No-op, for drop-in compatibility with ``DistributedSampler`` (the order is fixed)."""
