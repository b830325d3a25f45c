"""Prompt embeddings of every family, end to end: `latentcache encode --text-encoder tiny-random` on real videos ->
real tars -> LatentShardDataset batches -> one forward pass of a tiny transformer of the family; each cached tensor
checked against what the family's diffusers pipeline's `encode_prompt` returns for the same caption.

The pipelines here are built by the test itself from the tiny components (the same weights latentcache loaded),
and called as a user would call them: only `max_sequence_length` (HunyuanVideo 1.5: `tokenizer_max_length`) differs
from the defaults, to keep the tiny runs short.
"""

from __future__ import annotations

import json
from pathlib import Path

import diffusers
import pytest
import torch
from conftest import fast_cases, shard_members
from safetensors.torch import load as load_safetensors

from latentcache.cli import main
from latentcache.encode.models.families import FAMILIES
from latentcache.encode.models.text import load_text_encoder
from latentcache.encode.models.text_families import TEXT_FAMILIES
from latentcache.encode.settings import TextSettings
from latentcache.tools.synthetic import write_video
from latentcache.train.dataset import LatentShardDataset

pytest.importorskip("transformers")

LENGTH = 32  # tokens per prompt (LTX-2's connectors need a multiple of their 8 registers)
CAPTIONS = {"red": "a red square crosses the frame", "sign": 'a white sign reads "hello" at night', "plain": None}
FRAMES = {"mochi": 13, "minimax-h3": 22}  # Mochi's 6k+1, MiniMax-H3's 17k+5; else 17 (4k+1 and 8k+1)
FAMILY_NAMES = ["cogvideox", "wan", "ltx", "hunyuanvideo", "mochi", "ltx2", "hunyuanvideo15", "minimax-h3"]
# latentcache's own copy of these pipelines' T5 recipe, stored as `prompt_embeds` and the tokenizer's
# `attention_mask` (bool), which the dataset yields as `prompt_attention_mask` (CogVideoX's and Wan's pipelines
# return no mask).
T5_RECIPE = ("cogvideox", "wan", "ltx")


def _pipeline(family: str, parts: dict) -> object:
    """The family's diffusers pipeline around the tiny text components, every other module None."""
    if family == "minimax-h3":
        from diffusers.modular_pipelines.minimax_h3.encoders import MiniMaxH3TextEncoderStep

        pipe = MiniMaxH3TextEncoderStep().init_pipeline()
        pipe.update_components(**parts)
        return pipe
    if family in T5_RECIPE:
        cls = {"cogvideox": diffusers.CogVideoXPipeline, "wan": diffusers.WanPipeline, "ltx": diffusers.LTXPipeline}
        return cls[family](transformer=None, vae=None, scheduler=None, **parts)
    if family == "hunyuanvideo":
        return diffusers.HunyuanVideoPipeline(transformer=None, vae=None, scheduler=None, **parts)
    if family == "mochi":
        return diffusers.MochiPipeline(scheduler=None, vae=None, transformer=None, **parts)
    if family == "ltx2":
        return diffusers.LTX2Pipeline(scheduler=None, vae=None, audio_vae=None, connectors=None, transformer=None,
                                      vocoder=None, **parts)
    # HunyuanVideo15Pipeline.__init__ reads vae.config, so it gets a tiny VAE it never uses for prompts.
    vae = diffusers.AutoencoderKLHunyuanVideo15(**FAMILIES["hunyuanvideo15"].tiny_config)
    pipe = diffusers.HunyuanVideo15Pipeline(transformer=None, vae=vae, scheduler=None, guider=None, **parts)
    pipe.tokenizer_max_length = LENGTH
    return pipe


def _encode_prompt(family: str, pipe: object, prompt: str) -> dict[str, torch.Tensor]:
    """What the pipeline's `encode_prompt` returns for one prompt, by the names its __call__ passes on."""
    if family == "minimax-h3":  # its text encoder block's outputs
        out = pipe(prompt=prompt, output=["prompt_embeds", "text_token_tags"])
        return {"prompt_embeds": out["prompt_embeds"], "text_token_tags": out["text_token_tags"][None]}
    if family in ("cogvideox", "wan"):
        embeds, _ = pipe.encode_prompt(prompt, do_classifier_free_guidance=False, max_sequence_length=LENGTH)
        return {"prompt_embeds": embeds}
    if family == "hunyuanvideo":
        embeds, pooled, mask = pipe.encode_prompt(prompt, max_sequence_length=LENGTH)
        return {"prompt_embeds": embeds, "pooled_prompt_embeds": pooled, "prompt_attention_mask": mask}
    if family in ("mochi", "ltx2", "ltx"):
        embeds, mask, _, _ = pipe.encode_prompt(prompt, max_sequence_length=LENGTH)
        return {"prompt_embeds": embeds, "prompt_attention_mask": mask}
    embeds, mask, embeds_2, mask_2 = pipe.encode_prompt(prompt)
    return {"prompt_embeds": embeds, "prompt_embeds_mask": mask, "prompt_embeds_2": embeds_2,
            "prompt_embeds_mask_2": mask_2}


@pytest.fixture(scope="module")
def captioned(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Three videos: two captioned (one with a quoted glyph text, which HunyuanVideo 1.5's ByT5 encodes), one not."""
    d = tmp_path_factory.mktemp("captioned_videos")
    for name, caption in CAPTIONS.items():
        write_video(d / name, codec="h264", num_frames=90, height=96, width=128)
        if caption is not None:
            (d / f"{name}.txt").write_text(caption, encoding="utf-8")
    return d


@pytest.fixture(scope="module", params=fast_cases(FAMILY_NAMES, fast=["cogvideox"]))
def encoded(request: pytest.FixtureRequest, captioned: Path, tmp_path_factory: pytest.TempPathFactory):
    family = request.param
    out = tmp_path_factory.mktemp(f"text_{family}") / "out"
    code = main(["encode", str(captioned), "--out", str(out), "--vae", f"tiny-random-{family}", "--device", "cpu",
                 "--frames", str(FRAMES.get(family, 17)), "--fps", "8", "--height", "64", "--width", "96",
                 "--text-encoder", "tiny-random",
                 # MiniMax-H3's pipeline takes the prompt whole: no length to set.
                 *(["--text-max-length", str(LENGTH)] if family != "minimax-h3" else [])])
    assert code == 0
    encoder = load_text_encoder(TextSettings(source="tiny-random",
                                             max_length=None if family == "minimax-h3" else LENGTH), family)
    return family, out, encoder




def test_cached_tensors_are_the_pipelines_encode_prompt(encoded):
    """Every tensor of each clip's `text.safetensors`, read by the dataset, equals the family's pipeline's
    `encode_prompt` for its caption (the empty prompt for the clip without one): same names, dtypes and values."""
    family, out, encoder = encoded
    pipe = _pipeline(family, {name: getattr(encoder.pipe, name) for name in TEXT_FAMILIES[family].components})
    items = list(LatentShardDataset(out))
    assert sorted(i["caption"] or "" for i in items) == sorted(c or "" for c in CAPTIONS.values())
    for item in items:
        got = {k: v for k, v in item.items() if k not in ("latents", "key", "meta", "caption")}
        if family == "minimax-h3" and item["caption"] is None:
            assert got == {}  # its pipeline cannot encode an empty prompt: no prompt tensors for this clip
            continue
        expected = _encode_prompt(family, pipe, item["caption"] or "")
        if family in T5_RECIPE:
            assert got["prompt_attention_mask"].dtype == torch.bool
            if family == "ltx":
                got["prompt_attention_mask"] = got["prompt_attention_mask"].to(expected["prompt_attention_mask"].dtype)
            expected.setdefault("prompt_attention_mask", got["prompt_attention_mask"][None])
        assert sorted(got) == sorted(expected)
        for name, tensor in expected.items():
            assert got[name].dtype == tensor.dtype, name
            if family == "ltx2" and name == "prompt_embeds":
                # Stored at the prompt's own tokens only; LTX2TextConnectors zeroes the padding before reading it
                # (the forward test below checks the connectors' output is the same).
                keep = expected["prompt_attention_mask"][0].bool()
                assert torch.equal(got[name][keep], tensor[0][keep]) and not got[name][~keep].any()
            else:
                assert torch.equal(got[name], tensor[0]), name


def test_the_glyph_encoder_sees_only_quoted_text(encoded):
    """HunyuanVideo 1.5: ByT5 embeds the quoted text of a caption; a caption without quotes gets zeros and a zero
    mask, as the pipeline gives."""
    family, out, _ = encoded
    if family != "hunyuanvideo15":
        pytest.skip("HunyuanVideo 1.5 only")
    by_caption = {i["caption"]: i for i in LatentShardDataset(out)}
    assert by_caption[CAPTIONS["sign"]]["prompt_embeds_mask_2"].sum() > 0
    plain = by_caption[CAPTIONS["red"]]
    assert plain["prompt_embeds_mask_2"].sum() == 0 and not plain["prompt_embeds_2"].any()


def test_ltx2_stores_only_the_prompts_tokens(encoded):
    family, out, _ = encoded
    if family != "ltx2":
        pytest.skip("LTX-2 only")
    for members in shard_members(out).values():
        stored = load_safetensors(members["text.safetensors"])
        assert stored["prompt_embeds"].shape[0] == stored["prompt_attention_mask"].sum() < LENGTH


def _tiny_transformer(family: str, channels: int) -> torch.nn.Module:
    """The smallest transformer of each family, its text widths those of the tiny text encoders (16; CLIP 8)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        if family == "minimax-h3":
            return diffusers.MiniMaxH3Transformer3DModel(
                num_attention_heads=2, attention_head_dim=16, hidden_size=32, num_layers=1, num_refiner_layers=1,
                ffn_dim=64, in_channels=channels, audio_in_channels=8, text_dim=16, freq_dim=16,
                time_embed_hidden_dim=32, time_embed_dim=16, rope_freq_dim=2).eval()
        if family == "cogvideox":
            return diffusers.CogVideoXTransformer3DModel(
                num_attention_heads=2, attention_head_dim=8, in_channels=channels, out_channels=channels,
                num_layers=1, text_embed_dim=16, time_embed_dim=8, sample_frames=17, sample_height=8, sample_width=12,
                patch_size=2, max_text_seq_length=LENGTH).eval()
        if family == "wan":
            return diffusers.WanTransformer3DModel(
                patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=8, in_channels=channels,
                out_channels=channels, text_dim=16, freq_dim=16, ffn_dim=32, num_layers=1, rope_max_seq_len=32).eval()
        if family == "ltx":
            return diffusers.LTXVideoTransformer3DModel(
                in_channels=channels, out_channels=channels, num_attention_heads=2, attention_head_dim=8,
                cross_attention_dim=16, num_layers=1, caption_channels=16).eval()
        if family == "hunyuanvideo":
            return diffusers.HunyuanVideoTransformer3DModel(
                in_channels=channels, out_channels=channels, num_attention_heads=2, attention_head_dim=8,
                num_layers=1, num_single_layers=1, num_refiner_layers=1, patch_size=2, patch_size_t=1,
                guidance_embeds=False, text_embed_dim=16, pooled_projection_dim=8, rope_axes_dim=(2, 2, 4)).eval()
        if family == "mochi":
            return diffusers.MochiTransformer3DModel(
                patch_size=2, num_attention_heads=2, attention_head_dim=8, num_layers=1, pooled_projection_dim=16,
                in_channels=channels, text_embed_dim=16, time_embed_dim=16, max_sequence_length=LENGTH).eval()
        if family == "hunyuanvideo15":
            return diffusers.HunyuanVideo15Transformer3DModel(
                in_channels=2 * channels + 1, out_channels=channels, num_attention_heads=2, attention_head_dim=8,
                num_layers=1, num_refiner_layers=1, text_embed_dim=16, text_embed_2_dim=16, image_embed_dim=16,
                rope_axes_dim=(2, 2, 4)).eval()
        return diffusers.LTX2VideoTransformer3DModel(
            in_channels=channels, out_channels=channels, num_attention_heads=2, attention_head_dim=8,
            cross_attention_dim=16, num_layers=1, caption_channels=16, audio_in_channels=8, audio_out_channels=8,
            audio_num_attention_heads=2, audio_attention_head_dim=8, audio_cross_attention_dim=16).eval()


def _ltx2_connectors() -> torch.nn.Module:
    from diffusers.pipelines.ltx2.connectors import LTX2TextConnectors

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return LTX2TextConnectors(
            caption_channels=16, text_proj_in_factor=3, video_connector_num_attention_heads=2,
            video_connector_attention_head_dim=8, video_connector_num_layers=1,
            video_connector_num_learnable_registers=8, audio_connector_num_attention_heads=2,
            audio_connector_attention_head_dim=8, audio_connector_num_layers=1,
            audio_connector_num_learnable_registers=8).eval()


def _forward(family: str, model: torch.nn.Module, batch: dict) -> torch.Tensor:
    """One denoising step fed from the batch the way the family's pipeline feeds its transformer (docs/families.md)."""
    latents = batch["latents"]
    b = latents.shape[0]
    t = torch.full((b,), 500)
    if family == "minimax-h3":
        return _minimax_h3_forward(model, latents, batch["prompt_embeds"], batch["text_token_tags"][0])
    if family == "cogvideox":
        return model(hidden_states=latents, encoder_hidden_states=batch["prompt_embeds"], timestep=t).sample
    if family == "wan":
        return model(hidden_states=latents, timestep=t, encoder_hidden_states=batch["prompt_embeds"]).sample
    if family == "ltx":
        _, _, frames, height, width = latents.shape
        return model(hidden_states=diffusers.LTXPipeline._pack_latents(latents, 1, 1),
                     encoder_hidden_states=batch["prompt_embeds"], timestep=t,
                     encoder_attention_mask=batch["prompt_attention_mask"], num_frames=frames, height=height,
                     width=width).sample
    if family == "hunyuanvideo":
        return model(hidden_states=latents, timestep=t, encoder_hidden_states=batch["prompt_embeds"],
                     encoder_attention_mask=batch["prompt_attention_mask"],
                     pooled_projections=batch["pooled_prompt_embeds"]).sample
    if family == "mochi":
        return model(hidden_states=latents, encoder_hidden_states=batch["prompt_embeds"], timestep=t,
                     encoder_attention_mask=batch["prompt_attention_mask"]).sample
    if family == "hunyuanvideo15":
        cond = torch.zeros_like(latents)
        return model(hidden_states=torch.cat([latents, cond, cond[:, :1]], dim=1), timestep=t.float(),
                     encoder_hidden_states=batch["prompt_embeds"], encoder_attention_mask=batch["prompt_embeds_mask"],
                     encoder_hidden_states_2=batch["prompt_embeds_2"],
                     encoder_attention_mask_2=batch["prompt_embeds_mask_2"],
                     image_embeds=torch.zeros(b, 4, 16)).sample
    # LTX-2: the text connectors (trainable, part of the model) run in the training step on the cached states.
    video_text, audio_text, text_mask = _ltx2_connectors()(batch["prompt_embeds"], batch["prompt_attention_mask"],
                                                           padding_side="left")
    _, _, frames, height, width = latents.shape
    video, _ = model(hidden_states=diffusers.LTX2Pipeline._pack_latents(latents, 1, 1),
                     audio_hidden_states=torch.zeros(b, 5, 8), encoder_hidden_states=video_text,
                     audio_encoder_hidden_states=audio_text, timestep=t.float(), sigma=t / 1000,
                     encoder_attention_mask=text_mask, audio_encoder_attention_mask=text_mask, num_frames=frames,
                     height=height, width=width, audio_num_frames=5, return_dict=False)
    return video


def _minimax_h3_forward(model: torch.nn.Module, latents: torch.Tensor, text: torch.Tensor,
                        text_tags: torch.Tensor) -> torch.Tensor:
    """One packed sequence [text | audio | video] laid out by its pipeline's own layout step, the text rows tagged
    with the cached `text_token_tags`; one silent audio row (latentcache has no audio VAE)."""
    import numpy as np
    from diffusers.modular_pipelines.minimax_h3.before_denoise import (
        MiniMaxH3PrepareLayoutStep,
        patchify_video_latents,
    )
    from diffusers.modular_pipelines.minimax_h3.modular_pipeline import MINIMAX_H3_AUDIO_TAG, MINIMAX_H3_VIDEO_TAG

    b, _, frames, height, width = latents.shape
    patch = tuple(model.config.patch_size)
    position_ids, tags, video_idx, audio_idx, text_idx, _, _ = MiniMaxH3PrepareLayoutStep.build_packed_sequence(
        text_tags, frames, height, width, 1, patch, 1, MINIMAX_H3_AUDIO_TAG, MINIMAX_H3_VIDEO_TAG)
    rows = patchify_video_latents(latents, patch).view(b, -1, latents.shape[1] * int(np.prod(patch)))
    return model(hidden_states=rows, audio_hidden_states=torch.zeros(b, 1, 8), encoder_hidden_states=text,
                 timestep=torch.tensor([0.5]), timestep_indices=torch.zeros(len(tags), dtype=torch.long),
                 token_tags=tags, position_ids=position_ids, video_indices=video_idx, audio_indices=audio_idx,
                 text_indices=text_idx).sample


def test_a_streamed_batch_feeds_a_tiny_transformer_of_the_family(encoded):
    family, out, encoder = encoded
    channels = {"cogvideox": 16, "wan": 16, "ltx": 128, "hunyuanvideo": 16, "mochi": 12, "hunyuanvideo15": 32,
                "ltx2": 128, "minimax-h3": 24}[family]
    model = _tiny_transformer(family, channels)
    if family == "minimax-h3":
        # One request is one packed sequence: a batch of one captioned clip, its prompt rows as cached.
        batches = list(LatentShardDataset.for_transformer(model, out, batch_size=1))
        batch = next(b for b in batches if b["caption"][0] is not None)
        with torch.no_grad():
            pred = _forward(family, model, batch)
        assert torch.isfinite(pred).all() and pred.numel() == batch["latents"].numel()
        return
    layout = "BTCHW" if family == "cogvideox" else "BCTHW"  # what CogVideoXTransformer3DModel takes
    (batch,) = list(LatentShardDataset.for_transformer(model, out, batch_size=3, layout=layout))
    assert batch["prompt_embeds"].shape[:2] == (3, LENGTH)
    with torch.no_grad():
        pred = _forward(family, model, batch)
    assert torch.isfinite(pred).all() and pred.numel() == batch["latents"].numel()
    if family == "ltx2":
        # The connectors give the same output on the stored states as on the pipeline's full, padded ones.
        pipe = _pipeline(family, {name: getattr(encoder.pipe, name) for name in TEXT_FAMILIES[family].components})
        full = [_encode_prompt(family, pipe, c or "") for c in batch["caption"]]
        embeds, mask = (torch.cat([f[k] for f in full]) for k in ("prompt_embeds", "prompt_attention_mask"))
        connectors = _ltx2_connectors()
        with torch.no_grad():
            for ours, theirs in zip(connectors(batch["prompt_embeds"], batch["prompt_attention_mask"]),
                                    connectors(embeds, mask), strict=True):
                assert torch.equal(ours, theirs)


def test_a_damaged_trimmed_text_member_names_the_shard_and_the_reason():
    """`latentcache.trimmed` that names a missing mask, or rows that do not match the mask, is a ShardFormatError
    naming the member; an untrimmed member (every shard before this) reads as it was written."""
    from safetensors.torch import save as save_safetensors

    from latentcache.errors import ShardFormatError
    from latentcache.format.reader import decode_sample
    from latentcache.format.text import text_member

    latents = save_safetensors({"mean": torch.zeros(4, 1, 2, 2)})
    mask = torch.tensor([0, 0, 1, 1, 1])

    def sample(text: bytes) -> dict:
        return {"__key__": "k", "latents.safetensors": latents, "text.safetensors": text}

    good = decode_sample(sample(text_member({"prompt_embeds": torch.ones(3, 2), "prompt_attention_mask": mask},
                                            {"prompt_embeds": "prompt_attention_mask"})), "s.tar")["text"]
    assert torch.equal(good["prompt_embeds"], torch.tensor([[0.0, 0], [0, 0], [1, 1], [1, 1], [1, 1]]))
    legacy = decode_sample(sample(save_safetensors({"prompt_embeds": torch.ones(5, 2)})), "s.tar")["text"]
    assert legacy["prompt_embeds"].shape == (5, 2)
    with pytest.raises(ShardFormatError, match=r"s.tar: member k.text.safetensors: .*has \(4,\) rows, its mask "
                                               r"prompt_attention_mask keeps 3"):
        decode_sample(sample(text_member({"prompt_embeds": torch.ones(4, 2), "prompt_attention_mask": mask},
                                         {"prompt_embeds": "prompt_attention_mask"})), "s.tar")
    with pytest.raises(ShardFormatError, match=r"s.tar: member k.text.safetensors: metadata latentcache.trimmed "
                                               r"names 'prompt_embeds' cut to mask 'missing'"):
        decode_sample(sample(text_member({"prompt_embeds": torch.ones(3, 2)}, {"prompt_embeds": "missing"})),
                      "s.tar")


def test_prompts_of_different_lengths_are_padded_with_their_lengths():
    """MiniMax-H3's prompt rows are each prompt's own length (its pipeline neither pads nor truncates): a batch
    zero-pads them to the longest and says each one's length; equal lengths stack as they are."""
    from latentcache.errors import ShardFormatError
    from latentcache.format.text import collate_text

    short, long = torch.ones(2, 4), torch.full((3, 4), 2.0)
    batch = collate_text([{"prompt_embeds": short, "text_token_tags": torch.zeros(2, dtype=torch.long)},
                          {"prompt_embeds": long, "text_token_tags": torch.zeros(3, dtype=torch.long)}])
    assert batch["prompt_embeds"].shape == (2, 3, 4) and batch["prompt_embeds_lengths"].tolist() == [2, 3]
    assert torch.equal(batch["prompt_embeds"][0, :2], short) and not batch["prompt_embeds"][0, 2:].any()
    assert torch.equal(batch["prompt_embeds"][1], long) and batch["text_token_tags_lengths"].tolist() == [2, 3]
    assert set(collate_text([{"prompt_embeds": short}, {"prompt_embeds": short}])) == {"prompt_embeds"}
    with pytest.raises(ShardFormatError, match=r"prompt tensor prompt_embeds comes in shapes \[\(2, 4\), \(2, 5\)\]"):
        collate_text([{"prompt_embeds": short}, {"prompt_embeds": torch.ones(2, 5)}])


def test_minimax_h3_takes_no_max_length():
    from latentcache.errors import ConfigError

    with pytest.raises(ConfigError, match="--text-max-length 32 with --family minimax-h3: its pipeline .*whole"):
        load_text_encoder(TextSettings(source="tiny-random", max_length=32), "minimax-h3")


@pytest.mark.parametrize("family", ["hunyuanvideo", "ltx2", "hunyuanvideo15"])
def test_a_pipeline_directory_loads_to_the_same_embeddings(family, tmp_path):
    """The text components saved in the pipeline layout (`text_encoder/`, `tokenizer/`, `*_2/`) load through
    `from_pretrained` and give the tiny-random encoder's tensors exactly."""
    tiny = load_text_encoder(TextSettings(source="tiny-random", max_length=LENGTH), family)
    for name in TEXT_FAMILIES[family].components:
        getattr(tiny.pipe, name).save_pretrained(tmp_path / name)
    loaded = load_text_encoder(TextSettings(source=str(tmp_path), max_length=LENGTH), family)
    ours, theirs = tiny.embed(CAPTIONS["sign"]), loaded.embed(CAPTIONS["sign"])
    assert sorted(ours) == sorted(theirs) and all(torch.equal(ours[k], theirs[k]) for k in ours)


def test_the_pipelines_own_settings_are_read_from_its_model_index(tmp_path):
    """MochiPipeline's force_zeros_for_empty_prompt, set in a pipeline's model_index.json, reaches the pipeline
    latentcache builds: the empty prompt's ids and mask are zeroed as that pipeline zeroes them."""
    tiny = load_text_encoder(TextSettings(source="tiny-random", max_length=LENGTH), "mochi")
    for name in TEXT_FAMILIES["mochi"].components:
        getattr(tiny.pipe, name).save_pretrained(tmp_path / name)
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "MochiPipeline",
                                                           "force_zeros_for_empty_prompt": True}))
    loaded = load_text_encoder(TextSettings(source=str(tmp_path), max_length=LENGTH), "mochi")
    assert loaded.pipe.config.force_zeros_for_empty_prompt
    assert not loaded.embed(None)["prompt_attention_mask"].any() and tiny.embed(None)["prompt_attention_mask"].any()
    assert torch.equal(loaded.embed(CAPTIONS["red"])["prompt_embeds"], tiny.embed(CAPTIONS["red"])["prompt_embeds"])
