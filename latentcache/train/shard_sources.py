"""Where shards are and how they are read safely: urls and output directories -> manifest + `ShardRef`s, and the
bytes of one shard, checked whole (size, sha256, tar structure, sample count) before any sample leaves.

`verify`, `preview`, `sat` and the trainer's dataset all read shards through here. Every url form (plain paths,
file://, globs, brace lists, remote urls for webdataset's gopen) is told apart in storage/location.py.

Who a url comes from decides how it may be opened. A url the user typed (`LatentShardDataset("pipe:...")`, a
`latentcache verify https://...` argument) is theirs, like a shell command, and may name anything webdataset's gopen
opens. A shard path read from a file (a manifest, which may come from a stranger) never reaches gopen: it must be a
plain relative name under the dataset's own root (`_inside`), and is opened by latentcache's own reader, a local
regular file reached without a symbolic link below the root, or the root's own object store
(`trust.own_file_problem`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from latentcache.errors import LatentMismatchError, ShardFormatError
from latentcache.format.manifest import Manifest
from latentcache.format.out_layout import MANIFEST_FILE, SHARD_SUFFIX
from latentcache.format.reader import TarStats, iter_tar
from latentcache.storage import location, trust
from latentcache.storage.location import open_url  # noqa: F401 (the public latentcache.dataset.open_url)
from latentcache.storage.trust import plain_relative

PIXEL_SUFFIXES = {".mp4", ".webm", ".mov", ".mkv", ".avi", ".gif", ".ts", ".m4v", ".png", ".jpg", ".jpeg",
                  ".webp", ".bmp"}

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
    source: int = 0  # which output directory of a multi-source dataset it belongs to
    # The output directory (or object-store url) whose manifest named this shard, for a url built from a manifest
    # path: it is then opened only as a file under that root (see `read_bytes`). None for a url the user typed.
    root: str | None = None


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


def expand_urls(source: str | os.PathLike | Iterable[str | os.PathLike]) -> list[str]:
    """Brace lists (`{000000..000099}`), `::`-joined lists, globs and file:// urls -> a list of urls."""
    import webdataset as wds

    items = [source] if isinstance(source, str | os.PathLike) else list(source)
    urls: list[str] = []
    for item in items:
        for url in wds.shardlists.expand_urls(str(item)):
            matches = location.expand_pattern(url)  # a local glob's matches, each kept local (never to gopen)
            if not matches:
                raise ShardFormatError(f"{url}: the pattern matches no file")
            urls.extend(matches)
    if not urls:
        raise ShardFormatError(f"{source!r} names no shard")
    return urls


def _find_manifest_dir(urls: list[str]) -> Path:
    """The directory holding manifest.json, searched upwards from the first local shard."""
    local = trust.local_path(urls[0])
    if local is None:
        raise ShardFormatError(f"{urls[0]} is remote: pass manifest=PATH_OR_URL_OF/manifest.json (copy it next to "
                               "the training script) so the dataset knows the latent spec and the shard checksums")
    here = Path(local).resolve().parent
    for folder in [here, *here.parents][:MANIFEST_SEARCH_DEPTH]:
        if (folder / MANIFEST_FILE).is_file():
            return folder
    raise ShardFormatError(f"no manifest.json in {here} or the {MANIFEST_SEARCH_DEPTH - 1} folders above it: pass "
                           "manifest=OUT/manifest.json, the one `latentcache encode` wrote with these shards")


def _read_manifest_arg(manifest: str | os.PathLike) -> tuple[Manifest, Path]:
    path = Path(manifest)
    root = path if path.is_dir() else path.parent
    if path.is_file() and path.name != MANIFEST_FILE:
        raise ShardFormatError(f"manifest={manifest}: expected a file named manifest.json or its directory")
    return Manifest.read(root), root


def _match_shards(urls: list[str], manifest: Manifest, root: Path | str) -> list[ShardRef]:
    """Pair each url with its manifest entry; a shard the manifest does not list is refused."""
    by_path = {s.path: s for s in manifest.shards}
    refs = []
    for url in urls:
        local = trust.local_path(url)
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
            raise ShardFormatError(f"{url} is not listed in {root}/manifest.json ({len(by_path)} shards, e.g. "
                                   f"{next(iter(by_path), 'none')}): pass the manifest these shards were written with")
        path = _inside(entry.path, root)
        # The url names the file where the manifest puts it (SAT's shard lists, a glob over OUT/shards): opened by
        # the own-reader rules of a manifest-named shard, links refused (see read_bytes).
        own = local is not None and os.path.normpath(local) == os.path.normpath(os.path.join(str(root), path))
        refs.append(ShardRef(url, path, entry.bucket, int(entry.samples), entry.sha256,
                             int(entry.bytes), root=str(root) if own else None))
    return refs


def _inside(path: str, root: Path | str) -> str:
    """A shard path from a manifest, refused unless it is a plain relative name under the dataset's root: manifests
    may come from strangers, and `/dev/zero`, `../../etc`, `pipe:cmd` or `https://...` must never be opened."""
    if not plain_relative(path):  # the trust rule for a stranger's path: storage/trust.py
        raise ShardFormatError(f"{root}/manifest.json: shard path {path!r} is not a plain relative path inside the "
                               "dataset directory (absolute, `..`, empty parts, a url scheme, a backslash or a "
                               "control character); latentcache writes paths such as shards/17x64x96/000000.tar. "
                               "Refused: nothing was opened")
    return path


def resolve_source(source: Any, manifest: str | os.PathLike | None = None
                   ) -> tuple[Manifest, Path | str, list[ShardRef]]:
    """A dataset directory, or shard urls (paths, globs, brace lists, file://, anything webdataset opens)
    -> (manifest, manifest directory, shards). A dataset in object storage (`s3://bucket/latents`) gives its url."""
    source, manifest = _typed(source), _typed(manifest)
    remote = _object_store_source(source, manifest)
    if remote is not None:
        return remote
    if isinstance(source, str | os.PathLike) and Path(source).is_dir():
        root = Path(source)
        if manifest is None and not (root / MANIFEST_FILE).is_file():
            message = _pixels_message(root)
            if message:
                raise LatentMismatchError(message)
        data, mroot = _read_manifest_arg(manifest or root)
        if manifest is None or Path(mroot).resolve() == root.resolve():
            return data, mroot, _directory_shards(data, root)
        urls = [str(root / _inside(s.path, root)) for s in data.shards]
        return data, mroot, [dataclasses.replace(r, root=str(root)) for r in _match_shards(urls, data, mroot)]
    urls = expand_urls(source)
    data, mroot = _read_manifest_arg(manifest) if manifest is not None else _read_manifest_arg(
        _find_manifest_dir(urls))
    return data, mroot, _match_shards(urls, data, mroot)


def _typed(source: Any) -> Any:
    """A source or manifest the user typed, each string in it with a file url read as the local path it names (as
    on the command line: `trust.typed`), in it or in a list of them; a Path or other object is left as it is."""
    if isinstance(source, str):
        return trust.typed(source)
    if isinstance(source, list | tuple):
        return [trust.typed(item) if isinstance(item, str) else item for item in source]
    return source


def _directory_shards(manifest: Manifest, root: Path) -> list[ShardRef]:
    """The shards of an output directory, straight from its manifest: string work only, no Path or stat per shard
    (a 10M-sample output lists ~156k shards, and opening it must take seconds, not minutes)."""
    prefix = str(root).rstrip("/") + "/" if str(root) not in ("", ".") else ""
    make, inside, top = ShardRef, _inside, str(root)  # locals: this loop runs once per shard
    # read_manifest checked every entry (samples and bytes are ints, buckets well formed); _inside that each path is
    # a plain relative name, so prefix + path is a local path even where the prefix is empty (root "." or "").
    return [make(prefix + inside(s.path, root), s.path, s.bucket, s.samples, s.sha256, s.bytes,
                 root=top) for s in manifest.shards]


def resolve_sources(source: Any, manifest: str | os.PathLike | None = None
                    ) -> list[tuple[Manifest, Path, list[ShardRef]]]:
    """`resolve_source` for one source, or for each of a list of output directories (a list of shard files or
    urls is one source). Several outputs must share the latent spec and the VAE; each ShardRef says its source.
    The user typed these: a file url names the local path `trust.typed` gives, as on the command line."""
    source, manifest = _typed(source), _typed(manifest)
    if isinstance(source, str | os.PathLike) or not _lists_directories(source := list(source)):
        return [resolve_source(source, manifest)]
    if manifest is not None:
        raise ShardFormatError("manifest= names one output's manifest; a list of output directories reads each "
                               "one's own manifest.json: leave manifest= out")
    resolved = []
    for i, directory in enumerate(source):
        data, root, refs = resolve_source(directory)
        resolved.append((data, root, refs if i == 0 else [dataclasses.replace(r, source=i) for r in refs]))
    first_data, first_root, _ = resolved[0]
    for data, root, _ in resolved[1:]:
        problems = source_mismatch(first_data, data)
        if problems:
            raise LatentMismatchError(f"{first_root} and {root} cannot be read as one dataset: "
                                      + "; ".join(problems))
    return resolved


def _lists_directories(items: list[Any]) -> bool:
    """Whether a list names output directories (True) or shard files/urls (False), told by its first item (a list of
    shard files costs no stat per file); a list that mixes both is refused."""
    def is_dir(item: Any) -> bool:
        local = isinstance(item, str | os.PathLike) and trust.local_path(str(item)) is not None
        return local and Path(item).is_dir()

    if not items or not is_dir(items[0]):
        return False
    for item in items[1:]:
        if not is_dir(item):
            raise ShardFormatError(f"{item}: not an output directory, yet {items[0]} is; pass either output "
                                   "directories (one dataset over all of them) or shard files of one output")
    return True


# The VAE identity fields that must agree for latents to be mixed: its class, its hub revision, the sha256 of every
# weights file and its config. Where no weights hash is known (random weights, older manifests), its source too.
VAE_FIELDS = ("class_name", "revision", "config_hash", "weights", "random_weights")


def source_mismatch(a: Manifest, b: Manifest) -> list[str]:
    """Why latents of manifests `a` and `b` cannot be trained on together (the latent spec or the VAE differ),
    naming each differing field; [] when they can."""
    problems = []
    spec_a, spec_b = a.latent_spec or {}, b.latent_spec or {}
    for name in sorted(set(spec_a) | set(spec_b)):
        if spec_a.get(name) != spec_b.get(name):
            problems.append(f"latent_spec {name} is {spec_a.get(name)!r} vs {spec_b.get(name)!r}")
    vae_a, vae_b = a.vae or {}, b.vae or {}
    fields = VAE_FIELDS if vae_a.get("weights") and vae_b.get("weights") else (*VAE_FIELDS, "source")
    for name in fields:
        if vae_a.get(name) != vae_b.get(name):
            what = "weights sha256" if name == "weights" else name
            problems.append(f"vae {what} is {vae_a.get(name)!r} vs {vae_b.get(name)!r} (latents of different VAE "
                            "weights do not mix)")
    return problems


def read_bytes(shard: ShardRef, buffer: bytearray | None = None) -> memoryview:
    """The whole shard, read once; refused, before anything is read, when larger than the manifest says.

    A shard named by a manifest (`shard.root` set) is opened only by latentcache's own reader, never by gopen: see
    `trust.own_file_problem`. A local shard is read straight into `buffer` when one is given (grown as needed):
    see `location.read_whole`. A shard in object storage costs one HEAD (its size, checked first) and GETs of no
    more than it holds; `prefetched` starts the next shards' reads early, so that wait overlaps decoding.
    """
    limit = shard.bytes if shard.bytes is not None else MAX_SHARD_BYTES
    if shard.root is not None:
        problem = trust.own_file_problem(shard.url, shard.root, shard.path)
        if problem:
            raise ShardFormatError(f"{shard.url}: shard {shard.path!r} of {shard.root}/manifest.json {problem}; "
                                   "refused")
    try:
        data = location.read_whole(shard.url, limit, buffer)
    except location.TooLarge as e:
        raise ShardFormatError(f"{shard.url}: {e.size} bytes, the manifest lists {limit}; the shard was replaced or "
                               "appended to. Run `latentcache verify` and re-encode it") from None
    except FileNotFoundError:
        where = f"of {shard.root}/{MANIFEST_FILE}" if shard.root is not None else "named by the manifest"
        raise ShardFormatError(f"{shard.url}: shard {shard.path!r} {where} is missing from storage; the dataset "
                               "is incomplete (copied in part?): copy the whole output, or run `latentcache verify` "
                               "on it") from None
    if len(data) > limit:
        raise ShardFormatError(f"{shard.url}: more than the {limit} bytes the manifest lists; the shard was "
                               "replaced or appended to. Run `latentcache verify` and re-encode it")
    return memoryview(data)


def read_shard(shard: ShardRef, *, check_sha256: bool = True, buffer: bytearray | None = None,
               data: memoryview | None = None) -> Iterator[dict[str, Any]]:
    """Raw samples of one shard, none of them before the whole shard has passed: its size, sha256, tar structure
    and sample count against the manifest.

    The shard is read into memory once (bounded by the manifest's `bytes`; into `buffer` when given, see
    `read_bytes`) and hashed; its tar structure is then checked and its samples counted from those same bytes,
    headers only; only then are samples copied out, one at a time. A changed, cut or miscounted
    shard delivers nothing; no byte is read twice from disk, and memory holds the shard plus the samples in
    flight, not a second copy of the shard. `data`: the shard's bytes when already fetched (`prefetched`).
    """
    if check_sha256 and not shard.sha256:  # what verify reports, the readers refuse: nothing unchecked is delivered
        raise ShardFormatError(f"{shard.url}: the manifest has no sha256 for it, so its content cannot be checked; "
                               "run `latentcache finalize` to rebuild the manifest from the sidecars, or pass "
                               "check_sha256=False")
    data = read_bytes(shard, buffer) if data is None else data
    try:
        if check_sha256 and shard.sha256:
            digest = hashlib.sha256(data).hexdigest()
            if digest != shard.sha256:
                raise ShardFormatError(f"{shard.url}: sha256 {digest[:16]}..., the manifest lists "
                                       f"{shard.sha256[:16]}...; the shard changed after it was written. Rerun the "
                                       "same `latentcache encode` with --repair to write it again, or pass "
                                       "check_sha256=False if you changed it on purpose")
        stats = TarStats()
        for _ in iter_tar(data, shard.url, stats, sha256=False, members=False):
            pass
        if stats.samples != shard.samples:
            raise ShardFormatError(f"{shard.url}: {stats.samples} samples, the manifest lists {shard.samples}; the "
                                   "shard was replaced or cut short. Run `latentcache verify` and re-encode it")
        yield from iter_tar(data, shard.url, sha256=False)
    finally:
        data.release()  # lets the buffer grow for the next shard


# Shards fetched ahead of the one being decoded, per reader: object storage answers in tens of ms and a shard takes
# a while to download; two in flight keep a reader busy while costing two shards of memory.
PREFETCH_SHARDS = 2


def prefetched(shards: list[ShardRef]) -> Iterator[tuple[ShardRef, memoryview | None]]:
    """(shard, its bytes or None). Shards in object storage are downloaded PREFETCH_SHARDS ahead in threads, so a
    remote reader decodes one shard while the next arrive; local shards are read where they are used (None)."""
    return location.read_ahead(shards, lambda s: s.url, read_bytes, PREFETCH_SHARDS)


def _object_store_source(source: Any, manifest: str | os.PathLike | None
                         ) -> tuple[Manifest, str, list[ShardRef]] | None:
    """`s3://bucket/latents` (a dataset in object storage): its manifest and the shards it lists, as urls. None
    for anything else (local paths, shard urls, lists)."""
    root = location.object_url(source)
    if root is None or source.endswith(SHARD_SUFFIX) or any(c in source for c in "{*?"):
        return None
    mroot = str(manifest).rstrip("/").removesuffix(f"/{MANIFEST_FILE}") if manifest is not None else root
    data = Manifest.read(mroot)
    urls = [location.join(root, _inside(s.path, root)) for s in data.shards]
    return data, mroot, [dataclasses.replace(r, root=root) for r in _match_shards(urls, data, mroot)]
