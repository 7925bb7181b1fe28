"""unioncam: UnionCAM, Integrative CAM and their baselines, at dataset scale."""

from unioncam.methods import (
    METHODS,
    ClassifierOutputSoftmaxTarget,
    ClassifierOutputTarget,
    Explanation,
    explain,
    get_method,
)
from unioncam.models import LoadedModel, load
from unioncam.service.results import read_saliency

__version__ = "0.1.0"

__all__ = ["METHODS", "ClassifierOutputSoftmaxTarget", "ClassifierOutputTarget", "Explanation", "LoadedModel",
           "__version__", "explain", "get_method", "load", "read_saliency"]
