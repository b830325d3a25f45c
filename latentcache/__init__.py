"""latentcache: encode videos once with a video VAE; hand the trainer latents it can trust."""

from latentcache.dataset import LatentShardDataset
from latentcache.errors import (
    ConfigError,
    InputError,
    LatentcacheError,
    LatentMismatchError,
    ShardFormatError,
)

__all__ = [
    "ConfigError",
    "InputError",
    "LatentMismatchError",
    "LatentShardDataset",
    "LatentcacheError",
    "ShardFormatError",
]
__version__ = "0.1.0"
