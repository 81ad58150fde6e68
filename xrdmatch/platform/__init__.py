"""Campaign orchestration, stores, data loaders and CLI wiring."""
