"""The package layout's rules, read from the code's own imports (top-level and lazy ones alike).

    format/   the on-disk contract: imports only `errors` and `storage`
    storage/  where bytes live (local paths, object stores, tar members): imports only `errors`
    encode/   the write side          train/  the read side: never imports encode/ or tools/
    tools/    verify, preview, check-config, demo, synthetic videos: may import any side
    cli.py    the command line, imported by nothing in the package

A trainer that imports `LatentShardDataset` must not pay for the encoder side: checked in a fresh interpreter.
"""

from __future__ import annotations

import ast
import functools
import re
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "latentcache"
MAX_LINES = 600  # a module past it has more than one concern: split it along its seams
MAX_FUNCTION_LINES = 80


@functools.cache
def _parsed(path: Path) -> ast.Module:
    """A package module's syntax tree, parsed once per test run: every rule below walks the same files."""
    return ast.parse(path.read_text(encoding="utf-8"))


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _is_type_checking(node: ast.AST) -> bool:
    return isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)


def _runtime_imports(tree: ast.AST, module: str, is_package: bool) -> set[str]:
    """Absolute latentcache modules imported at run time (anywhere but under `if TYPE_CHECKING:`)."""
    found: set[str] = set()
    todo = [tree]
    while todo:
        node = todo.pop()
        if _is_type_checking(node):
            continue
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("latentcache")}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = module.split(".")
                anchor = anchor[: len(anchor) - node.level + (1 if is_package else 0)]
                base = ".".join([*anchor, base] if base else anchor)
            if base.startswith("latentcache"):
                # `from latentcache.x import y` imports x, and y too where y is a module
                found.add(base)
                found |= {f"{base}.{a.name}" for a in node.names if _exists(f"{base}.{a.name}")}
        todo.extend(ast.iter_child_nodes(node))
    return {m for m in found if _exists(m)} - {module}


def _exists(module: str) -> bool:
    path = PACKAGE.parent.joinpath(*module.split("."))
    return path.with_suffix(".py").exists() or (path / "__init__.py").exists()


@functools.cache
def _graph() -> dict[str, set[str]]:
    graph = {}
    for path in PACKAGE.rglob("*.py"):
        name = _module_name(path)
        graph[name] = _runtime_imports(_parsed(path), name, path.name == "__init__.py")
    return graph


def _area(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def test_the_graph_is_read():
    graph = _graph()
    assert "latentcache.train.dataset" in graph["latentcache"]
    assert {"latentcache.format.reader", "latentcache.storage.location"} <= graph["latentcache.train.shard_sources"]


def test_each_area_imports_only_what_the_layout_allows():
    allowed = {
        "errors": set(),
        "storage": {"storage", "errors"},
        "format": {"format", "storage", "errors"},
        "train": {"train", "format", "storage", "errors"},
        "encode": {"encode", "format", "storage", "errors"},
        "tools": {"tools", "encode", "train", "format", "storage", "errors"},
        "cli": {"encode", "train", "tools", "format", "storage", "errors"},
    }
    wrong = []
    for module, deps in sorted(_graph().items()):
        area = _area(module)
        if area in ("__init__", "dataset", "sat"):  # the package root and the public shims re-export train/
            assert {_area(d) for d in deps} <= {"train", "errors"}, (module, deps)
            continue
        wrong += [f"{module} imports {d}" for d in sorted(deps) if _area(d) not in allowed[area]]
    assert wrong == []


def test_decoding_never_imports_a_model():
    """encode/decoding/ (probing, decoding, the decode workers) is what planning and the decode workers run: none of
    it, nor anything it imports, loads a model's code (encode/models/)."""
    graph = _graph()
    decoding = [m for m in graph if m.startswith("latentcache.encode.decoding.")]
    assert len(decoding) >= 8  # the folder is read
    seen, todo = set(), list(decoding)
    while todo:
        module = todo.pop()
        if module not in seen:
            seen.add(module)
            todo.extend(graph.get(module, ()))
    assert sorted(m for m in seen if m.startswith("latentcache.encode.models")) == []


def _private_imports() -> list[tuple[str, str, str]]:
    """(importing module, imported module, name) of every `from latentcache.x import _name` in the package, and of
    every `module._name` where `module` is a latentcache module it imported."""
    found = []
    for path in PACKAGE.rglob("*.py"):
        name = _module_name(path)
        tree = _parsed(path)
        modules: dict[str, str] = {}  # local name -> latentcache module it is bound to
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("latentcache") and not node.level:
                found += [(name, node.module, a.name) for a in node.names if a.name.startswith("_")]
                modules |= {a.asname or a.name: f"{node.module}.{a.name}" for a in node.names
                            if _exists(f"{node.module}.{a.name}")}
            elif isinstance(node, ast.Import):
                modules |= {a.asname: a.name for a in node.names if a.asname and a.name.startswith("latentcache")}
        for node in ast.walk(tree):
            if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in modules
                    and node.attr.startswith("_") and not node.attr.startswith("__")):
                found.append((name, modules[node.value.id], node.attr))
    return found


def test_no_module_imports_a_private_name_of_another():
    """Modules talk to each other through public names only: a private (`_name`) name is what its module may change
    without looking elsewhere. (It once failed on decode.py's seven imports of integrity.py's private names.)"""
    assert _private_imports() == []


def test_no_module_imports_one_that_imports_it_back_even_lazily():
    graph = _graph()
    cycles, done = [], set()

    def walk(module: str, path: list[str]) -> None:
        for dep in sorted(graph.get(module, ())):
            if dep in path:
                cycles.append(path[path.index(dep):] + [dep])
            elif dep not in done:
                walk(dep, [*path, dep])
        done.add(module)

    for module in sorted(graph):
        walk(module, [module])
    # a package's __init__ importing its own children is not a cycle
    cycles = [c for c in cycles if not any(b.startswith(a + ".") for a, b in zip(c, c[1:], strict=False))]
    assert cycles == []
    assert not any(_area(d) == "cli" for deps in graph.values() for d in deps)


def _local_or_remote_tests(tree: ast.AST) -> list[str]:
    """Where code tells a local path from a url by itself: a test of a scheme's text (`"://" in x`,
    `x.startswith("s3://")`, `x.split("://")`), or a call of storage's own predicates (`is_url`,
    `in_object_store`)."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Compare) and any(isinstance(op, ast.In | ast.NotIn) for op in node.ops):
            texts = [node.left, *node.comparators]
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in (
                "startswith", "endswith", "split", "rsplit", "partition", "find", "index", "removeprefix"):
            texts = list(node.args)
        elif isinstance(node, ast.Name | ast.Attribute):
            name = node.id if isinstance(node, ast.Name) else node.attr
            if name in ("is_url", "in_object_store"):
                found.append(f"line {node.lineno}: {name}")
            continue
        else:
            continue
        for text in texts:
            for const in ast.walk(text):
                if isinstance(const, ast.Constant) and isinstance(const.value, str) and "://" in const.value:
                    found.append(f"line {node.lineno}: {ast.unparse(node)[:80]}")
    return found


def test_no_module_outside_storage_asks_whether_a_path_is_local():
    """storage/location.py resolves a string to a location (a local Path or an ObjectPath) and does what differs
    between the two; the trust rule for strangers' paths lives there too. Every other module takes what it gives."""
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        if _area(_module_name(path)) == "storage":
            continue
        found += [f"{path.relative_to(PACKAGE.parent)} {where}"
                  for where in _local_or_remote_tests(_parsed(path))]
    assert found == []


def test_every_open_url_call_in_the_package_says_whom_the_url_comes_from():
    """`open_url(url)` trusts its url by default (the public `latentcache.dataset.open_url`): the package's own calls
    say `trusted=` each time, so a string read from a file never reaches webdataset's gopen by omission."""
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        for node in ast.walk(_parsed(path)):
            if (isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", None)) == "open_url"
                    and not any(k.arg == "trusted" for k in node.keywords)):
                found.append(f"{path.relative_to(PACKAGE.parent)} line {node.lineno}")
    assert found == []


def test_no_module_is_over_600_lines_and_no_function_over_80():
    long = []
    for path in sorted(PACKAGE.rglob("*.py")):
        text = path.read_text(encoding="utf-8")
        where = path.relative_to(PACKAGE.parent)
        if text.count("\n") > MAX_LINES:
            long.append(f"{where}: {text.count(chr(10))} lines")
        for node in ast.walk(_parsed(path)):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                lines = node.end_lineno - node.lineno + 1
                if lines > MAX_FUNCTION_LINES:
                    long.append(f"{where}:{node.lineno} {node.name}: {lines} lines")
    assert long == []


@pytest.mark.slow
def test_the_dataset_imports_without_av_diffusers_or_the_write_side():
    code = ("import sys; from latentcache import LatentShardDataset; import latentcache.dataset, latentcache.sat; "
            "print(' '.join(sorted(m for m in sys.modules if m.split('.')[0] in ('av', 'diffusers') "
            "or m.startswith(('latentcache.encode', 'latentcache.tools', 'latentcache.cli')))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=PACKAGE.parent).stdout
    assert out.strip() == ""


def test_the_public_import_paths_are_kept():
    from latentcache import LatentShardDataset
    from latentcache.dataset import LatentShardDataset as Shimmed
    from latentcache.dataset import StatefulLoader
    from latentcache.sat import SATLatentDataset
    from latentcache.train.resume import StatefulLoader as Real
    from latentcache.train.sat import SATLatentDataset as RealSAT

    assert LatentShardDataset is Shimmed and StatefulLoader is Real and SATLatentDataset is RealSAT


# The output's file names (format/out_layout.py builds and matches every one): no module outside format/ spells one.
OUT_FILES = {"manifest.json", "plan.json", "failures.jsonl", ".latentcache"}
OUT_FOLDERS = {"chunks", "inputs", "shards"}
# Endings and pieces of OUT's names. `.tar` and `.jsonl` end inputs too (webdataset tars, input lists): `NOT_OUT`.
OUT_NAME_PIECES = re.compile(r"\.tar$|\.tar\.json|\.carry\.tar|\.keys\.npy|\.jsonl$|part-"
                             r"|(?:^|/)(?:chunks|inputs|shards)/")
# What the check finds that names no file of OUT, by module or package (a folder/): each with why it is not one.
NOT_OUT = {
    "encode/inputs/": {"'.jsonl'": "an input list (JSON lines) given to encode",
                       "'.tar'": "a webdataset tar of input videos"},
    "storage/trust.py": {"'.tar'": "a webdataset tar of input videos (`tar::member`)"},
    "tools/export_musubi.py": {"f'{item_name(sample)}_{start:05d}-{frames:03d}_{width:04d}x{height:04d}_"
                               "{arch.short}.safetensors'": "a cache file named as musubi-tuner names it"},
}


def _docstrings(tree: ast.AST) -> set[int]:
    return {id(node.body[0].value) for node in ast.walk(tree)
            if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef)
            and node.body and isinstance(node.body[0], ast.Expr) and isinstance(node.body[0].value, ast.Constant)}


def _output_names_built(tree: ast.AST) -> list[tuple[int, str]]:
    """(line, code) where a module spells a name of OUT: one of its files, a path under one of its folders or a name
    ending like one of its files, a folder of it joined with `/`, `.json` appended (a sidecar), or a number formatted
    into a file name or a path part as shards, chunks and share markers are (`:04d`, `:06d`). Text with a space in it
    is a message, not a name, and a docstring documents."""
    skip = _docstrings(tree)

    def operands(op: type[ast.operator]) -> set[int]:
        return {id(side) for node in ast.walk(tree) if isinstance(node, ast.BinOp) and isinstance(node.op, op)
                for side in (node.left, node.right)}

    joined, appended = operands(ast.Div), operands(ast.Add)
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in skip:
            name = node.value
            if (" " not in name and (name.rsplit("/", 1)[-1] in OUT_FILES or OUT_NAME_PIECES.search(name))
                    or (id(node) in joined and name in OUT_FOLDERS) or (id(node) in appended and name == ".json")):
                found.add((node.lineno, repr(name)))
        if isinstance(node, ast.JoinedStr):
            text = "".join(v.value for v in node.values if isinstance(v, ast.Constant))
            specs = {ast.unparse(v.format_spec) for v in node.values
                     if isinstance(v, ast.FormattedValue) and v.format_spec is not None}
            if " " not in text and {"f'04d'", "f'06d'"} & specs and ("/" in text or "." in text or id(node) in joined):
                found.add((node.lineno, ast.unparse(node)))
    return sorted(found)


def test_no_module_outside_format_builds_or_matches_an_output_file_name():
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        module = path.relative_to(PACKAGE).as_posix()
        if not module.startswith("format/"):
            allowed = {code for where, codes in NOT_OUT.items() if module.startswith(where) for code in codes}
            found += [f"{module} line {line}: {code}" for line, code in _output_names_built(
                _parsed(path)) if code not in allowed]
    assert found == []


def test_the_output_name_check_sees_each_way_of_spelling_a_name():
    code = '''
def f(out, part, chunk, rank, digest, index):
    """Writes OUT/manifest.json and chunks/p0000/c000000.json."""
    a = out / "manifest.json"
    b = f"chunks/p{part:04d}/c{chunk:06d}.json"
    c = out / "shards"
    d = path.with_name(path.name + ".tar.json"), Path(url + ".json")
    e = folder / f"r{rank:06d}"
    g = [p for p in out.rglob("*.tar")]
    h = str(manifest).removesuffix("/manifest.json")
    raise ValueError(f"{out}: no manifest.json, see failures.jsonl; {d!r}")
    key = f"{digest}_{index:04d}"
    row = {"shards": [], "inputs": 3}
'''
    assert sorted({line for line, _ in _output_names_built(ast.parse(code))}) == [4, 5, 6, 7, 8, 9, 10]
