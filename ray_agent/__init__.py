"""rayrack node agent: GPU metrics for Prometheus, with Ray attribution (host metrics are node_exporter's)."""

__version__ = "0.1.0"
