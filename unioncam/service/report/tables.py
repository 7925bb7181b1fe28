"""The report's tables, computed from the rows (each once, then rendered as CSV, Markdown and HTML)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd

from unioncam.evaluation import Metric, TableColumn, metric_classes, summarize
from unioncam.evaluation.base import mean_of
from unioncam.methods import CAM, get_method
from unioncam.service.report.formats import _missing, column_formats, fmt_int, fmt_sig3

SUMMARY_HEAD = ["method", "n", "errors"]  # then every registered metric's summary columns, then:
SUMMARY_TAIL = ["seconds_per_image"]


def summary_columns() -> list[str]:
    """``summary.csv``'s columns: method, n, errors, each registered metric's ``summary_columns``
    (registry order: ``average_drop`` … ``road_n``), ``seconds_per_image``."""
    return [*SUMMARY_HEAD, *(c for cls in metric_classes() for c in cls.summary_columns), *SUMMARY_TAIL]


def summary_table(df: pd.DataFrame, methods: list[str] | None = None) -> pd.DataFrame:
    """One row per method: n, errors, then each registered metric's summary of the method's
    error-free rows (:meth:`Metric.summarize <unioncam.evaluation.base.Metric.summarize>`: AD and
    AI with 95% CIs, insertion/deletion AUC, EPG, ROAD), then s/image; :func:`summary_columns`."""
    methods = methods or list(dict.fromkeys(df["method"]))
    rows = []
    for method in methods:
        part = df[df["method"] == method]
        ok = part[part["error"].isna()]
        row: dict[str, Any] = {"method": method, "n": len(ok), "errors": int(part["error"].notna().sum())}
        for cls in metric_classes():
            row.update(cls.summarize(ok))
        row["seconds_per_image"] = mean_of(ok["seconds"])
        rows.append(row)
    return pd.DataFrame(rows, columns=summary_columns())



# -- tables ------------------------------------------------------------------------------------
def per_class_table(df: pd.DataFrame, by: str = "label_name") -> pd.DataFrame:
    """Per method and class: n, Average Drop and Increase with 95% CIs. ``by``: ``label_name`` (the
    dataset label, ``per_class.csv``) or ``target_name`` (the class the maps explain, ``per_predicted.csv``)."""
    rows = []
    ok = df[df["error"].isna() & df["drop"].notna() & df[by].notna()]
    for method, part in ok.groupby("method", sort=False):
        drops = summarize(part["drop"].to_numpy(), part[by].tolist())[1:]
        incs = summarize(part["increase"].to_numpy(), part[by].tolist())[1:]
        for d, i in zip(drops, incs, strict=True):
            rows.append({"method": method, "class": d.group, "n": d.n, "average_drop": d.mean, "ad_ci_low": d.ci_low,
                         "ad_ci_high": d.ci_high, "average_increase": i.mean, "ai_ci_low": i.ci_low,
                         "ai_ci_high": i.ci_high})
    return pd.DataFrame(rows, columns=["method", "class", "n", "average_drop", "ad_ci_low", "ad_ci_high",
                                       "average_increase", "ai_ci_low", "ai_ci_high"])


def _class_pivot(per_class: pd.DataFrame, methods: list[str]) -> pd.DataFrame:
    """Classes × methods table of Average Drop, with each class's image count."""
    if per_class.empty:
        return pd.DataFrame(columns=["class", "n", *methods])
    table = per_class.pivot(index="class", columns="method", values="average_drop").rename_axis(columns=None)
    present = [m for m in methods if m in table.columns]
    table = table[present].assign(n=per_class.groupby("class")["n"].max()).reset_index()
    return table[["class", "n", *present]]


AMS_COLUMNS = ["by", "class", "n", "dereg", "region", "dereg_pct", "region_pct"]
BETA_COLUMNS = ["beta", "n", "mean", "min", "q05", "q25", "median", "q75", "q95", "max"]


def declared(method: str) -> type[CAM] | None:
    """The CAM class of a run's method (what it declares: its report sections, the maps it provides,
    the method it may equal), or None for a name this release does not know."""
    try:
        return get_method(method)
    except ValueError:
        return None


def section_methods(methods: Sequence[str], section: str) -> list[str]:
    """The methods of ``methods`` that declare report section ``section`` (``CAM.report_sections``)."""
    return [m for m in methods if (cls := declared(m)) is not None and section in cls.report_sections]


def _ams_rows(df: pd.DataFrame, method: str) -> pd.DataFrame:
    """``method``'s error-free rows with an AMS decision (``selected`` is ``dereg`` or ``region``)."""
    return df[(df["method"] == method) & df["error"].isna() & df["selected"].isin(["dereg", "region"])]


def ams_table(df: pd.DataFrame, method: str, predicted: bool = True) -> pd.DataFrame:
    """The AMS branch counts of ``method`` (UnionCAM's, the ``ams`` section): ``by`` = ``run`` (class
    ``all``), ``label`` (per dataset label) and, when ``predicted``, ``predicted`` (per explained
    class): n, dereg, region and their shares (%)."""
    u = _ams_rows(df, method)
    groups: list[tuple[str, str, pd.DataFrame]] = [("run", "all", u)] if len(u) else []
    for by, col in (("label", "label_name"), ("predicted", "target_name"))[:2 if predicted else 1]:
        groups += [(by, str(c), part) for c, part in sorted(u[u[col].notna()].groupby(col), key=lambda g: str(g[0]))]
    rows = []
    for by, cls, part in groups:
        n, dereg = len(part), int((part["selected"] == "dereg").sum())
        rows.append({"by": by, "class": cls, "n": n, "dereg": dereg, "region": n - dereg,
                     "dereg_pct": 100.0 * dereg / n, "region_pct": 100.0 * (n - dereg) / n})
    return pd.DataFrame(rows, columns=AMS_COLUMNS)


def beta_table(df: pd.DataFrame, method: str) -> pd.DataFrame:
    """The distribution of ``method``'s β's (``beta_den``, ``beta_reg``, ``beta_dereg``) and of the AMS
    margin ``beta_dereg − beta_reg`` (AMS picks L_Dereg when it is > 0): n, mean, min, quantiles, max."""
    u = df[(df["method"] == method) & df["error"].isna()]
    series = {c: u[c].astype(float) for c in ("beta_den", "beta_reg", "beta_dereg")}
    series["beta_dereg_minus_reg"] = series["beta_dereg"] - series["beta_reg"]
    rows = []
    for name, values in series.items():
        v = values.dropna().to_numpy()
        if len(v):
            q = np.quantile(v, [0.05, 0.25, 0.5, 0.75, 0.95])
            rows.append({"beta": name, "n": len(v), "mean": float(v.mean()), "min": float(v.min()), "q05": q[0],
                         "q25": q[1], "median": q[2], "q75": q[3], "q95": q[4], "max": float(v.max())})
    return pd.DataFrame(rows, columns=BETA_COLUMNS)


def identical_methods(df: pd.DataFrame, a: str, b: str, rtol: float = 1e-5,
                      atol: float = 1e-6) -> int:
    """How many images ``a`` and ``b`` were compared on when their rows agree on every one (``O``,
    insertion/deletion AUC and EPG where recorded, within ``rtol``/``atol``); 0 when they differ on
    any image, or have no error-free image or value in common."""
    cols = ["key", "rank", "y", "o", "insertion_auc", "deletion_auc", "epg"]
    ok = df[df["error"].isna()]
    left, right = ok[ok["method"] == a][cols], ok[ok["method"] == b][cols]
    both = left.merge(right, on=["key", "rank"], suffixes=("_a", "_b"))
    if both.empty:
        return 0
    compared = False
    for col in ("y", "o", "insertion_auc", "deletion_auc", "epg"):
        x, y = both[f"{col}_a"].astype(float).to_numpy(), both[f"{col}_b"].astype(float).to_numpy()
        if np.isnan(x).all() and np.isnan(y).all():
            continue
        if not np.array_equal(np.isnan(x), np.isnan(y)) or not np.allclose(x, y, rtol=rtol, atol=atol, equal_nan=True):
            return 0
        compared = compared or col != "y"  # Y is the same for every method (one image, one target)
    return int(both["key"].nunique()) if compared else 0


def _table1(summary: pd.DataFrame, requested: set[str] | None = None, no_boxes: bool = False,
            marks: dict[str, str] | None = None) -> pd.DataFrame:
    """The paper's Table 1 layout: method, n, errors, each registered metric's ``table`` columns (AD
    and AI with CIs, then the others; a metric with ``table_when_requested``, ROAD, only when the run
    requested it), then s/image, as text in each column's format (:func:`column_formats`). An empty
    cell says why when the run knows: ``not requested`` (a metric left out of ``--metrics``), ``no
    boxes`` (a metric that needs boxes, in a run without any); ``marks`` adds a footnote mark to a
    method's s/image."""
    formats = column_formats()

    def why(metric: type[Metric]) -> str:
        if requested is not None and metric.name not in requested:
            return "not requested"
        return "no boxes" if metric.needs_boxes and no_boxes else "–"

    def cells(metric: type[Metric], column: TableColumn) -> list[str]:
        out = []
        for _, row in summary.iterrows():
            value = row[column.value]
            if column.count:
                out.append(formats[column.value](value))
            elif _missing(value):
                out.append(why(metric))
            elif column.ci is not None:
                fmt = formats[column.value]
                out.append(f"{fmt(value)} [{fmt(row[column.ci[0]])}, {fmt(row[column.ci[1]])}]")
            else:
                out.append(formats[column.value](value))
        return out

    marks = marks or {}
    seconds = [f"{fmt_sig3(v)} {marks[m]}" if m in marks else fmt_sig3(v)
               for m, v in zip(summary["method"], summary["seconds_per_image"], strict=True)]
    table: dict[str, Any] = {"Method": summary["method"].astype(str), "n": summary["n"].map(fmt_int),
                             "errors": summary["errors"].map(fmt_int)}
    for metric in metric_classes():
        if metric.table_when_requested and not (requested and metric.name in requested):
            continue
        for column in metric.table:
            table[column.header] = cells(metric, column)
    table["s/image"] = seconds
    return pd.DataFrame(table)




def sanity_table(rows: pd.DataFrame | None) -> pd.DataFrame | None:
    """Mean Spearman and SSIM with the original maps per method and cascade step (``--sanity``), over
    the rank-1 rows (of a run's sanity files) that did not fail; None when the run has none."""
    if rows is None:
        return None
    rows = rows[rows["error"].isna() & (rows["rank"].isna() | (rows["rank"] == 1))]
    if rows.empty:
        return None
    ok = rows[~rows["failed"].astype(bool)]
    grouped = ok.groupby(["method", "step", "layer"], sort=True)
    table = grouped.agg(n=("key", "size"), spearman=("spearman", "mean"), ssim=("ssim", "mean")).reset_index()
    failed = rows.groupby(["method", "step"])["failed"].sum().rename("failed").reset_index()
    return table.merge(failed, on=["method", "step"], how="left").sort_values(["method", "step"])


