"""hetsim: simulate and run biased local SGD on heterogeneous clusters.

    import hetsim
    spec = hetsim.load_spec("examples/digits.toml", overrides=["seed=1"])
    result = hetsim.simulate(spec, out="runs/digits-s1")
    result.summary["time_to_accuracy_s"]
"""

from hetsim._version import __version__
from hetsim.config import Spec
from hetsim.errors import DataError, HetsimError, SpecError


def load_spec(path, overrides=()):
    """Read, override and check a TOML spec (`hetsim.resolve.load_spec`): every SpecError on load."""
    from hetsim.resolve import load_spec as _load_spec  # here, not above: `import hetsim.config` stays light

    return _load_spec(path, overrides)


def spec_from_dict(data, source="<dict>", base=None, overrides=()):
    """Build and check a Spec from a raw table (`hetsim.resolve.spec_from_dict`)."""
    from hetsim.resolve import spec_from_dict as _spec_from_dict

    return _spec_from_dict(data, source, base, overrides)


def simulate(spec, out=None, progress=None, resume=False, force=False, overwrite=False):
    """Run a spec in the simulator (see `hetsim.sim.simulate`); returns a RunResult."""
    from hetsim.sim import simulate as _simulate

    return _simulate(spec, out, progress, resume, force, overwrite)


__all__ = ["DataError", "HetsimError", "Spec", "SpecError", "__version__", "load_spec", "simulate",
           "spec_from_dict"]
