"""Captions -> prompt embeddings, cached next to the latents as `<key>.text.safetensors`.

Each family's diffusers pipeline encodes prompts its own way (templates, second encoders, masks, pooled outputs);
its `TextFamily` (encode/models/text_families.py) says how, so a trainer that reads the cached tensors gets exactly what
the pipeline's `encode_prompt` hands its transformer, under the same names. Each distinct caption is encoded once
(an LRU cache: clips of one video share a caption and sit next to each other in the plan).

`transformers` is the optional extra `text`: `pip install 'latentcache[text]'`.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from pathlib import Path
from typing import Any

import torch

from latentcache.encode.models.families import family_of
from latentcache.encode.models.text_families import TEXT_FAMILIES, TextFamily
from latentcache.encode.models.vae import resolve_device, resolve_dtype
from latentcache.encode.settings import TextSettings
from latentcache.errors import ConfigError, MissingDependency

log = logging.getLogger(__name__)

CACHE_SIZE = 128  # distinct captions kept; CogVideoX's 226x4096 bf16 embedding is 1.8 MB
EMPTY_PROMPT = ""  # what a clip without a caption is embedded as: the pipelines' unconditional prompt


def text_family(family: str) -> TextFamily:
    """The family's prompt recipe (`text_families.TEXT_FAMILIES`); a ConfigError naming those there are."""
    family_of(family)  # an unknown family is named as such
    found = TEXT_FAMILIES.get(family)
    if found is None:
        raise ConfigError(f"--text-encoder with --family {family}: latentcache has no prompt recipe for it yet "
                          f"(recipes: {', '.join(sorted(TEXT_FAMILIES))}); drop --text-encoder (captions are still "
                          "stored) and encode prompts in the training loop")
    return found


def _import_transformers() -> Any:
    try:
        import transformers
    except ImportError as e:
        raise MissingDependency(
            "--text-encoder needs the `transformers` package, found none; install the extra: "
            "pip install 'latentcache[text]'"
        ) from e
    return transformers


TINY_RANDOM = "tiny-random"  # `--text-encoder tiny-random`: the family's text components with random weights


class TextEncoder:
    """A family's text components, in its pipeline, giving each caption the tensors its transformer is handed."""

    def __init__(self, pipe: Any, family: TextFamily, max_length: int | None, device: torch.device) -> None:
        self.pipe = pipe
        self.family = family
        self.max_length = max_length
        self.device = device
        self._cache: OrderedDict[str, dict[str, torch.Tensor]] = OrderedDict()
        self.encoded_prompts = 0  # forward passes' worth of prompts, for tests and logs

    @property
    def trimmed(self) -> dict[str, str]:
        """Tensors stored only at their mask's positions (name -> mask name), for the writer's metadata."""
        return self.family.trimmed

    def embed_many(self, captions: list[str | None]) -> list[dict[str, torch.Tensor] | None]:
        """One dict per caption, encoding only captions not seen recently.

        A clip without a caption gets the embedding of the empty prompt "", exactly what the pipelines compute for
        `prompt=""` (the same tokenizer call and encoder pass): every clip of a run has `prompt_embeds`, so a batch
        never loses them because one of its clips had no caption. Where the pipeline cannot encode "" (MiniMax-H3,
        `TextFamily.encodes_empty`), such a clip gets None: no prompt tensors.
        """
        prompts = [EMPTY_PROMPT if c is None else c for c in captions]
        if not self.family.encodes_empty:
            prompts = [p or None for p in prompts]
        todo = list(dict.fromkeys(p for p in prompts if p is not None and p not in self._cache))
        fresh = {p: self._encode(p) for p in todo}
        out = []
        for prompt in prompts:
            if prompt is None:
                out.append(None)
                continue
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

    def embed(self, caption: str | None) -> dict[str, torch.Tensor] | None:
        return self.embed_many([caption])[0]

    @torch.inference_mode()
    def _encode(self, prompt: str) -> dict[str, torch.Tensor]:
        """One prompt per call, as the pipeline encodes one prompt: nothing depends on which captions are new
        together (a batch would pad or, in MochiPipeline with force_zeros_for_empty_prompt, zero by its last)."""
        batched = self.family.encode(self.pipe, [prompt], self.max_length, self.device)
        self.encoded_prompts += 1
        out = {name: t[0].contiguous().cpu() for name, t in batched.items()}
        for name, mask in self.family.trimmed.items():
            out[name] = out[name][out[mask].bool()].contiguous()
        return out


def _load_part(cls: Any, source: str, subfolder: str, revision: str | None, **kwargs: Any) -> Any:
    """Load from a pipeline's subfolder, else from the root (a directory or repo holding just this part)."""
    if Path(source).is_dir():
        sub = subfolder if (Path(source) / subfolder).is_dir() else None
        return cls.from_pretrained(source, subfolder=sub, **kwargs) if sub else cls.from_pretrained(source, **kwargs)
    try:
        return cls.from_pretrained(source, subfolder=subfolder, revision=revision, **kwargs)
    except OSError:
        return cls.from_pretrained(source, revision=revision, **kwargs)


def _pipeline_config(cls: Any, source: str, revision: str | None) -> dict[str, Any]:
    """The pipeline's own settings from its model_index.json, if the source has one (e.g. MochiPipeline's
    force_zeros_for_empty_prompt); components are passed separately."""
    try:
        config = cls.load_config(source, revision=revision)
    except (OSError, ValueError):
        return {}
    return {k: v for k, v in config.items() if not k.startswith("_") and not isinstance(v, (list, tuple))}


def build_pipeline(family: TextFamily, parts: dict[str, Any], config: dict[str, Any] | None = None,
                   vae_family: str | None = None) -> Any:
    """The family's diffusers pipeline holding only `parts` (its text components); every other module None.

    HunyuanVideo15Pipeline's __init__ reads `vae.config` even when the VAE is None: for such a pipeline the VAE
    family's tiny random VAE stands in while __init__ runs and is dropped after (prompt encoding never uses it).
    """
    import inspect

    import diffusers

    if family.build is not None:
        return family.build(parts)
    cls = getattr(diffusers, family.pipeline)
    signature = inspect.signature(cls.__init__).parameters
    kwargs = {p: None for p, v in signature.items() if p != "self" and v.default is inspect.Parameter.empty}
    kwargs.update({k: v for k, v in (config or {}).items() if k in signature})
    try:
        return cls(**{**kwargs, **parts})
    except AttributeError:
        if vae_family is None or "vae" not in kwargs:
            raise
    vae_record = family_of(vae_family)
    with torch.random.fork_rng(devices=[]):
        vae = getattr(diffusers, vae_record.class_name)(**vae_record.tiny_config)
    pipe = cls(**{**kwargs, **parts, "vae": vae})
    pipe.register_modules(vae=None)
    return pipe


def _check_config(transformers: Any, cls: Any, source: str, name: str, revision: str | None) -> None:
    """Refuse another model's config before loading weights: a class built from a foreign config falls back to its
    defaults (a LlamaModel from a T5 config is a 7B-parameter Llama)."""
    config = _load_part(transformers.AutoConfig, source, name, revision)
    expected = cls.config_class.model_type
    # Qwen2_5_VLTextModel (qwen2_5_vl_text) may come with the whole Qwen2.5-VL's config (qwen2_5_vl).
    if not (expected.startswith(config.model_type) or config.model_type.startswith(expected)):
        raise ValueError(f"its config is a {config.model_type} model, {cls.__name__} takes {expected}")


def _load_parts(settings: TextSettings, family: TextFamily, dtype: torch.dtype) -> dict[str, Any]:
    transformers = _import_transformers()
    parts = {}
    for name, class_name in family.components.items():
        cls = getattr(transformers, class_name)
        model = not name.startswith(("tokenizer", "processor"))
        kwargs = {"dtype": dtype} if model else {}
        try:
            if model:
                _check_config(transformers, cls, settings.source, name, settings.revision)
            parts[name] = _load_part(cls, settings.source, name, settings.revision, **kwargs)
        except ImportError as e:  # Qwen3-VL's processor needs torchvision
            raise MissingDependency(f"--text-encoder {settings.source}: loading {name} ({class_name}) needs a package "
                                    f"that is not installed: {e}") from e
        except (OSError, ValueError) as e:
            raise ConfigError(
                f"--text-encoder {settings.source}: could not load {name} ({class_name}) for {family.pipeline} "
                f"({e}). Pass the pipeline (with {'/, '.join(family.components)}/ subfolders) as a local path or a "
                f"hub id reachable from here, or `--text-encoder {TINY_RANDOM}` to try it with random weights."
            ) from e
    return parts


def load_text_encoder(settings: TextSettings, family: str, device: torch.device | str = "cpu") -> TextEncoder:
    """The family's text components from a local directory or hub id (pipeline layout or bare), or the built-in
    `tiny-random` ones, in the family's pipeline."""
    recipe = text_family(family)
    if recipe.max_length is None and settings.max_length is not None:
        raise ConfigError(f"--text-max-length {settings.max_length} with --family {family}: its pipeline "
                          f"({recipe.pipeline}) takes each prompt whole, untruncated and unpadded; drop "
                          "--text-max-length")
    _import_transformers()
    dev = resolve_device(str(device))
    # T5 and UMT5 were trained in bf16 and overflow in fp16.
    dtype = resolve_dtype(settings.dtype, dev, gpu_default=torch.bfloat16, flag="text encoder dtype")
    if settings.source == TINY_RANDOM:
        parts, config = recipe.tiny(), None
        log.warning("--text-encoder %s: random weights, for demos and tests only; its embeddings mean nothing",
                    TINY_RANDOM)
    else:
        parts = _load_parts(settings, recipe, dtype)
        pipeline_cls = getattr(_import_diffusers(), recipe.pipeline, None)
        config = _pipeline_config(pipeline_cls, settings.source, settings.revision) if recipe.build is None else None
    for part in parts.values():
        if isinstance(part, torch.nn.Module):
            part.to(device=dev, dtype=dtype).eval().requires_grad_(False)
    pipe = build_pipeline(recipe, parts, config, vae_family=family)
    max_length = settings.max_length or recipe.max_length
    log.info("text encoder %s (%s, %s, max length %s) on %s", settings.source, recipe.pipeline,
             str(dtype).split(".")[-1], max_length, dev)
    return TextEncoder(pipe, recipe, max_length, dev)


def _import_diffusers() -> Any:
    import diffusers

    return diffusers
