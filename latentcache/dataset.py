"""Public import path kept for trainers: `latentcache.dataset.LatentShardDataset`, `.StatefulLoader`.

The read side lives in `latentcache.train`; this module only re-exports its public names.
"""

from latentcache.train import dataset as _dataset
from latentcache.train.dataset import *  # noqa: F403  (the names its __all__ lists)

__all__ = _dataset.__all__
