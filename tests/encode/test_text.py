"""Captions (sidecar .txt, CSV and JSONL lists) and cached prompt embeddings, through real tars and the dataset.

The text encoders are tiny random T5/UMT5 models and a word-level tokenizer built here and saved in the pipeline
layout (text_encoder/, tokenizer/), so loading goes through the real `from_pretrained` path with no download.
Their embeddings are compared with what each diffusers pipeline's own `_get_t5_prompt_embeds` computes.
"""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path
from types import SimpleNamespace

import diffusers
import pytest
import torch
from conftest import shard_members
from safetensors.torch import load as load_safetensors

from latentcache.cli import main
from latentcache.encode.models.text import TextEncoder, load_text_encoder
from latentcache.encode.settings import TextSettings
from latentcache.errors import ConfigError
from latentcache.tools.synthetic import write_video
from latentcache.train.dataset import LatentShardDataset

transformers = pytest.importorskip("transformers")

WORDS = ["a", "red", "square", "crosses", "the", "frame", "blue", "circle", "spins", "slowly", "green", "night"]
CAPTIONS = {"red": "a red square crosses the frame", "blue": "a blue circle spins slowly"}
MAX_LENGTH = 16
CLIP = ["--vae", "tiny-random-cogvideox", "--device", "cpu", "--frames", "17", "--fps", "8", "--height", "64",
        "--width", "96"]


def _tokenizer() -> transformers.PreTrainedTokenizerFast:
    from tokenizers import Tokenizer, models, pre_tokenizers, processors

    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2, **{w: i + 3 for i, w in enumerate(WORDS)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    # T5 tokenizers end every prompt with </s>.
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>",
                                                unk_token="<unk>")


def _save_pipeline(root: Path, encoder_class: str, config_class: str) -> Path:
    torch.manual_seed(0)
    config = getattr(transformers, config_class)(vocab_size=len(WORDS) + 3, d_model=16, d_kv=8, d_ff=32,
                                                 num_layers=1, num_heads=2, pad_token_id=0, eos_token_id=1,
                                                 decoder_start_token_id=0)
    getattr(transformers, encoder_class)(config).save_pretrained(root / "text_encoder")
    _tokenizer().save_pretrained(root / "tokenizer")
    return root


@pytest.fixture(scope="module")
def t5_pipeline(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _save_pipeline(tmp_path_factory.mktemp("t5_pipeline"), "T5EncoderModel", "T5Config")


@pytest.fixture(scope="module")
def umt5_pipeline(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _save_pipeline(tmp_path_factory.mktemp("umt5_pipeline"), "UMT5EncoderModel", "UMT5Config")


def _as_pipeline(encoder: TextEncoder) -> SimpleNamespace:
    """What a diffusers pipeline's `_get_t5_prompt_embeds` reads from `self`."""
    return SimpleNamespace(tokenizer=encoder.pipe.tokenizer, text_encoder=encoder.pipe.text_encoder,
                           _execution_device=torch.device("cpu"))


# ------------------------------------------------------------------------ embeddings as the pipelines make them


def test_cogvideox_embeddings_match_the_pipeline(t5_pipeline):
    encoder = load_text_encoder(TextSettings(source=str(t5_pipeline), max_length=MAX_LENGTH), "cogvideox")
    got = encoder.embed(CAPTIONS["red"])
    expected = diffusers.CogVideoXPipeline._get_t5_prompt_embeds(
        _as_pipeline(encoder), CAPTIONS["red"], max_sequence_length=MAX_LENGTH, dtype=torch.float32)
    assert got["prompt_embeds"].shape == (MAX_LENGTH, 16)
    torch.testing.assert_close(got["prompt_embeds"], expected[0])
    # 6 words + </s>, then padding.
    assert got["attention_mask"].dtype == torch.bool and got["attention_mask"].sum() == 7


def test_ltx_embeddings_and_mask_match_the_pipeline(t5_pipeline):
    encoder = load_text_encoder(TextSettings(source=str(t5_pipeline), max_length=MAX_LENGTH), "ltx")
    got = encoder.embed(CAPTIONS["blue"])
    embeds, mask = diffusers.LTXPipeline._get_t5_prompt_embeds(
        _as_pipeline(encoder), CAPTIONS["blue"], max_sequence_length=MAX_LENGTH, dtype=torch.float32)
    torch.testing.assert_close(got["prompt_embeds"], embeds[0])
    assert torch.equal(got["attention_mask"], mask[0].bool())


def test_wan_embeddings_are_zero_past_the_prompt_like_the_pipeline(umt5_pipeline):
    encoder = load_text_encoder(TextSettings(source=str(umt5_pipeline), max_length=MAX_LENGTH), "wan")
    assert type(encoder.pipe.text_encoder).__name__ == "UMT5EncoderModel"
    got = encoder.embed(CAPTIONS["red"])
    expected = diffusers.WanPipeline._get_t5_prompt_embeds(
        _as_pipeline(encoder), CAPTIONS["red"], max_sequence_length=MAX_LENGTH, dtype=torch.float32)
    torch.testing.assert_close(got["prompt_embeds"], expected[0])
    assert torch.count_nonzero(got["prompt_embeds"][7:]) == 0 and torch.count_nonzero(got["prompt_embeds"][:7])


def test_each_distinct_caption_is_encoded_once(t5_pipeline):
    encoder = load_text_encoder(TextSettings(source=str(t5_pipeline) + "/", max_length=MAX_LENGTH), "cogvideox")
    red, blue = CAPTIONS["red"], CAPTIONS["blue"]
    out = encoder.embed_many([red, None, red, blue])
    assert out[0] is out[2] and not torch.equal(out[0]["prompt_embeds"], out[3]["prompt_embeds"])
    encoder.embed_many([blue, red, None, ""])
    assert encoder.encoded_prompts == 3  # red, blue and the empty prompt


def test_a_clip_without_caption_gets_the_pipelines_empty_prompt_embedding(t5_pipeline, umt5_pipeline):
    for family, pipeline, root in (("cogvideox", diffusers.CogVideoXPipeline, t5_pipeline),
                                   ("wan", diffusers.WanPipeline, umt5_pipeline)):
        encoder = load_text_encoder(TextSettings(source=str(root), max_length=MAX_LENGTH), family)
        got = encoder.embed(None)
        expected = pipeline._get_t5_prompt_embeds(_as_pipeline(encoder), "", max_sequence_length=MAX_LENGTH,
                                                  dtype=torch.float32)
        torch.testing.assert_close(got["prompt_embeds"], expected[0])
        assert got["attention_mask"].sum() == 1  # "</s>" alone


def test_more_new_captions_than_the_cache_holds(t5_pipeline, monkeypatch):
    from latentcache.encode.models import text

    monkeypatch.setattr(text, "CACHE_SIZE", 2)
    encoder = load_text_encoder(TextSettings(source=str(t5_pipeline) + "/", max_length=MAX_LENGTH), "cogvideox")
    captions = [f"caption {i}" for i in range(5)]
    out = encoder.embed_many(captions)
    assert len(out) == 5 and all(o is not None for o in out)
    assert len(encoder.embed_many(["caption 0", "caption 4", "a new one"])) == 3  # evicted, kept, new


def test_the_default_length_is_the_pipelines(t5_pipeline):
    assert load_text_encoder(TextSettings(source=str(t5_pipeline)), "cogvideox").max_length == 226
    assert load_text_encoder(TextSettings(source=str(t5_pipeline)), "ltx").max_length == 128


def test_without_transformers_the_error_names_the_extra(t5_pipeline, monkeypatch):
    monkeypatch.setitem(sys.modules, "transformers", None)  # what `import transformers` sees when it is absent
    with pytest.raises(ImportError, match=r"pip install 'latentcache\[text\]'"):
        load_text_encoder(TextSettings(source=str(t5_pipeline)), "cogvideox")


def test_bad_sources_are_refused_with_the_fix(tmp_path, t5_pipeline):
    with pytest.raises(ConfigError, match=r"(?s)could not load tokenizer \(AutoTokenizer\) for CogVideoXPipeline .*"
                                          r"tokenizer/, text_encoder/ subfolders.*--text-encoder tiny-random"):
        load_text_encoder(TextSettings(source=str(tmp_path)), "cogvideox")
    # A T5 pipeline for HunyuanVideo, whose pipeline needs a Llama and a CLIP: the component that is missing is named.
    with pytest.raises(ConfigError, match=r"could not load text_encoder \(LlamaModel\) for HunyuanVideoPipeline"):
        load_text_encoder(TextSettings(source=str(t5_pipeline)), "hunyuanvideo")


# ------------------------------------------------------------------------ captions and embeddings in the shards


@pytest.fixture(scope="module")
def captioned_videos(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("captioned")
    for name, codec in (("one", "h264"), ("two", "vp9"), ("three", "h264"), ("plain", "h264")):
        write_video(d / name, codec=codec, num_frames=60, height=96, width=128)
    return d




def test_csv_and_sidecar_captions_round_trip(captioned_videos, tmp_path):
    listing = tmp_path / "list.csv"
    with open(listing, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["path", "caption"])
        writer.writerow([captioned_videos / "one.mp4", "ünïcode, commas, \"quotes\" ✓"])
        writer.writerow([captioned_videos / "plain.mp4", ""])
    out = tmp_path / "out"
    assert main(["encode", str(listing), "--out", str(out), *CLIP]) == 0
    captions = {Path(s["source"]).name: s.get("txt") for s in
                ({**json.loads(m["json"]), "txt": m.get("txt")} for m in shard_members(out).values())}
    assert captions == {"one.mp4": "ünïcode, commas, \"quotes\" ✓".encode(), "plain.mp4": None}
    by_source = {Path(item["meta"]["source"]).name: item["caption"] for item in LatentShardDataset(out)}
    assert by_source == {"one.mp4": "ünïcode, commas, \"quotes\" ✓", "plain.mp4": None}

    sidecar = tmp_path / "sidecar"
    sidecar.mkdir()
    (sidecar / "one.mp4").symlink_to(captioned_videos / "one.mp4")
    (sidecar / "one.txt").write_text("  a red square crosses the frame\n", encoding="utf-8")
    assert main(["encode", str(sidecar), "--out", str(tmp_path / "out2"), *CLIP]) == 0
    (item,) = list(LatentShardDataset(tmp_path / "out2"))
    assert item["caption"] == "a red square crosses the frame" and "prompt_embeds" not in item


def test_encode_caches_prompt_embeddings_once_per_caption(captioned_videos, t5_pipeline, tmp_path, monkeypatch):
    listing = tmp_path / "list.jsonl"
    rows = [{"path": str(captioned_videos / "one.mp4"), "caption": CAPTIONS["red"]},
            {"path": str(captioned_videos / "two.webm"), "caption": CAPTIONS["red"]},
            {"path": str(captioned_videos / "three.mp4"), "caption": CAPTIONS["blue"]},
            {"path": str(captioned_videos / "plain.mp4")}]
    listing.write_text("\n".join(json.dumps(r) for r in rows), encoding="utf-8")
    encoded: list[str] = []
    real = TextEncoder._encode

    def spy(self, prompt):
        encoded.append(prompt)
        return real(self, prompt)

    monkeypatch.setattr(TextEncoder, "_encode", spy)
    out = tmp_path / "out"
    assert main(["encode", str(listing), "--out", str(out), "--text-encoder", str(t5_pipeline),
                 "--text-max-length", str(MAX_LENGTH), "--samples-per-shard", "2", *CLIP]) == 0
    # 3 captioned clips with 2 distinct captions, and the empty prompt for the clip without one.
    assert sorted(encoded) == sorted([*CAPTIONS.values(), ""])

    reference = load_text_encoder(TextSettings(source=str(t5_pipeline), max_length=MAX_LENGTH), "cogvideox")
    samples = shard_members(out)
    assert len(samples) == 4
    for members in samples.values():
        caption = members["txt"].decode() if "txt" in members else None
        cached = load_safetensors(members["text.safetensors"])
        assert set(cached) == {"prompt_embeds", "attention_mask"}
        torch.testing.assert_close(cached["prompt_embeds"], reference.embed(caption)["prompt_embeds"])

    items = {item["caption"]: item for item in LatentShardDataset(out)}
    assert items[None]["prompt_attention_mask"].sum() == 1  # the empty prompt: "</s>" alone
    red = items[CAPTIONS["red"]]
    assert red["prompt_embeds"].shape == (MAX_LENGTH, 16) and red["prompt_attention_mask"].sum() == 7
    # The caption-less clip shares a batch with a captioned one, and the batch keeps prompt_embeds.
    batches = list(LatentShardDataset(out, batch_size=2))
    assert any(None in b["caption"] and any(b["caption"]) for b in batches)
    assert all(b["prompt_embeds"].shape == (len(b["key"]), MAX_LENGTH, 16) for b in batches)
    settings = json.loads((out / "manifest.json").read_text())["settings"]
    assert settings["text"] == {"source": str(t5_pipeline), "revision": None, "max_length": MAX_LENGTH,
                                "dtype": "auto"}


def test_a_text_encoder_of_another_family_is_refused_before_any_work(captioned_videos, t5_pipeline, tmp_path,
                                                                      capsys):
    code = main(["encode", str(captioned_videos), "--out", str(tmp_path / "out"), "--text-encoder", str(t5_pipeline),
                 *[a if a != "tiny-random-cogvideox" else "tiny-random-hunyuanvideo" for a in CLIP]])
    assert code == 2 and "could not load text_encoder (LlamaModel) for HunyuanVideoPipeline" in capsys.readouterr().err
    assert not (tmp_path / "out" / "shards").exists()
