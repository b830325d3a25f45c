"""Fuzz targets: every reader of a stranger's file, fed structure-aware mutations of a real latentcache output.

Each target takes hypothesis' `data` (for interactive draws), a base output (a real encode, never changed) and a
scratch folder, builds one crafted input from the base (a manifest of JSON of other types and sizes, a shard whose
sample JSON, safetensors header or tar members lie, a resume state, a trainer config, an input list with odd cells)
and calls the entry points users call. The property, `Checker.call`: the call returns, or raises one of the
project's typed errors (`LatentcacheError`) whose message names the file (the scratch output, or the file given);
never another exception, never past a time bound (`bounded`); what `verify` passes the dataset and the musubi export
read, and what `verify` refuses the dataset refuses; nothing is written outside the output a call was given.

Used by tests/fuzz/test_fuzz.py (fast and slow tiers) and bench/fuzz.py (any target, for hours).
"""

from __future__ import annotations

import contextlib
import copy
import csv
import hashlib
import io
import json
import os
import shutil
import signal
import struct
import tarfile
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hypothesis import strategies as st

from latentcache.errors import LatentcacheError

# A crafted input must be answered within this (a real one of this size takes well under a second).
CALL_SECONDS = 30.0

SPECIAL_INTS = [0, -1, 1, 2, 3, 8, 16, 17, 255, 2**31, 2**32 + 1, 2**53 + 1, 2**63, 2**64, 10**30, -(2**63), 10**400]
SPECIAL_TEXT = ["", ".", "..", "/etc/passwd", "pipe:echo x", "s3://bucket/x", "https://example.com/x",
                "17x64x96", "0x0x0", "99999x99999x99999", "a" * 300, "\x00", "../../x", "shards/../../x.tar",
                "float16", "bfloat16", "int64", "F32", "mean", "logvar", "NaN", "1e999", "k.json", "\ud7ff"]
scalars = (st.none() | st.booleans() | st.sampled_from(SPECIAL_INTS) | st.integers(-10, 10**6)
           | st.floats() | st.sampled_from([1e308, -1e-320, 0.5, 1.5]) | st.text(max_size=10)
           | st.sampled_from(SPECIAL_TEXT))
json_values = st.recursive(scalars, lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=6), c,
                                                                                       max_size=3), max_leaves=6)


class Hang(Exception):
    """A call ran past CALL_SECONDS."""


@contextlib.contextmanager
def bounded(seconds: float = CALL_SECONDS) -> Iterator[None]:
    """Raise Hang in the main thread when the block runs past `seconds` (SIGALRM; the readers run in this thread)."""
    def alarm(signum, frame):
        raise Hang(f"still running after {seconds} s")

    previous = signal.signal(signal.SIGALRM, alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


# ------------------------------------------------------------------------------------------- JSON mutation


def _paths(doc: Any, prefix: tuple = ()) -> Iterator[tuple]:
    yield prefix
    if isinstance(doc, dict):
        for k, v in doc.items():
            yield from _paths(v, (*prefix, k))
    elif isinstance(doc, list):
        for i, v in enumerate(doc[:6]):
            yield from _paths(v, (*prefix, i))


def mutate_json(data: Any, doc: Any, most: int = 3) -> Any:
    """1..most structure-aware edits of a parsed JSON document: a value replaced by JSON of another type or size,
    a key removed, a key added, a list item repeated."""
    doc = copy.deepcopy(doc)
    for _ in range(data.draw(st.integers(1, most), label="edits")):
        path = data.draw(st.sampled_from(list(_paths(doc))), label="path")
        op = data.draw(st.sampled_from(["replace", "replace", "delete", "add", "repeat"]), label="op")
        if not path:
            if op == "replace":
                doc = data.draw(json_values, label="document")
            continue
        parent = doc
        for part in path[:-1]:
            parent = parent[part]
        last = path[-1]
        if op == "replace":
            parent[last] = data.draw(json_values, label="value")
        elif op == "delete":
            del parent[last]
        elif op == "add" and isinstance(parent[last], dict):
            parent[last][data.draw(st.text(max_size=12), label="key")] = data.draw(json_values, label="value")
        elif op == "repeat" and isinstance(parent[last], list) and parent[last]:
            parent[last].append(copy.deepcopy(parent[last][0]))
    return doc


def dump_json(doc: Any) -> bytes:
    """JSON text as a stranger may write it: NaN/Infinity allowed, surrogates kept."""
    return json.dumps(doc, allow_nan=True).encode("utf-8", "surrogatepass")


# ------------------------------------------------------------------------------------------------- checker


@dataclass
class Checker:
    """Calls readers and checks the property; counts outcomes per reader (for the closing numbers)."""

    names: tuple[str, ...]  # what an error message must name (at least one of them)
    outcomes: Counter = field(default_factory=Counter)

    def call(self, reader: str, fn: Callable[[], Any]) -> tuple[bool, Any]:
        """(True, result) or (False, the typed error). Anything else fails the target."""
        counter = self.outcomes
        try:
            with bounded():
                result = fn()
        except LatentcacheError as e:
            message = str(e)
            assert any(n in message for n in self.names), f"{reader}: the error names no file: {message[:500]}"
            counter[f"{reader}: refused"] += 1
            return False, e
        counter[f"{reader}: read"] += 1
        return True, result


def tree(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


# ------------------------------------------------------------------------------------------- shard editing


def _members(data: bytes) -> list[tuple[tarfile.TarInfo, bytes]]:
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as t:
        return [(m, t.extractfile(m).read() if m.isfile() else b"") for m in t.getmembers()]


def _tar(members: list[tuple[tarfile.TarInfo, bytes]]) -> bytes:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.GNU_FORMAT) as t:  # long names as GNU tar writes them
        for info, payload in members:
            info = copy.copy(info)
            if info.isfile():
                info.size = len(payload)
                t.addfile(info, io.BytesIO(payload))
            else:
                t.addfile(info)
    return out.getvalue()


def rewrite_shard(out: Path, index: int, data: bytes, *, recount: bool = True) -> None:
    """Put `data` in place of shard `index` and make the manifest agree with its size and sha256 (and, with
    `recount`, its key count), so that the readers look inside it instead of stopping at the checksum."""
    manifest = json.loads((out / "manifest.json").read_text())
    entry = manifest["shards"][index]
    (out / entry["path"]).write_bytes(data)
    entry["bytes"], entry["sha256"] = len(data), hashlib.sha256(data).hexdigest()
    if recount:
        with contextlib.suppress(tarfile.TarError, OSError, ValueError, EOFError):
            keys = {m.name.split(".", 1)[0] for m, _ in _members(data)}
            old = entry["samples"]
            entry["samples"] = len(keys)
            if isinstance(manifest.get("counts"), dict) and isinstance(manifest["counts"].get("samples"), int):
                manifest["counts"]["samples"] += len(keys) - old
    (out / "manifest.json").write_text(json.dumps(manifest))


def first_shard(out: Path) -> tuple[int, bytes]:
    manifest = json.loads((out / "manifest.json").read_text())
    return 0, (out / manifest["shards"][0]["path"]).read_bytes()


def safetensors_parts(blob: bytes) -> tuple[dict, bytes]:
    (n,) = struct.unpack("<Q", blob[:8])
    return json.loads(blob[8:8 + n]), blob[8 + n:]


def safetensors_join(header: Any, body: bytes, length: int | None = None) -> bytes:
    text = dump_json(header)
    return struct.pack("<Q", len(text) if length is None else length) + text + body


# ----------------------------------------------------------------------------------------- the readers


def read_dataset(out: Path, checker: Checker) -> tuple[bool, Any]:
    from latentcache.train.dataset import LatentShardDataset

    return checker.call("LatentShardDataset", lambda: [s["key"] for s in LatentShardDataset(out)])


def read_all(out: Path, checker: Checker, *, export: bool = True, sat: bool = True) -> None:
    """info, verify, the dataset, SAT's dataset and the musubi export on one output, and their agreement."""
    from latentcache.cli import main
    from latentcache.tools.verify import info_lines, verify

    checker.call("info", lambda: info_lines(out))
    ok, report = checker.call("verify", lambda: verify(out))
    if ok:
        report.lines()
    read, keys = read_dataset(out, checker)
    if ok and report.ok:
        assert read, f"verify passed, the dataset refused: {keys}"
        assert len(keys) == report.samples
    if read and ok:
        assert report.ok or not report.problems, "the dataset read what verify refuses: " + "; ".join(
            report.problems[:3])
    if sat:
        from latentcache.sat import SATLatentDataset

        def sat_epoch() -> list:  # map-style and endless: SAT asks for len(dataset) items per epoch
            dataset = SATLatentDataset(str(out), shuffle=False)
            return [dataset[i] for i in range(len(dataset))]

        checker.call("SATLatentDataset", sat_epoch)
    if export:
        to = out.parent / "export"
        before = tree(out)
        with bounded(), contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()) as err:
            code = main(["export", "musubi", str(out), "--to", str(to)])
        assert code != 1, f"export musubi: a traceback (exit 1): {err.getvalue()[-2000:]}"
        checker.outcomes[f"export musubi: exit {code}"] += 1
        assert tree(out) == before, "export musubi wrote into the output it read"
        if ok and not report.ok:
            assert code != 0, "export musubi exported what verify refuses: " + "; ".join(report.problems[:3])
        shutil.rmtree(to, ignore_errors=True)


# ------------------------------------------------------------------------------------------------- targets


def target_manifest(data: Any, out: Path, checker: Checker) -> None:
    """manifest.json of other JSON types, sizes and lies, read by info, verify, the dataset, SAT and the export."""
    manifest = json.loads((out / "manifest.json").read_text())
    (out / "manifest.json").write_bytes(dump_json(mutate_json(data, manifest)))
    read_all(out, checker)


def _edit_member(data: Any, out: Path, suffix: str, edit: Callable[[bytes], bytes]) -> None:
    index, blob = first_shard(out)
    members = _members(blob)
    choices = [i for i, (m, _) in enumerate(members) if m.name.endswith(suffix)]
    i = data.draw(st.sampled_from(choices), label="member")
    members[i] = (members[i][0], edit(members[i][1]))
    rewrite_shard(out, index, _tar(members))


def target_sample_json(data: Any, out: Path, checker: Checker) -> None:
    """A sample's KEY.json with values of other types and sizes (clip times, fps, bucket, source...)."""
    _edit_member(data, out, ".json", lambda b: dump_json(mutate_json(data, json.loads(b), most=4)))
    read_all(out, checker)


def target_safetensors(data: Any, out: Path, checker: Checker) -> None:
    """A sample's latents: a header of other dtypes, shapes and offsets, a lying length, a cut body."""
    def edit(blob: bytes) -> bytes:
        header, body = safetensors_parts(blob)
        how = data.draw(st.sampled_from(["header", "length", "cut", "tensor"]), label="how")
        if how == "header":
            return safetensors_join(mutate_json(data, header), body)
        if how == "tensor":  # a plausible tensor entry with one field changed to a plausible lie
            name = data.draw(st.sampled_from(sorted(k for k in header if k != "__metadata__")), label="tensor")
            field = data.draw(st.sampled_from(["dtype", "shape", "data_offsets"]), label="field")
            header[name][field] = data.draw(
                st.sampled_from(["F16", "BF16", "F32", "F64", "I64", "U8", "BOOL", "F8_E4M3"]) if field == "dtype"
                else st.lists(st.sampled_from([0, 1, 2, 3, 4, 5, 8, 12, 16, 2**31, 2**62, -1]), max_size=6),
                label="lie")
            return safetensors_join(header, body)
        if how == "length":
            return safetensors_join(header, body, data.draw(st.sampled_from([0, 1, 7, 2**20, 2**40, 2**64 - 1])
                                                            | st.integers(0, len(blob) + 64), label="length"))
        return blob[:data.draw(st.integers(0, max(0, len(blob) - 1)), label="cut")]

    _edit_member(data, out, ".latents.safetensors", edit)
    read_all(out, checker)


ODD_NAMES = ["../x.json", "/abs.json", "k.unknown", "k", ".json", "a.b.c.json", "k.latents.safetensors.json",
             "x" * 120 + ".json", "dir/k.json", "k..json", "K.JSON", "k.txt", "k.text.safetensors", "pipe:k.json"]


def target_tar(data: Any, out: Path, checker: Checker) -> None:
    """Tars with odd members: renamed, dropped, repeated, of another type (link, folder, fifo), added, cut short,
    bytes changed (with the manifest made to agree, so the reader looks inside)."""
    index, blob = first_shard(out)
    members = _members(blob)
    for _ in range(data.draw(st.integers(1, 3), label="edits")):
        op = data.draw(st.sampled_from(["rename", "drop", "repeat", "type", "add", "raw"]), label="op")
        i = data.draw(st.integers(0, max(0, len(members) - 1)), label="member")
        if op == "raw" or not members:
            try:
                raw = _tar(members)
            except (ValueError, UnicodeError):  # a name tarfile cannot write: a no-op case
                return
            at = data.draw(st.integers(0, max(0, len(raw) - 1)), label="at")
            blob = raw[:at] if data.draw(st.booleans(), label="cut") else raw[:at] + bytes([raw[at] ^ 0xFF]) + raw[
                at + 1:]
            rewrite_shard(out, index, blob)
            read_all(out, checker, export=False, sat=False)
            return
        info, payload = members[i]
        if op == "rename":
            info = copy.copy(info)
            info.name = data.draw(st.sampled_from(ODD_NAMES) | st.text(min_size=1, max_size=20), label="name")
            members[i] = (info, payload)
        elif op == "drop":
            del members[i]
        elif op == "repeat":
            members.insert(i, (info, payload))
        elif op == "type":
            info = copy.copy(info)
            info.type = data.draw(st.sampled_from([tarfile.SYMTYPE, tarfile.LNKTYPE, tarfile.DIRTYPE,
                                                   tarfile.FIFOTYPE, tarfile.CHRTYPE]), label="type")
            info.linkname = "/etc/passwd"
            members[i] = (info, b"")
        else:
            new = tarfile.TarInfo(data.draw(st.sampled_from(ODD_NAMES), label="name"))
            members.insert(i, (new, data.draw(st.binary(max_size=64), label="payload")))
    with contextlib.suppress(ValueError, UnicodeError):  # a name tarfile cannot write: a no-op case
        rewrite_shard(out, index, _tar(members))
    read_all(out, checker, export=False, sat=False)


def target_resume(data: Any, out: Path, checker: Checker) -> None:
    """A saved resume state of other types and ranges, loaded by the dataset and by StatefulLoader; accepted, the
    resumed epoch ends, delivering at most what the dataset holds."""
    from latentcache.train.dataset import LatentShardDataset
    from latentcache.train.resume import StatefulLoader

    dataset = LatentShardDataset(out, seed=3)
    for i, _ in enumerate(dataset):
        if i == data.draw(st.integers(0, 7), label="items"):
            break
    state = mutate_json(data, json.loads(json.dumps(dataset.state_dict())))
    checker.names = (*checker.names, "resume state")  # a dict handed over, not a file: named as what it is
    for name, target in (("dataset", LatentShardDataset(out, seed=3)),
                         ("StatefulLoader", StatefulLoader(LatentShardDataset(out, seed=3)))):
        ok, _ = checker.call(f"{name}.load_state_dict", lambda t=target: t.load_state_dict(state))
        if ok:
            rest = checker.call(f"{name} resumed", lambda t=target: list(t))[1]
            assert not isinstance(rest, list) or len(rest) <= 8


def target_check_config(data: Any, out: Path, checker: Checker) -> None:
    """A CogVideo SAT training YAML of other types and sizes: `latentcache check-config` exits 0 or 2, never 1."""
    import yaml

    from latentcache.cli import main
    from latentcache.format.manifest import Manifest
    from latentcache.train.trainer_config import config_problems, load_trainer_config

    example = Path(__file__).resolve().parents[2] / "examples" / "configs" / "cogvideox_tiny_sat.yaml"
    config = out.parent / "trainer.yaml"
    tree_ = mutate_json(data, yaml.safe_load(example.read_text()), most=4)
    config.write_text(json.dumps(tree_) if data.draw(st.booleans(), label="json") else yaml.safe_dump(tree_))
    names = checker.names
    checker.names = (*names, str(config))
    checker.call("check-config", lambda: config_problems(load_trainer_config(config), Manifest.read(out)))
    checker.names = names
    with bounded(), contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()) as err:
        code = main(["check-config", str(config), "--data", str(out)])
    assert code in (0, 2), f"check-config exit {code}: {err.getvalue()[-2000:]}"


LIST_COLUMNS = ["path", "url", "caption", "start", "end", "timestamp", "spans", "fps", "other"]


def target_input_list(data: Any, out: Path, checker: Checker) -> None:
    """encode's input lists (.txt, .csv, .jsonl, .parquet) with odd cells: every row read, or a ConfigError naming
    the list."""
    from latentcache.encode.inputs import discover_inputs

    folder = out.parent / "list"
    folder.mkdir(exist_ok=True)
    (folder / "a.mp4").write_bytes(b"not a video")
    kind = data.draw(st.sampled_from(["txt", "csv", "jsonl", "parquet"]), label="kind")
    rows = data.draw(st.lists(st.dictionaries(st.sampled_from(LIST_COLUMNS), json_values | st.just("a.mp4"),
                                              max_size=5), min_size=1, max_size=4), label="rows")
    path = folder / f"list.{kind}"
    if kind == "txt":
        path.write_bytes("\n".join(str(r.get("path", "")) for r in rows).encode("utf-8", "surrogatepass"))
    elif kind == "jsonl":
        path.write_bytes(b"\n".join(dump_json(r) for r in rows))
    elif kind == "csv":
        text = io.StringIO()
        writer = csv.DictWriter(text, fieldnames=sorted({k for r in rows for k in r}) or ["path"])
        writer.writeheader()
        writer.writerows({k: json.dumps(v) if not isinstance(v, str) else v for k, v in r.items()} for r in rows)
        path.write_bytes(text.getvalue().encode("utf-8", "surrogatepass"))
    else:
        import pyarrow as pa
        import pyarrow.parquet as pq

        columns = sorted({k for r in rows for k in r})
        try:
            table = pa.table({c: [r.get(c) for r in rows] for c in columns})
        except (pa.ArrowException, OverflowError, TypeError, ValueError):
            return  # cells arrow cannot hold in one column: no such parquet file exists
        try:
            pq.write_table(table, path)
        except (pa.ArrowException, OverflowError, TypeError, ValueError):
            return  # (a struct column with no field: parquet cannot hold it)
    checker.names = (*checker.names, str(path), path.name)
    checker.call("encode input list", lambda: list(discover_inputs([str(path)])))


def target_preview(data: Any, out: Path, checker: Checker) -> None:
    """`latentcache preview` of an output whose manifest or a sample's JSON lies (its source path, fps, bucket):
    an mp4 written where asked and nowhere else, or a latentcache error naming the output."""
    from latentcache.tools.preview import preview

    if data.draw(st.booleans(), label="manifest"):
        manifest = json.loads((out / "manifest.json").read_text())
        (out / "manifest.json").write_bytes(dump_json(mutate_json(data, manifest)))
    else:
        _edit_member(data, out, ".json", lambda b: dump_json(mutate_json(data, json.loads(b), most=4)))
    before = tree(out.parent)
    target = out.parent / "preview.mp4"
    ok, _ = checker.call("preview", lambda: preview(out, target, random_count=1))
    after = tree(out.parent)
    written = set(after) - set(before)
    assert written <= {"preview.mp4"} and all(after[k] == v for k, v in before.items()), (
        f"preview wrote outside its output: {sorted(written)}")
    assert not ok or "preview.mp4" in written


def target_sat(data: Any, out: Path, checker: Checker) -> None:
    """SATLatentDataset's data.params of other types and sizes (video_size, max_num_frames, fps, bucket, ...)."""
    from latentcache.sat import SATLatentDataset

    params = mutate_json(data, {"video_size": [64, 96], "max_num_frames": 13, "fps": 24, "bucket": "13x64x96",
                                "shuffle": False, "seed": 0, "shuffle_buffer": 4, "sample_posterior": True,
                                "check_sha256": True}, most=3)
    if not isinstance(params, dict):
        params = {"video_size": params}
    names = checker.names
    checker.names = (*names, "SATLatentDataset")

    def epoch() -> list:
        dataset = SATLatentDataset(str(out), **{str(k): v for k, v in params.items()})
        return [dataset[i] for i in range(min(len(dataset), 8))]

    checker.call("SATLatentDataset(params)", epoch)
    checker.names = names


def target_vae_dir(data: Any, out: Path, checker: Checker) -> None:
    """A local --vae directory whose config.json holds other types and sizes: the family is detected and the VAE
    loaded, or a ConfigError names the directory, before anything is encoded."""
    from latentcache.encode.models.vae import load_vae
    from latentcache.encode.models.vae_source import family_for_source
    from latentcache.encode.settings import VAESettings

    vae = out.parent / "vae"
    shutil.copytree(_tiny_vae_dir(out.parents[1]), vae)
    config = json.loads((vae / "config.json").read_text())
    (vae / "config.json").write_bytes(dump_json(mutate_json(data, config, most=3)))
    checker.names = (*checker.names, str(vae))

    def load() -> Any:
        family = family_for_source(str(vae), subfolder=None)
        return load_vae(VAESettings(source=str(vae), family=family, subfolder=None), "cpu")

    checker.call("--vae DIR", load)


def _tiny_vae_dir(scratch: Path) -> Path:
    """The tiny random Wan VAE saved as a local directory (config.json + safetensors), once per scratch folder."""
    folder = scratch / "tiny_vae"
    if not (folder / "config.json").is_file():
        from latentcache.encode.models.vae import load_vae
        from latentcache.encode.settings import VAESettings

        load_vae(VAESettings(source="tiny-random-wan", family="wan", subfolder=None), "cpu").model.save_pretrained(
            folder)
    return folder


TARGETS: dict[str, Callable[[Any, Path, Checker], None]] = {
    "manifest": target_manifest, "sample_json": target_sample_json, "safetensors": target_safetensors,
    "tar": target_tar, "resume": target_resume, "check_config": target_check_config,
    "input_list": target_input_list, "preview": target_preview, "sat": target_sat, "vae_dir": target_vae_dir,
}


def build_base(folder: Path) -> Path:
    """The output every case starts from: a real encode of two small videos (h264, vp9; one with a caption) with the
    tiny random Wan VAE (a family the musubi export writes), 2 clips each, 2 samples per shard."""
    from latentcache.cli import main
    from latentcache.tools.synthetic import write_video

    videos = folder / "videos"
    videos.mkdir(parents=True)
    write_video(videos / "red_clip", codec="h264", num_frames=48, height=64, width=96)
    write_video(videos / "blue_clip", codec="vp9", num_frames=48, height=64, width=96)
    (videos / "red_clip.txt").write_text("a red square crosses the frame", encoding="utf-8")
    out = folder / "out"
    with contextlib.redirect_stdout(io.StringIO()):
        code = main(["encode", str(videos), "--out", str(out), "--vae", "tiny-random-wan", "--family", "wan",
                     "--device", "cpu", "--frames", "13", "--fps", "24", "--height", "64", "--width", "96",
                     "--clips", "uniform:2", "--samples-per-shard", "2"])
    assert code == 0, f"encode of the fuzz base exited {code}"
    return out


def run_one(target: str, data: Any, base: Path, scratch: Path, outcomes: Counter | None = None) -> None:
    """One case: a fresh copy of `base` under `scratch`, the target's crafted input, its property; cleaned after."""
    folder = Path(os.path.realpath(scratch)) / "case"
    shutil.rmtree(folder, ignore_errors=True)
    out = folder / "out"
    shutil.copytree(base, out)
    try:
        TARGETS[target](data, out, Checker((str(out),), outcomes if outcomes is not None else Counter()))
    finally:
        shutil.rmtree(folder, ignore_errors=True)
