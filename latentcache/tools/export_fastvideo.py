"""`latentcache export fastvideo OUT --to DIR`: FastVideo's preprocessed Parquet dataset from a latentcache output.

The format is FastVideo's, read at commit 2f3d4074064e4d86f99dc784ebbaa296e6f5925f (hao-ai-lab/FastVideo, Apache-2.0):
- fastvideo/dataset/dataloader/schema.py `pyarrow_schema_t2v`: per row `id`, the `vae_latent_` and `text_embedding_`
  bytes/shape/dtype triplets, `file_name`, `caption`, `media_type`, `width`, `height` (the clip's pixels),
  `num_frames` (latent frames), `duration_sec`, `fps`.
- fastvideo/dataset/dataloader/parquet_io.py ParquetDatasetWriter: zstd Parquet files
  `<out>/worker_<j>/data_chunk_<n>.parquet`; fastvideo/workflow/preprocess/preprocess_workflow.py puts `<out>` at
  `<dataset_output_dir>/training_dataset/worker_<rank>`.
- fastvideo/pipelines/stages/encoding.py EncodingStage: `self.vae.encode(latents).mean`, the raw posterior mean
  (normalised at training time); fastvideo/workflow/preprocess/components.py `_process_non_padded_embeddings`: the
  text embedding cut to its prompt's tokens, `prompt_embeds[i, :mask.sum()]`.
- fastvideo/dataset/utils.py collate_rows_from_parquet_schema: every tensor's bytes are read as float32 whatever its
  `_dtype` says, so both are written as float32.
- fastvideo/dataset/parquet_dataset_map_style.py get_parquet_files_and_length: the file list and row counts are
  cached in `<data_path>/map_style_cache/file_info.pkl` and rebuilt only when a listed file is missing; a re-export
  with other files or row counts would leave it stale, so the export writes that cache itself (the same content
  FastVideo computes) and refuses where FastVideo's own copy is there and differs.
"""

from __future__ import annotations

import io
import os
import pickle
from pathlib import Path
from typing import Any

import torch

from latentcache.errors import ConfigError, MissingDependency
from latentcache.tools.export_common import (
    ExportResult,
    ExportSample,
    ExportTarget,
    Progress,
    meta_number,
    open_source,
    refused,
    sha256,
)

DATA_DIR = "training_dataset"
CHUNK_DIR = f"{DATA_DIR}/worker_0/worker_0"
FILE_INFO = f"{DATA_DIR}/map_style_cache/file_info.pkl"
ROWS_PER_FILE = 64
MAX_FPS = 1000.0
MAX_SIDE = 1 << 16


def _pyarrow() -> Any:
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        raise MissingDependency("export fastvideo writes Parquet: pip install 'latentcache[parquet]' "
                                "(pyarrow)") from None
    return pa, pq


def t2v_schema() -> Any:
    """FastVideo's `pyarrow_schema_t2v` (schema.py), field for field."""
    pa, _ = _pyarrow()
    triplet = [(f"{name}_{part}", kind) for name in ("vae_latent", "text_embedding")
               for part, kind in (("bytes", pa.binary()), ("shape", pa.list_(pa.int64())), ("dtype", pa.string()))]
    fields = [("id", pa.string()), *triplet, ("file_name", pa.string()), ("caption", pa.string()),
              ("media_type", pa.string()), ("width", pa.int64()), ("height", pa.int64()), ("num_frames", pa.int64()),
              ("duration_sec", pa.float64()), ("fps", pa.float64())]
    return pa.schema([pa.field(name, kind) for name, kind in fields])


def _text(sample: ExportSample) -> torch.Tensor:
    text = sample.text or {}
    embeds, mask = text.get("prompt_embeds"), text.get("attention_mask")
    if embeds is None:
        raise refused(sample.where, "has no prompt embeddings; every FastVideo row holds its text encoder's output: "
                                    "encode with --text-encoder (the pipeline's UMT5)")
    if embeds.dim() != 2 or not embeds.is_floating_point() or not torch.isfinite(embeds).all():
        raise refused(sample.where, f"prompt_embeds {list(embeds.shape)} {embeds.dtype} are not finite [tokens, dim] "
                                    "float embeddings")
    length = int(mask.sum()) if mask is not None and mask.dim() == 1 else embeds.shape[0]
    return embeds[:length].float().contiguous()


def fastvideo_row(sample: ExportSample, temporal_compression: int) -> dict[str, Any]:
    """One row as FastVideo's record creator (dataloader/record_schema.py basic_t2v_record_creator) builds it."""
    latent = sample.mean.float().contiguous()
    text = _text(sample)
    c, t, h, w = latent.shape
    fps = meta_number(sample, "fps", most=MAX_FPS)
    if not fps:
        raise refused(sample.where, "its JSON has no frame rate (fps)")
    width = meta_number(sample, "width", most=MAX_SIDE, integer=True)
    height = meta_number(sample, "height", most=MAX_SIDE, integer=True)
    frames = (t - 1) * temporal_compression + 1
    source = sample.meta.get("source")
    return {"id": sample.key, "vae_latent_bytes": latent.numpy().tobytes(), "vae_latent_shape": [c, t, h, w],
            "vae_latent_dtype": "float32", "text_embedding_bytes": text.numpy().tobytes(),
            "text_embedding_shape": list(text.shape), "text_embedding_dtype": "float32",
            "file_name": Path(source).stem if isinstance(source, str) and source else sample.key,
            "caption": sample.caption or "", "media_type": "image" if t == 1 else "video",
            "width": int(width or 0), "height": int(height or 0), "num_frames": t,
            "duration_sec": frames / float(fps), "fps": float(fps)}


def _parquet_bytes(rows: list[dict[str, Any]]) -> bytes:
    pa, pq = _pyarrow()
    buffer = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(rows, schema=t2v_schema()), buffer, compression="zstd")
    return buffer.getvalue()


def _file_info(target: ExportTarget, chunks: list[tuple[str, int]]) -> bytes:
    """What get_parquet_files_and_length pickles: the sorted real paths of the Parquet files and their row counts."""
    data_root = os.path.realpath(target.root / DATA_DIR)
    listed = sorted((os.path.join(data_root, name.removeprefix(f"{DATA_DIR}/")), rows) for name, rows in chunks)
    names, lengths = zip(*listed, strict=True) if listed else ((), ())
    return pickle.dumps((tuple(names), tuple(lengths)))


def _check_file_info(target: ExportTarget, data: bytes) -> None:
    path = target.root / FILE_INFO
    if path.exists() and not target.owns(FILE_INFO) and sha256(path.read_bytes()) != sha256(data):
        raise ConfigError(f"{path}: FastVideo's cached list of this dataset's Parquet files, which this export "
                          "would leave stale (FastVideo rebuilds it only when a listed file is missing). Delete it "
                          "(FastVideo makes it again) and rerun the export")


def export_fastvideo(source: str | os.PathLike, to: str | os.PathLike, *, dry_run: bool = False,
                     progress: Progress | None = None) -> ExportResult:
    """Write FastVideo's `training_dataset/` Parquet files (and its file-list cache) into `to`."""
    src = open_source(source)
    if src.spec.family != "wan":
        raise ConfigError(f"{source}: a {src.spec.family} output; the FastVideo export writes Wan text-to-video rows "
                          "(the raw Wan VAE posterior mean and the UMT5 prompt embedding)")
    _pyarrow()
    target = ExportTarget(to, "fastvideo", str(source), dry_run=dry_run)
    rows: list[dict[str, Any]] = []
    chunks: list[tuple[str, int]] = []

    def flush() -> None:
        name = f"{CHUNK_DIR}/data_chunk_{len(chunks)}.parquet"
        target.write(name, _parquet_bytes(rows), f"{target.root / name}")
        chunks.append((name, len(rows)))
        rows.clear()

    for sample in src.samples():
        if sample.image_mean is not None:
            raise refused(sample.where, "has image-to-video latents; the FastVideo export writes text-to-video rows")
        rows.append(fastvideo_row(sample, src.spec.temporal_compression))
        if len(rows) == ROWS_PER_FILE:
            flush()
        if progress is not None:
            progress(1, src.total)
    if rows:
        flush()
    info = _file_info(target, chunks)
    _check_file_info(target, info)
    target.write(FILE_INFO, info, f"{target.root / FILE_INFO}")
    result = target.finish()
    result.notes.append(f"train with --data_path {target.root / DATA_DIR} (FastVideo's training scripts, e.g. "
                        "examples/training/finetune/wan_t2v_1.3B/crush_smol/finetune_t2v.sh)")
    return result
