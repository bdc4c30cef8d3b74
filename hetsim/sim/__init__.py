"""The SimPy model of a heterogeneous cluster running biased local SGD (see engine.py)."""

from hetsim.sim.engine import Simulation, simulate

__all__ = ["Simulation", "simulate"]
