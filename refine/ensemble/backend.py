"""Where the shards of an ensemble refinement live: in this process, or each on one Dask worker.

Both backends run a shard function (:mod:`refine.ensemble.shots`) on every shard, either keeping what it returns as
the new shards (:meth:`update`: a per-shot fit) or bringing its small result back (:meth:`map`: losses, gradients,
curvatures, records), always in shard order, so that the client's sums do not depend on which worker finished first.
On Dask each shard is pinned to the worker that loaded it (the images never move); the client is
:func:`refine.scaleout.make_client`'s, as for ``--independent``.
"""
from __future__ import annotations

import logging
import time
from typing import Callable, Optional, Sequence

from .shots import Shard


class LocalShards:
    """Shards in this process."""

    def __init__(self, shards: Sequence[Shard]):
        self.shards = list(shards)
        self.workers, self.threads = 1, 0

    def update(self, fn: Callable, *args) -> None:
        """Replace every shard by ``fn(shard, *args)``."""
        self.shards = [fn(s, *args) for s in self.shards]

    def map(self, fn: Callable, *args) -> list:
        """``[fn(shard, *args) for every shard]``."""
        return [fn(s, *args) for s in self.shards]

    def close(self) -> None:
        """Nothing to release."""


class DaskShards:
    """Shards held by Dask workers, one future each, pinned to a worker (``placed`` their addresses); ``own``: the
    client and local cluster to close afterwards (None: the caller's)."""

    def __init__(self, client, futures, placed, own=None, threads: int = 0):
        self.client, self.futures, self.placed, self.own = client, list(futures), list(placed), own
        self.workers, self.threads = len(set(placed)), threads

    def _submit(self, fn, args, key: str):
        stamp = time.time_ns()
        return [self.client.submit(fn, f, *args, pure=False, workers=[w], allow_other_workers=False,
                                   key=f"ensemble-{key}-{k}-{stamp}")
                for k, (f, w) in enumerate(zip(self.futures, self.placed))]

    def update(self, fn: Callable, *args) -> None:
        """Replace every shard by ``fn(shard, *args)``, run on its worker (waited for; a failure raises)."""
        from distributed import wait

        new = self._submit(fn, args, fn.__name__)
        wait(new)
        for f in new:
            if f.status == "error":
                f.result()  # raises the worker's exception here
        self.futures = new

    def map(self, fn: Callable, *args) -> list:
        """``fn(shard, *args)`` of every shard, gathered in shard order."""
        return self.client.gather(self._submit(fn, args, fn.__name__))

    def close(self) -> None:
        """Release the shards; close the client and cluster this backend made."""
        self.futures = []
        if self.own is not None:
            client, cluster = self.own
            client.close()
            if cluster is not None:
                cluster.close()


def dask_shards(make: Callable, client=None, workers: Optional[int] = None, scheduler: Optional[str] = None,
                security=None) -> DaskShards:
    """The shards on Dask.  ``make(n_workers, threads)`` gives either the shards (:class:`~.shots.Shard`, built
    here and scattered once, one per worker in turn) or loaders (pairs ``(fn, args)`` whose ``fn(*args)`` builds a
    shard on its worker: read there, never sent).  ``client``: an existing client, else one made by
    :func:`refine.scaleout.make_client` from ``workers`` / ``scheduler`` / ``security`` (closed with the backend);
    ``threads``: torch threads per worker (None: as the workers have them)."""
    from ..scaleout import make_client

    own, threads = None, None
    if client is None:
        logging.getLogger("distributed").setLevel(logging.CRITICAL)
        client, cluster, threads = make_client(workers, scheduler, security)
        own = (client, cluster)
    try:
        addresses = sorted(client.scheduler_info()["workers"])
        items = make(len(addresses), threads)
        placed = [addresses[k % len(addresses)] for k in range(len(items))]
        stamp = time.time_ns()
        futures = [client.scatter(it, workers=[w], direct=True) if isinstance(it, Shard) else
                   client.submit(it[0], *it[1], pure=False, workers=[w], allow_other_workers=False,
                                 key=f"ensemble-load-{k}-{stamp}")
                   for k, (it, w) in enumerate(zip(items, placed))]
    except BaseException:
        if own is not None:
            client.close()
            if own[1] is not None:
                own[1].close()
        raise
    return DaskShards(client, futures, placed, own, threads or 0)
