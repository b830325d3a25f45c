"""Public import path kept for trainers: `latentcache.dataset.LatentShardDataset`, `.StatefulLoader`.

The read side lives in `latentcache.train`; this module only re-exports its public names from where each lives.
"""

from latentcache.train.dataset import LatentShardDataset
from latentcache.train.decoder import LAYOUTS
from latentcache.train.guard import bucket_latent_shape, transformer_problems
from latentcache.train.raw import raw_shape
from latentcache.train.resume import ResumeState, StatefulLoader
from latentcache.train.shard_sources import (
    MANIFEST_SEARCH_DEPTH,
    MAX_SHARD_BYTES,
    PIXEL_SUFFIXES,
    ShardRef,
    expand_urls,
    open_url,
    read_bytes,
    read_shard,
    resolve_source,
)

__all__ = ["LAYOUTS", "MANIFEST_SEARCH_DEPTH", "MAX_SHARD_BYTES", "PIXEL_SUFFIXES", "LatentShardDataset",
           "ResumeState", "ShardRef", "StatefulLoader", "bucket_latent_shape", "expand_urls", "open_url",
           "raw_shape", "read_bytes", "read_shard", "resolve_source", "transformer_problems"]
