"""Sweep configs: `get_config(arg)` files for the mains in `scripts/sweeps/`."""
