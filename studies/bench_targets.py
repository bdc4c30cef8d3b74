"""The benchmarks' verdicts: every target prints PASS or FAIL on its own line, and the script exits
non-zero when any target was missed (or could not be measured), so CI and people read the same result.

    targets = Targets()
    targets.check("batched / per-replica", 0.41, "<=", 0.5, "(1.2 s vs 2.9 s)")
    sys.exit(targets.summary())
"""

from __future__ import annotations

import math
import operator

_OPS = {"<=": operator.le, "<": operator.lt, ">=": operator.ge, ">": operator.gt}


class Targets:
    def __init__(self) -> None:
        self.missed: list[str] = []
        self.count = 0

    def check(self, name: str, value: float | None, op: str, target: float, detail: str = "") -> bool:
        """Print `PASS|FAIL name: value (target op target) detail`; None or NaN (not measured) is a miss."""
        self.count += 1
        measured = value is not None and not math.isnan(value)
        ok = measured and _OPS[op](value, target)
        shown = f"{value:.4g}" if measured else "not measured"
        print(f"{'PASS' if ok else 'FAIL'} {name}: {shown} (target {op} {target:g}){' ' + detail if detail else ''}",
              flush=True)
        if not ok:
            self.missed.append(name)
        return ok

    def summary(self) -> int:
        """Print the tally; the exit status: 0 when every target was met, 1 otherwise."""
        if self.missed:
            print(f"\n{len(self.missed)} of {self.count} targets missed: {', '.join(self.missed)}")
            return 1
        print(f"\nall {self.count} targets met")
        return 0
