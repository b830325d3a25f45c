"""`latentcache export ltx2`: real LTX-2 shards of two buckets -> the LTX-2 trainer's precomputed latents.

The LTX-2 trainer's code is under the LTX-2 Community License (not OSI), so it is not kept as a fixture; its format
is pinned here to the lines of Lightricks/LTX-2 at commit 400fd31054597515f47125691032c04b1c3ee24e that define it:
- packages/ltx-trainer/scripts/process_videos.py L556-L575 (compute_latents): per clip,
  `output_rel_path = Path(batch["main_media_relative_path"][i]).with_suffix(".pt")` under the output dir, a dict
  `{"latents": [C, F', H', W'], "num_frames", "height", "width" (latent sizes), "fps": source fps / subsample}`
  written with `torch.save` (`_atomic_save`, L1366-L1374); L509: the video VAE encoder is loaded in bfloat16.
- packages/ltx-core/src/ltx_core/model/video_vae/video_vae.py L334-L336 (VideoEncoder.forward): `means, _ =
  torch.chunk(sample, 2, dim=1)`; `return self.per_channel_statistics.normalize(means)`, and
  model/video_vae/ops.py L81-L84: `normalize(x) = (x - mean-of-means) / std-of-means`.
- packages/ltx-trainer/src/ltx_trainer/datasets.py L158-L222 (PrecomputedDataset._discover_samples): glob
  `**/*.pt` per source, keep a latents file only where `<source>/<same relative path>` exists (L224-L232: a name
  starting with `latent_` maps to `condition_<rest>.pt`); L258-L267 (__getitem__): `torch.load(file_path,
  map_location="cpu", weights_only=True)`; L124-L126: a root holding `.precomputed` is replaced by it.
- packages/ltx-trainer/scripts/process_captions.py L157-L166 (_embedding_output_path): the conditions file is
  `(dataset_file.parent / media_path).relative_to(dataset_file.parent).with_suffix(".pt")`; L146-L155 and L185-L204:
  a .json dataset file is a list of objects with `caption` and `media_path`.
- packages/ltx-trainer/src/ltx_trainer/training_strategies/flexible.py L155-L163 and L187-L197: `video` and `audio`
  modality blocks default to None; data sources are `conditions` plus the latents_dir of each block given.
The test below reads the export as those lines do (torch.load with weights_only=True, the same glob and pairing).
"""

from __future__ import annotations

import json
from pathlib import Path, PurePosixPath

import pytest
import torch

from latentcache.cli import main
from latentcache.errors import ConfigError
from latentcache.tools.export_ltx2 import export_ltx2
from latentcache.tools.synthetic import write_video
from tests.tools.test_export_musubi import _samples


@pytest.fixture(scope="module")
def ltx2_out(tmp_path_factory: pytest.TempPathFactory) -> Path:
    videos = tmp_path_factory.mktemp("ltx2_videos")
    write_video(videos / "wide", codec="h264", num_frames=30, height=64, width=96)
    write_video(videos / "tall", codec="h264", num_frames=30, height=96, width=64)
    (videos / "wide.txt").write_text("a wide clip", encoding="utf-8")
    out = tmp_path_factory.mktemp("ltx2") / "out"
    assert main(["encode", str(videos), "--out", str(out), "--vae", "tiny-random-ltx2", "--device", "cpu",
                 "--frames", "9", "--fps", "24", "--height", "64", "--width", "96",
                 "--buckets", "64x96,96x64"]) == 0
    return out


def _discover(precomputed: Path) -> list[str]:
    """PrecomputedDataset._discover_samples for the sources latents + conditions: the latents files it keeps."""
    latents, conditions = precomputed / "latents", precomputed / "conditions"
    present = {str(p) for p in conditions.glob("**/*.pt")}
    kept = []
    for data_file in sorted(latents.glob("**/*.pt")):
        rel = data_file.relative_to(latents)
        expected = (conditions / f"condition_{data_file.stem[7:]}.pt" if data_file.name.startswith("latent_")
                    else conditions / rel)
        if str(expected) in present:
            kept.append(rel.as_posix())
    return kept


def test_ltx2_export_is_the_trainers_format_for_two_buckets_and_pairs_with_its_captions(ltx2_out, tmp_path, capsys):
    to = tmp_path / "ltx2_data"
    assert main(["export", "ltx2", str(ltx2_out), "--to", str(to)]) == 0
    printed = capsys.readouterr().out
    assert f"next: python scripts/process_captions.py {to / 'dataset.json'} --output-dir " \
           f"{to / '.precomputed' / 'conditions'}" in printed
    assert f"data.preprocessed_data_root: {to / '.precomputed'}" in printed
    spec = json.loads((ltx2_out / "manifest.json").read_text())["latent_spec"]
    mean = torch.tensor(spec["latents_mean"]).view(-1, 1, 1, 1)
    std = torch.tensor(spec["latents_std"]).view(-1, 1, 1, 1)
    samples = {s["key"]: s for s in _samples(ltx2_out).values()}
    assert {s["meta"]["bucket"] for s in samples.values()} == {"9x64x96", "9x96x64"}

    # process_captions.py: each dataset entry's conditions file, written where its _embedding_output_path says
    dataset = json.loads((to / "dataset.json").read_text())
    assert sorted(e["caption"] for e in dataset) == ["", "a wide clip"]
    conditions = to / ".precomputed" / "conditions"
    for entry in dataset:
        rel = (to / entry["media_path"]).relative_to(to).with_suffix(".pt")
        (conditions / rel).parent.mkdir(parents=True, exist_ok=True)
        torch.save({"video_prompt_embeds": torch.zeros(4, 8)}, conditions / rel)
    kept = _discover(to / ".precomputed")
    assert sorted(kept) == sorted(f"{key}.pt" for key in samples)

    for rel in kept:
        data = torch.load(to / ".precomputed" / "latents" / rel, map_location="cpu", weights_only=True)
        sample = samples[PurePosixPath(rel).stem]
        expected = ((sample["mean"].float() - mean) / std).to(torch.bfloat16)
        assert set(data) == {"latents", "num_frames", "height", "width", "fps"}
        assert data["latents"].dtype == torch.bfloat16 and data["latents"].shape[0] == 128
        torch.testing.assert_close(data["latents"], expected, rtol=0, atol=0)
        assert (data["num_frames"], data["height"], data["width"]) == tuple(expected.shape[1:])
        assert all(type(data[k]) is int for k in ("num_frames", "height", "width"))
        assert data["fps"] == 24.0 and type(data["fps"]) is float

    again = export_ltx2(ltx2_out, to)  # the same bytes: nothing rewritten, the conditions files untouched
    assert not again.written and len(again.unchanged) == len(samples) + 1 and not again.removed
    assert len(list(conditions.glob("*.pt"))) == len(samples)


def test_ltx2_export_refuses_other_families(tmp_path):
    from tests.tools.test_export_musubi import _encode as encode

    videos = tmp_path / "videos"
    videos.mkdir()
    write_video(videos / "clip", codec="h264", num_frames=30, height=64, width=96)
    out = encode(videos, tmp_path / "out", "wan")
    with pytest.raises(ConfigError, match="a wan output; the LTX-2 trainer trains on the LTX-2 video VAE's"):
        export_ltx2(out, tmp_path / "to")
    assert not (tmp_path / "to").exists()
