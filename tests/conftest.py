"""Suite-wide settings. Its presence also puts tests/ on sys.path for `_formats`."""

from __future__ import annotations

import os

# Triton's interpreter runs the kernels on the CPU; Triton reads this when first imported, so
# it is set before anything (torch, Lightning) may import Triton.
os.environ.setdefault("TRITON_INTERPRET", "1")
# No test may need the W&B service or a display.
os.environ.setdefault("WANDB_MODE", "offline")

import matplotlib

matplotlib.use("Agg")
