"""What a `--vae` names, found without loading it: the family its config.json declares, a near miss of a built-in
name or a hub that cannot be reached, refused in a moment, and the latent spec its config alone gives (`peek_spec`)
so that a clip it cannot encode is refused before a multi-GB VAE loads. Loading and encoding are encode/models/vae.py.
"""

from __future__ import annotations

import ast
import functools
import importlib.util
import logging
from pathlib import Path
from typing import Any

from latentcache.encode.models import vae_checks
from latentcache.encode.models.families import FAMILIES, UNSUPPORTED, family_of
from latentcache.encode.settings import VAESettings
from latentcache.errors import ConfigError
from latentcache.format import strictjson
from latentcache.format.spec import LatentSpec

log = logging.getLogger(__name__)

TINY_RANDOM_SUFFIX = "tiny-random-"


def family_for_source(source: str | None, family: str | None = None, *, subfolder: str | None = "vae",
                      revision: str | None = None) -> str:
    """The VAE family, detected from the VAE's own config; `family` (--family) overrides, checked against it.

    A built-in `tiny-random-<family>` names its family. Otherwise the config's `_class_name` says it: a local
    directory's config.json (or its `subfolder`'s, for a pipeline directory), or a hub repo's config already in the
    Hugging Face cache (nothing is downloaded here). With no config to read, `family`, else CogVideoX; the loader
    then checks the class it finds.
    """
    if source and source.startswith(TINY_RANDOM_SUFFIX) and source[len(TINY_RANDOM_SUFFIX):] in FAMILIES:
        return family or source[len(TINY_RANDOM_SUFFIX):]
    found = _config_class_name(source, subfolder, revision) if source else None
    if found is None:
        return family or "cogvideox"
    config_path, class_name = found
    detected = next((f.name for f in FAMILIES.values() if f.class_name == class_name), None)
    if class_name in UNSUPPORTED:
        raise ConfigError(f"--vae {source}: {config_path} is a {class_name}, which latentcache cannot encode with: "
                          f"{UNSUPPORTED[class_name]}")
    if detected is None:
        raise ConfigError(f"--vae {source}: {config_path} is a {class_name}, not one of "
                          f"the supported VAEs ({', '.join(f.class_name for f in FAMILIES.values())})")
    if family and family != detected:
        raise ConfigError(f"--family {family}, but --vae {source} is {class_name} ({config_path}), a {detected} VAE; "
                          f"drop --family (it is detected) or pass --family {detected}")
    return detected


def check_source_name(source: str) -> None:
    """Refuse in a moment a --vae that can name nothing: a near miss of a built-in name (`tiny-cogvideox`: "did you
    mean tiny-random-cogvideox"), a path that does not exist, or a text that is not a hub id (OWNER/NAME). Checked
    before any import of diffusers and before the hub is asked (offline, a wrong id costs a minute of retries)."""
    import difflib

    builtins = [TINY_RANDOM_SUFFIX + f for f in FAMILIES]
    path = Path(source).expanduser()
    if source in builtins or path.is_dir():
        return
    close = difflib.get_close_matches(source, builtins, n=1, cutoff=0.6)
    if close or source.startswith("tiny"):
        guess = f"did you mean {close[0]}? " if close else ""
        raise ConfigError(f"--vae {source}: not a local directory, nor a built-in name; {guess}The built-in tiny "
                          f"random VAEs are {', '.join(builtins)}")
    if path.exists():
        raise ConfigError(f"--vae {source}: a file; pass the directory holding the VAE's config.json and weights (or "
                          "a pipeline directory with a vae/ folder), or a hub id such as THUDM/CogVideoX-2b")
    if source.startswith((".", "/", "~")) or source.count("/") != 1 or not all(source.split("/")):
        raise ConfigError(f"--vae {source}: no such directory, and not a hub id (OWNER/NAME, e.g. THUDM/CogVideoX-2b)")


def check_hub_reachable(source: str, subfolder: str | None, revision: str | None) -> None:
    """For a hub id whose config is not in the local Hugging Face cache: one quick request, so that an unreachable
    hub, an id that does not exist or an offline machine (HF_HUB_OFFLINE=1) is refused in a second, not after the
    loader's minute of retries. A cached id, a local directory or a built-in name is left alone."""
    if source.startswith(TINY_RANDOM_SUFFIX) or Path(source).expanduser().is_dir():
        return
    if _config_class_name(source, subfolder, revision) is not None:
        return
    try:
        import huggingface_hub
        from huggingface_hub import constants
        from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError, RevisionNotFoundError
    except ImportError:
        return
    if constants.HF_HUB_OFFLINE:
        raise ConfigError(f"--vae {source}: not in the Hugging Face cache here ({constants.HF_HUB_CACHE}), and "
                          "HF_HUB_OFFLINE=1 forbids downloading it; download it on a machine with access "
                          f"(`hf download {source}`) into that cache, or pass a local directory")
    try:
        huggingface_hub.HfApi().model_info(source, revision=revision, timeout=10)  # HF_ENDPOINT as set now
    except GatedRepoError:
        return  # the loader says what access it needs
    except RevisionNotFoundError:
        raise ConfigError(f"--vae {source}: the hub has no revision {revision!r} of it") from None
    except RepositoryNotFoundError:
        raise ConfigError(f"--vae {source}: no such model on the hub (or it is private: log in with `hf auth "
                          "login`); a local directory must exist here") from None
    except Exception as e:  # the hub's client raises its HTTP library's own errors for a network that fails
        if getattr(getattr(e, "response", None), "status_code", None) is not None:
            return  # the hub answered (e.g. rate limited): the loader reports it exactly
        raise ConfigError(f"--vae {source}: the hub cannot be reached from here ({type(e).__name__}: {e}) and it is "
                          f"not in the local cache ({constants.HF_HUB_CACHE}); download it on a machine with access, "
                          "or pass a local directory. HF_HUB_OFFLINE=1 makes hub look-ups fail at once") from None


def _config_class_name(source: str, subfolder: str | None, revision: str | None) -> tuple[str, str] | None:
    """(where, `_class_name`) of the VAE config for `source`, or None when there is none to read offline."""
    candidates: list[Path] = []
    if Path(source).is_dir():
        root = Path(source)
        candidates = [root / subfolder / "config.json"] if subfolder else []
        candidates.append(root / "config.json")
    else:
        try:
            from huggingface_hub import try_to_load_from_cache
        except ImportError:
            return None
        for name in ([f"{subfolder}/config.json"] if subfolder else []) + ["config.json"]:
            try:
                cached = try_to_load_from_cache(source, name, revision=revision)
            except ValueError:  # not a valid repo id: the loader says what is wrong with it
                return None
            if isinstance(cached, str):
                candidates.append(Path(cached))
    for path in candidates:
        if not path.is_file():
            continue
        try:
            config = strictjson.loads(path.read_bytes())  # a model folder's file: any content is an error, not a bug
        except (OSError, ValueError) as e:
            raise ConfigError(f"--vae {source}: cannot read {path}: {e}") from e
        vae_checks.check_config(config, f"--vae {source}: {path}")
        if isinstance(config, dict) and "_class_name" in config:
            return str(path), config["_class_name"]
    return None




def peek_spec(settings: VAESettings) -> LatentSpec | None:
    """The geometry of the VAE `settings` name (channels, compressions, frame rule; no normalisation), from its config
    alone and its class's defaults, without importing torch's model code or diffusers, reading no weights and
    downloading nothing for a hub id that is not cached: so a --frames or --height it cannot encode is refused in a
    second, before a multi-GB VAE loads. None when the config cannot be read offline; `load_vae` then checks as
    before."""
    family = family_of(settings.family)
    try:
        if settings.source == TINY_RANDOM_SUFFIX + family.name:
            config: dict[str, Any] = dict(family.tiny_config)
        else:
            found = _config_class_name(settings.source, settings.subfolder, settings.revision)
            if found is None or found[1] != family.class_name:
                return None  # load_vae names what is wrong with it
            config = strictjson.loads(Path(found[0]).read_bytes())
        defaults = class_defaults(family.class_name)
        if defaults is None or family.geometry_from_config is None:
            return None
        return family.geometry_from_config({**defaults, **config})
    except Exception as e:  # best effort only: any surprise here leaves the check to load_vae, which is exact
        log.debug("no early latent spec for %s: %s", settings.source, e)
        return None


@functools.cache
def class_defaults(class_name: str) -> dict[str, Any] | None:
    """The constructor defaults of the installed diffusers' VAE class `class_name` (what its registered config holds
    for a field a config.json leaves out), read from its source file without importing diffusers (seconds of imports
    for a check that takes a millisecond). Defaults that are not literals (`(0.0,) * 24`) are left out; None when the
    class is not found."""
    spec = importlib.util.find_spec("diffusers")  # finding a top-level package runs none of its code
    if spec is None or not spec.submodule_search_locations:
        return None
    folder = Path(next(iter(spec.submodule_search_locations))) / "models" / "autoencoders"
    marker = f"class {class_name}("
    for path in sorted(folder.glob("*.py")):
        text = path.read_text(encoding="utf-8")
        if marker not in text:
            continue
        for node in ast.parse(text).body:
            if isinstance(node, ast.ClassDef) and node.name == class_name:
                init = next((f for f in node.body if isinstance(f, ast.FunctionDef) and f.name == "__init__"), None)
                return _literal_defaults(init.args) if init is not None else None
    return None


def _literal_defaults(args: ast.arguments) -> dict[str, Any]:
    positional = args.posonlyargs + args.args
    pairs = [*zip(positional[len(positional) - len(args.defaults):], args.defaults, strict=True),
             *((a, d) for a, d in zip(args.kwonlyargs, args.kw_defaults, strict=True) if d is not None)]
    defaults: dict[str, Any] = {}
    for arg, node in pairs:
        try:
            defaults[arg.arg] = ast.literal_eval(node)
        except ValueError:
            continue
    return defaults
