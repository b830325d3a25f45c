"""Provenance: which weights made these latents, and which software wrote each shard.

A latent cache is valid only for the weights that made it. `weights_provenance` finds, for the VAE just loaded,
the hub commit it resolved to (a hub id) and the sha256 of every weights file diffusers loaded (any source). Both go
into the VAE identity (`revision` and `weights`), hence into the plan's fingerprint: a resume or rerun with other
weights is refused by `vae_change`, naming the old and new hashes.

`software_record` says what computed a shard (library versions, CUDA/cuDNN, the device) and the two run settings the
latents' last bits depend on: the batch size (batched convolutions round differently) and, on CPU, torch's thread
count (a convolution split over another number of threads sums in another order: a 128-channel CogVideoX encoder
on a 17x96x160 clip gives other bits with 1 thread than with 2). Byte identity between runs is only promised within
one such record, so it is kept out of the tar members: it goes into each shard's sidecar and
is merged into the manifest (`merge_software`), where `verify` warns when one output holds several
(`software_differences`). It holds no timestamp, hostname or pid: the same machine writes the same record.
"""

from __future__ import annotations

import hashlib
import json
import logging
import platform
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from latentcache.errors import ConfigError
from latentcache.format import strictjson

log = logging.getLogger(__name__)

# diffusers' file names (diffusers.utils.constants), in the order `ModelMixin.from_pretrained` looks for them when
# no variant is asked for: a sharded safetensors index, one safetensors file, then the pickle-based .bin.
SAFE_WEIGHTS_INDEX_NAME = "diffusion_pytorch_model.safetensors.index.json"
SAFETENSORS_WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
WEIGHTS_NAME = "diffusion_pytorch_model.bin"
_SHA256 = re.compile(r"[0-9a-f]{64}")
_CHUNK = 8 << 20


@dataclass(slots=True, frozen=True)
class WeightsProvenance:
    """Where a VAE's weights came from: the hub commit (None for a local directory) and {file: sha256}."""

    commit: str | None
    weights: dict[str, str]
    # The folder the files were read from (a local directory, or the snapshot folder in the HF cache).
    folder: Path
    # Bytes hashed here; 0 when every file's hash was read off its HF cache blob name.
    hashed_bytes: int = 0


# ------------------------------------------------------------------------------------------------- weights


def file_sha256(path: Path) -> tuple[str, int]:
    """(sha256 hex, bytes hashed). A file in a Hugging Face cache snapshot is a link to `blobs/<sha256>` (LFS files
    are stored under their sha256, which the hub checked on download): its hash is read off the name, for free."""
    if path.is_symlink():
        target = path.resolve()
        if target.parent.name == "blobs" and _SHA256.fullmatch(target.name):
            return target.name, 0
    digest = hashlib.sha256()
    size = 0
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
            size += len(chunk)
    return digest.hexdigest(), size


def weight_files(folder: Path) -> list[Path]:
    """The weights files diffusers loads from a model folder (no variant): every shard a safetensors index names,
    else the one safetensors file, else the .bin file. Raises ConfigError when there is none."""
    index = folder / SAFE_WEIGHTS_INDEX_NAME
    if index.is_file():
        try:
            weight_map = strictjson.loads(index.read_bytes())["weight_map"]
            if not (isinstance(weight_map, dict) and all(isinstance(v, str) for v in weight_map.values())):
                raise TypeError("weight_map is not an object of file names")
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise ConfigError(f"{index}: not a safetensors index (no weight_map: {e})") from e
        return [folder / name for name in sorted(set(weight_map.values()))]
    for name in (SAFETENSORS_WEIGHTS_NAME, WEIGHTS_NAME):
        if (folder / name).is_file():
            return [folder / name]
    raise ConfigError(f"{folder}: no {SAFETENSORS_WEIGHTS_NAME}, {SAFE_WEIGHTS_INDEX_NAME} or {WEIGHTS_NAME}, so the "
                      "weights the VAE was loaded from cannot be identified")


def hub_snapshot(repo_id: str, subfolder: str | None, revision: str | None) -> tuple[str, Path]:
    """(commit, folder) of a hub VAE in the local Hugging Face cache, as `from_pretrained` just resolved it: the
    revision (default: the `main` ref) -> `snapshots/<commit>/<subfolder>`."""
    from huggingface_hub import try_to_load_from_cache

    name = f"{subfolder}/config.json" if subfolder else "config.json"
    found = try_to_load_from_cache(repo_id, name, revision=revision)
    if not isinstance(found, str):
        raise ConfigError(f"--vae {repo_id}: loaded, but {name} at revision {revision or 'main'} is not in the "
                          "Hugging Face cache (HF_HUB_CACHE), so the commit and weights cannot be recorded; pass "
                          "the snapshot directory as --vae instead")
    folder = Path(found).parent
    snapshot = Path(found).parents[len(Path(name).parts) - 1]
    return snapshot.name, folder


def weights_provenance(source: str, subfolder: str | None, revision: str | None) -> WeightsProvenance:
    """The commit (hub ids) and sha256 of each weights file of a VAE just loaded from `source`/`subfolder`.

    A local directory is hashed here, once per load (see bench/provenance.py for the cost per GB); a hub id costs
    nothing extra, its blobs being named by their sha256.
    """
    local = Path(source)
    if local.is_dir():
        commit, folder = None, local / subfolder if subfolder else local
    else:
        commit, folder = hub_snapshot(source, subfolder, revision)
    weights, hashed = {}, 0
    for path in weight_files(folder):
        weights[path.relative_to(folder).as_posix()], size = file_sha256(path)
        hashed += size
    if hashed:
        log.info("hashed %d weights file(s) of %s: %.2f GB", len(weights), folder, hashed / 1e9)
    log.info("VAE %s: %s%s", source, f"hub commit {commit}, " if commit else "", _describe_weights(weights))
    return WeightsProvenance(commit, weights, folder, hashed)


def vae_change(old: dict[str, Any] | None, new: dict[str, Any], where: str) -> str | None:
    """Why latents of VAE identity `new` must not join those of `old` (both `VAEIdentity.to_dict()`, whose `revision`
    is the resolved hub commit), naming the old and new weights hashes and commits; None when they all agree."""
    old = old or {}
    redo = ("Its shards hold latents of the old weights. To re-encode on purpose with the new ones, pass --overwrite "
            "(or use a new --out)")
    if "weights" not in old:
        return (f"{where} records no hash of the VAE's weights (written by an older latentcache), so the weights "
                f"loaded now ({_describe_weights(new.get('weights'))}) cannot be checked against its shards. {redo}")
    changes = []
    if old.get("weights") != new.get("weights"):
        changes.append(_weights_diff(old.get("weights"), new.get("weights")))
    if old.get("revision") != new.get("revision"):
        changes.append(f"hub commit {old.get('revision')} then, {new.get('revision')} now")
    if old.get("config_hash") != new.get("config_hash"):
        changes.append(f"config hash {old.get('config_hash')} then, {new.get('config_hash')} now")
    if old.get("source") != new.get("source"):
        changes.append(f"source {old.get('source')} then, {new.get('source')} now")
    if not changes:
        return None
    pin = (f"; to finish it with the commit it was started with, pass --revision {old['revision']}"
           if old.get("revision") and old.get("revision") != new.get("revision") else "")
    return f"the VAE differs from the one {where} was made with: {'; '.join(changes)}. {redo}{pin}."


def _weights_diff(old: dict[str, str] | None, new: dict[str, str] | None) -> str:
    old, new = old or {}, new or {}
    parts = []
    for name in sorted(set(old) | set(new)):
        if old.get(name) != new.get(name):
            parts.append(f"{name} sha256 {old.get(name, 'absent')} then, {new.get(name, 'absent')} now")
    return "; ".join(parts) or "the weights differ"


def _describe_weights(weights: dict[str, str] | None) -> str:
    if not weights:
        return "random weights"
    return ", ".join(f"{name} sha256 {digest}" for name, digest in sorted(weights.items()))


# ------------------------------------------------------------------------------------------------ software


def software_record(device: Any = "cpu", *, text_encoder: bool = False,
                    batch_size: int | None = None) -> dict[str, Any]:
    """What computes the latents in this process: library versions, CUDA/cuDNN where used, the device model, the
    batch size (when given) and on CPU torch's thread count.

    Deterministic for one machine and environment (no time, host or pid), so a rerun's sidecars are byte-identical.
    """
    import av
    import diffusers
    import torch

    dev = torch.device(device)
    cuda = dev.type == "cuda" and torch.cuda.is_available()
    record: dict[str, Any] = {
        "latentcache": _package_version("latentcache"),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "av": av.__version__,
        "ffmpeg": _ffmpeg_version(av),
        "cuda": torch.version.cuda if cuda else None,
        "cudnn": torch.backends.cudnn.version() if cuda and torch.backends.cudnn.is_available() else None,
        "device": _device_name(dev, cuda),
    }
    if batch_size is not None:
        record["batch_size"] = batch_size
    if dev.type == "cpu":
        record["cpu_threads"] = torch.get_num_threads()
    if text_encoder:
        record["transformers"] = _package_version("transformers")
    return record


def _package_version(name: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(name)
    except PackageNotFoundError:
        return None


def _ffmpeg_version(av: Any) -> str:
    info = getattr(av, "ffmpeg_version_info", None)
    if info:
        return str(info)
    codec = getattr(av, "library_versions", {}).get("libavcodec")
    return f"libavcodec {'.'.join(map(str, codec))}" if codec else "unknown"


def _device_name(dev: Any, cuda: bool) -> str:
    import torch

    if cuda:
        return f"cuda: {torch.cuda.get_device_name(dev)}"
    # On a CPU the kernels torch picks follow the instruction set (AVX2, AVX512): part of what makes bytes equal.
    return f"{dev.type}: {platform.machine()} {torch.backends.cpu.get_cpu_capability()}"


def merge_software(records: list[dict[str, Any] | None]) -> list[dict[str, Any]]:
    """Sidecars' software records -> the manifest's list: each distinct record once, with how many shards it wrote.
    Shards without a record (written by an older latentcache) are counted under `{"unrecorded": true}`."""
    counts: dict[str, int] = {}
    for record in records:
        key = json.dumps(record if record is not None else {"unrecorded": True}, sort_keys=True)
        counts[key] = counts.get(key, 0) + 1
    return [{**json.loads(key), "shards": n} for key, n in sorted(counts.items())]


def software_differences(software: list[dict[str, Any]]) -> str | None:
    """When one output's shards were written by different software or device kinds: which fields differ and how
    many shards each value wrote, e.g. "torch 2.4.1 (3 shards) / 2.5.0 (1 shard)". None when they all agree."""
    recorded = [s for s in software if not s.get("unrecorded")]
    if len(recorded) < 2:
        return None
    fields = sorted({k for s in recorded for k in s} - {"shards"})
    parts = []
    for name in fields:
        by_value: dict[str, int] = {}
        for s in recorded:
            value = str(s.get(name)) if s.get(name) is not None else "none"
            by_value[value] = by_value.get(value, 0) + s.get("shards", 0)
        if len(by_value) > 1:
            # Most shards first: the odd ones out come last.
            ranked = sorted(by_value.items(), key=lambda item: (-item[1], item[0]))
            parts.append(f"{name} " + " / ".join(f"{v} ({n} shard{'s' if n != 1 else ''})" for v, n in ranked))
    return "; ".join(parts) or None


def describe_software(record: dict[str, Any]) -> str:
    """One line: 'torch 2.5.0+cu124, diffusers 0.42.1, av 18.1.0 (ffmpeg 8.1.2), CUDA 12.4, cuDNN 90100, python
    3.11.7, latentcache 0.1.0 on cuda: NVIDIA H100 (12 shards)'."""
    if record.get("unrecorded"):
        return f"not recorded (written by an older latentcache) ({_shards(record)})"
    parts = [f"torch {record.get('torch')}", f"diffusers {record.get('diffusers')}",
             f"av {record.get('av')} (ffmpeg {record.get('ffmpeg')})"]
    if record.get("transformers"):
        parts.append(f"transformers {record['transformers']}")
    if record.get("cuda"):
        parts.append(f"CUDA {record['cuda']}")
    if record.get("cudnn"):
        parts.append(f"cuDNN {record['cudnn']}")
    parts += [f"python {record.get('python')}", f"latentcache {record.get('latentcache')}"]
    device = str(record.get("device"))
    if record.get("cpu_threads"):
        device += f" ({record['cpu_threads']} thread{'s' if record['cpu_threads'] != 1 else ''})"
    if record.get("batch_size"):
        device += f", batch {record['batch_size']}"
    return f"{', '.join(parts)} on {device} ({_shards(record)})"


def _shards(record: dict[str, Any]) -> str:
    n = record.get("shards", 0)
    return f"{n} shard{'s' if n != 1 else ''}"


def describe_vae(identity: dict[str, Any]) -> str:
    """The weights part of a VAE identity, for `info` and logs: commit and each file's sha256."""
    if identity.get("random_weights"):
        return "random weights (seeded), no file"
    if "weights" not in identity:
        return "not recorded (written by an older latentcache)"
    commit = f"hub commit {identity['revision']}, " if identity.get("revision") else ""
    return commit + _describe_weights(identity.get("weights"))
