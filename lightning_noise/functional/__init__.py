"""The methods' cores: each algorithm on tensors, torch only (no Lightning).

One module a method (``sam``, ``gradient_noise``, ``selection``, ``late_stopping``); a method
whose core is a loss keeps it in :mod:`lightning_noise.losses` (ELR, NoiseFiT's hybrid loss),
and the kernels live in :mod:`lightning_noise.kernels`. The callbacks and mixins are thin
Lightning adapters over these (see ``docs/architecture.md``).
"""
