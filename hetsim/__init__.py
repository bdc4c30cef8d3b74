"""hetsim: simulate and run biased local SGD on heterogeneous clusters.

    import hetsim
    spec = hetsim.load_spec("examples/digits.toml", overrides=["seed=1"])
    result = hetsim.simulate(spec, out="runs/digits-s1")
    result.summary["time_to_accuracy_s"]
"""

__version__ = "0.1.0"

from hetsim.config import Spec, load_spec, spec_from_dict  # noqa: E402
from hetsim.errors import DataError, HetsimError, SpecError  # noqa: E402


def simulate(spec, out=None, progress=None, resume=False, force=False, overwrite=False):
    """Run a spec in the simulator (see `hetsim.sim.simulate`); returns a RunResult."""
    from hetsim.sim import simulate as _simulate

    return _simulate(spec, out, progress, resume, force, overwrite)


__all__ = ["DataError", "HetsimError", "Spec", "SpecError", "load_spec", "simulate", "spec_from_dict"]
