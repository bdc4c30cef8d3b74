"""The package version, in a module of its own: results record it without importing the package's
__init__ (which reaches the simulator, and so would close an import cycle)."""

__version__ = "0.1.0"
