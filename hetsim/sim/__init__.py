"""The simulator: the driver's ports on a virtual clock (SimPy emulated and time-only clocks, the
in-process comm) and `simulate()` (see engine.py)."""

from hetsim.sim.engine import EmulatedClock, InProcessComm, Simulation, TimeOnlyClock, simulate

__all__ = ["EmulatedClock", "InProcessComm", "Simulation", "TimeOnlyClock", "simulate"]
