"""A simulated libnvidia-ml.so.1 driven by the fake backend's scenarios (see README.md here)."""
