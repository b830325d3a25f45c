"""`latentcache demo`: the whole path on real video, on any machine, in about a minute.

Writes a few videos with PyAV's encoders (h264 mp4 and vp9 webm, moving content, one with a caption), encodes them
with the built-in tiny random CogVideoX VAE (and, where `transformers` is installed, caches their prompt embeddings
with `--text-encoder tiny-random`), streams the shards back through `LatentShardDataset`, and runs one forward pass
of a tiny `CogVideoXTransformer3DModel` (in_channels=16) on them, fed the cached `prompt_embeds`.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from latentcache.encode.settings import (
    ClipSettings,
    EncodeSettings,
    JobSettings,
    RuntimeSettings,
    TextSettings,
    VAESettings,
)
from latentcache.errors import ConfigError
from latentcache.tools.synthetic import write_video

DEMO_CLIP = ClipSettings(frames=17, fps=8.0, height=64, width=96)
DEMO_TEXT_LENGTH = 8  # tokens per prompt: the tiny transformer's max_text_seq_length


def make_demo_videos(folder: Path) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    videos = [
        write_video(folder / "walk", codec="h264", num_frames=72, height=120, width=160),
        write_video(folder / "pan", codec="vp9", num_frames=72, height=96, width=128),
        write_video(folder / "portrait", codec="h264", num_frames=60, height=160, width=96, fps=20),
        write_video(folder / "phone", codec="vp9", num_frames=96, height=96, width=128, fps=30),
    ]
    (folder / "walk.txt").write_text("a red square walks from left to right", encoding="utf-8")
    return videos


def tiny_transformer(latent_frames: int, latent_height: int, latent_width: int, in_channels: int = 16,
                     text_embed_dim: int = 32):
    from diffusers import CogVideoXTransformer3DModel

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return CogVideoXTransformer3DModel(
            num_attention_heads=2, attention_head_dim=8, in_channels=in_channels, out_channels=in_channels,
            num_layers=1, text_embed_dim=text_embed_dim, time_embed_dim=8, sample_frames=(latent_frames - 1) * 4 + 1,
            sample_height=latent_height, sample_width=latent_width, patch_size=2, max_text_seq_length=8,
        ).eval()


def demo_settings(videos: Path, latents: Path, text: bool = False) -> JobSettings:
    """What the demo encodes with: the built-in tiny random CogVideoX VAE, 17x64x96 clips, two per shard; with
    `text`, prompt embeddings from the built-in tiny random text encoder."""
    return JobSettings(
        inputs=(str(videos),),
        out=latents,
        encode=EncodeSettings(clip=DEMO_CLIP, vae=VAESettings(source="tiny-random-cogvideox", family="cogvideox"),
                              samples_per_shard=2,
                              text=TextSettings(source="tiny-random", max_length=DEMO_TEXT_LENGTH) if text else None),
        # batch_size None: auto, as `latentcache encode` defaults to.
        runtime=RuntimeSettings(batch_size=None),
        overwrite=True,
    )


# Written into --out by the demo, so a second demo there may replace what the first one wrote, and nothing else.
DEMO_MARKER = "latentcache-demo.txt"


def claim_demo_folder(out: Path) -> None:
    """The demo writes videos/ and latents/ (with --overwrite) into `out`: only into a new or empty folder, or one an
    earlier demo made, never over a user's files."""
    if out.exists() and not out.is_dir():
        raise ConfigError(f"{out}: not a directory; the demo writes videos/ and latents/ into a new folder")
    if out.is_dir() and any(out.iterdir()) and not (out / DEMO_MARKER).is_file():
        raise ConfigError(f"{out}: not empty and not made by `latentcache demo`; the demo overwrites videos/ and "
                          "latents/ there: give a new folder with --out")
    out.mkdir(parents=True, exist_ok=True)
    (out / DEMO_MARKER).write_text("made by `latentcache demo`; a later demo may overwrite videos/ and latents/\n")


def run_demo(out: Path) -> int:
    import importlib.util

    from latentcache.encode import job
    from latentcache.train.dataset import LatentShardDataset

    claim_demo_folder(out)
    videos = make_demo_videos(out / "videos")
    print(f"wrote {len(videos)} videos to {out / 'videos'}: " + ", ".join(p.name for p in videos))
    latents_dir = out / "latents"
    # Prompt embeddings need the `text` extra (transformers); without it the demo runs on latents alone.
    text = importlib.util.find_spec("transformers") is not None
    started = time.perf_counter()
    code = job.run(demo_settings(out / "videos", latents_dir, text=text))
    print(f"encode: {len(videos)} clips in {time.perf_counter() - started:.1f}s (exit code {code})"
          + ("" if text else "; no prompt embeddings: pip install 'latentcache[text]' for them"))
    first = next(iter(LatentShardDataset(latents_dir, expected_channels=16, batch_size=2, layout="BTCHW")))
    _, t, c, h, w = first["latents"].shape
    print(f"LatentShardDataset batch: latents {tuple(first['latents'].shape)} {first['latents'].dtype} "
          "(B, T, C, H, W)" + (f", prompt_embeds {tuple(first['prompt_embeds'].shape)}" if text else ""))
    model = tiny_transformer(t, h, w, in_channels=c, text_embed_dim=16 if text else 32)
    # for_transformer checks channels, frames and sizes against the model's config before any step is taken.
    dataset = LatentShardDataset.for_transformer(model, latents_dir, batch_size=2, layout="BTCHW")
    with torch.no_grad():
        for batch in dataset:
            latents = batch["latents"]
            prompts = batch["prompt_embeds"] if text else torch.zeros(latents.shape[0], DEMO_TEXT_LENGTH, 32)
            pred = model(hidden_states=latents, encoder_hidden_states=prompts,
                         timestep=torch.tensor([500] * latents.shape[0])).sample
            captions = ", ".join(repr(c) for c in batch["caption"])
            print(f"  CogVideoXTransformer3DModel(in_channels={model.config.in_channels}) forward on "
                  f"{batch['key']}: {tuple(pred.shape)}, finite={bool(torch.isfinite(pred).all())}; "
                  f"captions {captions}")
    print(f"demo done: shards and manifest in {latents_dir}")
    return code
