"""`<key>.text.safetensors`: a clip's prompt tensors as its family's pipeline returns them, one prompt's worth (the
batch dimension dropped), under the pipeline's own names; and how a reader batches them again.

A tensor may be stored only at the positions its mask keeps (LTX-2's stacked Gemma hidden states, hundreds of MB a
prompt at full length, whose padded positions its text connectors zero before reading them): the member's metadata
`latentcache.trimmed` names such tensors and their masks (JSON, `{"prompt_embeds": "prompt_attention_mask"}`), and
`read_text` puts the rows back where the mask is set, zeros elsewhere. Shards written before this (CogVideoX, Wan,
LTX-Video: `prompt_embeds` and `attention_mask`, no metadata) read as they always did.
"""

from __future__ import annotations

import json
from typing import Any

import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from latentcache.errors import ShardFormatError

TRIMMED = "latentcache.trimmed"
# The name older shards gave the mask, and the name the dataset has always yielded it under.
LEGACY_MASK, LEGACY_MASK_AS = "attention_mask", "prompt_attention_mask"


def text_member(tensors: dict[str, torch.Tensor], trimmed: dict[str, str] | None = None) -> bytes:
    """The member's bytes; `trimmed` (name -> mask name) as the caller already cut those tensors to their mask."""
    metadata = {TRIMMED: json.dumps(trimmed, sort_keys=True)} if trimmed else None
    return save_safetensors({k: v.contiguous() for k, v in tensors.items()}, metadata=metadata)


def read_text(data: bytes, header: dict[str, Any], where: str) -> dict[str, torch.Tensor]:
    """The member's tensors at full length (trimmed ones put back at their mask's positions); `header` is the
    already checked safetensors header (`reader.safetensors_header`)."""
    tensors = load_safetensors(data)
    raw = (header.get("__metadata__") or {}).get(TRIMMED)
    if raw is None:
        return tensors
    try:
        trimmed = json.loads(raw)
    except json.JSONDecodeError as e:
        raise ShardFormatError(f"{where}: metadata {TRIMMED} is not JSON ({e})") from e
    if not isinstance(trimmed, dict):
        raise ShardFormatError(f"{where}: metadata {TRIMMED} is a {type(trimmed).__name__}, expected an object")
    for name, mask_name in trimmed.items():
        tensor, mask = tensors.get(name), tensors.get(mask_name) if isinstance(mask_name, str) else None
        if tensor is None or mask is None or mask.ndim != 1:
            raise ShardFormatError(f"{where}: metadata {TRIMMED} names {name!r} cut to mask {mask_name!r}, but the "
                                   f"member holds {sorted(tensors)} (a 1-d mask needed)")
        keep = mask.bool()
        if tensor.ndim < 1 or tensor.shape[0] != int(keep.sum()):
            raise ShardFormatError(f"{where}: {name} has {tuple(tensor.shape)[:1]} rows, its mask {mask_name} keeps "
                                   f"{int(keep.sum())}; the member is damaged, re-encode the shard")
        full = tensor.new_zeros((keep.shape[0], *tensor.shape[1:]))
        full[keep] = tensor
        tensors[name] = full
    return tensors


def item_text(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A sample's prompt tensors as the dataset yields them: the pipeline's names (older shards' `attention_mask`
    as the `prompt_attention_mask` the dataset has always called it)."""
    return {LEGACY_MASK_AS if name == LEGACY_MASK else name: t for name, t in tensors.items()}


def collate_text(items: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Stack each prompt tensor every item has, as the pipeline's batch: the pipelines pad every prompt to their
    max_length, so one family's tensors share their shapes. MiniMax-H3's pipeline takes each prompt whole (one
    request is one packed sequence): its tensors vary in length along the first axis, so they are zero-padded to the
    longest and `<name>_lengths` [B] says how many rows of each are the prompt's (slice them back per sample)."""
    out = {}
    for name in items[0] if items else ():
        found = [i.get(name) for i in items]
        if any(t is None for t in found):
            continue
        if len({tuple(t.shape[1:]) for t in found}) > 1 or any(t.ndim == 0 for t in found):
            raise ShardFormatError(f"prompt tensor {name} comes in shapes {sorted({tuple(t.shape) for t in found})} "
                                   "within one batch; the samples were encoded with different text settings")
        lengths = [t.shape[0] for t in found]
        if len(set(lengths)) == 1:
            out[name] = torch.stack(found)
            continue
        padded = found[0].new_zeros((len(found), max(lengths), *found[0].shape[1:]))
        for row, t in zip(padded, found, strict=True):
            row[: t.shape[0]] = t
        out[name], out[f"{name}_lengths"] = padded, torch.tensor(lengths)
    return out
