"""The report's figures (PNG bytes): metric plots, metrics' curves (ROAD), AMS β's, the sanity check and the
overlay grid."""

from __future__ import annotations

import base64
import html
import io
import textwrap
from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd

from unioncam import storage
from unioncam.evaluation import metric_classes
from unioncam.evaluation.base import CurvePanel
from unioncam.service.report.formats import fmt_text
from unioncam.service.results import read_saliency


class OverlayKeyError(ValueError):
    """``overlay_keys`` names images the run cannot draw (the message lists a few valid keys)."""


def _curves_plot(panels: Sequence[CurvePanel]) -> bytes:
    """A metric's curves (:meth:`Metric.curves <unioncam.evaluation.base.Metric.curves>`): one panel
    each, a line per method labelled with its image count."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 3.8), squeeze=False)
    for ax, panel in zip(axes[0], panels, strict=True):
        for method, (xs, ys, n) in panel.lines.items():
            ax.plot(xs, ys, marker="o", label=f"{method} (n={n})")
        ax.set_xlabel(panel.xlabel)
        ax.set_ylabel(panel.ylabel)
        ax.set_title(panel.title)
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    data = _png(fig)
    plt.close(fig)
    return data


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
    shown = {c: t for cls in metric_classes() for c, t in cls.distributions.items()}  # each metric's, in its order
    panels = [(c, t) for c, t in shown.items() if c in ok and ok[c].notna().any()]
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
