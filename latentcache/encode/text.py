"""Captions -> prompt embeddings, cached next to the latents as `<key>.text.safetensors`.

Each family's diffusers pipeline encodes prompts its own way (tokenizer length, whether the attention mask reaches
the encoder, Wan's zeroed padding); each family's `text_recipe` (in families.FAMILIES) copies those choices so a
trainer that reads the cached `prompt_embeds` gets exactly what the pipeline's `encode_prompt` would give. Each
distinct caption is encoded once (an LRU cache: clips of one video share a caption and sit next to each other in
the plan).

`transformers` is the optional extra `text`: `pip install 'latentcache[text]'`.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from pathlib import Path
from typing import Any

import torch

from latentcache.encode.families import FAMILIES, TextRecipe, family_of
from latentcache.encode.settings import TextSettings
from latentcache.encode.vae import resolve_device, resolve_dtype
from latentcache.errors import ConfigError, MissingDependency

log = logging.getLogger(__name__)

CACHE_SIZE = 128  # distinct captions kept; CogVideoX's 226x4096 bf16 embedding is 1.8 MB
EMPTY_PROMPT = ""  # what a clip without a caption is embedded as: the pipelines' unconditional prompt


def recipe_for(family: str) -> TextRecipe:
    """The family's text recipe (`VAEFamily.text_recipe`); a ConfigError saying why for a family without one."""
    found = family_of(family)
    if found.text_recipe is None:
        known = ", ".join(f.name for f in FAMILIES.values() if f.text_recipe is not None)
        raise ConfigError(f"--text-encoder with --family {family}: {found.text_unsupported} (text recipes: "
                          f"{known}); drop --text-encoder (captions are still stored) and encode prompts in the "
                          "training loop")
    return found.text_recipe


def _import_transformers() -> Any:
    try:
        import transformers
    except ImportError as e:
        raise MissingDependency(
            "--text-encoder needs the `transformers` package, found none; install the extra: "
            "pip install 'latentcache[text]'"
        ) from e
    return transformers


class TextEncoder:
    """A tokenizer and encoder that give each caption the tensors `prompt_embeds` and `attention_mask`."""

    def __init__(self, tokenizer: Any, model: Any, recipe: TextRecipe, max_length: int, device: torch.device) -> None:
        self.tokenizer = tokenizer
        self.model = model
        self.recipe = recipe
        self.max_length = max_length
        self.device = device
        self._cache: OrderedDict[str, dict[str, torch.Tensor]] = OrderedDict()
        self.encoded_prompts = 0  # forward passes' worth of prompts, for tests and logs

    def embed_many(self, captions: list[str | None]) -> list[dict[str, torch.Tensor]]:
        """One dict per caption, encoding only captions not seen recently.

        A clip without a caption gets the embedding of the empty prompt "", exactly what the pipelines compute for
        `prompt=""` (the same tokenizer call and encoder pass): every clip of a run has `prompt_embeds`, so a batch
        never loses them because one of its clips had no caption.
        """
        prompts = [EMPTY_PROMPT if c is None else c for c in captions]
        todo = list(dict.fromkeys(p for p in prompts if p not in self._cache))
        fresh = dict(zip(todo, self._encode(todo), strict=True)) if todo else {}
        out = []
        for prompt in prompts:
            tensors = fresh.get(prompt)
            if tensors is None:
                tensors = self._cache[prompt]
                self._cache.move_to_end(prompt)
            out.append(tensors)
        # Evict only once the answer is built: a batch may hold more new captions than the cache.
        for prompt, tensors in fresh.items():
            self._cache[prompt] = tensors
            if len(self._cache) > CACHE_SIZE:
                self._cache.popitem(last=False)
        return out

    def embed(self, caption: str | None) -> dict[str, torch.Tensor]:
        return self.embed_many([caption])[0]

    @torch.inference_mode()
    def _encode(self, prompts: list[str]) -> list[dict[str, torch.Tensor]]:
        if self.recipe.wan_style:
            from diffusers.pipelines.wan.pipeline_wan import prompt_clean

            prompts = [prompt_clean(p) for p in prompts]
        tokens = self.tokenizer(prompts, padding="max_length", max_length=self.max_length, truncation=True,
                                add_special_tokens=True, return_attention_mask=True, return_tensors="pt")
        ids = tokens.input_ids.to(self.device)
        mask = tokens.attention_mask.to(self.device)
        if self.recipe.wan_style:
            embeds = self.model(ids, mask).last_hidden_state
            # Positions past each prompt's length are zeros, as WanPipeline makes them.
            embeds = embeds * mask.unsqueeze(-1).to(embeds.dtype)
        else:
            embeds = self.model(ids)[0]
        self.encoded_prompts += len(prompts)
        return [{"prompt_embeds": e.contiguous().cpu(), "attention_mask": m.bool().cpu()}
                for e, m in zip(embeds, mask, strict=True)]


def _load_part(cls: Any, source: str, subfolder: str, revision: str | None, **kwargs: Any) -> Any:
    """Load from a pipeline's subfolder, else from the root (a directory or repo holding just this part)."""
    if Path(source).is_dir():
        sub = subfolder if (Path(source) / subfolder).is_dir() else None
        return cls.from_pretrained(source, subfolder=sub, **kwargs) if sub else cls.from_pretrained(source, **kwargs)
    try:
        return cls.from_pretrained(source, subfolder=subfolder, revision=revision, **kwargs)
    except OSError:
        return cls.from_pretrained(source, revision=revision, **kwargs)


def load_text_encoder(settings: TextSettings, family: str, device: torch.device | str = "cpu") -> TextEncoder:
    """The family's text encoder and tokenizer from a local directory or hub id (pipeline layout or bare)."""
    recipe = recipe_for(family)
    transformers = _import_transformers()
    dev = resolve_device(str(device))
    # T5 and UMT5 were trained in bf16 and overflow in fp16.
    dtype = resolve_dtype(settings.dtype, dev, gpu_default=torch.bfloat16, flag="text encoder dtype")
    encoder_cls = getattr(transformers, recipe.encoder_class)
    try:
        tokenizer = _load_part(transformers.AutoTokenizer, settings.source, "tokenizer", settings.revision)
        model = _load_part(encoder_cls, settings.source, "text_encoder", settings.revision, dtype=dtype)
    except (OSError, ValueError) as e:
        raise ConfigError(
            f"--text-encoder {settings.source}: could not load a tokenizer and {recipe.encoder_class} ({e}). "
            "Pass a pipeline (with text_encoder/ and tokenizer/) or a directory holding both, as a local path or "
            "a hub id reachable from here."
        ) from e
    model = model.to(dev).eval().requires_grad_(False)
    max_length = settings.max_length or recipe.max_length
    log.info("text encoder %s (%s, %s, max length %d) on %s", settings.source, recipe.encoder_class,
             str(dtype).split(".")[-1], max_length, dev)
    return TextEncoder(tokenizer, model, recipe, max_length, dev)
