"""Suite-wide settings. Its presence also puts tests/ on sys.path for `_formats`."""

from __future__ import annotations

import os

import matplotlib

# No test may need the W&B service or a display.
os.environ.setdefault("WANDB_MODE", "offline")
matplotlib.use("Agg")
