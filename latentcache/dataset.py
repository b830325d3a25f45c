"""Stage 4: shards -> model-ready latent tensors for a trainer, refusing anything the model does not expect.

One worker's stream is a chain of small generator stages:

    shard order (seed, epoch) -> this worker's shards -> raw samples (checked against the manifest)
    -> buffer shuffle -> groups of one shape -> [skip what a resumed run already saw] -> decode + collate

Everything before "decode" works on raw bytes and safetensors headers, so resuming at step k skips k batches
without decoding them. Normalisation (scaling/shift factor or per-channel mean/std, read from the manifest) is
applied exactly once, at decode; `normalize=False` hands back the raw VAE posterior.
"""

from __future__ import annotations

import copy
import glob
import hashlib
import logging
import os
import random
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from latentcache.buckets import Bucket
from latentcache.checks import latent_problems
from latentcache.errors import LatentMismatchError, ShardFormatError
from latentcache.shards import (
    LATENTS,
    TarStats,
    decode_sample,
    iter_tar,
    open_regular,
    read_manifest,
    safetensors_header,
)
from latentcache.vae import LatentSpec

log = logging.getLogger(__name__)

PIXEL_SUFFIXES = {".mp4", ".webm", ".mov", ".mkv", ".avi", ".gif", ".ts", ".m4v", ".png", ".jpg", ".jpeg",
                  ".webp", ".bmp"}
LAYOUTS = ("BCTHW", "BTCHW")
# How far above a shard a manifest is looked for: OUT/shards/BUCKET/x.tar -> OUT/manifest.json is two levels.
MANIFEST_SEARCH_DEPTH = 3
# The most a shard without a size in its ShardRef may take into memory (manifests always give the size).
MAX_SHARD_BYTES = 16 << 30


@dataclass(slots=True, frozen=True)
class ShardRef:
    """One shard as the dataset opens it (`url`) and as the manifest lists it."""

    url: str
    path: str
    bucket: str
    samples: int
    sha256: str | None
    bytes: int | None = None  # the manifest's size: the most a read of this shard takes into memory


def _rank_and_world() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def _seed(*parts: Any) -> int:
    """A 64-bit seed from any parts; the same on every machine and Python (unlike hash())."""
    return int.from_bytes(hashlib.sha1(":".join(map(str, parts)).encode()).digest()[:8], "little")


def _pixels_message(root: Path) -> str | None:
    """When `root` holds videos or frames rather than latents, the message that says so."""
    if not root.is_dir():
        return None
    pixels = [p for p in root.rglob("*") if p.suffix.lower() in PIXEL_SUFFIXES]
    if not pixels:
        return None
    return (
        f"{root} holds {len(pixels)} video/image file(s) (e.g. {pixels[0].name}) and no latent shards: the "
        "transformer expects VAE latents, and a trainer that skips its own VAE (CogVideo SAT with latent_input: "
        "true) would feed it these as 3-channel RGB pixels. Run "
        f"`latentcache encode {root} --out LATENTS_DIR` first and point the dataset at LATENTS_DIR."
    )


# ------------------------------------------------------------------------------------------ finding shards


def _local_path(url: str) -> str | None:
    """The filesystem path of a local url (plain path or file://), None for remote ones (http, pipe:, s3...)."""
    if url.startswith("file://"):
        return url[len("file://"):]
    if "://" in url or url.startswith("pipe:"):
        return None
    return url


def expand_urls(source: str | os.PathLike | Iterable[str | os.PathLike]) -> list[str]:
    """Brace lists (`{000000..000099}`), `::`-joined lists, globs and file:// urls -> a list of urls."""
    import webdataset as wds

    items = [source] if isinstance(source, str | os.PathLike) else list(source)
    urls: list[str] = []
    for item in items:
        for url in wds.shardlists.expand_urls(str(item)):
            local = _local_path(url)
            if local is not None and glob.has_magic(local):
                matches = sorted(glob.glob(local))
                if not matches:
                    raise ShardFormatError(f"{url}: the pattern matches no file")
                urls.extend(matches)
            else:
                urls.append(local if local is not None else url)
    if not urls:
        raise ShardFormatError(f"{source!r} names no shard")
    return urls


def _find_manifest_dir(urls: list[str]) -> Path:
    """The directory holding manifest.json, searched upwards from the first local shard."""
    local = _local_path(urls[0])
    if local is None:
        raise ShardFormatError(f"{urls[0]} is remote: pass manifest=PATH_OR_URL_OF/manifest.json (copy it next to "
                               "the training script) so the dataset knows the latent spec and the shard checksums")
    here = Path(local).resolve().parent
    for folder in [here, *here.parents][:MANIFEST_SEARCH_DEPTH]:
        if (folder / "manifest.json").is_file():
            return folder
    raise ShardFormatError(f"no manifest.json in {here} or the {MANIFEST_SEARCH_DEPTH - 1} folders above it: pass "
                           "manifest=OUT/manifest.json, the one `latentcache encode` wrote with these shards")


def _read_manifest_arg(manifest: str | os.PathLike) -> tuple[dict[str, Any], Path]:
    path = Path(manifest)
    root = path if path.is_dir() else path.parent
    if path.is_file() and path.name != "manifest.json":
        raise ShardFormatError(f"manifest={manifest}: expected a file named manifest.json or its directory")
    return read_manifest(root), root


def _match_shards(urls: list[str], manifest: dict[str, Any], root: Path) -> list[ShardRef]:
    """Pair each url with its manifest entry; a shard the manifest does not list is refused."""
    by_path = {s["path"]: s for s in manifest["shards"]}
    refs = []
    for url in urls:
        local = _local_path(url)
        entry = None
        if local is not None:
            try:
                entry = by_path.get(Path(local).resolve().relative_to(root.resolve()).as_posix())
            except ValueError:
                entry = None
        if entry is None:  # remote, or stored elsewhere: match on the path's tail, else on a unique file name
            entry = next((s for p, s in by_path.items() if url.endswith("/" + p) or url == p), None)
        if entry is None:
            name = url.rstrip("/").rsplit("/", 1)[-1]
            same = [s for p, s in by_path.items() if p.rsplit("/", 1)[-1] == name]
            entry = same[0] if len(same) == 1 else None
        if entry is None:
            raise ShardFormatError(f"{url} is not listed in {root / 'manifest.json'} ({len(by_path)} shards, e.g. "
                                   f"{next(iter(by_path), 'none')}): pass the manifest these shards were written with")
        refs.append(ShardRef(url, entry["path"], entry["bucket"], int(entry["samples"]), entry.get("sha256"),
                             int(entry["bytes"])))
    return refs


def _inside(path: str, root: Path) -> str:
    """A shard path from a manifest, refused unless it stays inside the dataset directory (manifests may come from
    strangers: `/dev/zero` or `../../etc` must never be opened)."""
    posix = str(path).replace("\\", "/")
    if not posix or posix.startswith("/") or ".." in posix.split("/") or (len(posix) > 1 and posix[1] == ":"):
        raise ShardFormatError(f"{root / 'manifest.json'}: shard path {path!r} is absolute or leaves the dataset "
                               "directory; latentcache writes paths such as shards/17x64x96/000000.tar")
    return posix


def resolve_source(source: Any, manifest: str | os.PathLike | None = None
                   ) -> tuple[dict[str, Any], Path, list[ShardRef]]:
    """A dataset directory, or shard urls (paths, globs, brace lists, file://, anything webdataset opens)
    -> (manifest, manifest directory, shards)."""
    if isinstance(source, str | os.PathLike) and Path(source).is_dir():
        root = Path(source)
        if manifest is None and not (root / "manifest.json").is_file():
            message = _pixels_message(root)
            if message:
                raise LatentMismatchError(message)
        data, mroot = _read_manifest_arg(manifest or root)
        urls = [str(root / _inside(s["path"], root)) for s in data["shards"]]
        return data, mroot, _match_shards(urls, data, mroot)
    urls = expand_urls(source)
    data, mroot = _read_manifest_arg(manifest) if manifest is not None else _read_manifest_arg(
        _find_manifest_dir(urls))
    return data, mroot, _match_shards(urls, data, mroot)


def open_url(url: str) -> Any:
    """A binary stream for a shard url: local regular files directly (a FIFO or device is refused, never waited
    on), the rest through webdataset's gopen."""
    local = _local_path(url)
    if local is not None:
        return open_regular(local, url)
    import webdataset as wds

    return wds.gopen(url, "rb")


def read_bytes(shard: ShardRef, buffer: bytearray | None = None) -> memoryview:
    """The whole shard, read once; refused, before anything is read, when larger than the manifest says.

    A local shard is read straight into `buffer` when one is given (grown as needed): a reader going through many
    shards then reuses one warm buffer instead of faulting in fresh pages for every shard (6x faster here).
    """
    limit = shard.bytes if shard.bytes is not None else MAX_SHARD_BYTES
    with open_url(shard.url) as stream:
        if _local_path(shard.url) is None:  # a remote stream: its size is known only once it ends
            data = _read_chunks(stream, limit + 1)
        else:
            size = os.fstat(stream.fileno()).st_size
            if size > limit:
                raise ShardFormatError(f"{shard.url}: {size} bytes, the manifest lists {limit}; the shard was "
                                       "replaced or appended to. Run `latentcache verify` and re-encode it")
            # A byte past the size fstat gave says the file grew since: more than the manifest lists, or not.
            data = _read_into(stream, size + 1, buffer)
    if len(data) > limit:
        raise ShardFormatError(f"{shard.url}: more than the {limit} bytes the manifest lists; the shard was "
                               "replaced or appended to. Run `latentcache verify` and re-encode it")
    return memoryview(data)


def _read_into(stream: Any, most: int, buffer: bytearray | None) -> memoryview | bytes:
    if buffer is None:
        return stream.read(most)
    try:
        if len(buffer) < most:
            buffer += bytes(most - len(buffer))
    except BufferError:  # still exported by a reader of an earlier shard: use a buffer of its own
        return stream.read(most)
    view, got = memoryview(buffer)[:most], 0
    while got < most:
        n = stream.readinto(view[got:])
        if not n:
            break
        got += n
    return view[:got]


def _read_chunks(stream: Any, most: int) -> bytes:
    chunks, total = [], 0
    while total < most:
        chunk = stream.read(min(64 << 20, most - total))
        if not chunk:
            break
        chunks.append(chunk)
        total += len(chunk)
    return b"".join(chunks)


def read_shard(shard: ShardRef, *, check_sha256: bool = True, buffer: bytearray | None = None
               ) -> Iterator[dict[str, Any]]:
    """Raw samples of one shard, none of them before the whole shard has passed: its size, sha256, tar structure
    and sample count against the manifest.

    The shard is read into memory once (bounded by the manifest's `bytes`; into `buffer` when given, see
    `read_bytes`) and hashed; its tar structure is then checked and its samples counted from those same bytes,
    headers only; only then are samples copied out, one at a time. A changed, cut or miscounted
    shard delivers nothing; no byte is read twice from disk, and memory holds the shard plus the samples in
    flight, not a second copy of the shard.
    """
    data = read_bytes(shard, buffer)
    try:
        if check_sha256 and shard.sha256:
            digest = hashlib.sha256(data).hexdigest()
            if digest != shard.sha256:
                raise ShardFormatError(f"{shard.url}: sha256 {digest[:16]}..., the manifest lists "
                                       f"{shard.sha256[:16]}...; the shard changed after it was written. Re-encode "
                                       "it, or pass check_sha256=False if you changed it on purpose")
        stats = TarStats()
        for _ in iter_tar(data, shard.url, stats, sha256=False, members=False):
            pass
        if stats.samples != shard.samples:
            raise ShardFormatError(f"{shard.url}: {stats.samples} samples, the manifest lists {shard.samples}; the "
                                   "shard was replaced or cut short. Run `latentcache verify` and re-encode it")
        for raw in iter_tar(data, shard.url, sha256=False):
            raw["__url__"], raw["__bucket__"] = shard.url, shard.bucket
            yield raw
    finally:
        data.release()  # lets the buffer grow for the next shard


def raw_shape(raw: dict[str, Any]) -> tuple[int, ...]:
    """The latent shape of a raw sample, from its safetensors header only (no tensor is built)."""
    where = f"{raw.get('__url__', '?')}: member {raw.get('__key__')}.{LATENTS}"
    if LATENTS not in raw:
        raise ShardFormatError(f"{raw.get('__url__', '?')}: sample {raw.get('__key__')!r} has no {LATENTS} member")
    mean = safetensors_header(raw[LATENTS], where).get("mean")
    if not isinstance(mean, dict) or not isinstance(mean.get("shape"), list):
        raise ShardFormatError(f"{where}: no 'mean' tensor")
    return tuple(int(d) for d in mean["shape"])


# ---------------------------------------------------------------------------------------------- the guard


def _config_get(transformer_or_config: Any) -> Any:
    config = getattr(transformer_or_config, "config", transformer_or_config)
    if isinstance(config, dict):
        return config.get
    return lambda k, d=None: getattr(config, k, d)


def bucket_latent_shape(spec: LatentSpec, bucket: str) -> tuple[int, int, int, int]:
    """'49x480x720' (frames x height x width in pixels) -> latent (C, T, H, W)."""
    try:
        parsed = Bucket.parse(bucket)
    except ValueError as e:
        raise ShardFormatError(str(e)) from None
    return spec.latent_shape(parsed.frames, parsed.height, parsed.width)


def transformer_problems(transformer_or_config: Any, spec: LatentSpec, buckets: Iterable[str], *,
                         image_to_video: bool = False, pad_frames: bool = False) -> list[str]:
    """Why latents of these buckets cannot go into this diffusers transformer (CogVideoX-style config); [] if fine.

    Reads in_channels, patch_size(_t), temporal_compression_ratio, sample_frames/height/width and the kind of
    positional embedding. Learned positional embeddings only fit their own size; sincos ones are recomputed for
    other sizes by diffusers (a warning, not a refusal); rotary ones fit any size.
    """
    get = _config_get(transformer_or_config)
    problems: list[str] = []
    in_channels = int(get("in_channels"))
    c = spec.channels
    # Image-to-video inputs: the noisy latents plus conditioning concatenated along channels. CogVideoX I2V: 2C;
    # HunyuanVideo I2V: 2C+1 (a mask channel); Wan 2.1 I2V: 2C+4 (a 4-channel frame mask); LTX-Video and Wan 2.2
    # TI2V condition in the token sequence or the first latent frame instead, and take C.
    twice = f"twice the VAE's {c} latent channels"
    i2v_layouts = {2 * c: twice, 2 * c + 1: f"{twice} plus a mask channel",
                   2 * c + 4: f"{twice} plus 4 (a frame mask)"}
    if image_to_video:
        if in_channels != c and in_channels not in i2v_layouts:
            problems.append(f"in_channels={in_channels} fits no image-to-video layout of {c}-channel latents "
                            f"({c}, {', '.join(str(n) for n in i2v_layouts)}): encode with the VAE this "
                            "transformer was trained with")
    elif in_channels in i2v_layouts:
        problems.append(
            f"in_channels={in_channels} is {i2v_layouts[in_channels]}: an image-to-video model, whose input "
            "is the noisy video latents concatenated with the image latents (and a mask) along channels. Pass "
            "image_to_video=True and build the conditioning in the training step.")
    elif in_channels != c:
        problems.append(f"in_channels={in_channels}, the latents have {c} channels: encode with the VAE this "
                        "transformer was trained with")
    compression = get("temporal_compression_ratio")
    if compression is not None and int(compression) != spec.temporal_compression:
        problems.append(f"temporal_compression_ratio={compression}, the VAE compresses time by "
                        f"{spec.temporal_compression}")
    for bucket in sorted(set(buckets)):
        problems.extend(_bucket_problems(get, spec, bucket, pad_frames))
    return problems


def _patch_sizes(get: Any) -> tuple[int | None, int, int]:
    """(time, height, width) patch sizes: CogVideoX/Hunyuan/LTX give patch_size (+ patch_size_t), Wan a tuple."""
    patch = get("patch_size") or 1
    if isinstance(patch, list | tuple):
        t, h, w = patch if len(patch) == 3 else (None, *patch)
        return (int(t) if t else None), int(h), int(w)
    pt = get("patch_size_t")
    return (int(pt) if pt else None), int(patch), int(patch)


def _bucket_problems(get: Any, spec: LatentSpec, bucket: str, pad_frames: bool = False) -> list[str]:
    _, t, h, w = bucket_latent_shape(spec, bucket)
    problems = []
    pt, ph, pw = _patch_sizes(get)
    for name, size, p in (("height", h, ph), ("width", w, pw)):
        if size % p:
            problems.append(f"bucket {bucket}: latent {name} {size} is not a multiple of patch_size {p}; encode at a "
                            f"{name} that is a multiple of {p * spec.spatial_compression} pixels")
    if pt and t % pt and not pad_frames:
        problems.append(f"bucket {bucket}: {t} latent frames is not a multiple of patch_size_t {pt}; pad the latents "
                        "to a multiple in the training step (as CogVideoX 1.5 pipelines do) and pass pad_frames=True, "
                        "or encode other frames")
    frames, sh, sw = get("sample_frames"), get("sample_height"), get("sample_width")
    if frames is None or sh is None or sw is None:
        return problems
    model_t = (int(frames) - 1) // spec.temporal_compression + 1
    mismatch = [f"{n} {have} vs the config's {want}" for n, have, want in
                (("latent frames", t, model_t), ("latent height", h, sh), ("latent width", w, sw)) if have != want]
    if not mismatch:
        return problems
    if get("use_learned_positional_embeddings"):
        problems.append(f"bucket {bucket}: {', '.join(mismatch)} (sample_frames={frames}); this model's learned "
                        "positional embeddings only exist for its own size: encode at "
                        f"{frames}x{int(sh) * spec.spatial_compression}x{int(sw) * spec.spatial_compression}")
    elif not get("use_rotary_positional_embeddings"):
        log.warning("bucket %s: %s; diffusers recomputes the sincos positional embeddings for this size, which "
                    "the model was not trained on", bucket, ", ".join(mismatch))
    return problems


# ------------------------------------------------------------------------------------------------ dataset


class LatentShardDataset(IterableDataset):
    """Streams latents written by `latentcache encode`.

    `source` is an output directory, or shard urls: a path, a glob, a brace list (`shards/{000000..000099}.tar`),
    `file://...`, or anything webdataset's gopen opens (then pass `manifest=`; for local shards it is found above
    them). Yields dicts with `latents` (float tensor [C, T, H, W], normalised for the model), `key`, `meta`,
    `caption` and `prompt_embeds` when cached. With `batch_size=B`, yields batches of one bucket: `latents` is
    [B, C, T, H, W] (or [B, T, C, H, W] with `layout="BTCHW"`, what diffusers' CogVideoX transformer takes).

    Every sample is seen exactly once per epoch across DDP ranks and DataLoader workers: shards are split between
    them when there are enough, samples otherwise. `shuffle=True` permutes shards per (seed, epoch) and shuffles
    samples in a buffer of `shuffle_buffer`; `resampled=True` draws shards with replacement forever (step-based
    training: every rank gets an endless stream, so DDP ranks never run out unevenly).
    Each item also carries `__worker__` and `__index__`, which `StatefulLoader` uses to save the position.
    """

    def __init__(
        self,
        source: str | os.PathLike | Iterable[str],
        *,
        manifest: str | os.PathLike | None = None,
        expected_channels: int | None = None,
        sample_posterior: bool = True,
        normalize: bool = True,
        batch_size: int | None = None,
        layout: str = "BCTHW",
        dtype: torch.dtype = torch.float32,
        seed: int = 0,
        shuffle: bool = False,
        shuffle_buffer: int = 64,
        resampled: bool = False,
        epoch_items: int | None = None,
        drop_last: bool = False,
        check_sha256: bool = True,
        rank: int | None = None,
        world_size: int | None = None,
    ) -> None:
        super().__init__()
        if layout not in LAYOUTS:
            raise ValueError(f"layout {layout!r} is not one of {', '.join(LAYOUTS)}")
        if batch_size is not None and batch_size < 1:
            raise ValueError(f"batch_size {batch_size} must be at least 1 (or None for single samples)")
        self.manifest, self.root, self.shards = resolve_source(source, manifest)
        self.spec = LatentSpec.from_dict(self.manifest["latent_spec"])
        if expected_channels is not None and self.spec.channels != expected_channels:
            raise LatentMismatchError(
                f"{self.root}: latents have {self.spec.channels} channels ({self.manifest['vae']['class_name']}), "
                f"the model expects {expected_channels}. Encode with the VAE your model was trained with, or fix "
                "the model's in_channels."
            )
        self.expected_channels = self.spec.channels
        # Normalisation is affine per channel: applied in place with the spec's own gain and offset.
        self._gain, self._offset = self.spec.affine()
        self.sample_posterior, self.normalize = sample_posterior, normalize
        self.batch_size, self.layout, self.dtype, self.drop_last = batch_size, layout, dtype, drop_last
        self.seed, self.shuffle, self.shuffle_buffer, self.resampled = seed, shuffle, shuffle_buffer, resampled
        self.check_sha256 = check_sha256
        if epoch_items is not None and epoch_items < 1:
            raise ValueError(f"epoch_items {epoch_items} must be at least 1 (or None for the whole data)")
        # Items (samples, or batches) each rank x worker slot yields per epoch: with resampled=True, every DDP rank
        # then takes the same number of steps, and no rank waits forever in a collective at the end of an epoch.
        self.epoch_items = epoch_items
        self.rank, self.world_size = rank, world_size
        self.epoch = 0
        # Resume state: items already delivered per global worker id, and how many to skip on the next pass.
        self._consumed: dict[int, int] = {}
        self._skip: dict[int, int] = {}
        self._slots: int | None = None

    @classmethod
    def for_transformer(cls, transformer_or_config: Any, source: str | os.PathLike | Iterable[str], *,
                        image_to_video: bool = False, pad_frames: bool = False, **kwargs: Any
                        ) -> LatentShardDataset:
        """Read the transformer's config (in_channels, patch sizes, sample sizes, positional embedding) and refuse
        shards that do not fit it, naming each number."""
        dataset = cls(source, **kwargs)
        buckets = {s.bucket for s in dataset.shards}
        problems = transformer_problems(transformer_or_config, dataset.spec, buckets, image_to_video=image_to_video,
                                        pad_frames=pad_frames)
        if problems:
            raise LatentMismatchError(f"{dataset.root}: these latents do not fit the transformer:\n  - "
                                      + "\n  - ".join(problems))
        return dataset

    @property
    def vae_identity(self) -> dict[str, Any]:
        """Which VAE made these latents, from the manifest: class, source, hub commit, sha256 of each weights file,
        config hash. Log it next to checkpoints: a model trained on these latents decodes with that VAE only."""
        return copy.deepcopy(self.manifest.get("vae") or {})

    @property
    def num_samples(self) -> int:
        """Samples in the selected shards, all ranks together.

        There is deliberately no `__len__`: how many items one rank yields depends on batching by bucket, the split
        between ranks and DataLoader workers, and `epoch_items`; a wrong `len(loader)` would silently mis-size a
        learning-rate schedule. Step-based training sets `resampled=True, epoch_items=N` and knows N.
        """
        return sum(s.samples for s in self.shards)

    def set_epoch(self, epoch: int) -> None:
        """A new pass: new shard order, new buffer shuffle, new posterior noise.

        A resume position loaded for this same epoch is kept, so the usual `load_state_dict(...)` then
        `for epoch in range(start, n): set_epoch(epoch)` continues mid-epoch instead of replaying it.
        """
        if epoch != self.epoch:
            self._skip = {}
        self.epoch = epoch
        self._consumed = dict(self._skip)

    # -------------------------------------------------------------------------------------------- resume

    def _fingerprint(self) -> str:
        return hashlib.sha1("\n".join(f"{s.path}:{s.sha256}" for s in self.shards).encode()).hexdigest()[:16]

    def state_dict(self) -> dict[str, Any]:
        """Where this pass stands: JSON-able, for the trainer's checkpoint. With DataLoader workers, take it from
        `StatefulLoader` (the workers' copies of the dataset count, not this one)."""
        return {"epoch": self.epoch, "seed": self.seed, "slots": self._slots, "shards": self._fingerprint(),
                "batch_size": self.batch_size, "shuffle": self.shuffle, "shuffle_buffer": self.shuffle_buffer,
                "drop_last": self.drop_last, "resampled": self.resampled, "epoch_items": self.epoch_items,
                "consumed": {str(k): v for k, v in sorted(self._consumed.items())}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue a pass where `state` left it: the next iteration skips what was delivered before."""
        mine = self.state_dict()
        # Anything that changes the order of items would make the skip count point at other samples.
        for name in ("seed", "shards", "batch_size", "shuffle", "shuffle_buffer", "drop_last", "resampled",
                     "epoch_items"):
            if state.get(name) != mine[name]:
                raise ValueError(f"resume state has {name}={state.get(name)!r}, this dataset {mine[name]!r}: "
                                 "build the dataset with the settings and shards of the saved run")
        self.epoch = int(state["epoch"])
        self._consumed = {int(k): int(v) for k, v in state["consumed"].items()}
        self._skip = dict(self._consumed)
        self._slots = state.get("slots")

    # ----------------------------------------------------------------------------------------- internals

    def _slot(self) -> tuple[int, int, int]:
        """(global worker id, total workers, workers per rank) for this process."""
        rank, world = _rank_and_world()
        rank = self.rank if self.rank is not None else rank
        world = self.world_size if self.world_size is not None else world
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        return rank * workers + worker, world * workers, workers

    def _epoch_shards(self) -> list[ShardRef]:
        shards = list(self.shards)
        if self.shuffle:
            random.Random(_seed(self.seed, self.epoch, "shards")).shuffle(shards)
        return shards

    def _read(self, shard: ShardRef, buffer: bytearray | None = None) -> Iterator[dict[str, Any]]:
        return read_shard(shard, check_sha256=self.check_sha256, buffer=buffer)

    def _worker_raw(self, gid: int, total: int) -> Iterator[dict[str, Any]]:
        """This worker's raw samples: whole shards when there are enough, every total-th sample otherwise."""
        buffer = bytearray()  # this pass's shard buffer, reused shard after shard (never shared between passes)
        if self.resampled:
            rng = random.Random(_seed(self.seed, self.epoch, "resample", gid))
            draw = 0
            while self.shards:
                for raw in self._read(rng.choice(self.shards), buffer):
                    # A sample drawn twice in one epoch gets fresh posterior noise each time, still reproducible.
                    raw["__draw__"] = f"{gid}:{draw}"
                    draw += 1
                    yield raw
        shards = self._epoch_shards()
        if len(shards) >= total:
            for shard in shards[gid::total]:
                yield from self._read(shard, buffer)
            return
        n = 0
        for shard in shards:
            for raw in self._read(shard, buffer):
                if n % total == gid:
                    yield raw
                n += 1

    def _shuffled(self, raws: Iterator[dict[str, Any]], gid: int) -> Iterator[dict[str, Any]]:
        if not self.shuffle or self.shuffle_buffer <= 1:
            yield from raws
            return
        rng = random.Random(_seed(self.seed, self.epoch, "buffer", gid))
        buffer: list[dict[str, Any]] = []
        for raw in raws:
            buffer.append(raw)
            if len(buffer) >= self.shuffle_buffer:
                i = rng.randrange(len(buffer))
                buffer[i], buffer[-1] = buffer[-1], buffer[i]
                yield buffer.pop()
        rng.shuffle(buffer)
        yield from buffer

    def _groups(self, raws: Iterator[dict[str, Any]]) -> Iterator[list[dict[str, Any]]]:
        """Samples grouped by latent shape (one bucket per batch), decided from headers alone."""
        if not self.batch_size:
            for raw in raws:
                yield [raw]
            return
        pending: dict[tuple[int, ...], list[dict[str, Any]]] = {}
        for raw in raws:
            shape = raw_shape(raw)
            group = pending.setdefault(shape, [])
            group.append(raw)
            if len(group) == self.batch_size:
                yield pending.pop(shape)
        if not self.drop_last:
            yield from pending.values()

    def _latents(self, sample: dict[str, Any]) -> torch.Tensor:
        mean, logvar = sample["mean"], sample["logvar"]
        if mean.ndim != 4:
            raise LatentMismatchError(f"{sample['url']}: sample {sample['key']} has shape {tuple(mean.shape)}, "
                                      "expected [C, T, H, W]")
        if mean.shape[0] != self.expected_channels:
            hint = (" These are 3-channel pixels, not latents (what SAT with latent_input: true feeds its DiT from "
                    "a pixel dataset): run `latentcache encode` first." if mean.shape[0] == 3 else "")
            raise LatentMismatchError(f"{sample['url']}: sample {sample['key']} has {mean.shape[0]} channels, "
                                      f"the manifest says {self.expected_channels}.{hint}")
        # The check `latentcache verify` applies: dtype, the bucket's shape, finite, and finite once sampled and
        # normalised in float32. A sample that fails it never reaches the trainer.
        problems = latent_problems(mean, logvar, self.spec, sample["bucket"],
                                   f"{sample['url']}: sample {sample['key']}")
        if problems:
            raise ShardFormatError(f"{problems[0]}. Run `latentcache verify` on the dataset and re-encode the shard")
        # In-place arithmetic on tensors this sample owns (decoded just now): a 49x480x720 clip's latents are 4.5 MB
        # in float32, and every temporary costs a pass over them.
        if self.sample_posterior and logvar is not None:
            # Fresh noise every epoch, yet reproducible (and the same after a resume): seeded by (seed, epoch, key).
            gen = torch.Generator().manual_seed(_seed(self.seed, self.epoch, sample["key"], *sample["draw"]) >> 1)
            std = logvar.float().mul_(0.5).exp_()
            z = torch.randn(mean.shape, generator=gen).mul_(std).add_(mean)
        else:
            z = mean.float()
        if self.normalize:
            z = z.mul_(self._gain).add_(self._offset)
        return z.to(self.dtype)

    def _decode(self, raw: dict[str, Any]) -> dict[str, Any]:
        sample = decode_sample(raw, raw.get("__url__", "?"))
        sample["draw"] = (raw["__draw__"],) if "__draw__" in raw else ()
        sample["bucket"] = raw.get("__bucket__")
        latents = self._latents(sample)
        if self.layout == "BTCHW":
            latents = latents.permute(1, 0, 2, 3)
        out = {"latents": latents, "key": sample["key"], "meta": sample["meta"], "caption": sample["caption"]}
        if sample["text"] is not None:
            out["prompt_embeds"] = sample["text"].get("prompt_embeds")
            out["prompt_attention_mask"] = sample["text"].get("attention_mask")
        return out

    def _collate(self, samples: list[dict[str, Any]]) -> dict[str, Any]:
        batch = {"latents": torch.stack([s["latents"] for s in samples]), "key": [s["key"] for s in samples],
                 "meta": [s["meta"] for s in samples], "caption": [s["caption"] for s in samples]}
        if all(s.get("prompt_embeds") is not None for s in samples):
            batch["prompt_embeds"] = torch.stack([s["prompt_embeds"] for s in samples])
            if all(s.get("prompt_attention_mask") is not None for s in samples):
                batch["prompt_attention_mask"] = torch.stack([s["prompt_attention_mask"] for s in samples])
        return batch

    def __iter__(self) -> Iterator[dict[str, Any]]:
        gid, total, workers = self._slot()
        if self._slots is not None and self._skip and self._slots != total:
            raise ValueError(f"resume state was saved with {self._slots} rank x worker slots, this run has {total}: "
                             "resume with the same world size and num_workers")
        self._slots = total
        skip = self._skip.pop(gid, 0)
        # A new pass: what was delivered is what this pass skips, never counts left over from the previous pass.
        self._consumed = {gid: skip} if skip else {}
        groups = self._groups(self._shuffled(self._worker_raw(gid, total), gid))
        for index, group in enumerate(groups):
            if self.epoch_items is not None and index >= self.epoch_items:
                return
            if index < skip:
                continue  # delivered before the restart: not decoded, not yielded again
            samples = [self._decode(raw) for raw in group]
            item = self._collate(samples) if self.batch_size else samples[0]
            item["__worker__"], item["__index__"] = gid, index
            self._consumed[gid] = index + 1
            yield item


class StatefulLoader:
    """A DataLoader over a LatentShardDataset that remembers what each worker delivered, for mid-epoch resume.

    `loader.state_dict()` after k batches, saved with the model; a restarted run builds the same dataset and loader,
    calls `load_state_dict`, and continues with batch k+1 (same world size and num_workers). torchdata's
    StatefulDataLoader does the same job where it is installed.
    """

    def __init__(self, dataset: LatentShardDataset, num_workers: int = 0, **kwargs: Any) -> None:
        if kwargs.get("persistent_workers"):
            # Persistent workers keep their first copy of the dataset: set_epoch and load_state_dict never reach
            # them, so every epoch would repeat the first one's order and noise.
            raise ValueError("StatefulLoader does not support persistent_workers=True: workers must see set_epoch "
                             "and load_state_dict")
        self.dataset = dataset
        self.num_workers = num_workers
        # The dataset batches by bucket itself, so the DataLoader must not batch again.
        self.loader = DataLoader(dataset, batch_size=None, num_workers=num_workers, **kwargs)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        dataset = self.dataset
        slots = dataset._slot()[1] * max(1, self.num_workers)  # in this process _slot() counts one worker per rank
        if dataset._skip and dataset._slots not in (None, slots):
            raise ValueError(f"resume state was saved with {dataset._slots} rank x worker slots, this run has "
                             f"{slots}: resume with the same world size and num_workers")
        dataset._slots = slots
        dataset._consumed = dict(dataset._skip)  # a new pass starts from the resume position, or from nothing
        iterator = iter(self.loader)
        if self.num_workers:
            dataset._skip = {}  # the workers took their copy of the resume position; later passes start afresh
        for item in iterator:
            dataset._consumed[int(item["__worker__"])] = int(item["__index__"]) + 1
            yield item

    def state_dict(self) -> dict[str, Any]:
        return self.dataset.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.dataset.load_state_dict(state)
