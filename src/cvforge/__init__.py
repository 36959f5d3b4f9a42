"""cvforge: train, evaluate, run and export computer-vision models on your own data."""
from __future__ import annotations

__version__ = "0.1.0"
