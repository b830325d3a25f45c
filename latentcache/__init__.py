"""latentcache: encode videos once with a video VAE; hand the trainer latents it can trust."""

from latentcache.errors import (
    ConfigError,
    InputError,
    LatentcacheError,
    LatentMismatchError,
    ShardFormatError,
)
from latentcache.train.dataset import LatentShardDataset

__all__ = [
    "ConfigError",
    "InputError",
    "LatentMismatchError",
    "LatentShardDataset",
    "LatentcacheError",
    "ShardFormatError",
]
__version__ = "0.1.0"
