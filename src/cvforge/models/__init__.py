"""Models: backbones cut into stages, task models on top, and pretrained-weight loading.

The registry of buildable models by name is ``cvforge.zoo``.
"""
from cvforge.models.backbones import Backbone, get_backbone, param_groups
from cvforge.models.classifier import Classifier, build_classifier
from cvforge.models.weights import LoadReport, load_pretrained

__all__ = ["Backbone", "Classifier", "LoadReport", "build_classifier", "get_backbone", "load_pretrained",
           "param_groups"]
