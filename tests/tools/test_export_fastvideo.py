"""`latentcache export fastvideo`: real Wan shards of two buckets with cached UMT5 prompt embeddings -> FastVideo's
Parquet rows, read back by FastVideo's own reading code (tests/fixtures/fastvideo, copied from hao-ai-lab/FastVideo at
a pinned commit, Apache-2.0): `get_parquet_files_and_length` with its file-list cache, `LatentsParquetMapStyleDataset`
and `collate_rows_from_parquet_schema`."""

from __future__ import annotations

import logging
import pickle
import sys
import types
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from latentcache.cli import main
from latentcache.errors import ConfigError, LatentMismatchError
from latentcache.tools.export_fastvideo import export_fastvideo
from latentcache.tools.synthetic import write_video
from tests.tools.test_export_musubi import _samples

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "fastvideo"
STAND_INS = {
    # parquet_dataset_map_style.py's imports from the rest of FastVideo, for one process: rank 0 of 1
    "fastvideo.distributed": dict(get_sp_world_size=lambda: 1, get_world_size=lambda: 1, get_world_rank=lambda: 0,
                                  get_world_group=lambda: SimpleNamespace(barrier=lambda: None)),
    "fastvideo.logger": dict(init_logger=logging.getLogger),
    "fastvideo.platforms": dict(current_platform=SimpleNamespace()),
}


@pytest.fixture(scope="module")
def fastvideo():
    pytest.importorskip("pyarrow")
    pytest.importorskip("torchdata")
    sys.path.insert(0, str(FIXTURE))
    for name, attrs in STAND_INS.items():
        sys.modules[name] = types.SimpleNamespace(**attrs)
    try:
        from fastvideo.dataset import parquet_dataset_map_style
        from fastvideo.dataset.dataloader import schema

        yield SimpleNamespace(map_style=parquet_dataset_map_style, schema=schema)
    finally:
        sys.path.remove(str(FIXTURE))
        for name in [*STAND_INS, "fastvideo", "fastvideo.dataset", "fastvideo.dataset.utils",
                     "fastvideo.dataset.parquet_dataset_map_style", "fastvideo.dataset.dataloader",
                     "fastvideo.dataset.dataloader.schema"]:
            sys.modules.pop(name, None)


def _encode(videos: Path, out: Path, pipeline: Path | None) -> Path:
    text = ["--text-encoder", str(pipeline), "--text-max-length", "16"] if pipeline else []
    assert main(["encode", str(videos), "--out", str(out), "--vae", "tiny-random-wan", "--device", "cpu",
                 "--frames", "9", "--fps", "24", "--height", "64", "--width", "96", "--buckets", "64x96,96x64",
                 *text]) == 0
    return out


@pytest.fixture(scope="module")
def outputs(tmp_path_factory: pytest.TempPathFactory) -> SimpleNamespace:
    pytest.importorskip("transformers")
    from tests.encode.test_text import _save_pipeline

    root = tmp_path_factory.mktemp("fastvideo")
    pipeline = _save_pipeline(root / "umt5", "UMT5EncoderModel", "UMT5Config")
    videos = root / "videos"
    videos.mkdir()
    write_video(videos / "wide", codec="h264", num_frames=30, height=64, width=96)
    write_video(videos / "tall", codec="h264", num_frames=30, height=96, width=64)
    (videos / "wide.txt").write_text("a red square crosses the frame", encoding="utf-8")
    (videos / "tall.txt").write_text("a blue square", encoding="utf-8")
    two = _encode(videos, root / "two", pipeline)
    write_video(videos / "third", codec="h264", num_frames=30, height=64, width=96)
    (videos / "third.txt").write_text("a third clip", encoding="utf-8")
    three = _encode(videos, root / "three", pipeline)
    (videos / "third.mp4").unlink()
    return SimpleNamespace(two=two, three=three, pipeline=pipeline, videos=videos)


def _read(fastvideo, data_path: Path) -> list[dict]:
    dataset = fastvideo.map_style.LatentsParquetMapStyleDataset(str(data_path), batch_size=1,
                                                                parquet_schema=fastvideo.schema.pyarrow_schema_t2v,
                                                                text_padding_length=16)
    return [dataset.__getitems__([i]) for i in range(len(dataset))]


def test_fastvideo_reads_the_export_as_float32_raw_means_and_cut_embeddings(fastvideo, outputs, tmp_path, capsys):
    to = tmp_path / "fv"
    assert main(["export", "fastvideo", str(outputs.two), "--to", str(to)]) == 0
    assert f"--data_path {to / 'training_dataset'}" in capsys.readouterr().out
    assert (to / "training_dataset/worker_0/worker_0/data_chunk_0.parquet").is_file()
    samples = {s["key"]: s for s in _samples(outputs.two).values()}
    assert {s["meta"]["bucket"] for s in samples.values()} == {"9x64x96", "9x96x64"}
    batches = _read(fastvideo, to / "training_dataset")
    assert len(batches) == 2
    for batch in batches:
        (info,) = batch["info_list"]
        sample = samples[info["id"]]
        # the raw, unscaled posterior mean, float32 [C, T, H, W] (FastVideo normalises while training)
        torch.testing.assert_close(batch["vae_latent"][0], sample["mean"].float(), rtol=0, atol=0)
        length = int(sample["text"]["attention_mask"].sum())
        assert int(batch["text_attention_mask"][0].sum()) == length < 16
        torch.testing.assert_close(batch["text_embedding"][0][:length],
                                   sample["text"]["prompt_embeds"][:length].float(), rtol=0, atol=0)
        meta = sample["meta"]
        assert (info["caption"], info["media_type"], info["num_frames"]) == (sample["caption"], "video", 3)
        assert (info["width"], info["height"], info["fps"]) == (meta["width"], meta["height"], 24.0)
        assert info["duration_sec"] == pytest.approx(9 / 24)


def test_a_re_export_leaves_no_stale_file_list(fastvideo, outputs, tmp_path):
    """FastVideo caches the Parquet files' row counts in map_style_cache/file_info.pkl and rebuilds it only when a
    listed file is missing: a re-export with another row count must not leave it stale."""
    to = tmp_path / "fv"
    export_fastvideo(outputs.two, to)
    assert len(_read(fastvideo, to / "training_dataset")) == 2
    again = export_fastvideo(outputs.three, to)
    assert "training_dataset/map_style_cache/file_info.pkl" in again.written
    assert len(_read(fastvideo, to / "training_dataset")) == 3
    assert not export_fastvideo(outputs.three, to).written  # the same bytes: nothing rewritten

    info = to / "training_dataset/map_style_cache/file_info.pkl"
    info.write_bytes(pickle.dumps((("elsewhere.parquet",), (7,))))  # FastVideo's own, other, list
    with pytest.raises(ConfigError, match=r"file_info.pkl: FastVideo's cached list .* would leave stale"):
        export_fastvideo(outputs.two, to)
    assert pickle.loads(info.read_bytes()) == (("elsewhere.parquet",), (7,))


def test_an_output_without_prompt_embeddings_is_refused_with_the_reason(outputs, tmp_path, capsys):
    plain = _encode(outputs.videos, tmp_path / "plain", None)
    with pytest.raises(LatentMismatchError, match="has no prompt embeddings; every FastVideo row holds its text "
                                                  "encoder's output: encode with --text-encoder"):
        export_fastvideo(plain, tmp_path / "fv")
    assert main(["export", "fastvideo", str(plain), "--to", str(tmp_path / "fv")]) == 2
    assert not (tmp_path / "fv").exists()
