"""Ray actors: XRD generation, screening and MD validation workers (kept thin)."""
