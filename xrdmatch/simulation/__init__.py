"""Physics: the XRD engine and ASE-driven MD validation."""
