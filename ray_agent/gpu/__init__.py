"""GPU backends: the interface (base), NVML, and the scenario-driven fake."""
