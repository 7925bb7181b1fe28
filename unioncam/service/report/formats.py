"""One display format per report column: counts, percentages, AUCs, seconds, β's."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import pandas as pd

from unioncam.evaluation import metric_classes


# -- number formats: one per column ------------------------------------------------------------
def _missing(v: Any) -> bool:
    if v is None:
        return True
    try:
        return bool(pd.isna(v))
    except (TypeError, ValueError):
        return False


def fmt_int(v: Any) -> str:
    """A count: ``5``."""
    return "–" if _missing(v) else f"{int(v)}"


def fmt_pct(v: Any) -> str:
    """A percentage (Average Drop, Increase, their CIs, shares): 2 decimals, ``10.40``."""
    return "–" if _missing(v) else f"{float(v):.2f}"


def fmt_auc(v: Any) -> str:
    """An AUC or an EPG value in [0, 1]: 3 decimals, ``0.000``."""
    return "–" if _missing(v) else f"{float(v):.3f}"


def fmt_sig3(v: Any) -> str:
    """Seconds: 3 significant digits, never an exponent (``0.0283``, ``1.25``, ``10.4``, ``1230``)."""
    if _missing(v):
        return "–"
    r = float(f"{float(v):.2e}")  # rounded to 3 significant digits first (9.996 → 10.0, not 10.00)
    if r == 0:
        return "0.00"
    return f"{r:.{max(0, 2 - math.floor(math.log10(abs(r))))}f}"


def fmt_beta(v: Any) -> str:
    """A β (a difference of probabilities, in [−1, 1]): 4 decimals, ``0.0123``."""
    return "–" if _missing(v) else f"{float(v):.4f}"


def fmt_text(v: Any) -> str:
    return "–" if _missing(v) else str(v)


FORMATS: dict[str, Callable[[Any], str]] = {"int": fmt_int, "pct": fmt_pct, "auc": fmt_auc}  # a Metric's Format


def column_formats() -> dict[str, Callable[[Any], str]]:
    """The display format of each column of the CSVs (the md and html tables show these): the
    report's own columns' and each registered metric's ``summary_columns``'."""
    return {
        **dict.fromkeys(("n", "errors", "dereg", "region"), fmt_int),
        **dict.fromkeys(("dereg_pct", "region_pct"), fmt_pct),
        **{c: FORMATS[f] for cls in metric_classes() for c, f in cls.summary_columns.items()},
        "seconds_per_image": fmt_sig3,
        **dict.fromkeys(("mean", "min", "q05", "q25", "median", "q75", "q95", "max"), fmt_beta),
    }
FORMATS_NOTE = ("Formats: percentages (Average Drop, Average Increase, their CIs, shares) with 2 decimals; "
                "insertion/deletion AUC and EPG with 3; s/image with 3 significant digits; β with 4.")


def _formatted(frame: pd.DataFrame, formats: dict[str, Callable[[Any], str]] | None = None) -> pd.DataFrame:
    """``frame`` as text, each column in its format (:func:`column_formats` unless ``formats`` names it)."""
    formats = {**column_formats(), **(formats or {})}
    return pd.DataFrame({c: [formats.get(str(c), fmt_text)(v) for v in frame[c]] for c in frame.columns},
                        columns=frame.columns)

