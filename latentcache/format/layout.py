"""The names of the on-disk format: the format version and the members of a sample in a shard. Both sides import
these; see docs/format.md for every file, member and field."""

from __future__ import annotations

import re

FORMAT_VERSION = 1


LATENTS = "latents.safetensors"


TEXT_EMBEDS = "text.safetensors"


KNOWN_MEMBERS = {LATENTS, "json", "txt", TEXT_EMBEDS}


# Tensors a sample's latents member may hold, beyond `mean` (and `logvar`): the image-to-video conditioning.
IMAGE_TENSORS = ("image_mean", "image_logvar")


SHA256_HEX = re.compile(r"^[0-9a-f]{64}$")
