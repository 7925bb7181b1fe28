"""The run report: ``report/summary.csv``, ``per_class.csv``, ``report.md``, ``report.html`` and plots.

Everything is recomputed from the Parquet rows (REFERENCE.md stores ``Y`` and ``O`` per image and
method): per-image drop ``100·max(0, Y−O)/Y`` and increase ``100·1[Y<O]``; Average Drop / Increase
are their means with a seeded 95% percentile bootstrap CI (:func:`unioncam.metrics.summarize`).
Error rows are counted, never averaged.
"""

from __future__ import annotations

import html
import io
import os
from typing import Any

import numpy as np
import pandas as pd

from unioncam import storage
from unioncam.metrics import summarize
from unioncam.service.results import load_manifest, provenance_of, read_metrics, read_saliency, run_files

CSS = """body{font-family:sans-serif;max-width:1200px;margin:2em auto;padding:0 1em;color:#222}
table.t{border-collapse:collapse;margin:1em 0;font-size:14px}
table.t th,table.t td{padding:4px 10px;border-bottom:1px solid #ddd;text-align:right}
table.t th{background:#f3f3f3}table.t td:first-child,table.t th:first-child{text-align:left}
img{max-width:100%;margin:0.5em 0}"""

SUMMARY_COLUMNS = ["method", "n", "errors", "average_drop", "ad_ci_low", "ad_ci_high", "average_increase",
                   "ai_ci_low", "ai_ci_high", "insertion_auc", "deletion_auc", "epg", "n_epg", "seconds_per_image"]


def load_rows(run_dir: str | os.PathLike[str]) -> pd.DataFrame:
    """All metrics rows with per-image ``drop`` and ``increase`` (percent) added."""
    df = read_metrics(run_dir).to_pandas()
    y, o = df["y"].astype(float), df["o"].astype(float)
    df["drop"] = 100.0 * (y - o).clip(lower=0) / y
    df["increase"] = np.where(y.isna() | o.isna(), np.nan, 100.0 * (y < o))
    return df


def _mean(values: pd.Series) -> float:
    values = values.dropna()
    return float(values.mean()) if len(values) else float("nan")


def summary_table(df: pd.DataFrame, methods: list[str] | None = None) -> pd.DataFrame:
    """One row per method: n, errors, AD and AI with 95% CIs, insertion/deletion AUC, EPG, s/image."""
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
        row.update(insertion_auc=_mean(ok["insertion_auc"]), deletion_auc=_mean(ok["deletion_auc"]),
                   epg=_mean(ok["epg"]), n_epg=int(ok["epg"].notna().sum()),
                   seconds_per_image=_mean(ok["seconds"]))
        rows.append(row)
    return pd.DataFrame(rows, columns=SUMMARY_COLUMNS)


def per_class_table(df: pd.DataFrame) -> pd.DataFrame:
    """Per method and labelled class: n, Average Drop and Increase with 95% CIs."""
    rows = []
    ok = df[df["error"].isna() & df["drop"].notna() & df["label_name"].notna()]
    for method, part in ok.groupby("method", sort=False):
        drops = summarize(part["drop"].to_numpy(), part["label_name"].tolist())[1:]
        incs = summarize(part["increase"].to_numpy(), part["label_name"].tolist())[1:]
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


def _png(fig: Any) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    return buf.getvalue()


def _plots(df: pd.DataFrame, summary: pd.DataFrame, out: str) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = []
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
        storage.write_bytes(storage.join(out, "ad_ai.png"), _png(fig))
        plt.close(fig)
        names.append("ad_ai.png")
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
        storage.write_bytes(storage.join(out, "distributions.png"), _png(fig))
        plt.close(fig)
        names.append("distributions.png")
    return names


def _overlay_grid(run_dir: str, df: pd.DataFrame, methods: list[str], shards: dict[str, str | None], count: int,
                  out: str) -> str | None:
    """A grid of the first ``count`` error-free images × all methods, if maps and shards
    (``shards``: shard name → tar path) are present."""
    from unioncam.data.shards import iter_samples
    from unioncam.viz import grid, overlay

    if count == 0 or not run_files(run_dir, "maps"):
        return None
    ok = df[df["error"].isna()]
    complete = ok.groupby("key")["method"].nunique()
    keys = sorted(complete[complete == len(methods)].index)[:count]
    wanted = {k: shards.get(df.loc[df["key"] == k, "shard"].iloc[0]) for k in keys}
    paths = sorted({p for p in wanted.values() if p and storage.is_file(p)})
    if not keys or not paths:
        return None
    got, meths, maps = read_saliency(run_dir, keys=keys)
    size = maps.shape[1:]
    images = {s["key"]: s["image"] for s in iter_samples(paths, size) if s.get("key") in wanted and "image" in s}
    import torch

    lookup = {(k, m): torch.from_numpy(a) for k, m, a in zip(got, meths, maps, strict=True)}
    keys = [k for k in keys if k in images]
    if not keys:
        return None
    cells = [[overlay(images[k], lookup[(k, m)]) for m in methods] for k in keys]
    buf = io.BytesIO()
    grid(cells, keys, methods).save(buf, format="PNG")
    storage.write_bytes(storage.join(out, "overlays.png"), buf.getvalue())
    return "overlays.png"


def _fmt(v: Any) -> str:
    if isinstance(v, (float, np.floating)):
        return "–" if np.isnan(v) else f"{v:.3f}" if abs(v) < 1 else f"{v:.2f}"
    return str(v)


def _table1(summary: pd.DataFrame) -> pd.DataFrame:
    """The paper's Table 1 layout: AD and AI with CIs, then the other metrics."""
    def ci(m: float, lo: float, hi: float) -> str:
        return "–" if np.isnan(m) else f"{m:.2f} [{lo:.2f}, {hi:.2f}]"

    return pd.DataFrame({
        "Method": summary["method"], "n": summary["n"], "errors": summary["errors"],
        "Average Drop % ↓ [95% CI]": [ci(*r) for r in
                                      summary[["average_drop", "ad_ci_low", "ad_ci_high"]].to_numpy()],
        "Average Increase % ↑ [95% CI]": [ci(*r) for r in
                                          summary[["average_increase", "ai_ci_low", "ai_ci_high"]].to_numpy()],
        "Insertion ↑": summary["insertion_auc"].map(_fmt), "Deletion ↓": summary["deletion_auc"].map(_fmt),
        "EPG ↑": summary["epg"].map(_fmt), "s/image": summary["seconds_per_image"].map(_fmt)})


def _md(text: Any) -> str:
    """A table cell's text, safe in markdown: HTML escaped (keys, shard names and error texts come
    from the data), ``|`` escaped, newlines as spaces."""
    return html.escape(" ".join(str(text).split()), quote=False).replace("|", "\\|")


def _markdown(df: pd.DataFrame) -> str:
    head = "| " + " | ".join(_md(c) for c in df.columns) + " |"
    rule = "|" + "|".join("---" for _ in df.columns) + "|"
    body = ["| " + " | ".join(_md(_fmt(v)) for v in row) + " |" for row in df.itertuples(index=False)]
    return "\n".join([head, rule, *body])


def write_report(run_dir: str | os.PathLike[str], overlays: int = 4, max_class_rows: int = 60) -> dict[str, str]:
    """Aggregate a run's rows into ``RUN_DIR/report/`` (``run_dir`` a folder or a URI, the report is
    written beside the rows); returns the written locations by kind. Each file is written whole
    (:func:`unioncam.storage.write_bytes`)."""
    run_dir = storage.absolute(run_dir)
    out = storage.join(run_dir, "report")
    df = load_rows(run_dir)
    top = int(df["rank"].max()) if df["rank"].notna().any() else 1
    if top > 1:  # --target topk:K: the tables describe the predicted class, as in a plain run
        df = df[df["rank"].isna() | (df["rank"] == 1)]
    manifest = load_manifest(run_dir) if storage.is_file(storage.join(run_dir, "manifest.json")) else {}
    methods = manifest.get("config", {}).get("methods") or list(dict.fromkeys(df["method"]))
    methods = [m for m in methods if m in set(df["method"])]
    summary = summary_table(df, methods)
    per_class = per_class_table(df)
    storage.write_text(storage.join(out, "summary.csv"), summary.to_csv(index=False))
    storage.write_text(storage.join(out, "per_class.csv"), per_class.to_csv(index=False))
    provs = {storage.basename(f).removesuffix(".parquet"): provenance_of(f)
             for f in run_files(run_dir, "metrics")}
    listed = {name: entry.get("path") for name, entry in manifest.get("shards", {}).items()}
    shards = {name: p.get("shard_path") or listed.get(name) for name, p in provs.items()}  # older runs: manifest
    images = _plots(df, summary, out)
    grid_name = _overlay_grid(run_dir, df, methods, shards, overlays, out)
    if grid_name:
        images.append(grid_name)
    prov = next(iter(provs.values()))
    counts = manifest.get("counts", {})
    facts = {"run id": prov.get("run_id"), "dataset": prov.get("dataset"), "model": prov.get("model"),
             "weights sha256": prov.get("weights_sha256") or "(seeded/random)",
             "target layer": prov.get("target_layer"),
             "input size": prov.get("input_size"), "precision (methods)": prov.get("precision"),
             "target": prov.get("target") if top == 1 else f"{prov.get('target')} (the tables use rank 1, the "
             f"predicted class; metrics/ holds all {top} ranks)", "insertion/deletion steps": prov.get("insdel_steps"),
             "shards done / failed": f"{counts.get('shards_done', '?')} / {counts.get('shards_failed', '?')}",
             "images": df["key"].nunique(), "error rows": int(df["error"].notna().sum()),
             "versions": f"unioncam {prov.get('unioncam_version')}, torch {prov.get('torch_version')}, "
                         f"ray {prov.get('ray_version')}"}
    table = _table1(summary)
    shared = ("scorecam's maps are UnionCAM's L_Region (computed once); its s/image counts only its own extra work."
              if {"scorecam", "unioncam"} <= set(methods) else "")
    shown = _class_pivot(per_class, methods).head(max_class_rows)
    n_classes = per_class["class"].nunique()
    more = (f"\n\n(first {max_class_rows} of {n_classes} classes; all, with CIs and AI, in per_class.csv)"
            if n_classes > max_class_rows else "\n\n(with CIs and Average Increase in per_class.csv)")
    errors = df[df["error"].notna()][["key", "shard", "method", "error"]].drop_duplicates(["key", "error"])

    md = ["# unioncam evaluation report", "", *[f"- **{k}**: {v}" for k, v in facts.items()], "",
          "## Results (Table 1 layout)", "", _markdown(table), "",
          "Average Drop = 100/N Σ max(0, Y−O)/Y; Average Increase = 100/N Σ 1[Y<O] (REFERENCE.md).", shared, "",
          *[f"![{n}]({n})" for n in images], "", "## Per class: Average Drop (%)", "",
          _markdown(shown) + more, ""]
    if len(errors):
        md += ["## Errors", "", _markdown(errors.head(50)), ""]
    storage.write_text(storage.join(out, "report.md"), "\n".join(md))

    def h(frame: pd.DataFrame) -> str:
        return frame.to_html(index=False, float_format=lambda v: _fmt(v), na_rep="–", border=0, classes="t")

    facts_html = "".join(f"<li><b>{html.escape(k)}</b>: {html.escape(str(v))}</li>" for k, v in facts.items())
    title = html.escape(f"unioncam report {prov.get('run_id')}")
    figures = "".join(f'<img src="{n}" alt="{n}">' for n in images)
    error_part = f"<h2>Errors</h2>{h(errors.head(50))}" if len(errors) else ""
    page = (f'<!doctype html><html><head><meta charset="utf-8"><title>{title}</title><style>{CSS}</style></head>'
            f"<body><h1>unioncam evaluation report</h1><ul>{facts_html}</ul>"
            f"<h2>Results (Table 1 layout)</h2>{h(table)}"
            "<p>Average Drop = 100/N &Sigma; max(0, Y&minus;O)/Y; Average Increase = 100/N &Sigma; 1[Y&lt;O]; "
            f"95% percentile bootstrap CIs. {html.escape(shared)}</p>"
            f"{figures}<h2>Per class: Average Drop (%)</h2>{h(shown)}{html.escape(more)}{error_part}</body></html>")
    storage.write_text(storage.join(out, "report.html"), page)
    return {kind: storage.join(out, name) for kind, name in (
        ("summary", "summary.csv"), ("per_class", "per_class.csv"), ("markdown", "report.md"), ("html", "report.html"))}
