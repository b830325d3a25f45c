"""Public import path kept for CogVideo SAT configs, which name `latentcache.sat.SATLatentDataset` as `data.target`.

The adapter lives in `latentcache.train.sat`; this module only re-exports it.
"""

from latentcache.train.sat import SATLatentDataset

__all__ = ["SATLatentDataset"]
