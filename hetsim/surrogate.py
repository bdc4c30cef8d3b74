"""Learning-curve surrogate: accuracy as a function of work done, for the time-only fidelity.

Fit on emulated runs (real math) at small scale, the curve

    acc(e) = a - b · exp(-c · e),   e = epochs of samples processed,  0 <= a <= 1, b >= 0, c > 0

gives time-only runs of the same policy an accuracy at each evaluation, so their time-to-accuracy is
defined. The curve is valid only over the epochs it was fitted on: beyond them `predict` returns NaN
(never a silent extrapolation), and the run's summary says from which epoch on accuracy was refused.

    hetsim surrogate runs/a-s0 runs/a-s1 --holdout runs/a-s2 --out curve.json
    hetsim simulate big.toml --set sim.fidelity='"time_only"' --set sim.surrogate='"curve.json"'
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from hetsim.analysis import Run
from hetsim.errors import HetsimError, SpecError
from hetsim.results import time_to_accuracy, write_json

FORMAT = "hetsim-learning-curve/1"


@dataclass(frozen=True)
class LearningCurve:
    a: float
    b: float
    c: float
    epochs_min: float
    epochs_max: float
    fitted_on: tuple[str, ...] = ()

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
        return cls(**data)


def fit(runs: Sequence[Run]) -> LearningCurve:
    """Least-squares fit of the curve to every evaluation of `runs` (pooled)."""
    from scipy.optimize import curve_fit

    e = np.concatenate([r.evaluated()[1] for r in runs])
    acc = np.concatenate([r.evaluated()[2] for r in runs])
    if len(e) < 4:
        raise HetsimError(f"a learning curve needs at least 4 evaluations, the runs have {len(e)}")

    def curve(x, a, b, c):
        return a - b * np.exp(-c * x)

    guess = (float(acc.max()), float(acc.max() - acc.min()) or 0.5, 1.0 / max(float(e.max()), 1e-9))
    (a, b, c), _ = curve_fit(curve, e, acc, p0=guess, bounds=([0.0, 0.0, 1e-9], [1.0, 1.0, np.inf]), maxfev=20000)
    return LearningCurve(float(a), float(b), float(c), float(e.min()), float(e.max()),
                         tuple(str(r.path) for r in runs))


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
