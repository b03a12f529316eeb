"""rayrack: day-2 operations on a rayrack Ray cluster (converge, status, rolling upgrade, drain)."""

__version__ = "0.1.0"
