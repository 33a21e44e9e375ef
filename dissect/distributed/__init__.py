"""Multi-process runs with ``torch.distributed`` (launched by ``torchrun``): one process per GPU.

How a run is split
------------------
``capture`` and ``netdissect.dissect`` look for an initialized process group, or for the
``RANK`` / ``WORLD_SIZE`` / ``LOCAL_RANK`` variables that ``torchrun`` sets (then they join the
group themselves: NCCL when the run uses CUDA, each rank on ``cuda:LOCAL_RANK``; gloo on CPU).
Without either, nothing changes: one process, as before.

- **Sharding.** The dataset's rows are cut into contiguous blocks of whole batches
  (:func:`shard_range`): rank ``r`` gets the ``r``-th block, the first ranks one batch more when
  the batches do not divide evenly, so the shards concatenate in dataset order and every batch
  is a batch the single-process run would have used (same inputs per forward pass, hence the
  same numbers on deterministic kernels).
- **Shards and the published store.** Rank ``r`` of ``W`` writes an ordinary, resumable store
  ``<path>.shards/rank{r:05d}-of-{W:05d}.h5`` next to ``<path>`` (the folder name keeps the full
  file name, so ``a.h5`` and ``a.hdf5`` never share one). Once every rank is done, rank 0
  publishes ``<path>`` as an HDF5 *virtual* store (:func:`publish_shards`): every dataset is a
  virtual dataset mapping the shards' rows in order, with the shards named by paths relative to
  ``<path>``'s folder, so the folder can be moved or copied as a whole. Publishing writes only
  metadata (milliseconds whatever the size) and needs no second copy of terabytes of
  activations; :func:`consolidate` makes a standalone single file when one is wanted. A virtual
  dataset whose source file is missing would read as zeros, so
  :class:`~dissect.store.ActivationStore` refuses a published store whose shards are gone.
- **Resume** works per shard: a rerun with the same world size continues each rank's shard
  where it stopped and then publishes; complete shards are not recomputed.
- **Exact merging** (:mod:`dissect.netdissect`): thresholds come from each rank's own exact
  top values merged by counting all-reduces (:func:`dissect.stats.exact_quantiles`), IoU counts
  are int64 tensors summed with ``all_reduce``; every rank returns the single-process result.
- **Failures.** Every synchronization point is a gloo ``monitored_barrier`` (on a gloo group of
  its own when the data backend is NCCL, also right before each NCCL collective) with a timeout
  (default 30 minutes); at the end of a capture the ranks also exchange their outcomes, so an
  error on one rank is raised on every rank, naming it. A rank that died or hangs makes the
  others raise :class:`DistributedError` (at once when its connection closes, at the latest
  after the timeout) instead of waiting forever.

All ranks must see one filesystem at ``<path>`` (one machine, or NFS/Lustre across nodes):
rank 0 reads every shard when it publishes.
"""

from .context import (
    DEFAULT_TIMEOUT,
    DistContext,
    DistributedError,
    env_ranks,
    resolve,
    session,
    setup,
)
from .shards import (
    SHARD_SUFFIX,
    consolidate,
    publish_shards,
    shard_attr,
    shard_dir,
    shard_path,
    shard_range,
)

__all__ = [
    "DEFAULT_TIMEOUT",
    "SHARD_SUFFIX",
    "DistContext",
    "DistributedError",
    "consolidate",
    "env_ranks",
    "publish_shards",
    "resolve",
    "session",
    "setup",
    "shard_attr",
    "shard_dir",
    "shard_path",
    "shard_range",
]
