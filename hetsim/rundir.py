"""Which runs are one experiment, and which folder a run may write into.

Run identity: two runs are seeds of one experiment when their resolved configs agree on everything
but `seed`, `name`, `run.*` (fault timeout, checkpoints) and `trace.*` (what is logged), and they ran
on the same engine at the same fidelity (a simulated and a measured run are never two seeds of one
curve). `identity_key` hashes exactly that; `hetsim plot` groups by it and the default run folder
carries it, so runs of different configs neither share a folder nor a curve.

The run folder: `claim_run_dir` is called by every entry point before anything is written. It
accepts a new or empty folder, or one holding a run of the same config (a re-run, a resume, a sweep's
cached run); it refuses anything else with a one-line error. With `overwrite`, hetsim replaces only
its own run files (RUN_FILES) and never deletes a user's other files or the folder itself: the safe
reading of "overwrite" when the folder may be a user's own.

    claim_run_dir("runs/a", spec, "sim")                   # new folder: created
    default_run_dir(spec, "sim")                           # runs/<name>-s<seed>-<identity[:8]>
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import shutil
import tempfile
import tomllib
from pathlib import Path
from typing import Any, Mapping

from hetsim.config import Spec, spec_to_dict, to_toml
from hetsim.errors import SpecError

#: top-level config keys that do not change what a run computes or how long it takes
IDENTITY_IGNORES = ("seed", "name", "run", "trace")
#: what a fresh run replaces: the run directory's files (results.py; decisions.jsonl is schema 1's) and the
#: backend's error reports, worker logs and per-rank checkpoints
RUN_FILES = ("config.toml", "metrics.csv", "decisions.bin", "decisions.jsonl", "trace.json", "summary.json",
             "checkpoint.pt")
RUN_FOLDERS = (".errors", "checkpoints")
#: the backend's worker logs: appended to by every attempt (a separator line between), never removed, and
#: not a sign of another run: under torchrun the other ranks open theirs while rank 0 claims the folder
LOGS = "logs"
#: the longest name part of a default folder; file systems allow 255 bytes a name part
SLUG_MAX = 64


def normalized_config(spec: Spec) -> dict[str, Any]:
    """The spec as its config.toml reads back, so a spec and a run loaded from disk compare equal."""
    return tomllib.loads(to_toml(spec_to_dict(spec)))


def engine_fidelity(spec: Spec, engine: str) -> str:
    """The fidelity a run of `spec` on `engine` reports in its summary.json."""
    return spec.sim.fidelity if engine == "sim" else "real"


#: keys inside a table that change how fast the host computes, never what a run computes
IDENTITY_IGNORES_IN = {"sim": ("threads",)}


def with_defaults(config: Mapping[str, Any]) -> dict[str, Any]:
    """`config` with every table's missing keys at their defaults: a config.toml written before a key
    existed (e.g. stop.on_divergence) equals one that spells the default out."""
    out = dict(config)
    for key, default in normalized_config(Spec()).items():
        if isinstance(default, dict) and isinstance(out.get(key), Mapping):
            out[key] = {**default, **out[key]}
        elif key not in out:
            out[key] = default
    return out


def _identity_part(config: Mapping[str, Any]) -> dict[str, Any]:
    full = with_defaults(config)
    kept = {k: v for k, v in full.items() if k not in IDENTITY_IGNORES}
    for table, keys in IDENTITY_IGNORES_IN.items():
        if isinstance(kept.get(table), Mapping):
            kept[table] = {k: v for k, v in kept[table].items() if k not in keys}
    return kept


def identity_key(config: Mapping[str, Any], engine: str, fidelity: str) -> str:
    """12 hex digits naming the experiment a run belongs to (see the module docstring)."""
    kept = _identity_part(config)
    payload = json.dumps({"config": kept, "engine": engine, "fidelity": fidelity}, sort_keys=True, default=str)
    return hashlib.sha256(payload.encode()).hexdigest()[:12]


def spec_identity(spec: Spec, engine: str) -> str:
    return identity_key(normalized_config(spec), engine, engine_fidelity(spec, engine))


def flatten(config: Any, prefix: str = "") -> dict[str, Any]:
    """{'optim.lr': 0.1, 'cluster.devices.1.count': 4, ...}: the `--set` spelling of every leaf."""
    if isinstance(config, Mapping):
        items = config.items()
    elif isinstance(config, list) and any(isinstance(x, (Mapping, list)) for x in config):
        items = ((str(i), x) for i, x in enumerate(config))
    else:
        return {prefix: config}
    out: dict[str, Any] = {}
    for k, v in items:
        out.update(flatten(v, f"{prefix}.{k}" if prefix else str(k)))
    return out


MISSING = "<unset>"


def config_differences(a: Mapping[str, Any], b: Mapping[str, Any],
                       ignore: tuple[str, ...] = IDENTITY_IGNORES) -> dict[str, tuple[Any, Any]]:
    """Dotted keys whose values differ between two configs -> (value in a, value in b); top-level
    keys in `ignore` are skipped."""
    fa = flatten({k: v for k, v in with_defaults(a).items() if k not in ignore})
    fb = flatten({k: v for k, v in with_defaults(b).items() if k not in ignore})
    keys = list(fa) + [k for k in fb if k not in fa]
    return {k: (fa.get(k, MISSING), fb.get(k, MISSING)) for k in keys if fa.get(k, MISSING) != fb.get(k, MISSING)}


def slug(name: str) -> str:
    """A folder name for `name`: no path separators or leading dots (a name like '../x' stays
    inside the output folder), at most SLUG_MAX characters; a changed name gets a short hash of the
    original so two names never share a slug."""
    safe = re.sub(r"[^A-Za-z0-9._+=,\[\]-]+", "_", name).lstrip(".") or "run"
    if safe == name and len(safe) <= SLUG_MAX:
        return safe
    digest = hashlib.sha256(name.encode()).hexdigest()[:6]
    return f"{safe[:SLUG_MAX - 7]}-{digest}"


def default_run_dir(spec: Spec, engine: str, root: str | Path = "runs") -> Path:
    """runs/NAME-sSEED-IDENTITY (and -real for the backend): readable, inside `root`, and distinct for
    different configs of one name."""
    suffix = "" if engine == "sim" else "-real"
    return Path(root) / f"{slug(spec.name)}-s{spec.seed}-{spec_identity(spec, engine)[:8]}{suffix}"


def _existing_run(path: Path) -> tuple[dict[str, Any] | None, str | None]:
    """(resolved config, engine) of the hetsim run in `path`; config None when there is none; engine
    None while the run has no summary.json yet."""
    try:
        config = tomllib.loads((path / "config.toml").read_text())
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError):
        return None, None
    try:
        engine = json.loads((path / "summary.json").read_text()).get("engine")
    except (OSError, ValueError, AttributeError):
        engine = None
    return config, engine


def short_repr(value: Any, limit: int = 40) -> str:
    """repr(value), cut in the middle past `limit` characters (a profile's 1,000 step-time samples
    must not make an error message or a legend label a page long)."""
    text = repr(value)
    return text if len(text) <= limit else f"{text[:limit * 2 // 3]}...{text[-(limit // 3):]}"


def _describe(diffs: dict[str, tuple[Any, Any]], limit: int = 3) -> str:
    shown = [f"{k}: {short_repr(old)} there, {short_repr(new)} now" for k, (old, new) in list(diffs.items())[:limit]]
    more = f"; and {len(diffs) - limit} more" if len(diffs) > limit else ""
    return "; ".join(shown) + more


def _check_name_lengths(path: Path) -> None:
    for part in path.parts:
        n = len(os.fsencode(part))
        if n > 255:
            shown = part if len(part) <= 40 else f"{part[:20]}...{part[-12:]}"
            raise SpecError(f"{shown}: a folder name of {n} bytes is too long (file systems allow 255); "
                            "choose a shorter --out or name")


def _remove_run_files(path: Path) -> None:
    for name in RUN_FILES:
        (path / name).unlink(missing_ok=True)
    for name in RUN_FOLDERS:
        if (path / name).is_dir():
            shutil.rmtree(path / name)


def claim_run_dir(path: str | Path, spec: Spec, engine: str, *, overwrite: bool = False,
                  resume: bool = False) -> Path:
    """Make `path` the run directory of `spec` on `engine` ('sim' or 'torchmp'), or refuse with a
    one-line SpecError; call it before anything is written. Accepted: a new or empty folder, or one
    holding a run of the same config (run.* and trace.* may differ). A fresh (not resumed) run first
    removes the folder's earlier run files, so two attempts never mix. overwrite: also accept a
    folder holding other files or a different run; only hetsim's own run files are removed.
    resume: the folder must exist; whether its checkpoint fits `spec` is results.load_checkpoint's check."""
    path = Path(path)
    if resume and overwrite:
        raise SpecError(f"{path}: --resume continues the run in this folder; it cannot be combined with --overwrite")
    _check_name_lengths(path.absolute())
    if path.exists() and not path.is_dir():
        raise SpecError(f"{path}: exists and is not a folder; the run directory must be a folder")
    if resume:  # the checkpoint is the authority on what is resumed (results.load_checkpoint checks its config)
        if not path.is_dir():
            raise SpecError(f"{path}: no run to resume here")
        return writable_dir(path, "run folder")
    try:
        occupied = path.is_dir() and any(p.name != LOGS for p in path.iterdir())
    except OSError as e:
        raise SpecError(f"{path}: cannot read the run folder ({e.strerror})") from None
    if occupied:
        config, found_engine = _existing_run(path)
        if config is None:
            if not overwrite:
                raise SpecError(f"{path}: the folder is not empty and holds no hetsim run; choose a new folder, "
                                "or pass --overwrite to write into it (only hetsim's run files are replaced)")
        else:
            diffs = config_differences(config, normalized_config(spec), ignore=("run", "trace"))
            if found_engine is not None and found_engine != engine:
                diffs = {"engine": (found_engine, engine), **diffs}
            if diffs and not overwrite:
                raise SpecError(f"{path}: holds a different run ({_describe(diffs)}); choose another folder, "
                                "or pass --overwrite to replace its run files")
        try:
            _remove_run_files(path)
        except OSError as e:
            raise SpecError(f"{path}: cannot replace the earlier run's files ({e.strerror})") from None
    return writable_dir(path, "run folder")


def writable_dir(path: str | Path, what: str = "output folder") -> Path:
    """Create `path` (and its parents) and check that files can be made in it; one-line SpecError
    for a file in the way, a read-only folder or a name too long, instead of a traceback mid-run."""
    path = Path(path)
    _check_name_lengths(path.absolute())
    if path.exists() and not path.is_dir():
        raise SpecError(f"{path}: exists and is not a folder; the {what} must be a folder")
    try:
        path.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=path, prefix=".hetsim-probe-")
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        if e.errno == errno.ENAMETOOLONG:
            raise SpecError(f"{path}: the path is too long for the file system; choose a shorter --out") from None
        raise SpecError(f"{path}: cannot write the {what} ({e.strerror})") from None
    return path
