"""unioncam: UnionCAM, Integrative CAM and their baselines, at dataset scale.

The library needs only torch, torchvision, numpy and pillow; the evaluation service (Ray, Parquet,
the report) is the ``service`` extra, imported on first use: ``read_saliency`` needs pyarrow.
"""

from typing import TYPE_CHECKING, Any

from unioncam.methods import (
    METHODS,
    ClassifierOutputSoftmaxTarget,
    ClassifierOutputTarget,
    Explanation,
    explain,
    get_method,
)
from unioncam.models import LoadedModel, load

if TYPE_CHECKING:
    from unioncam.service.results import read_saliency as read_saliency

__version__ = "0.1.0"

# read_saliency is not in __all__: `from unioncam import *` must work without the service extra
__all__ = ["METHODS", "ClassifierOutputSoftmaxTarget", "ClassifierOutputTarget", "Explanation", "LoadedModel",
           "__version__", "explain", "get_method", "load"]

# the `service` extra (pyproject.toml): top-level module → its package; a missing one means
# `pip install 'unioncam[service]'`
_SERVICE_MODULES = {"ray": "ray", "pyarrow": "pyarrow", "pandas": "pandas", "yaml": "pyyaml",
                    "matplotlib": "matplotlib", "scipy": "scipy"}


def _missing_service_module(exc: ImportError) -> str | None:
    """The package of the service extra that ``exc`` says is missing, else None."""
    name = (exc.name or "").partition(".")[0] if isinstance(exc, ModuleNotFoundError) else ""
    return _SERVICE_MODULES.get(name)


def __getattr__(name: str) -> Any:
    """``unioncam.read_saliency``, imported on first use (it needs pyarrow, from the service extra)."""
    if name == "read_saliency":
        try:
            from unioncam.service.results import read_saliency
        except ImportError as exc:
            missing = _missing_service_module(exc)
            if missing is None:
                raise
            raise ImportError(f"unioncam.read_saliency needs {missing}, from the service extra: "
                              "pip install 'unioncam[service]'") from exc
        globals()[name] = read_saliency
        return read_saliency
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), "read_saliency"})
