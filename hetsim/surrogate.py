"""Learning-curve surrogate: accuracy as a function of work done, for the time-only fidelity.

Fit on emulated runs (real math) at small scale, the curve

    acc(e) = a - b · exp(-c · e),   e = epochs of samples processed,  0 <= a <= 1, b >= 0, c > 0

gives time-only runs of the same policy an accuracy at each evaluation, so their time-to-accuracy is
defined. The curve is valid only over the epochs it was fitted on: beyond them `predict` returns NaN
(never a silent extrapolation), and the run's summary says from which epoch on accuracy was refused.

The curve file records what it was fitted on (`fitted_for`: workload, scheduler, sampler, aggregator
and optimiser of the runs, which must agree, and their cluster shapes). A time-only spec that differs in
any of the first five gets a warning naming the difference: the curve describes another policy. The
cluster shape is recorded, not compared: fitting small and predicting large is the curve's purpose.

    hetsim surrogate runs/a-s0 runs/a-s1 --holdout runs/a-s2 --out curve.json
    hetsim simulate big.toml --set sim.fidelity='"time_only"' --set sim.surrogate='"curve.json"'
"""

from __future__ import annotations

import dataclasses
import json
import math
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, Sequence

import numpy as np

from hetsim.analysis import Run
from hetsim.errors import HetsimError, HetsimWarning, SpecError
from hetsim.results import time_to_accuracy, write_json

if TYPE_CHECKING:
    from hetsim.config import Spec

FORMAT = "hetsim-learning-curve/1"
#: the parts of a run's config a learning curve depends on; a spec differing in one gets a warning
COMPARED = ("workload", "scheduler", "sampler", "aggregator", "optim", "selector", "protocol", "data")
#: spec sections whose absence (a curve recorded before they existed) means their default
_DEFAULT_NAMES = {"selector": "all", "protocol": "sync", "data": "shared"}
#: workload keys that change where the data are, not what is learnt
_WORKLOAD_IGNORED = ("path", "n_test")


def fitted_for(config: Mapping[str, Any]) -> dict[str, Any]:
    """What of a run's resolved config (its config.toml tables) a curve fitted on it depends on, and the
    run's cluster shape ([[kind, count], ...] per device group)."""
    workload = {k: v for k, v in dict(config.get("workload", {})).items() if k not in _WORKLOAD_IGNORED}
    policies = {c: {"name": config.get(c, {}).get("name", ""), "params": dict(config.get(c, {}).get("params", {}))}
                for c in ("scheduler", "sampler", "aggregator", "selector", "protocol", "data")}
    shape = [[d.get("kind", "cpu"), d.get("count", 1)] for d in config.get("cluster", {}).get("devices", [])]
    return {"workload": workload, **policies, "optim": dict(config.get("optim", {})), "cluster_shapes": [shape]}


def _normal(key: str, table: Mapping[str, Any]) -> Any:
    """A recorded table with its defaults filled in (a policy object, a WorkloadSpec, an OptimSpec), so
    that `{}` and the defaults written out compare equal; the table itself where it cannot be built."""
    from hetsim.config import OptimSpec, PolicySpec, WorkloadSpec, build_dataclass
    from hetsim.policies import build

    if key in _DEFAULT_NAMES:
        table = {"name": table.get("name") or _DEFAULT_NAMES[key], "params": dict(table.get("params", {}))}
        if key != "selector":  # (protocol and data are not policy objects: compared as written)
            return table
    try:
        if key == "workload":
            return build_dataclass(WorkloadSpec, {**table, **{k: getattr(WorkloadSpec, k) for k in _WORKLOAD_IGNORED}})
        if key == "optim":
            return build_dataclass(OptimSpec, table)
        return build(key, PolicySpec(table.get("name", ""), table.get("params", {})))
    except SpecError:
        return dict(table)  # e.g. a plug-in policy that is not importable here: compare as written


def _normal_name(key: str, table: Mapping[str, Any]) -> str:
    return table.get("name") or _DEFAULT_NAMES.get(key, "")


def differences(first: Mapping[str, Any], second: Mapping[str, Any], labels: tuple[str, str] = ("fitted", "here")
                ) -> list[str]:
    """'key: fitted X, here Y' for each compared part (COMPARED) in which two fitted_for records differ."""
    out = []
    for key in COMPARED:
        ta, tb = first.get(key, {}), second.get(key, {})
        a, b = _normal(key, ta), _normal(key, tb)
        if a == b:
            continue
        if type(a) is type(b) and dataclasses.is_dataclass(a):
            out += [f"{key}.{f.name}: {labels[0]} {getattr(a, f.name)!r}, {labels[1]} {getattr(b, f.name)!r}"
                    for f in dataclasses.fields(a) if getattr(a, f.name) != getattr(b, f.name)]
        elif key in ("scheduler", "sampler", "aggregator", "selector", "protocol", "data") and \
                _normal_name(key, ta) != _normal_name(key, tb):
            out.append(f"{key}: {labels[0]} {_normal_name(key, ta)!r}, {labels[1]} {_normal_name(key, tb)!r}")
        else:
            out.append(f"{key}: {labels[0]} {dict(ta)!r}, {labels[1]} {dict(tb)!r}")
    return out


@dataclass(frozen=True)
class LearningCurve:
    a: float
    b: float
    c: float
    epochs_min: float
    epochs_max: float
    fitted_on: tuple[str, ...] = ()
    #: what the runs were (`fitted_for`); None in files written before it was recorded
    fitted_for: Mapping[str, Any] | None = None

    def predict(self, epochs: float | np.ndarray) -> float | np.ndarray:
        """Accuracy after `epochs`; NaN outside the fitted range."""
        e = np.asarray(epochs, dtype=np.float64)
        acc = self.a - self.b * np.exp(-self.c * e)
        acc = np.where((e >= self.epochs_min) & (e <= self.epochs_max), acc, np.nan)
        return float(acc) if acc.ndim == 0 else acc

    def save(self, path: str | Path) -> None:
        write_json(Path(path), {"format": FORMAT, **asdict(self)})

    @classmethod
    def load(cls, path: str | Path) -> "LearningCurve":
        path = Path(path)
        try:
            data = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise SpecError(f"sim.surrogate: cannot read learning curve {str(path)!r}: {e}") from None
        if data.pop("format", None) != FORMAT:
            raise SpecError(f"sim.surrogate: {path}: format: expected {FORMAT!r}")
        data["fitted_on"] = tuple(data.get("fitted_on", ()))
        if not (data.get("fitted_for") is None or isinstance(data["fitted_for"], dict)):
            raise SpecError(f"sim.surrogate: {path}: fitted_for: expected a table, got {data['fitted_for']!r}")
        return cls(**data)

    def warn_if_not_fitted_for(self, spec: "Spec") -> None:
        """Warn (HetsimWarning, one line) when `spec` is not of the policy this curve was fitted on, or when
        the curve does not record what it was fitted on."""
        from hetsim.config import spec_to_dict

        where = f"sim.surrogate: {spec.sim.surrogate}"
        if self.fitted_for is None:
            warnings.warn(f"{where}: the curve does not record which workload and policies it was fitted on "
                          f"(written before hetsim recorded it), so that cannot be checked; refit it with "
                          f"`hetsim surrogate` to have it checked", HetsimWarning, stacklevel=2)
            return
        diff = differences(self.fitted_for, fitted_for(spec_to_dict(spec)))
        if diff:
            warnings.warn(f"{where}: fitted on runs of another policy than this spec ({'; '.join(diff)}); its "
                          f"accuracies describe that policy, not this one", HetsimWarning, stacklevel=2)


def fit(runs: Sequence[Run]) -> LearningCurve:
    """Least-squares fit of the curve to every evaluation of `runs` (pooled); the runs must share
    workload, policies and optimiser (seeds and cluster sizes may differ)."""
    from scipy.optimize import curve_fit

    records = [fitted_for(r.config) for r in runs]
    for r, rec in zip(runs[1:], records[1:]):
        diff = differences(records[0], rec, (str(runs[0].path), str(r.path)))
        if diff:
            raise HetsimError(f"a learning curve is fitted on runs of one policy, these differ: {'; '.join(diff)}")
    shapes = [s for rec in records for s in rec["cluster_shapes"]]
    record = {**records[0], "cluster_shapes": [s for i, s in enumerate(shapes) if s not in shapes[:i]]}
    e = np.concatenate([r.evaluated()[1] for r in runs])
    acc = np.concatenate([r.evaluated()[2] for r in runs])
    if len(e) < 4:
        raise HetsimError(f"a learning curve needs at least 4 evaluations, the runs have {len(e)}")

    def curve(x, a, b, c):
        return a - b * np.exp(-c * x)

    guess = (float(acc.max()), float(acc.max() - acc.min()) or 0.5, 1.0 / max(float(e.max()), 1e-9))
    (a, b, c), _ = curve_fit(curve, e, acc, p0=guess, bounds=([0.0, 0.0, 1e-9], [1.0, 1.0, np.inf]), maxfev=20000)
    return LearningCurve(float(a), float(b), float(c), float(e.min()), float(e.max()),
                         tuple(str(r.path) for r in runs), record)


def holdout_error(curve: LearningCurve, runs: Sequence[Run], target: float) -> dict[str, float | None]:
    """How well the curve predicts runs it was not fitted on: accuracy error at their evaluations and
    the error of the time to `target` when the curve supplies the accuracy."""
    diffs, tta_errors = [], []
    for r in runs:
        t, e, acc = r.evaluated()
        pred = curve.predict(e)
        ok = ~np.isnan(pred)
        diffs.extend(np.abs(pred[ok] - acc[ok]).tolist())
        true_tta = time_to_accuracy(list(t), list(acc), target)
        pred_tta = time_to_accuracy(list(t[ok]), list(pred[ok]), target)
        if true_tta and pred_tta is not None:
            tta_errors.append(abs(pred_tta - true_tta) / true_tta)
    return {"accuracy_abs_error_mean": float(np.mean(diffs)) if diffs else None,
            "accuracy_abs_error_max": float(np.max(diffs)) if diffs else None,
            "time_to_accuracy_rel_error_mean": float(np.mean(tta_errors)) if tta_errors else None,
            "points": len(diffs), "runs": len(runs)}


def accuracy_or_nan(curve: LearningCurve | None, epochs: float) -> float:
    return math.nan if curve is None else curve.predict(epochs)
