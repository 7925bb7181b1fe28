"""Dataset-scale evaluation on Ray: config → runner (driver) → workers (one per GPU) → Parquet → report.

Ray is imported only by :mod:`unioncam.service.runner`; reading results back needs only pyarrow.
"""

from unioncam.service.config import ConfigError, EvalConfig
from unioncam.service.dataset import SaliencyDataset
from unioncam.service.results import read_metrics, read_saliency

__all__ = ["ConfigError", "EvalConfig", "SaliencyDataset", "read_metrics", "read_saliency"]
