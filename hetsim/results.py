"""The run directory, shared by every runner (simulator and real backends).

    config.toml     the fully resolved spec (re-run it with `hetsim simulate config.toml`)
    metrics.csv     one row per round: round, time_s, epoch, samples, lr, train_loss, test_loss, test_acc
                    (round 0 is the initial model). An empty cell was not computed (no evaluation that
                    round); a computed non-finite value is written `nan`, `inf` or `-inf`.
    decisions.bin   every update's decisions, complete: workers, local_steps, samples, biased_samples,
                    weights per arrival, the time budget; staleness, pulled version, start_s, finish_s per
                    arrival, the version produced, the dropped late work and the new model's digest; one
                    compressed columnar record per update (read it with `hetsim.results.read_decisions`;
                    format below).
    trace.json      Chrome / Perfetto trace events (compute, comm, idle, eval per device) in the JSON
                    array format, one event per line; sampled by `[trace]` (first rounds, some devices).
    summary.json    time_to_accuracy_s, final/best accuracy, utilisation per device, seed, versions,
                    schema_version (RUN_SCHEMA), ...

The three per-round files are append-only: every finished round is handed to the OS before the next
starts (a SIGKILL loses no finished round), whole lines or whole records, and readers drop a partial last
line or record. Two exceptions, in the time-only fast path (hetsim/sim/fastpath.py): at scale, sync and
semi_sync compress decision records on a second thread, so a kill can lose the last finished update's
decisions record (never its metrics row); async and buffered_async write rows and records a few thousand
updates at a time, so a kill can lose up to that many (a resume from a checkpoint loses nothing).
Checkpoints store the files' lengths, and `--resume` cuts the files back to them.
config.toml and summary.json are written atomically (temporary file + rename). Every JSON file goes
through `strict_json`: NaN and infinities become null, so strict JSON readers accept them.

Schema 1 (no `schema_version` in summary.json) wrote decisions.jsonl and a `{"traceEvents": [...]}`
trace; `hetsim.analysis.load_run` still reads it.

decisions.bin: the line `hetsim-decisions/3\\n`, then per update a header (little-endian u64 payload
length, i64 round, i64 number of arrivals n, f64 time budget in s or NaN for none, u32 CRC-32 of the
payload, 4 bytes: the struct type code of each integer column, B/H/I/q) and a zlib-compressed payload
of five arrays of n values each: workers, local_steps, samples, biased_samples (integers, each in the
narrowest of those types that holds its values) and weights (float64, exact); then (schema 3) i64
version, i64 m (n, or 0 when the per-arrival columns were not recorded), i64 number of dropped
arrivals d, u16 digest length, 4 type codes, and the arrays staleness (m), pulled (m), dropped (d),
dropped_steps (d) (integers), start_s (m), finish_s (m), dropped_finish_s (d) (float64, each array
stored as 8 byte planes: all first bytes, then all second bytes, ...) and the digest (ASCII). `hetsim-decisions/2` files (the five arrays only) are still read, with those seven keys.
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import io
import json
import math
import os
import platform
import re
import struct
import tempfile
import zlib
from array import array
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Sequence

import numpy as np

from hetsim.config import Spec, TraceSpec, spec_to_dict, to_toml
from hetsim.errors import HetsimError

if TYPE_CHECKING:
    from hetsim.training import RoundRecord

_UMASK = os.umask(0)
os.umask(_UMASK)

RUN_SCHEMA = 2  # summary.json's schema_version; bump when a run file changes meaning
METRIC_COLUMNS = ("round", "time_s", "epoch", "samples", "lr", "train_loss", "test_loss", "test_acc")
_INT_COLUMNS = ("round", "samples")
DECISIONS_MAGIC = b"hetsim-decisions/3\n"
_DECISIONS_V2 = b"hetsim-decisions/2\n"  # read, not written
_RECORD = struct.Struct("<QqqdI4s")
# /3's extension, after /2's five columns in the payload: version, length m of the per-arrival columns (n,
# or 0 for a record made without them), number of dropped arrivals, digest length, 4 integer type codes
_EXTENSION = struct.Struct("<qqqH4s")
_INT_TYPES = (b"B", b"H", b"I")  # narrowest first; b"q" (int64) otherwise
_DECISION_INTS = ("workers", "local_steps", "samples", "biased_samples")
# closes trace.json's JSON array at the end of a run (a cut file without it is still a valid Chrome trace)
_TRACE_END = {"name": "process_name", "ph": "M", "pid": 0, "args": {"name": "hetsim"}}


def atomic_write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600; give the file the usual permissions
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _finite(obj: Any) -> Any:
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj


def strict_json(obj: Any, indent: int | None = None) -> str:
    """JSON that strict readers accept: NaN and +-inf become null (json.dumps would write bare NaN)."""
    return json.dumps(_finite(obj), indent=indent, allow_nan=False)


def write_json(path: Path, obj: Any, indent: int | None = 2) -> None:
    """The one way hetsim writes a JSON file: strict, atomic, newline-terminated."""
    atomic_write(Path(path), strict_json(obj, indent) + "\n")


def versions() -> dict[str, str]:
    import numpy
    import simpy
    import torch

    from hetsim._version import __version__

    return {"hetsim": __version__, "python": platform.python_version(), "torch": torch.__version__,
            "numpy": numpy.__version__, "simpy": simpy.__version__}


def _cell(v: Any) -> str:
    """A metrics.csv cell: None (not computed) is empty, a computed NaN is `nan`, infinities `inf`/`-inf`."""
    if v is None:
        return ""
    if isinstance(v, (float, np.floating)):
        return repr(float(v))
    return str(v)


def metrics_line(row: dict[str, Any]) -> str:
    buf = io.StringIO()
    csv.writer(buf, lineterminator="\n").writerow([_cell(row[c]) for c in METRIC_COLUMNS])
    return buf.getvalue()


def metrics_csv(rows: Iterable[dict[str, Any]]) -> str:
    return ",".join(METRIC_COLUMNS) + "\n" + "".join(metrics_line(r) for r in rows)


def _whole_lines(data: bytes) -> list[str]:
    """The complete lines of an append-only file; a last line without its newline was cut by a kill."""
    return data.decode().split("\n")[:-1]


def read_metrics_columns(path: Path) -> dict[str, list[float]]:
    """metrics.csv as columns of floats (empty cells NaN); a partial last line is dropped."""
    from hetsim.errors import HetsimError

    lines = _whole_lines(Path(path).read_bytes())
    reader = csv.reader(lines)
    header = next(reader, None)
    missing = [c for c in METRIC_COLUMNS if header is None or c not in header]
    if missing:
        raise HetsimError(f"{path}: missing columns {missing}")
    pos = [header.index(c) for c in METRIC_COLUMNS]
    cols: dict[str, list[float]] = {c: [] for c in METRIC_COLUMNS}
    for n, cells in enumerate(reader, start=2):
        try:
            for c, i in zip(METRIC_COLUMNS, pos):
                cols[c].append(float(cells[i]) if cells[i] != "" else math.nan)
        except (ValueError, IndexError):
            raise HetsimError(f"{path}: line {n} is not a metrics row: {','.join(cells)!r}") from None
    return cols


class MetricRows(Sequence):
    """The metrics rows of a run. keep (a run without a directory): all of them as compact columns (8
    numbers a round), rows[i] a dict in which what was not computed is NaN. Otherwise (the rows are in
    metrics.csv) only their count and the last row (rows[-1]), so memory stays flat however many updates
    a run has. Either way the summary's accuracy fields are kept up to date as rows come (`accuracy`),
    for target_accuracy."""

    def __init__(self, keep: bool = True, target_accuracy: float = math.nan) -> None:
        self.keep = keep
        self.target_accuracy = target_accuracy
        self.columns = {c: array("q" if c in _INT_COLUMNS else "d") for c in METRIC_COLUMNS}
        self._count = 0
        self._last: dict[str, Any] | None = None
        self._hit: tuple[float, int, float] | None = None  # (time_s, round, epoch) of the first row at the target
        self._final_acc: float | None = None
        self._best_acc: float | None = None

    def append(self, row: dict[str, Any]) -> None:
        if self.keep:
            for c, col in self.columns.items():
                v = row[c]
                col.append(int(v) if c in _INT_COLUMNS else (math.nan if v is None else float(v)))
        self._count += 1
        self._last = row
        acc = row["test_acc"]
        if acc is not None:
            self._evaluated(row, float(acc))

    def _evaluated(self, row: dict[str, Any], acc: float) -> None:
        if acc != acc:  # NaN: computed, but no accuracy
            return
        self._final_acc = acc
        if self._best_acc is None or acc > self._best_acc:
            self._best_acc = acc
        if self._hit is None and acc >= self.target_accuracy:
            self._hit = (float(row["time_s"]), int(row["round"]), float(row["epoch"]))

    def extend(self, columns: dict[str, list[float]]) -> None:
        """Rows read back from metrics.csv (`read_metrics_columns`: empty cells NaN)."""
        n = len(columns["round"])
        for i in np.flatnonzero(~np.isnan(np.asarray(columns["test_acc"], dtype=np.float64))).tolist():
            self._evaluated({c: columns[c][i] for c in METRIC_COLUMNS}, columns["test_acc"][i])
        if self.keep:
            for c, values in columns.items():
                self.columns[c].extend([int(v) for v in values] if c in _INT_COLUMNS else values)
        if n:
            self._last = {c: columns[c][n - 1] for c in METRIC_COLUMNS}
        self._count += n

    def accuracy(self) -> dict[str, Any]:
        """The summary's time_to_accuracy_s, rounds_to_accuracy, epochs_to_accuracy (None: never reached),
        final_test_acc and best_test_acc (None: never evaluated), over the rows whose accuracy was computed."""
        hit = self._hit
        return {"time_to_accuracy_s": hit[0] if hit else None, "rounds_to_accuracy": hit[1] if hit else None,
                "epochs_to_accuracy": hit[2] if hit else None, "final_test_acc": self._final_acc,
                "best_test_acc": self._best_acc}

    def __len__(self) -> int:
        return self._count

    def __getitem__(self, i):  # type: ignore[override]
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        if self.keep:
            return {c: col[i] for c, col in self.columns.items()}
        if i not in (-1, self._count - 1) or self._last is None:
            raise IndexError(f"row {i}: a run with a directory keeps only its last row in memory (the rest are in "
                             "metrics.csv)")
        return {c: (int(self._last[c]) if c in _INT_COLUMNS else
                    math.nan if self._last[c] is None else float(self._last[c])) for c in METRIC_COLUMNS}

    def as_lists(self) -> dict[str, list[Any]]:
        return {c: col.tolist() for c, col in self.columns.items()}


def read_metric_lists(path: Path) -> dict[str, list[Any]]:
    """metrics.csv's columns as MetricRows.as_lists gives them: round and samples ints, what was not computed
    NaN."""
    cols = read_metrics_columns(path)
    return {c: [int(v) for v in col] if c in _INT_COLUMNS else col for c, col in cols.items()}


# -- decisions --------------------------------------------------------------------------------------

def model_digest(params: Any) -> str:
    """A short hash of a global model's bytes (its flat float tensor): how a replay checks, update by
    update, that it computes the same model. "" for an empty model (the time-only core has none)."""
    if params.numel() == 0:
        return ""
    return hashlib.sha256(params.detach().cpu().contiguous().numpy().tobytes()).hexdigest()[:16]


def _narrow(values: Sequence[int]) -> tuple[bytes, np.ndarray]:
    """(type code, array) in the narrowest integer type that holds the values: a 10^4-device round's
    columns shrink 4-8x before compression, which is most of its cost."""
    a = np.asarray(values, dtype=np.int64)
    if len(a) and a.min() >= 0:
        top = int(a.max())
        for code in _INT_TYPES:
            if top < 1 << (8 * struct.calcsize(code.decode())):
                return code, a.astype("<" + code.decode())
    return b"q", a.astype("<i8")


def encode_decision(record: RoundRecord) -> bytes:
    """One round's decisions as a decisions.bin record (hetsim-decisions/3)."""
    codes, cols = zip(*(_narrow(c) for c in (record.workers, record.local_steps, record.samples,
                                             record.biased_samples)))
    n = len(cols[0])
    if any(len(c) != n for c in cols) or len(record.weights) != n:
        raise ValueError(f"round {record.round}: decision columns of unequal lengths")
    m, nd = len(record.staleness), len(record.dropped)
    if m not in (0, n) or any(len(c) != m for c in (record.pulled, record.start_s, record.finish_s)):
        raise ValueError(f"round {record.round}: per-arrival columns of unequal lengths")
    if len(record.dropped_steps) != nd or len(record.dropped_finish_s) != nd:
        raise ValueError(f"round {record.round}: dropped columns of unequal lengths")
    xcodes, xcols = zip(*(_narrow(c) for c in (record.staleness, record.pulled, record.dropped, record.dropped_steps)))
    digest = record.digest.encode("ascii")
    raw = b"".join(c.tobytes() for c in cols) + np.asarray(record.weights, dtype="<f8").tobytes() + \
        _EXTENSION.pack(int(record.version), m, nd, len(digest), b"".join(xcodes)) + \
        b"".join(c.tobytes() for c in xcols) + \
        b"".join(_shuffled(c) for c in (record.start_s, record.finish_s, record.dropped_finish_s)) + digest
    payload = zlib.compress(raw, 1)
    budget = math.nan if record.time_budget_s is None else float(record.time_budget_s)
    return _RECORD.pack(len(payload), int(record.round), n, budget, zlib.crc32(payload), b"".join(codes)) + payload


_PACKERS = {code: struct.Struct("<" + code.decode()) for code in (*_INT_TYPES, b"q")}
_F8 = struct.Struct("<d")
_RECORD_HEAD = _RECORD.size


def _narrow_ints(values: list[int]) -> tuple[bytes, bytes]:
    """`_narrow` without numpy, for a few Python ints: (type code, little-endian bytes)."""
    if values and min(values) >= 0:
        top = max(values)
        code = b"B" if top < 1 << 8 else b"H" if top < 1 << 16 else b"I" if top < 1 << 32 else b"q"
    else:
        code = b"q"
    if len(values) == 1:
        return code, _PACKERS[code].pack(values[0])
    return code, struct.pack(f"<{len(values)}{code.decode()}", *values)


def _shuffled_floats(values: list[float]) -> bytes:
    """`_shuffled` without numpy, for a few Python floats."""
    if len(values) == 1:
        return _F8.pack(values[0])
    raw = struct.pack(f"<{len(values)}d", *values)
    return b"".join(raw[j::8] for j in range(8))


def encode_update(round_: int, workers: list[int], local_steps: list[int], samples: list[int],
                  biased_samples: list[int], weights: list[float], version: int, staleness: list[int],
                  pulled: list[int], start_s: list[float], finish_s: list[float]) -> bytes:
    """`encode_decision`'s bytes for an update of a few arrivals with no time budget, nothing dropped and
    no digest (a time-only asynchronous update), from Python lists: ~10x faster than the numpy form for one
    arrival, which is what 10^6 updates a run need (tests/test_scale.py checks the bytes are equal)."""
    n = len(workers)
    codes, cols = zip(*(_narrow_ints(c) for c in (workers, local_steps, samples, biased_samples)))
    xcodes, xcols = zip(*(_narrow_ints(c) for c in (staleness, pulled)))
    raw = b"".join(cols) + (_F8.pack(weights[0]) if n == 1 else struct.pack(f"<{n}d", *weights)) + \
        _EXTENSION.pack(version, n, 0, 0, b"".join(xcodes) + b"qq") + b"".join(xcols) + \
        _shuffled_floats(start_s) + _shuffled_floats(finish_s)
    payload = zlib.compress(raw, 1)
    return _RECORD.pack(len(payload), round_, n, math.nan, zlib.crc32(payload), b"".join(codes)) + payload


_ONE_ARRIVAL: dict[str, struct.Struct] = {}


def _code(v: int) -> str:
    return "B" if 0 <= v < 256 else "H" if 0 <= v < 65536 else "I" if 0 <= v < 4294967296 else "q"


def encode_arrival(round_: int, worker: int, local_steps: int, samples: int, biased_samples: int, weight: float,
                   version: int, staleness: int, pulled: int, start_s: float, finish_s: float) -> bytes:
    """`encode_update` of one arrival (a time-only async update): its raw columns in one struct."""
    codes = _code(worker) + _code(local_steps) + _code(samples) + _code(biased_samples) + _code(staleness) + \
        _code(pulled)
    packer = _ONE_ARRIVAL.get(codes)
    if packer is None:
        packer = _ONE_ARRIVAL[codes] = struct.Struct(f"<{codes[:4]}d{_EXTENSION.format[1:]}{codes[4:]}dd")
    payload = zlib.compress(packer.pack(worker, local_steps, samples, biased_samples, weight, version, 1, 0, 0,
                                        (codes[4:] + "qq").encode(), staleness, pulled, start_s, finish_s), 1)
    return _RECORD.pack(len(payload), round_, 1, math.nan, zlib.crc32(payload), codes[:4].encode()) + payload


def _shuffled(values: Sequence[float]) -> bytes:
    """float64s as 8 byte planes (every value's first byte, then every second byte, ...): times of one
    update share their sign, exponent and leading digits, which then compress (random finish times: 6.5
    bytes a value instead of 7.3)."""
    a = np.asarray(values, dtype="<f8")
    return a.view(np.uint8).reshape(len(a), 8).T.tobytes()


def _ints(raw: bytes, codes: bytes, counts: Sequence[int], pos: int, keys: Sequence[str], out: dict) -> int:
    for key, code, count in zip(keys, codes, counts):
        dtype = np.dtype("<" + chr(code))
        out[key] = np.frombuffer(raw, dtype=dtype, offset=pos, count=count).tolist()
        pos += count * dtype.itemsize
    return pos


def _decode(header: bytes, payload: bytes, where: str, schema: int = 3) -> dict[str, Any]:
    """A record as a dict; schema 2 records (hetsim-decisions/2) have the first seven keys only."""
    from hetsim.errors import HetsimError

    _, round_, n, budget, crc, codes = _RECORD.unpack(header)
    if zlib.crc32(payload) != crc:
        raise HetsimError(f"{where}: the record of round {round_} is corrupt (CRC mismatch)")
    raw = zlib.decompress(payload)
    out: dict[str, Any] = {"round": round_}
    pos = _ints(raw, codes, [n] * 4, 0, _DECISION_INTS, out)
    out["weights"] = np.frombuffer(raw, dtype="<f8", offset=pos, count=n).tolist()
    pos += 8 * n
    out["time_budget_s"] = None if math.isnan(budget) else budget
    if schema < 3:
        return out
    version, m, nd, digest_len, xcodes = _EXTENSION.unpack_from(raw, pos)
    pos = _ints(raw, xcodes, [m, m, nd, nd], pos + _EXTENSION.size, ("staleness", "pulled", "dropped", "dropped_steps"),
                floats := {})
    for key, count in (("start_s", m), ("finish_s", m), ("dropped_finish_s", nd)):
        planes = np.frombuffer(raw, dtype=np.uint8, offset=pos, count=8 * count).reshape(8, count)
        floats[key] = planes.T.copy().view("<f8").reshape(count).tolist()
        pos += 8 * count
    out.update(staleness=floats["staleness"], pulled=floats["pulled"], start_s=floats["start_s"],
               finish_s=floats["finish_s"], version=version, dropped=floats["dropped"],
               dropped_steps=floats["dropped_steps"], dropped_finish_s=floats["dropped_finish_s"],
               digest=raw[pos:pos + digest_len].decode("ascii"))
    return out


def _schema_of(magic: bytes, where: str) -> int:
    from hetsim.errors import HetsimError

    if magic == DECISIONS_MAGIC:
        return 3
    if magic == _DECISIONS_V2:
        return 2
    raise HetsimError(f"{where}: not a hetsim decisions file (expected it to start with {DECISIONS_MAGIC!r} "
                      f"or {_DECISIONS_V2!r})")


def _scan_records(f: Any, size: int, where: str) -> list[int]:
    """Offsets of the complete records in a decisions stream of `size` bytes (a cut last one is dropped)."""
    f.seek(0)
    _schema_of(f.read(len(DECISIONS_MAGIC)), where)
    offsets, pos = [], len(DECISIONS_MAGIC)
    while pos + _RECORD.size <= size:
        f.seek(pos)
        length = _RECORD.unpack(f.read(_RECORD.size))[0]
        if pos + _RECORD.size + length > size:
            break
        offsets.append(pos)
        pos += _RECORD.size + length
    return offsets


class _BufferReader:
    """seek/read over an in-memory decisions stream, without copying it."""

    def __init__(self, buf: bytearray):
        self.buf, self.pos = buf, 0

    def seek(self, pos: int) -> None:
        self.pos = pos

    def read(self, n: int) -> bytes:
        self.pos += n
        return bytes(self.buf[self.pos - n:self.pos])

    def __enter__(self) -> "_BufferReader":
        return self

    def __exit__(self, *exc: Any) -> None:
        return None


class Decisions(Sequence):
    """Every update's decisions, decoded on demand: decisions[i] is a dict with keys round, workers,
    local_steps, samples, biased_samples, weights, time_budget_s, staleness, pulled, start_s, finish_s,
    version, dropped, dropped_steps, dropped_finish_s, digest (what RoundRecord.as_json() gives; a
    hetsim-decisions/2 file has the first seven).
    Backed by a decisions.bin file, or by the same bytes in memory (`hetsim.simulate` without `out`)."""

    def __init__(self, source: Path | bytearray, offsets: list[int]):
        self._source, self._offsets = source, offsets
        self._where = str(source) if isinstance(source, Path) else "decisions"
        self._schema = 0  # read from the first line on first use (a writer creates the file after this)

    def _reader(self) -> Any:
        return open(self._source, "rb") if isinstance(self._source, Path) else _BufferReader(self._source)

    def _at(self, f: Any, pos: int) -> dict[str, Any]:
        if not self._schema:
            f.seek(0)
            self._schema = _schema_of(f.read(len(DECISIONS_MAGIC)), self._where)
        f.seek(pos)
        header = f.read(_RECORD.size)
        return _decode(header, f.read(_RECORD.unpack(header)[0]), self._where, self._schema)

    def __len__(self) -> int:
        return len(self._offsets)

    def __getitem__(self, i):  # type: ignore[override]
        if isinstance(i, slice):
            with self._reader() as f:
                return [self._at(f, self._offsets[j]) for j in range(*i.indices(len(self)))]
        with self._reader() as f:
            return self._at(f, self._offsets[i])

    def __iter__(self):
        with self._reader() as f:
            for pos in self._offsets:
                yield self._at(f, pos)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Sequence) or isinstance(other, (str, bytes)):
            return NotImplemented
        return len(self) == len(other) and all(a == b for a, b in zip(self, other))

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"Decisions({len(self)} rounds from {self._where})"


def read_decisions(path: Path) -> Decisions:
    """A run's decisions.bin; a record cut by a kill at the end is dropped."""
    path = Path(path)
    with open(path, "rb") as f:
        offsets = _scan_records(f, path.stat().st_size, str(path))
    return Decisions(path, offsets)


# -- trace ------------------------------------------------------------------------------------------

def read_trace(path: Path) -> list[dict[str, Any]]:
    """trace.json's events: the JSON array format, one event a line (a cut last line is dropped), or
    schema 1's `{"traceEvents": [...]}`."""
    from hetsim.errors import HetsimError

    data = Path(path).read_bytes()
    if data.lstrip().startswith(b"{"):
        return json.loads(data)["traceEvents"]
    events = []
    for n, line in enumerate(_whole_lines(data), start=1):
        line = line.strip().rstrip(",]")
        if line in ("", "["):
            continue
        try:
            events.append(json.loads(line))
        except json.JSONDecodeError:
            raise HetsimError(f"{path}: line {n} is not a trace event") from None
    return events


class TraceSample:
    """Which trace events a run keeps (`[trace]`): the first max_rounds rounds, on at most max_devices
    devices spread evenly over the cluster (groups are contiguous, so every large group is seen), plus
    the devices named in `always` (the evaluator). 0 = no limit."""

    def __init__(self, spec: TraceSpec, n_workers: int, always: Iterable[int] = ()):
        self.max_rounds = spec.max_rounds
        if spec.max_devices and spec.max_devices < n_workers:
            picked = np.unique(np.linspace(0, n_workers - 1, spec.max_devices).round().astype(np.int64))
            self.mask: np.ndarray | None = np.zeros(n_workers, dtype=bool)
            self.mask[picked] = True
            self.mask[list(always)] = True
        else:
            self.mask = None

    def keeps(self, worker: int) -> bool:
        """(a track beyond the workers', the server's, is always kept)"""
        return self.mask is None or worker >= len(self.mask) or bool(self.mask[worker])

    def positions(self, round_: int, workers: Sequence[int]) -> list[int]:
        """Indices i of `workers` whose events of this round are kept."""
        if self.max_rounds and round_ > self.max_rounds:
            return []
        if self.mask is None:
            return list(range(len(workers)))
        return np.flatnonzero(self.mask[np.asarray(workers, dtype=np.int64)]).tolist()


class _LazyTrace(Sequence):
    """trace.json's events, read on first use (a run may keep more events than it needs in memory)."""

    def __init__(self, path: Path):
        self._path = path
        self._events: list[dict[str, Any]] | None = None

    def _all(self) -> list[dict[str, Any]]:
        if self._events is None:
            self._events = read_trace(self._path)
        return self._events

    def __len__(self) -> int:
        return len(self._all())

    def __getitem__(self, i):  # type: ignore[override]
        return self._all()[i]


@dataclass
class RunResult:
    """What a run produced. `metrics` is a dict of equal-length columns, so
    `pandas.DataFrame(result.metrics)` gives the table; values not computed are NaN. `decisions` is a
    sequence of per-round dicts (decoded on demand), `trace` the trace events the run kept.

    The metrics are given as columns, or as the path of the metrics.csv to read them from on first use (a
    run with a directory: 10^6 updates' rows are ~250 MB of Python lists, which a run does not hold)."""

    spec: Spec
    _metrics: dict[str, list[Any]] | Path
    decisions: Sequence[dict[str, Any]]
    summary: dict[str, Any]
    run_dir: Path | None = None
    trace: Sequence[dict[str, Any]] = field(default_factory=list)

    @property
    def metrics(self) -> dict[str, list[Any]]:
        if not isinstance(self._metrics, dict):
            self._metrics = read_metric_lists(self._metrics)
        return self._metrics


_FILES = (("metrics.csv", "metrics_bytes"), ("decisions.bin", "decisions_bytes"), ("trace.json", "trace_bytes"))


class RunWriter:
    """Writes a run's rows, decisions and trace events as they happen (see the module docstring).

    Memory stays flat as rounds grow: rows go to metrics.csv (kept in memory, 8 numbers a round, only
    without a run directory; `MetricRows`), decisions go to disk (or to one compressed buffer without a run
    directory; 8 bytes a round of offsets) and only the sampled trace events are kept.

    names: the workers' names (trace tracks); always_traced: workers whose events the trace sample keeps
    whatever its size (the evaluator); resume: the files exist and `load_state_dict` will cut them back to
    a checkpoint (otherwise they are started afresh).
    """

    def __init__(self, run_dir: Path | None, spec: Spec, names: Sequence[str], always_traced: Iterable[int] = (),
                 resume: bool = False, server_lane: bool = False):
        self.run_dir = Path(run_dir) if run_dir is not None else None
        self.spec = spec
        self.rows = MetricRows(keep=self.run_dir is None, target_accuracy=spec.stop.target_accuracy)
        self.sample = TraceSample(spec.trace, len(names), always_traced)
        self._events: list[dict[str, Any]] = []   # kept trace events, without a run directory
        self._pending: list[str] = []             # trace lines of the round in progress
        self._offsets = array("q")                # where each round's decisions record starts
        self._files: dict[str, Any] = {}
        self._size: dict[str, int] = {}
        if self.run_dir is None:
            self._buffer = bytearray(DECISIONS_MAGIC)
            self.decisions = Decisions(self._buffer, self._offsets)
        else:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            atomic_write(self.run_dir / "config.toml", to_toml(spec_to_dict(spec)))
            self.decisions = Decisions(self.run_dir / "decisions.bin", self._offsets)
        if self.run_dir is not None and resume:
            return  # load_state_dict opens the files where the checkpoint left them
        if self.run_dir is not None:
            # a run started afresh replaces the folder's files: what described the old ones goes first (its
            # summary would mark the new files finished; its checkpoint would resume into them)
            for stale in ("summary.json", CHECKPOINT, "decisions.jsonl"):
                (self.run_dir / stale).unlink(missing_ok=True)
            # unbuffered: every write below reaches the OS at once, so a kill loses no finished round
            self._files = {name: open(self.run_dir / name, "wb", buffering=0) for name, _ in _FILES}
            self._size = dict.fromkeys(self._files, 0)
            self._write("metrics.csv", (",".join(METRIC_COLUMNS) + "\n").encode())
            self._write("decisions.bin", DECISIONS_MAGIC)
            self._write("trace.json", b"[\n")
        # server_lane: a track after the workers' (tid = len(names)) for what the server does (event-driven
        # protocols: the evaluation), so it does not overlap the evaluator device's own compute
        for event in trace_thread_names(list(names) + (["server"] if server_lane else [])):
            self.add_trace(event)
        self.flush()

    def _write(self, name: str, data: bytes) -> None:
        self._files[name].write(data)
        self._size[name] += len(data)

    def add_trace(self, event: dict[str, Any]) -> None:
        """Keep `event` if the trace sample does (its device and, for timed events, its round)."""
        r = event.get("args", {}).get("round")
        if not self.sample.keeps(event["tid"]) or (r is not None and self.sample.max_rounds and r > self.sample.max_rounds):
            return
        if self.run_dir is None:
            self._events.append(event)
        else:
            self._pending.append(strict_json(event) + ",\n")

    def trace_positions(self, round_: int, workers: Sequence[int]) -> list[int]:
        """Indices of `workers` whose events of round `round_` the trace keeps (to skip building the rest)."""
        return self.sample.positions(round_, workers)

    def add_decision(self, decision: RoundRecord) -> None:
        """One round's decisions; every round is kept."""
        record = encode_decision(decision)
        if self.run_dir is None:
            self._offsets.append(len(self._buffer))
            self._buffer += record
        else:
            self._offsets.append(self._size["decisions.bin"])
            self._write("decisions.bin", record)

    def add_decision_records(self, records: Sequence[bytes]) -> None:
        """Updates' decisions, already encoded (`encode_decision`, `encode_update`), in order, in one write."""
        if self.run_dir is None:
            for record in records:
                self._offsets.append(len(self._buffer))
                self._buffer += record
            return
        pos = self._size["decisions.bin"]
        for record in records:
            self._offsets.append(pos)
            pos += len(record)
        self._write("decisions.bin", b"".join(records))

    def add_rows(self, rows: Sequence[dict[str, Any]], lines: Sequence[str]) -> None:
        """Several rounds' metrics rows at once, with their `metrics_line`s: the trace lines held, then the
        rows, in one write (what add_row does row by row)."""
        for row in rows:
            self.rows.append(row)
        self.flush()
        if self.run_dir is not None:
            self._write("metrics.csv", "".join(lines).encode())

    def add_row(self, row: dict[str, Any]) -> None:
        """The round's metrics row (None = not computed); it ends the round: its trace lines, then the row,
        are handed to the OS now."""
        self.rows.append(row)
        self.flush()
        if self.run_dir is not None:
            self._write("metrics.csv", metrics_line(row).encode())

    def flush(self) -> None:
        """Write the trace lines held for the round in progress."""
        if self._pending and self.run_dir is not None:
            self._write("trace.json", "".join(self._pending).encode())
        self._pending.clear()

    def state_dict(self) -> dict[str, Any]:
        """What a checkpoint needs to cut the files back to this point: their lengths, not their contents."""
        self.flush()
        return {"run_schema": RUN_SCHEMA, "rows": len(self.rows), **{key: self._size[name] for name, key in _FILES}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Cut the run directory's files back to a checkpoint's lengths and continue appending there."""
        from hetsim.errors import HetsimError

        assert self.run_dir is not None, "resuming needs a run directory"
        if state.get("run_schema") != RUN_SCHEMA:
            raise HetsimError(f"{self.run_dir}: the checkpoint was written by another hetsim version (run schema "
                              f"{state.get('run_schema', 1)}, this one writes {RUN_SCHEMA}); start the run again")
        for name, key in _FILES:
            path = self.run_dir / name
            size = path.stat().st_size if path.is_file() else 0
            if size < state[key]:
                raise HetsimError(f"{path}: {size} bytes, shorter than the {state[key]} its checkpoint recorded "
                                  "(changed since); start the run again")
            os.truncate(path, state[key])
        self._files = {name: open(self.run_dir / name, "ab", buffering=0) for name, _ in _FILES}
        self._size = {name: state[key] for name, key in _FILES}
        cols = read_metrics_columns(self.run_dir / "metrics.csv")
        if len(cols["round"]) != state["rows"]:
            raise HetsimError(f"{self.run_dir / 'metrics.csv'}: {len(cols['round'])} rows where its checkpoint "
                              f"recorded {state['rows']}; start the run again")
        self.rows = MetricRows(keep=False, target_accuracy=self.spec.stop.target_accuracy)
        self.rows.extend(cols)
        with open(self.run_dir / "decisions.bin", "rb") as f:
            self._offsets[:] = array("q", _scan_records(f, state["decisions_bytes"], str(self.run_dir / "decisions.bin")))
            f.seek(0)
            if f.read(len(DECISIONS_MAGIC)) != DECISIONS_MAGIC:  # records of this hetsim would follow older ones
                raise HetsimError(f"{self.run_dir / 'decisions.bin'}: written by an older hetsim (not "
                                  f"{DECISIONS_MAGIC.decode().strip()}); start the run again")

    def close(self) -> None:
        for f in self._files.values():
            f.close()
        self._files = {}

    def finish(self, summary: dict[str, Any]) -> RunResult:
        """Close the files and write summary.json (with the schema version)."""
        summary = {"schema_version": RUN_SCHEMA, **summary}
        trace: Sequence[dict[str, Any]] = self._events
        if self.run_dir is not None:
            self.flush()
            self._write("trace.json", (strict_json(_TRACE_END) + "]\n").encode())
            self.close()
            write_json(self.run_dir / "summary.json", summary)
            trace = _LazyTrace(self.run_dir / "trace.json")
        metrics = self.rows.as_lists() if self.rows.keep else self.run_dir / "metrics.csv"
        return RunResult(self.spec, metrics, self.decisions, summary, self.run_dir, trace)


def trace_event(name: str, worker: int, start_s: float, end_s: float, **args: Any) -> dict[str, Any]:
    """A Chrome trace 'complete' event; times in microseconds, one track (tid) per worker."""
    return {"name": name, "cat": name, "ph": "X", "pid": 0, "tid": worker,
            "ts": start_s * 1e6, "dur": max(end_s - start_s, 0.0) * 1e6, "args": args}


def trace_thread_names(names: list[str]) -> list[dict[str, Any]]:
    return [{"name": "thread_name", "ph": "M", "pid": 0, "tid": k, "args": {"name": n}} for k, n in enumerate(names)]


def time_to_accuracy(times: list[float], accs: list[float], target: float) -> float | None:
    """First time at which the evaluated accuracy reached `target` (None if never)."""
    for t, a in zip(times, accs):
        if a is not None and not math.isnan(a) and a >= target:
            return t
    return None


def run_summary(spec: Spec, rows: MetricRows, engine: str, names: list[str], busy_s: Any,
                rounds: int, time_s: float, epochs: float, samples: int, stopped_by: str, wall_s: float,
                diverged_at_round: int | None = None, config_changes: Sequence[dict[str, Any]] = (),
                **extra: Any) -> dict[str, Any]:
    """The summary.json every runner writes: time to accuracy, accuracy, utilisation, provenance.

    diverged_at_round: the first round whose training loss or global parameters were not finite
    (None: the run did not diverge). config_changes: the resumes that went on with an edited config
    (`Checkpoint.config_changes`), reported as resumed_with_changed_config (None: never)."""
    import torch

    target = spec.stop.target_accuracy
    acc = rows.accuracy()
    return {
        "name": spec.name, "engine": engine, "seed": spec.seed, "workload": spec.workload.name,
        "n_workers": len(names), "scheduler": spec.scheduler.name, "sampler": spec.sampler.name,
        "aggregator": spec.aggregator.name, "target_accuracy": target, "time_to_accuracy_s": acc["time_to_accuracy_s"],
        "rounds_to_accuracy": acc["rounds_to_accuracy"], "epochs_to_accuracy": acc["epochs_to_accuracy"],
        "final_test_acc": acc["final_test_acc"], "best_test_acc": acc["best_test_acc"],
        "final_train_loss": rows[-1]["train_loss"], "rounds": rounds, "time_s": time_s, "epochs": epochs,
        "samples": samples, "stopped_by": stopped_by, "diverged_at_round": diverged_at_round,
        "resumed_with_changed_config": list(config_changes) or None,
        "utilization": {n: (float(b) / time_s if time_s else 0.0) for n, b in zip(names, busy_s)},
        **extra,
        "wall_time_s": wall_s, "torch_threads": torch.get_num_threads(), "versions": versions(),
    }


def summary_outcome(summary: dict[str, Any]) -> str:
    """A run's result in words, for status lines: its divergence, "no accuracy" (a time-only run), or
    its final accuracy and time to target."""
    if summary.get("diverged_at_round") is not None:
        return f"diverged at round {summary['diverged_at_round']}: non-finite training loss or parameters"
    acc = summary.get("final_test_acc")
    if acc is None:
        time_only = summary.get("fidelity") == "time_only" and not summary.get("surrogate")
        return "no accuracy" + (" (time-only run without sim.surrogate)" if time_only else " (never evaluated)")
    tta = summary["time_to_accuracy_s"]
    return (f"final acc {acc:.3f}, time to {summary['target_accuracy']:.0%}: "
            f"{'not reached' if tta is None else f'{tta:.4g}s'}")


CHECKPOINT = "checkpoint.pt"
CHECKPOINT_FORMAT = 1  # the envelope below; a later hetsim that changes it bumps this
ENGINE_COMMANDS = {"sim": "hetsim simulate", "torchmp": "hetsim run"}


def config_hash(spec: Spec) -> str:
    """sha256 of the fully resolved config (as config.toml holds it): what a checkpoint was written with."""
    return hashlib.sha256(to_toml(spec_to_dict(spec)).encode()).hexdigest()


@dataclass(frozen=True)
class Checkpoint:
    """A loaded checkpoint: the runner's `state` and the config changes its run went through.

    config_changes: one entry per resume that continued with an edited config (`--force`):
    {"round", "checkpoint_config_hash", "config_hash", "changed": [dotted keys]}. A run carries the
    list in every later checkpoint, so summary.json reports it even after further plain resumes.
    """

    state: dict[str, Any]
    config_changes: list[dict[str, Any]]


def save_checkpoint(path: Path, state: dict[str, Any], engine: str, spec: Spec,
                    config_changes: Sequence[dict[str, Any]] = ()) -> None:
    """Write a checkpoint atomically (torch.save to a temporary file, then rename).

    The file holds tensors and plain data only (numpy arrays become tensors, numpy scalars Python
    numbers), so `load_checkpoint` can read it with torch's weights-only unpickler and a checkpoint in a
    shared run folder can never run code. It records the engine and the resolved config it belongs to.
    """
    import torch

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    torch.save({"hetsim_checkpoint": CHECKPOINT_FORMAT, "engine": engine, "config": spec_to_dict(spec),
                "config_hash": config_hash(spec), "config_changes": _to_plain(list(config_changes)),
                "state": _to_plain(state)}, tmp)
    os.replace(tmp, path)


def load_checkpoint(path: Path, engine: str, spec: Spec, force: bool = False) -> Checkpoint:
    """Read a checkpoint written by `save_checkpoint` for `engine` ("sim" or "torchmp") and `spec`.

    Only tensors and plain data are unpickled (torch's weights-only loader; anything else is refused
    before it is built). A missing, empty, truncated or corrupt file (zip CRC checked), a file that is not
    a hetsim checkpoint, one of the other engine, or one written with another config is a one-line
    HetsimError; with `force`, a changed config is accepted and recorded in `Checkpoint.config_changes`.
    """
    import pickle
    import zipfile

    import torch

    if not path.is_file():
        raise HetsimError(f"{path.parent}: no checkpoint to resume from (set run.checkpoint_every > 0)")
    if path.stat().st_size == 0:
        raise HetsimError(f"{path}: the checkpoint is empty (the run was interrupted while writing it?)")
    if not zipfile.is_zipfile(path):
        raise HetsimError(f"{path}: not a hetsim checkpoint (truncated, or not written by hetsim)")
    try:
        with zipfile.ZipFile(path) as z:
            bad = z.testzip()  # torch does not verify the archive's CRCs; a flipped bit would load silently
    except (zipfile.BadZipFile, OSError, EOFError) as e:
        raise HetsimError(f"{path}: the checkpoint is corrupt ({_one_line(e)})") from None
    if bad is not None:
        raise HetsimError(f"{path}: the checkpoint is corrupt (checksum mismatch in {bad})")
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        found = re.search(r"GLOBAL ([\w.]+)", str(e))
        raise HetsimError(f"{path}: refused to load: the checkpoint holds objects other than tensors and plain "
                          f"data, so it was not written by this hetsim or was tampered with"
                          + (f" (it refers to {found.group(1)})" if found else "")) from None
    except Exception as e:  # noqa: BLE001 - whatever else torch.load trips on, the file is unusable
        raise HetsimError(f"{path}: the checkpoint is corrupt ({_one_line(e)})") from None
    if isinstance(data, dict) and "hetsim_checkpoint" not in data and "round" in data:
        raise HetsimError(f"{path}: the checkpoint was written by an older hetsim (before run schema {RUN_SCHEMA}); "
                          "start the run again")
    if not isinstance(data, dict) or "hetsim_checkpoint" not in data or not isinstance(data.get("state"), dict):
        raise HetsimError(f"{path}: not a hetsim checkpoint")
    if data["hetsim_checkpoint"] != CHECKPOINT_FORMAT:
        raise HetsimError(f"{path}: checkpoint format {data['hetsim_checkpoint']!r}; this hetsim reads format "
                          f"{CHECKPOINT_FORMAT}")
    if data.get("engine") != engine:
        other = ENGINE_COMMANDS.get(data.get("engine"), repr(data.get("engine")))
        raise HetsimError(f"{path}: written by `{other}`, not `{ENGINE_COMMANDS[engine]}`; resume it with "
                          f"`{other} --resume {path.parent}`")
    changes = list(data.get("config_changes") or [])
    new_hash = config_hash(spec)
    if data.get("config_hash") != new_hash:
        changed = _changed_keys(data.get("config") or {}, spec_to_dict(spec))
        shown = ", ".join(changed[:4]) + (f" and {len(changed) - 4} more" if len(changed) > 4 else "")
        if not force:
            raise HetsimError(f"{path}: the config changed since this checkpoint ({shown or 'config hash differs'}); "
                              f"restore config.toml, or resume with --force to continue with the edited config "
                              f"(recorded in summary.json)")
        changes.append({"round": data["state"].get("round"), "checkpoint_config_hash": data.get("config_hash"),
                        "config_hash": new_hash, "changed": changed})
    return Checkpoint(_from_plain(data["state"]), changes)


@contextlib.contextmanager
def restoring(path: Path):
    """Around a runner's restore of a loaded state: a state that does not fit this run (a config changed
    with --force beyond what the state can take, a damaged file) is a one-line error, not a traceback."""
    try:
        yield
    except (KeyError, IndexError, TypeError, ValueError, RuntimeError, AttributeError) as e:
        raise HetsimError(f"{path}: the checkpoint does not fit this run ({_one_line(e)})") from None


def _one_line(e: BaseException, limit: int = 200) -> str:
    text = " ".join(str(e).split()) or type(e).__name__
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _changed_keys(old: Any, new: Any, prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two resolved configs (list items by index)."""
    if isinstance(old, dict) and isinstance(new, dict):
        out: list[str] = []
        for k in list(old) + [k for k in new if k not in old]:
            out += _changed_keys(old.get(k), new.get(k), f"{prefix}.{k}" if prefix else str(k))
        return out
    if isinstance(old, list) and isinstance(new, list) and len(old) == len(new) and \
            any(isinstance(x, dict) for x in old + new):
        return [key for i, (a, b) in enumerate(zip(old, new)) for key in _changed_keys(a, b, f"{prefix}.{i}")]
    return [] if old == new else [prefix]


_NDARRAY = "__hetsim_ndarray__"  # marks a numpy array stored as a tensor
_PLAIN = (type(None), bool, int, float, str)


def _to_plain(obj: Any) -> Any:
    """Tensors and plain data only: numpy arrays become tagged tensors, numpy scalars Python numbers.
    Anything else is a TypeError here, at save, rather than a checkpoint that cannot be loaded."""
    import collections

    import numpy as np
    import torch

    if isinstance(obj, np.generic):  # before the plain types: np.float64 is a float, but pickles as numpy
        return obj.item()
    if isinstance(obj, _PLAIN) or isinstance(obj, torch.Tensor):
        return obj
    if isinstance(obj, np.ndarray):
        if obj.dtype.kind not in "biuf":
            raise TypeError(f"cannot checkpoint a numpy array of dtype {obj.dtype}")
        return {_NDARRAY: torch.from_numpy(np.ascontiguousarray(obj))}
    if type(obj) in (dict, collections.OrderedDict):
        out = type(obj)((_to_plain(k), _to_plain(v)) for k, v in obj.items())
        if hasattr(obj, "_metadata"):  # a module state_dict's per-module versions
            out._metadata = obj._metadata
        return out
    if type(obj) in (list, tuple):
        if all(type(v) in _PLAIN for v in obj):  # the common long lists (per-worker numbers): nothing to convert
            return obj
        return type(obj)(_to_plain(v) for v in obj)
    raise TypeError(f"cannot checkpoint a {type(obj).__name__}: only tensors, numpy arrays and plain data")


def unsavable(obj: Any, at: str = "state") -> str | None:
    """Where `obj` holds a value that a checkpoint cannot store (what `save_checkpoint` refuses), e.g.
    "state['seen'] is of type set"; None when all of it can be stored. For a one-line error that points
    at the value in a policy's state, rather than a TypeError from deep in the save."""
    import collections

    import numpy as np

    try:
        _to_plain(obj)
        return None
    except TypeError:
        pass
    if type(obj) in (dict, collections.OrderedDict):
        for k, v in obj.items():
            found = unsavable(k, f"a key of {at}") or unsavable(v, f"{at}[{k!r}]")
            if found:
                return found
    elif type(obj) in (list, tuple):
        for i, v in enumerate(obj):
            found = unsavable(v, f"{at}[{i}]")
            if found:
                return found
    if isinstance(obj, np.ndarray):
        return f"{at} is a numpy array of dtype {obj.dtype}"
    cls = type(obj)
    name = cls.__qualname__ if cls.__module__ == "builtins" else f"{cls.__module__}.{cls.__qualname__}"
    return f"{at} is of type {name}"


def _from_plain(obj: Any) -> Any:
    if isinstance(obj, dict):
        if len(obj) == 1 and _NDARRAY in obj:
            return obj[_NDARRAY].numpy()
        out = type(obj)((k, _from_plain(v)) for k, v in obj.items())
        if hasattr(obj, "_metadata"):
            out._metadata = obj._metadata
        return out
    if isinstance(obj, (list, tuple)):
        if all(type(v) in _PLAIN for v in obj):
            return obj
        return type(obj)(_from_plain(v) for v in obj)
    return obj
