"""The run report: ``report/summary.csv``, ``per_class.csv``, ``per_predicted.csv``, ``ams.csv``,
``ams_beta.csv``, ``report.md``, ``report.html`` (self-contained: its figures are embedded) and plots.

Everything is recomputed from the Parquet rows (REFERENCE.md stores ``Y`` and ``O`` per image and
method): per-image drop ``100·max(0, Y−O)/Y`` and increase ``100·1[Y<O]``; Average Drop / Increase
are their means with a seeded 95% percentile bootstrap CI (:func:`unioncam.metrics.summarize`).
Error rows are counted, never averaged.

The tables show one format per column (:data:`COLUMN_FORMATS`): percentages with 2 decimals, AUCs
and EPG with 3, seconds with 3 significant digits, β's with 4. ``per_class.csv`` groups by the
dataset label (``label_name``), ``per_predicted.csv`` by the class the maps explain (``target_name``,
the predicted class); ``ams.csv`` counts UnionCAM's AMS branch per run and class, ``ams_beta.csv``
gives the β's quantiles.
"""

from __future__ import annotations

import base64
import html
import io
import math
import os
import textwrap
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import pandas as pd

from unioncam import storage
from unioncam.methods import CAM, get_method, provided_maps
from unioncam.metrics import summarize
from unioncam.protocols import PROTOCOL_NAMES, Protocol, get_protocol
from unioncam.service.results import provenance_of, read_metrics, read_parquet, read_saliency
from unioncam.service.rundir import load_manifest, run_files

CSS = """body{font-family:sans-serif;max-width:1200px;margin:2em auto;padding:0 1em;color:#222}
table.t{border-collapse:collapse;margin:1em 0;font-size:14px}
table.t th,table.t td{padding:4px 10px;border-bottom:1px solid #ddd;text-align:right}
table.t th{background:#f3f3f3}table.t td:first-child,table.t th:first-child{text-align:left}
img{max-width:100%;margin:0.5em 0}figure{margin:1em 0}figcaption{font-size:13px;color:#555}
ul.notes{font-size:14px;color:#333}
div.ov{overflow-x:auto}table.ov{border-collapse:collapse;font-size:14px}
table.ov th{padding:2px 6px;text-align:center}table.ov th.row{font-weight:normal;text-align:left}
table.ov td{padding:2px}table.ov td img{display:block;margin:0 auto}
p.ovbar{font-size:14px}p.ovbar img{vertical-align:middle;margin:0 6px}"""

SUMMARY_COLUMNS = ["method", "n", "errors", "average_drop", "ad_ci_low", "ad_ci_high", "average_increase",
                   "ai_ci_low", "ai_ci_high", "insertion_auc", "deletion_auc", "epg", "n_epg", "road_morf", "road_lerf",
                   "road_combined", "road_n", "seconds_per_image"]


def run_protocol(run_dir: str | os.PathLike[str]) -> Protocol:
    """The metric protocol a run recorded in its manifest (runs from before protocols: ``reference``)."""
    run_dir = storage.absolute(run_dir)
    if not storage.is_file(storage.join(run_dir, "manifest.json")):
        return get_protocol("reference")
    return get_protocol(str(load_manifest(run_dir)["config"].get("protocol") or "reference"))


def load_rows(run_dir: str | os.PathLike[str]) -> pd.DataFrame:
    """All metrics rows with per-image ``drop`` and ``increase`` (percent) added, the drop by the
    run's protocol (:func:`run_protocol`; ``reference``: ``100·max(0, Y−O)/Y``)."""
    df = read_metrics(run_dir).to_pandas()
    y, o = df["y"].astype(float), df["o"].astype(float)
    df["drop"] = run_protocol(run_dir).drop_array(y.to_numpy(), o.to_numpy())
    df["increase"] = np.where(y.isna() | o.isna(), np.nan, 100.0 * (y < o))
    return df


def road_matrix(values: pd.Series) -> np.ndarray:
    """A ``road_morf``/``road_lerf`` column as an ``N×P`` array (NaN where undefined or not computed)."""
    lists = [v for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    width = max((len(v) for v in lists), default=0)
    out = np.full((len(values), width), np.nan)
    for i, v in enumerate(values):
        if v is not None and not (isinstance(v, float) and math.isnan(v)):
            out[i, :len(v)] = [np.nan if x is None else x for x in v]
    return out


def road_complete(rows: pd.DataFrame) -> pd.Series:
    """Per row, whether every ROAD value is defined: each percentile of ``road_morf`` and of
    ``road_lerf`` finite (no null list, no null entry). The ROAD columns average over these rows."""
    morf, lerf = road_matrix(rows["road_morf"]), road_matrix(rows["road_lerf"])
    defined = np.isfinite(morf).all(axis=1) & np.isfinite(lerf).all(axis=1) & (morf.shape[1] > 0) & (lerf.shape[1] > 0)
    return pd.Series(defined, index=rows.index, dtype=bool)


def road_notes(df: pd.DataFrame, methods: list[str]) -> list[str]:
    """Per method, how many error-free images the ROAD columns leave out (:func:`road_complete`) and why."""
    ok = df[df["error"].isna()]
    complete = road_complete(ok)
    none = ok["road_morf"].map(_missing_list) | ok["road_lerf"].map(_missing_list)
    notes = []
    for method in methods:
        mine = ok["method"] == method
        failed, nan = int((mine & none).sum()), int((mine & ~none & ~complete).sum())
        if failed or nan:
            why = [f"{nan} where a ROAD threshold removed every pixel (NaN)"] if nan else []
            why += [f"{failed} where ROAD failed (no values)"] if failed else []
            notes.append(f"ROAD: {failed + nan} image(s) of method {method} left out (ROAD n = "
                         f"{int((mine & complete).sum())} of {int(mine.sum())}): {', '.join(why)}.")
    return notes


def _missing_list(value: Any) -> bool:
    """Whether a ``road_morf``/``road_lerf`` cell holds no values (null or empty: ROAD failed or was not run)."""
    return value is None or (isinstance(value, float) and math.isnan(value)) or len(value) == 0


def _road_means(values: pd.Series) -> pd.Series:
    """Per row, the mean over ROAD's percentiles (grad-cam's ``...Average``); NaN if none is defined."""
    m = road_matrix(values)
    with warnings.catch_warnings():  # a row with no defined percentile is NaN, silently
        warnings.simplefilter("ignore", RuntimeWarning)
        means = np.nanmean(m, axis=1) if m.shape[1] else np.full(len(values), np.nan)
    return pd.Series(means, index=values.index)


def _road_plot(df: pd.DataFrame, methods: list[str], percentiles: list[float]) -> bytes | None:
    """ROAD curves: mean f_c after imputing the most (MoRF ↓) / least (LeRF ↑) relevant pixels per
    method, against the share removed: ``100 − p`` at grad-cam's percentile ``p`` (the pixels above
    the map's ``p``-th percentile, or below the ``(100 − p)``-th for LeRF, are removed); over the
    images of the ROAD columns (:func:`road_complete`)."""
    ok = df[df["error"].isna()]
    ok = ok[road_complete(ok)]
    if ok.empty:
        return None
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
    for ax, (col, title) in zip(axes, (("road_morf", "ROAD MoRF: most relevant removed ↓"),
                                       ("road_lerf", "ROAD LeRF: least relevant removed ↑")), strict=True):
        for method in methods:
            m = road_matrix(ok.loc[ok["method"] == method, col])
            if m.size:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", RuntimeWarning)
                    ax.plot([100 - p for p in percentiles[:m.shape[1]]], np.nanmean(m, axis=0), marker="o",
                            label=f"{method} (n={len(m)})")
        ax.set_xlabel("pixels removed and imputed (%)")
        ax.set_ylabel("f_c (probability)")
        ax.set_title(title)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    data = _png(fig)
    plt.close(fig)
    return data


def _mean(values: pd.Series) -> float:
    values = values.dropna()
    return float(values.mean()) if len(values) else float("nan")


def summary_table(df: pd.DataFrame, methods: list[str] | None = None) -> pd.DataFrame:
    """One row per method: n, errors, AD and AI with 95% CIs, insertion/deletion AUC, EPG, ROAD, s/image.

    ROAD: MoRF and LeRF are the means over images of each image's mean over the percentiles, both over
    the same images, ``road_n`` of them: the error-free rows whose every ROAD value is defined
    (:func:`road_complete`; an image with a NaN percentile, or no values, is left out of all three);
    ``road_combined`` = (LeRF − MoRF)/2 of those means, which is the mean of each image's (LeRF − MoRF)/2."""
    methods = methods or list(dict.fromkeys(df["method"]))
    rows = []
    for method in methods:
        part = df[df["method"] == method]
        ok = part[part["error"].isna()]
        row: dict[str, Any] = {"method": method, "n": len(ok), "errors": int(part["error"].notna().sum())}
        for col, prefix, name in (("drop", "ad", "average_drop"), ("increase", "ai", "average_increase")):
            values = ok[col].dropna()
            s = summarize(values.to_numpy())[0] if len(values) else None
            row[name] = s.mean if s else float("nan")
            row[f"{prefix}_ci_low"] = s.ci_low if s else float("nan")
            row[f"{prefix}_ci_high"] = s.ci_high if s else float("nan")
        road = ok[road_complete(ok)]
        morf, lerf = _mean(_road_means(road["road_morf"])), _mean(_road_means(road["road_lerf"]))
        row.update(insertion_auc=_mean(ok["insertion_auc"]), deletion_auc=_mean(ok["deletion_auc"]),
                   epg=_mean(ok["epg"]), n_epg=int(ok["epg"].notna().sum()), road_morf=morf, road_lerf=lerf,
                   road_combined=(lerf - morf) / 2, road_n=len(road), seconds_per_image=_mean(ok["seconds"]))
        rows.append(row)
    return pd.DataFrame(rows, columns=SUMMARY_COLUMNS)


class OverlayKeyError(ValueError):
    """``overlay_keys`` names images the run cannot draw (the message lists a few valid keys)."""


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


#: The display format of each column of the CSVs (the md and html tables show these).
COLUMN_FORMATS: dict[str, Callable[[Any], str]] = {
    **dict.fromkeys(("n", "errors", "n_epg", "road_n", "dereg", "region"), fmt_int),
    **dict.fromkeys(("average_drop", "ad_ci_low", "ad_ci_high", "average_increase", "ai_ci_low", "ai_ci_high",
                     "dereg_pct", "region_pct"), fmt_pct),
    **dict.fromkeys(("insertion_auc", "deletion_auc", "epg", "road_morf", "road_lerf", "road_combined"), fmt_auc),
    "seconds_per_image": fmt_sig3,
    **dict.fromkeys(("mean", "min", "q05", "q25", "median", "q75", "q95", "max"), fmt_beta),
}
FORMATS_NOTE = ("Formats: percentages (Average Drop, Average Increase, their CIs, shares) with 2 decimals; "
                "insertion/deletion AUC and EPG with 3; s/image with 3 significant digits; β with 4.")


def _formatted(frame: pd.DataFrame, formats: dict[str, Callable[[Any], str]] | None = None) -> pd.DataFrame:
    """``frame`` as text, each column in its format (:data:`COLUMN_FORMATS` unless ``formats`` names it)."""
    formats = {**COLUMN_FORMATS, **(formats or {})}
    return pd.DataFrame({c: [formats.get(str(c), fmt_text)(v) for v in frame[c]] for c in frame.columns},
                        columns=frame.columns)


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


def _epg_note(df: pd.DataFrame, requested: bool | None, dataset: Any) -> str:
    """Why EPG is empty or partial (empty text when every image has it, or it was not requested)."""
    ok = df[df["error"].isna()]
    images, with_boxes = ok["key"].nunique(), ok.loc[ok["epg"].notna(), "key"].nunique()
    if requested is False or not images:
        return ""
    if with_boxes == 0:
        why = {"imagenet": "ImageNet shards have boxes only when converted with --boxes",
               "voc": "VOC shards carry the boxes of each image's labelled objects; these samples have none"}.get(
            str(dataset), "their samples' .json has no \"boxes\"")
        if requested is None:
            return f"EPG: no values: no boxes in these shards ({why}), or epg was not requested."
        return f"EPG: no boxes in these shards ({why})."
    if with_boxes < images:
        return (f"EPG: over the {with_boxes} of {images} images that have boxes (n_epg in summary.csv); "
                "the others have none.")
    return ""


def _table1(summary: pd.DataFrame, requested: set[str] | None = None, no_boxes: bool = False,
            marks: dict[str, str] | None = None) -> pd.DataFrame:
    """The paper's Table 1 layout: AD and AI with CIs, then the other metrics, as text in each
    column's format (:data:`COLUMN_FORMATS`). An empty cell says why when the run knows: ``not
    requested`` (a metric left out of ``--metrics``), ``no boxes`` (EPG without boxes); ``marks``
    adds a footnote mark to a method's s/image."""
    def why(metric: str) -> str:
        if requested is not None and metric not in requested:
            return "not requested"
        return "no boxes" if metric == "epg" and no_boxes else "–"

    def ci(m: float, lo: float, hi: float, metric: str) -> str:
        return why(metric) if _missing(m) else f"{fmt_pct(m)} [{fmt_pct(lo)}, {fmt_pct(hi)}]"

    def one(col: str, metric: str) -> list[str]:
        return [why(metric) if _missing(v) else COLUMN_FORMATS[col](v) for v in summary[col]]

    marks = marks or {}
    seconds = [f"{fmt_sig3(v)} {marks[m]}" if m in marks else fmt_sig3(v)
               for m, v in zip(summary["method"], summary["seconds_per_image"], strict=True)]
    return pd.DataFrame({
        "Method": summary["method"].astype(str), "n": summary["n"].map(fmt_int),
        "errors": summary["errors"].map(fmt_int),
        "Average Drop % ↓ [95% CI]": [ci(m, lo, hi, "ad") for m, lo, hi in
                                      summary[["average_drop", "ad_ci_low", "ad_ci_high"]].to_numpy()],
        "Average Increase % ↑ [95% CI]": [ci(m, lo, hi, "ai") for m, lo, hi in
                                          summary[["average_increase", "ai_ci_low", "ai_ci_high"]].to_numpy()],
        "Insertion ↑": one("insertion_auc", "insdel"), "Deletion ↓": one("deletion_auc", "insdel"),
        "EPG ↑": one("epg", "epg"),
        **({"ROAD MoRF ↓": one("road_morf", "road"), "ROAD LeRF ↑": one("road_lerf", "road"),
            "ROAD combined ↑": one("road_combined", "road"), "ROAD n": summary["road_n"].map(fmt_int)}
           if requested and "road" in requested else {}),
        "s/image": seconds})


# -- figures -------------------------------------------------------------------------------------
def _png(fig: Any) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    return buf.getvalue()


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _plots(df: pd.DataFrame, summary: pd.DataFrame) -> dict[str, bytes]:
    plt = _pyplot()
    figures: dict[str, bytes] = {}
    methods = summary["method"].tolist()
    if summary["average_drop"].notna().any():
        fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
        for ax, (col, lo, hi, title) in zip(axes, (
                ("average_drop", "ad_ci_low", "ad_ci_high", "Average Drop (%) ↓"),
                ("average_increase", "ai_ci_low", "ai_ci_high", "Average Increase (%) ↑")), strict=True):
            mean = summary[col].to_numpy()
            err = np.vstack([mean - summary[lo].to_numpy(), summary[hi].to_numpy() - mean])
            ax.bar(methods, mean, yerr=err, capsize=4, color="#4c72b0")
            ax.set_title(f"{title}, 95% bootstrap CI")
            ax.tick_params(axis="x", rotation=30)
        fig.tight_layout()
        figures["ad_ai.png"] = _png(fig)
        plt.close(fig)
    ok = df[df["error"].isna()]
    panels = [(c, t) for c, t in (("drop", "per-image drop (%)"), ("insertion_auc", "insertion AUC ↑"),
                                  ("deletion_auc", "deletion AUC ↓"), ("epg", "energy pointing game ↑"))
              if ok[c].notna().any()]
    if panels:
        fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.8), squeeze=False)
        for ax, (col, title) in zip(axes[0], panels, strict=True):
            data = [ok.loc[ok["method"] == m, col].dropna().to_numpy() for m in methods]
            ax.boxplot(data, tick_labels=methods)
            ax.set_title(title)
            ax.tick_params(axis="x", rotation=30)
        fig.tight_layout()
        figures["distributions.png"] = _png(fig)
        plt.close(fig)
    return figures


def sanity_table(run_dir: str) -> pd.DataFrame | None:
    """Mean Spearman and SSIM with the original maps per method and cascade step (``--sanity``), over
    the rank-1 rows that did not fail; None when the run has no sanity rows."""
    files = run_files(run_dir, "sanity")
    if not files:
        return None
    rows = pd.concat([read_parquet(f).to_pandas() for f in files], ignore_index=True)
    rows = rows[rows["error"].isna() & (rows["rank"].isna() | (rows["rank"] == 1))]
    if rows.empty:
        return None
    ok = rows[~rows["failed"].astype(bool)]
    grouped = ok.groupby(["method", "step", "layer"], sort=True)
    table = grouped.agg(n=("key", "size"), spearman=("spearman", "mean"), ssim=("ssim", "mean")).reset_index()
    failed = rows.groupby(["method", "step"])["failed"].sum().rename("failed").reset_index()
    return table.merge(failed, on=["method", "step"], how="left").sort_values(["method", "step"])


def _sanity_plot(table: pd.DataFrame) -> bytes:
    """Adebayo et al.'s cascading randomization curves: similarity to the original maps vs the layer
    randomized down to (logits first)."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, (col, title) in zip(axes, (("spearman", "Spearman rank correlation"), ("ssim", "SSIM")), strict=True):
        for method, part in table.groupby("method", sort=False):
            ax.plot(part["step"], part[col], marker="o", label=method)
        steps = table.drop_duplicates("step").sort_values("step")
        ax.set_xticks(steps["step"], [str(layer) for layer in steps["layer"]], rotation=60, ha="right", fontsize=7)
        ax.set_ylim(-0.2 if col == "spearman" else 0, 1.05)
        ax.set_title(f"{title} with the original map")
        ax.set_xlabel("randomized from the logits down to")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    data = _png(fig)
    plt.close(fig)
    return data


def _ams_plot(df: pd.DataFrame, method: str) -> bytes | None:
    """``method``'s β histograms, and β_reg vs β_dereg per image with the AMS boundary β_dereg = β_reg."""
    u = df[(df["method"] == method) & df["error"].isna()]
    betas = {c: u[c].astype(float).dropna().to_numpy() for c in ("beta_den", "beta_reg", "beta_dereg")}
    if not any(len(v) for v in betas.values()):
        return None
    plt = _pyplot()
    fig, (hist, scatter) = plt.subplots(1, 2, figsize=(11, 3.8))
    every = np.concatenate([v for v in betas.values() if len(v)])
    bins = np.linspace(float(every.min()), float(every.max()) + 1e-12, 30)
    for name, values in betas.items():
        if len(values):
            hist.hist(values, bins=bins, histtype="step", linewidth=1.5, label=f"{name} (n={len(values)})")
    hist.set_title(f"{method}'s β (score gain over a black image)")
    hist.set_xlabel("β")
    hist.legend(fontsize=8)
    both = u[u["beta_reg"].notna() & u["beta_dereg"].notna()]
    for branch, colour in (("dereg", "#dd8452"), ("region", "#4c72b0")):
        part = both[both["selected"] == branch]
        scatter.scatter(part["beta_reg"].astype(float), part["beta_dereg"].astype(float), s=14, color=colour,
                        label=f"{branch} ({len(part)})")
    if len(both):
        lo = float(min(both["beta_reg"].min(), both["beta_dereg"].min()))
        hi = float(max(both["beta_reg"].max(), both["beta_dereg"].max()))
        scatter.plot([lo, hi], [lo, hi], color="#888", linewidth=1, linestyle="--", label="β_dereg = β_reg")
    scatter.set_xlabel("β_reg")
    scatter.set_ylabel("β_dereg")
    scatter.set_title("AMS: L_Dereg above the line, L_Region below")
    scatter.legend(fontsize=8)
    fig.tight_layout()
    data = _png(fig)
    plt.close(fig)
    return data


# -- overlays --------------------------------------------------------------------------------------
OVERLAY_HEIGHT = 160  # the least height of an overlay cell, in pixels (a map's own height when larger)
COLORBAR_LABEL = "saliency, 0 to 1 (jet colours, blended 50% over the photo)"


def choose_overlay_keys(df: pd.DataFrame, methods: list[str], count: int,
                        overlay_keys: Sequence[str] | None = None) -> list[str]:
    """The images of the overlay grid: ``overlay_keys`` in their order (checked: each must have an
    error-free row), else the first ``count`` keys (sorted) that every method explained.

    Raises:
        OverlayKeyError: unknown keys, or keys with error rows only (one line, a few valid keys).
    """
    ok = df[df["error"].isna()]
    if overlay_keys is None:
        complete = ok.groupby("key")["method"].nunique()
        return sorted(complete[complete == len(methods)].index)[:count]
    keys = list(dict.fromkeys(str(k) for k in overlay_keys))
    valid = set(ok["key"])
    bad = [k for k in keys if k not in valid]
    if bad:
        failed = [k for k in bad if k in set(df["key"])]
        unknown = [k for k in bad if k not in set(df["key"])]
        shown = sorted(valid)
        parts = ([f"unknown overlay key(s) {', '.join(map(repr, unknown[:5]))}{' …' if len(unknown) > 5 else ''}"]
                 if unknown else [])
        parts += [f"key(s) {', '.join(map(repr, failed[:5]))} have only error rows"] if failed else []
        raise OverlayKeyError(f"{'; '.join(parts)}; valid keys: {', '.join(shown[:5])}"
                              f"{f' … ({len(shown)} in all)' if len(shown) > 5 else ''}")
    return keys


def _caption(key: str, rows: pd.DataFrame) -> str:
    """A row label of the overlay grid: the key, the class the maps explain and the dataset label."""
    first = rows.iloc[0]
    lines = [key, f"explains: {fmt_text(first['target_name'])}", f"label: {fmt_text(first['label_name'])}"]
    return "\n".join(part for line in lines for part in textwrap.wrap(line, 26) or [""])


def _overlay_rows(run_dir: str, df: pd.DataFrame, methods: list[str], shards: dict[str, str | None],
                  keys: list[str]) -> tuple[list[str], list[str], list[list[Any]]] | str:
    """The overlay grid's rows: ``(keys, captions, cells)``, each cell a PIL image at its photo's
    aspect ratio (``orig_size``); or why there are none (a sentence)."""
    from PIL import Image, ImageDraw

    from unioncam.data.shards import iter_samples
    from unioncam.viz import overlay

    if not keys:
        return "no image has an error-free row for every method"
    names = {k: str(df.loc[df["key"] == k, "shard"].iloc[0]) for k in keys}
    wanted = {k: shards.get(name) for k, name in names.items()}
    paths = sorted({p for p in wanted.values() if p and storage.is_file(p)})
    if not paths:
        return "the shards these images came from are not readable where the run recorded them"
    try:  # only the maps files of these images' shards are opened
        got, meths, maps = read_saliency(run_dir, keys=keys, shards=sorted(set(names.values())))
    except KeyError as exc:
        return f"some images have no saved map ({exc.args[0] if exc.args else exc})"
    size = (int(maps.shape[1]), int(maps.shape[2]))
    samples = {s["key"]: s for s in iter_samples(paths, size) if s.get("key") in wanted and "image" in s}
    import torch

    lookup = {(k, m): torch.from_numpy(np.ascontiguousarray(a)) for k, m, a in zip(got, meths, maps, strict=True)}
    drawn = [k for k in keys if k in samples]
    if not drawn:
        return "their samples could not be read from the shards"
    height = max(size[0], OVERLAY_HEIGHT)
    ok = df[df["error"].isna()]
    captions, cells = [], []
    for key in drawn:
        h, w = samples[key].get("orig_size") or size
        width = round(height * min(max(w / h, 0.25), 4.0))
        row = []
        for method in methods:
            if (key, method) in lookup:
                row.append(overlay(samples[key]["image"], lookup[(key, method)]).resize(
                    (width, height), Image.Resampling.BILINEAR))
            else:
                blank = Image.new("RGB", (width, height), (200, 200, 200))
                ImageDraw.Draw(blank).text((6, height // 2 - 6), "no map (error row)", fill="black")
                row.append(blank)
        cells.append(row)
        captions.append(_caption(key, ok[ok["key"] == key]))
    return drawn, captions, cells


def _png_img(image: Any, alt: str) -> str:
    """A PIL image as an ``<img>`` with the PNG embedded (a data URI)."""
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    data = base64.b64encode(buf.getvalue()).decode("ascii")
    return f'<img src="data:image/png;base64,{data}" alt="{html.escape(alt)}">'


def _overlay_table(drawn: list[str], captions: list[str], methods: list[str], cells: list[list[Any]]) -> str:
    """The overlay grid for report.html: a table whose labels are HTML text (14 px, readable at any
    page width; the methods above, each image's key and classes left of its row) and whose cells are
    the overlays, each an embedded PNG; the colour bar under it."""
    from unioncam.viz import COLORBAR_WIDTH, colorbar

    head = "<tr><th></th>" + "".join(f"<th>{html.escape(m)}</th>" for m in methods) + "</tr>"
    body = "".join('<tr><th class="row">' + "<br>".join(map(html.escape, caption.split("\n"))) + "</th>"
                   + "".join(f"<td>{_png_img(cell, f'{key}, {m}')}</td>" for m, cell in zip(methods, row, strict=True))
                   + "</tr>" for key, caption, row in zip(drawn, captions, cells, strict=True))
    bar = _png_img(colorbar(COLORBAR_WIDTH, 12), "colour bar")
    return (f'<div class="ov"><table class="ov" id="overlays">{head}{body}</table></div>'
            f'<p class="ovbar">0{bar}1 {html.escape(COLORBAR_LABEL)}</p>')


def _overlay_grid(run_dir: str, df: pd.DataFrame, methods: list[str], shards: dict[str, str | None],
                  keys: list[str]) -> tuple[bytes | None, str, str]:
    """The overlay grid as a PNG (``overlays.png``, the markdown's; or None) and as HTML
    (:func:`_overlay_table`, report.html's), and a sentence for the report: what it shows, or why it
    is missing."""
    from unioncam.viz import grid

    result = _overlay_rows(run_dir, df, methods, shards, keys)
    if isinstance(result, str):
        return None, "", f"No overlays: {result}."
    drawn, captions, cells = result
    buf = io.BytesIO()
    grid(cells, captions, methods, colorbar_label=COLORBAR_LABEL).save(buf, format="PNG")
    ok = df[df["error"].isna()]
    listed = "; ".join(f"{k} (explains {fmt_text(ok.loc[ok['key'] == k, 'target_name'].iloc[0])}, label "
                       f"{fmt_text(ok.loc[ok['key'] == k, 'label_name'].iloc[0])})" for k in drawn)
    text = (f"Rows are images ({listed}), columns methods; each photo at its own aspect ratio; "
            "the colour bar is the saliency scale (0 → 1). Choose the images with: unioncam report RUN_DIR "
            "--overlay-keys KEY1,KEY2")
    return buf.getvalue(), _overlay_table(drawn, captions, methods, cells), text


# -- markdown and html -----------------------------------------------------------------------------
def _md(text: Any) -> str:
    """A table cell's text, safe in markdown: HTML escaped (keys, shard names and error texts come
    from the data), ``|`` escaped, newlines as spaces."""
    return html.escape(" ".join(str(text).split()), quote=False).replace("|", "\\|")


def _markdown(df: pd.DataFrame) -> str:
    """A text table (:func:`_formatted`) as markdown."""
    head = "| " + " | ".join(_md(c) for c in df.columns) + " |"
    rule = "|" + "|".join("---" for _ in df.columns) + "|"
    body = ["| " + " | ".join(_md(v) for v in row) + " |" for row in df.itertuples(index=False)]
    return "\n".join([head, rule, *body])


def _html_table(frame: pd.DataFrame, table_id: str | None = None) -> str:
    """A text table (:func:`_formatted`) as HTML, every cell escaped."""
    return frame.to_html(index=False, na_rep="–", border=0, classes="t", escape=True, table_id=table_id)


#: A report block: ("h2", text), ("p", text), ("notes", [text]), ("table", (frame, id)), ("img", (name, text))
#: or ("overlays", (name, text, html)): the markdown shows the figure ``name``, the html its table ``html``.
Block = tuple[str, Any]


def _render_md(blocks: list[Block]) -> str:
    out: list[str] = []
    for kind, value in blocks:
        if kind == "h2":
            out += [f"## {value}", ""]
        elif kind == "p":
            out += [str(value), ""]
        elif kind == "notes":
            out += [*(f"- {n}" for n in value), ""]
        elif kind == "table":
            out += [_markdown(value[0]), ""]
        elif kind in ("img", "overlays"):  # a caption names keys and classes from the data: HTML escaped
            out += [f"![{value[0]}]({value[0]})", ""] + ([html.escape(str(value[1]), quote=False), ""]
                                                         if value[1] else [])
    return "\n".join(out)


def _render_html(blocks: list[Block], figures: dict[str, bytes]) -> str:
    out: list[str] = []
    for kind, value in blocks:
        if kind == "h2":
            out.append(f"<h2>{html.escape(str(value))}</h2>")
        elif kind == "p":
            out.append(f"<p>{html.escape(str(value))}</p>")
        elif kind == "notes":
            out.append('<ul class="notes">' + "".join(f"<li>{html.escape(str(n))}</li>" for n in value) + "</ul>")
        elif kind == "table":
            out.append(_html_table(*value))
        elif kind == "img":
            name, text = value
            data = base64.b64encode(figures[name]).decode("ascii")
            caption = f"<figcaption>{html.escape(name)}{': ' if text else ''}{html.escape(str(text or ''))}"
            out.append(f'<figure><img src="data:image/png;base64,{data}" alt="{html.escape(name)}">'
                       f"{caption}</figcaption></figure>")
        elif kind == "overlays":
            name, text, table = value
            out.append(f"<figure>{table}<figcaption>{html.escape(str(text))}; {html.escape(name)} beside this "
                       "report is the same grid as one image.</figcaption></figure>")
    return "".join(out)


def protocol_lines(protocol: Protocol, steps: Any = None) -> list[str]:
    """The conventions ``protocol`` uses, one sentence each (the report's "Metric protocol")."""
    space = ("the pixels ([0, 1] images)" if protocol.space == "pixel"
             else "the model's normalized input (x − mean)/std, where zeros are the mean colour")
    drop = "relative to Y" if protocol.drop == "relative" else "absolute, max(0, Y−O)"
    if protocol.drop_eps:
        drop += f", Y + {protocol.drop_eps:g} in the denominator"
    lines = [f"Masks and baselines apply to {space}." + (
        " Average Drop/Increase mask the pixels ([0, 1] images), as reference."
        if protocol.masking(curves=False) != protocol.space else ""),
             f"Average Drop is {drop}; Y and O are softmax probabilities of the target class."]
    c = protocol.curves
    if c is None:
        lines.append("Insertion/deletion: none (the library defines no such curves).")
    else:
        step = "round(s·HW/steps) pixels at point s" if c.step_rule == "round" else "⌈HW/steps⌉ pixels per step"
        auc = "the trapezoid rule with equal spacing" if c.auc == "uniform" else "torch.trapezoid over the fraction"
        used = f"{steps} steps in this run ({c.steps} by default)" if steps is not None else f"{c.steps} steps"
        end = "zeros (black)" if protocol.space == "pixel" else "zeros (the mean colour)"
        start = f"a {c.blur_kernel} blur ({c.blur_padding} padding)" if c.insertion_start == "blur" else end
        lines.append(f"Insertion/deletion: {used}, {step}; insertion starts from {start}, deletion ends at {end}; "
                     f"ties in {c.ties} order; AUC by {auc}.")
    lines.append(f"Sources: {protocol.sources}.")
    return lines


def protocol_blocks(protocol: Protocol, steps: Any = None) -> list[Block]:
    """The report's "Metric protocol" section: the conventions used, and how each protocol differs."""
    others = [f"{p.name}{' (this run)' if p.name == protocol.name else ''}: {p.differs}."
              for p in map(get_protocol, PROTOCOL_NAMES)]
    return [("h2", f"Metric protocol: {protocol.name}"), ("notes", protocol_lines(protocol, steps)),
            ("p", "The protocols (rescore a run's maps with another: unioncam rescore RUN_DIR --protocol NAME):"),
            ("notes", others)]


def write_report(run_dir: str | os.PathLike[str], overlays: int = 4, max_class_rows: int = 60,
                 overlay_keys: Sequence[str] | None = None) -> dict[str, str]:
    """Aggregate a run's rows into ``RUN_DIR/report/`` (``run_dir`` a folder or a URI, the report is
    written beside the rows); returns the written locations by kind. Each file is written whole
    (:func:`unioncam.storage.write_bytes`). ``report.html`` embeds its figures (data URIs), so the
    file alone keeps them; the PNGs are written beside it too.

    ``overlay_keys`` chooses the images of the overlay grid (default: the first ``overlays`` keys
    that every method explained).

    Raises:
        OverlayKeyError: ``overlay_keys`` names images the run does not have (before anything is written).
    """
    run_dir = storage.absolute(run_dir)
    out = storage.join(run_dir, "report")
    df = load_rows(run_dir)
    top = int(df["rank"].max()) if df["rank"].notna().any() else 1
    if top > 1:  # --target topk:K: the tables describe the predicted class, as in a plain run
        df = df[df["rank"].isna() | (df["rank"] == 1)]
    manifest = load_manifest(run_dir) if storage.is_file(storage.join(run_dir, "manifest.json")) else {}
    config = manifest.get("config", {})
    methods = config.get("methods") or list(dict.fromkeys(df["method"]))
    methods = [m for m in methods if m in set(df["method"])]
    keys = choose_overlay_keys(df, methods, overlays, overlay_keys) if overlays or overlay_keys else []
    has_maps = bool(keys) and bool(run_files(run_dir, "maps"))
    if overlay_keys is not None and keys and not has_maps:
        raise OverlayKeyError(f"{storage.redact(run_dir)} has no maps (run with --no-maps): no overlays to draw")
    provs = {storage.basename(f).removesuffix(".parquet"): provenance_of(f)
             for f in run_files(run_dir, "metrics")}
    prov = next(iter(provs.values()))
    protocol = run_protocol(run_dir)
    requested = set(config["metrics"]) if isinstance(config.get("metrics"), list) else None
    label_target = str(prov.get("target", config.get("target"))) == "label" or (
        "target" not in prov and "target" not in config and df["rank"].isna().all())

    summary = summary_table(df, methods)
    per_class = per_class_table(df)
    per_predicted = None if label_target else per_class_table(df, by="target_name")
    ams_method = next(iter(section_methods(methods, "ams")), None)
    ams = ams_table(df, ams_method or "", predicted=not label_target)
    betas = beta_table(df, ams_method or "")
    written = {"summary": "summary.csv", "per_class": "per_class.csv"}
    storage.write_text(storage.join(out, "summary.csv"), summary.to_csv(index=False))
    storage.write_text(storage.join(out, "per_class.csv"), per_class.to_csv(index=False))
    if per_predicted is not None:
        storage.write_text(storage.join(out, "per_predicted.csv"), per_predicted.to_csv(index=False))
        written["per_predicted"] = "per_predicted.csv"
    if ams_method is not None:
        storage.write_text(storage.join(out, "ams.csv"), ams.to_csv(index=False))
        storage.write_text(storage.join(out, "ams_beta.csv"), betas.to_csv(index=False))
        written.update(ams="ams.csv", ams_beta="ams_beta.csv")

    listed = {name: entry.get("path") for name, entry in manifest.get("shards", {}).items()}
    shards = {name: p.get("shard_path") or listed.get(name) for name, p in provs.items()}  # older runs: manifest
    figures = _plots(df, summary)
    road_png = _road_plot(df, methods, list(prov.get("road_percentiles") or range(10, 100, 10)))
    if road_png:
        figures["road.png"] = road_png
    ams_png = _ams_plot(df, ams_method) if ams_method is not None else None
    if ams_png:
        figures["ams_beta.png"] = ams_png
    overlay_text = overlay_html = ""
    if keys or overlays:
        if not keys:
            overlay_text = "No overlays: no image has an error-free row for every method."
        elif not has_maps:
            overlay_text = "No overlays: the run saved no maps (--no-maps)."
        else:
            grid_png, overlay_html, overlay_text = _overlay_grid(run_dir, df, methods, shards, keys)
            if grid_png:
                figures["overlays.png"] = grid_png
    sanity = sanity_table(run_dir)
    if sanity is not None:
        storage.write_text(storage.join(out, "sanity.csv"), sanity.to_csv(index=False))
        written["sanity"] = "sanity.csv"
        figures["sanity.png"] = _sanity_plot(sanity)
    for name, data in figures.items():
        storage.write_bytes(storage.join(out, name), data)

    counts = manifest.get("counts", {})
    facts = {"run id": prov.get("run_id"), "dataset": prov.get("dataset"), "model": prov.get("model"),
             "weights sha256": prov.get("weights_sha256") or "(seeded/random)",
             "target layer": prov.get("target_layer"),
             "input size": prov.get("input_size"), "precision (methods)": prov.get("precision"),
             "target": prov.get("target") if top == 1 else f"{prov.get('target')} (the tables use rank 1, the "
             f"predicted class; metrics/ holds all {top} ranks)", "insertion/deletion steps": prov.get("insdel_steps"),
             "metric protocol": protocol.name + (f" (rescored from {prov['rescore_of']}: the same maps)"
                                                 if prov.get("rescore_of") else ""),
             "metrics requested": ", ".join(config["metrics"]) if requested is not None else "(not recorded)",
             "shards done / failed": f"{counts.get('shards_done', '?')} / {counts.get('shards_failed', '?')}",
             "images": df["key"].nunique(), "error rows": int(df["error"].notna().sum()),
             "versions": f"unioncam {prov.get('unioncam_version')}, torch {prov.get('torch_version')}, "
                         f"ray {prov.get('ray_version')}"}
    provided = provided_maps(methods)  # {method: (the method that computed its maps, its detail)}
    epg_note = _epg_note(df, None if requested is None else "epg" in requested, prov.get("dataset"))
    no_boxes = bool(df.loc[df["error"].isna(), "epg"].isna().all())
    table = _table1(summary, requested, no_boxes, dict.fromkeys(provided, "†") or None)
    drop_rule = ("100/N Σ max(0, Y−O)/Y" if protocol.drop == "relative" and not protocol.drop_eps else
                 f"100/N Σ max(0, Y−O)/(Y + {protocol.drop_eps:g})" if protocol.drop == "relative" else
                 "100/N Σ max(0, Y−O) (absolute)")
    notes = [FORMATS_NOTE,
             f"Average Drop = {drop_rule}; Average Increase = 100/N Σ 1[Y<O] (protocol {protocol.name}; "
             "see Metric protocol below); 95% percentile bootstrap CIs.",
             "s/image: the mean wall-clock seconds per image to compute the method's map (each batch's time over "
             "its images; scoring the metrics is not included), on this run's hardware and precision."]
    for other, (provider, key) in provided.items():
        notes.append(f"† {other}'s maps are {provider}'s {key} (REFERENCE.md: UnionCAM's L_Region is Score-CAM's "
                     f"map), computed once inside {provider}: {other}'s s/image counts only taking them over, and "
                     f"{provider}'s includes that work. Run {other} without {provider} to time it alone.")
    if epg_note:
        notes.append(epg_note)
    for method in methods:  # a method that may equal another (CAM.same_as), when their rows agree
        cls = declared(method)
        if cls is None or cls.same_as is None or cls.same_as[0] not in methods:
            continue
        other, why = cls.same_as
        same = identical_methods(df, other, method)
        if same:
            notes.append(f"{method} = {other} in this run: their rows (O and, where recorded, insertion/deletion "
                         f"AUC and EPG) agree on all {same} images. The target layer is "
                         f"{prov.get('target_layer')}: {why}.")

    blocks: list[Block] = [("h2", "Results (Table 1 layout)"), ("table", (table, "summary")), ("notes", notes)]
    if requested and "road" in requested:
        notes.append("ROAD (Rong et al., 2022; pytorch-grad-cam's ROADMostRelevantFirst/LeastRelevantFirst): the "
                     "most (MoRF) or least (LeRF) relevant 10…90% of the pixels (grad-cam's percentiles p = 90…10: "
                     "the pixels beyond the map's p-th percentile) replaced by noisy linear imputation; MoRF/LeRF "
                     "are the mean f_c over the percentiles, combined = (LeRF − MoRF)/2 (grad-cam's ROADCombined). "
                     "All three average over the same images (ROAD n, road_n in summary.csv): those with every "
                     "ROAD value defined; an image with a percentile whose threshold removed every pixel (NaN), "
                     "or on which ROAD failed, is left out of all three.")
        notes += road_notes(df, methods)
    blocks += [("img", (n, "")) for n in ("ad_ai.png", "distributions.png", "road.png") if n in figures]

    if sanity is not None:
        seed = provenance_of(run_files(run_dir, "sanity")[0]).get("sanity_seed")
        last = sanity.sort_values("step").groupby("method").tail(1).set_index("method")
        blocks += [("h2", "Sanity check: cascading model parameter randomization"),
                   ("p", f"Adebayo et al. (2018): the model's layers re-initialized from the logits down (seed {seed}, "
                         "one seed per layer), each method's maps recomputed on the randomized model and compared "
                         "with the original maps (mean over images; sanity.csv per step). A method whose maps "
                         "stay similar once the layers it explains are random does not depend on the model. "
                         "Fully randomized: " + "; ".join(f"{m} Spearman {fmt_auc(r['spearman'])}, SSIM "
                                                          f"{fmt_auc(r['ssim'])}" for m, r in last.iterrows()) + "."),
                   ("img", ("sanity.png", ""))]
    blocks += protocol_blocks(protocol, prov.get("insdel_steps") if requested is None or "insdel" in requested
                              else None)
    blocks.append(("h2", "UnionCAM's AMS branch"))
    run_row = ams[ams["by"] == "run"]
    if ams_method is None:
        blocks.append(("p", "No method of this run has an AMS branch (UnionCAM's is the `ams` section)."))
    elif run_row.empty:
        blocks.append(("p", f"No AMS decision recorded (no error-free {ams_method} row has `selected`)."))
    else:
        r = run_row.iloc[0]
        by_cls = "predicted" if not label_target else "label"
        shown_ams = ams[ams["by"] == by_cls].drop(columns="by").head(max_class_rows)
        blocks += [("p", f"AMS chose L_Dereg on {fmt_int(r['dereg'])} of {fmt_int(r['n'])} images "
                         f"({fmt_pct(r['dereg_pct'])}%) and L_Region on {fmt_int(r['region'])} "
                         f"({fmt_pct(r['region_pct'])}%); where it chose L_Region, {ams_method}'s map is "
                         "Score-CAM's. "
                         "AMS picks L_Dereg when β_dereg > β_reg (β: the target's score gain over a black image)."),
                   ("p", f"Per class (by the {'predicted class' if by_cls == 'predicted' else 'dataset label'}, "
                         "the class the maps explain; ams.csv has both groupings):"),
                   ("table", (_formatted(shown_ams), "ams")),
                   ("p", "The β's (ams_beta.csv; beta_dereg_minus_reg is the AMS margin):"),
                   ("table", (_formatted(betas), "ams_beta"))]
        blocks += [("img", ("ams_beta.png", ""))] if "ams_beta.png" in figures else []

    def class_section(frame: pd.DataFrame, title: str, what: str, csv: str) -> None:
        shown = _class_pivot(frame, methods).head(max_class_rows)
        n_classes = frame["class"].nunique()
        more = (f"first {max_class_rows} of {n_classes} classes; all, with CIs and Average Increase, in {csv}"
                if n_classes > max_class_rows else f"with CIs and Average Increase in {csv}")
        blocks.extend([("h2", title), ("p", f"{what} ({more})."),
                       ("table", (_formatted(shown, dict.fromkeys(methods, fmt_pct)), None))])

    class_section(per_class, "Per class, by dataset label: Average Drop (%)",
                  "Grouped by the dataset label (label_name)" + (
                      "; the maps explain the label (--target label), so this is also the explained class"
                      if label_target else "; the maps explain the predicted class: see the next table"),
                  "per_class.csv")
    if per_predicted is not None:
        class_section(per_predicted, "Per class, by predicted class: Average Drop (%)",
                      "Grouped by the predicted class (target_name), the class the maps explain", "per_predicted.csv")

    if overlay_text:
        blocks.append(("h2", "Overlays"))
        blocks.append(("overlays", ("overlays.png", overlay_text, overlay_html)) if "overlays.png" in figures
                      else ("p", overlay_text))
    errors = df[df["error"].notna()][["key", "shard", "method", "error"]].drop_duplicates(["key", "error"])
    if len(errors):
        blocks += [("h2", "Errors"), ("table", (_formatted(errors.head(50)), None))]

    md = ["# unioncam evaluation report", "", *[f"- **{k}**: {_md(v)}" for k, v in facts.items()], "",
          _render_md(blocks)]
    storage.write_text(storage.join(out, "report.md"), "\n".join(md))
    facts_html = "".join(f"<li><b>{html.escape(k)}</b>: {html.escape(str(v))}</li>" for k, v in facts.items())
    title = html.escape(f"unioncam report {prov.get('run_id')}")
    page = (f'<!doctype html><html><head><meta charset="utf-8"><title>{title}</title><style>{CSS}</style></head>'
            f"<body><h1>unioncam evaluation report</h1><ul>{facts_html}</ul>{_render_html(blocks, figures)}"
            "</body></html>")
    storage.write_text(storage.join(out, "report.html"), page)
    written.update(markdown="report.md", html="report.html")
    return {kind: storage.join(out, name) for kind, name in written.items()}
