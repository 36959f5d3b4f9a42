"""cvforge: train, evaluate, run and export computer-vision models on your own data.

    import cvforge
    result = cvforge.train(task="classify", model="resnet18", data="shapes", epochs=5)
    cvforge.evaluate(result.best)
    cvforge.load(result.best).predict("image.jpg")
"""
from __future__ import annotations

__version__ = "0.1.0"

from cvforge.api import evaluate, load, train  # noqa: E402  (the API needs __version__ defined first)
from cvforge.predict import predict  # noqa: E402
from cvforge.zoo import build_model  # noqa: E402

__all__ = ["__version__", "build_model", "evaluate", "load", "predict", "train"]
