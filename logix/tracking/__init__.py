"""Which modules are watched, the hooks on them, and the per-module-type LoGra math."""
