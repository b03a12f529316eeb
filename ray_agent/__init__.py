"""rayrack node agent: GPU and host metrics for Prometheus, with Ray attribution."""

__version__ = "0.1.0"
