"""Dataset-scale evaluation on Ray: config → runner (driver) → workers (one per GPU) → Parquet → report.

Ray is imported only by :mod:`unioncam.service.runner`; reading results back needs only pyarrow. The
names below are imported on first use, so importing one module (``unioncam.service.config``) does not
import the others' dependencies (pandas, pyarrow).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from unioncam.service.config import ConfigError, EvalConfig
    from unioncam.service.dataset import SaliencyDataset
    from unioncam.service.results import read_metrics, read_saliency

_EXPORTS: dict[str, str] = {"ConfigError": "config", "EvalConfig": "config", "SaliencyDataset": "dataset",
                            "read_metrics": "results", "read_saliency": "results"}  # name → its module

__all__ = ["ConfigError", "EvalConfig", "SaliencyDataset", "read_metrics", "read_saliency"]


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS})
