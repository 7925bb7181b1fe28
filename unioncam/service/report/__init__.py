"""The run report: ``report/summary.csv``, ``per_class.csv``, ``per_predicted.csv``, ``ams.csv``,
``ams_beta.csv``, ``report.md``, ``report.html`` (self-contained: its figures are embedded) and plots.

Everything is recomputed from the Parquet rows (REFERENCE.md stores ``Y`` and ``O`` per image and
method): per-image drop ``100·max(0, Y−O)/Y`` and increase ``100·1[Y<O]``; Average Drop / Increase
are their means with a seeded 95% percentile bootstrap CI (:func:`unioncam.evaluation.summarize`).
Error rows are counted, never averaged.

The tables show one format per column (:func:`column_formats`): percentages with 2 decimals, AUCs
and EPG with 3, seconds with 3 significant digits, β's with 4. ``per_class.csv`` groups by the
dataset label (``label_name``), ``per_predicted.csv`` by the class the maps explain (``target_name``,
the predicted class); ``ams.csv`` counts UnionCAM's AMS branch per run and class, ``ams_beta.csv``
gives the β's quantiles.

Modules: :mod:`.data` reads the run once (:class:`RunData`: manifest, rows, provenance, sanity rows),
:mod:`.tables` computes every table once from it (the summary and Table 1 from the metric registry),
:mod:`.figures` draws the plots and overlays, :mod:`.formats` and :mod:`.render` turn the tables into
CSV, Markdown and HTML; :func:`write_report` puts them together.
"""

from __future__ import annotations

import html
import os
from collections.abc import Sequence

import pandas as pd

from unioncam import storage
from unioncam.evaluation import metric_classes
from unioncam.evaluation.base import ReportFacts
from unioncam.methods import provided_maps
from unioncam.service.report.data import RunData, load_rows
from unioncam.service.report.figures import (
    OverlayKeyError,
    _ams_plot,
    _curves_plot,
    _overlay_grid,
    _plots,
    _sanity_plot,
    choose_overlay_keys,
)
from unioncam.service.report.formats import FORMATS_NOTE, _formatted, fmt_auc, fmt_int, fmt_pct, fmt_sig3
from unioncam.service.report.render import CSS, Block, _md, _render_html, _render_md, protocol_blocks
from unioncam.service.report.tables import (
    _class_pivot,
    _table1,
    ams_table,
    beta_table,
    declared,
    identical_methods,
    per_class_table,
    sanity_table,
    section_methods,
    summary_columns,
    summary_table,
)

__all__ = ["CSS", "OverlayKeyError", "RunData", "fmt_auc", "fmt_int", "fmt_pct", "fmt_sig3", "identical_methods",
           "load_rows", "summary_columns", "summary_table", "write_report"]


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
    run = RunData.load(run_dir)  # the manifest and every file read once
    df, manifest, config, protocol = run.rows, run.manifest, run.config, run.protocol
    top = int(df["rank"].max()) if df["rank"].notna().any() else 1
    if top > 1:  # --target topk:K: the tables describe the predicted class, as in a plain run
        df = df[df["rank"].isna() | (df["rank"] == 1)]
    methods = config.get("methods") or list(dict.fromkeys(df["method"]))
    methods = [m for m in methods if m in set(df["method"])]
    keys = choose_overlay_keys(df, methods, overlays, overlay_keys) if overlays or overlay_keys else []
    has_maps = bool(keys) and bool(run.maps_files)
    if overlay_keys is not None and keys and not has_maps:
        raise OverlayKeyError(f"{storage.redact(run_dir)} has no maps (run with --no-maps): no overlays to draw")
    provs = run.provenance
    prov = next(iter(provs.values()))
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
    metric_facts = ReportFacts(protocol, prov, None if requested is None else frozenset(requested))
    ok = df[df["error"].isna()]
    # the metrics the report speaks of: those requested, or that have values (AI computed with AD: y, o)
    reported = [cls for cls in metric_classes() if requested is None or cls.name in requested
                or any(bool(ok[c].notna().any()) for c in cls.columns if c in ok)]
    figures = _plots(df, summary)
    for metric in reported:
        panels = metric.curves(df, methods, metric_facts) if metric.figure else []
        if panels:
            figures[str(metric.figure)] = _curves_plot(panels)
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
    sanity = sanity_table(run.sanity_rows)
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
    # no value of any metric that needs boxes (in ok, the error-free rows): the run had none
    no_boxes = all(bool(ok[c].isna().all()) for m in metric_classes() if m.needs_boxes for c in m.columns)
    table = _table1(summary, requested, no_boxes, dict.fromkeys(provided, "†") or None)
    # a metric's notes follow Table 1: one it shows only when requested (ROAD) speaks only then
    noted = [m for m in reported if not m.table_when_requested or (requested is not None and m.name in requested)]
    notes = [FORMATS_NOTE, *(note for m in noted for note in m.notes(df, methods, metric_facts)),
             "s/image: the mean wall-clock seconds per image to compute the method's map (each batch's time over "
             "its images; scoring the metrics is not included), on this run's hardware and precision."]
    for other, (provider, key) in provided.items():
        notes.append(f"† {other}'s maps are {provider}'s {key} (REFERENCE.md: UnionCAM's L_Region is Score-CAM's "
                     f"map), computed once inside {provider}: {other}'s s/image counts only taking them over, and "
                     f"{provider}'s includes that work. Run {other} without {provider} to time it alone.")
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
    curves = [str(m.figure) for m in reported if m.figure]
    blocks += [("img", (n, "")) for n in ("ad_ai.png", "distributions.png", *curves) if n in figures]

    if sanity is not None:
        seed = run.sanity_provenance.get("sanity_seed")
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
