"""The run report (issue 16, items 1-8): why EPG is empty, the AMS branch, label vs predicted class,
XGrad-CAM = Grad-CAM, number formats, a self-contained report.html, overlays, and an HTML check.

Runs are real (tiny_cnn on the sample photos, :class:`ShardEvaluator`, no Ray), with a manifest
written as the job writes it.
"""

from __future__ import annotations

import base64
import html.parser
import io
import json
import math
import re
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image
from service_data import make_shards

from unioncam.cli import main as cli_main
from unioncam.data.shards import iter_samples
from unioncam.service import EvalConfig
from unioncam.service.report import (
    CSS,
    OverlayKeyError,
    fmt_auc,
    fmt_pct,
    fmt_sig3,
    identical_methods,
    load_rows,
    write_report,
)
from unioncam.service.report.figures import _overlay_rows
from unioncam.service.worker import ShardEvaluator
from unioncam.viz import COLORBAR_WIDTH, colorbar, grid

METHODS = ["gradcam", "xgradcam", "scorecam", "unioncam"]
EPG_WHY = "EPG: no boxes in these shards (ImageNet shards have boxes only when converted with --boxes)."


def _run(root: Path, n_images: int, boxes: bool, methods: list[str], metrics: list[str],
         manifest_metrics: list[str] | None = None) -> Path:
    """Evaluate every shard of a fresh shard set into ``root/run`` and write its manifest.json
    (``manifest_metrics``: the metrics the manifest records, default ``metrics``)."""
    shards = make_shards(root / "shards", n_images=n_images, shard_size=6, boxes=boxes, bad=True)
    cfg = EvalConfig(shards=str(root / "shards" / "*.tar"), out=str(root / "run"), model="tiny_cnn",
                     methods=methods, metrics=metrics, insdel_steps=4).resolved()
    evaluator = ShardEvaluator(cfg, "cpu", run_id="rep1")
    entries = {}
    for shard in shards:
        c = evaluator.evaluate(str(shard), cfg.out)
        entries[shard.name.removesuffix(".tar")] = {"status": "done", "path": str(shard), "attempts": 1,
                                                    **{k: c[k] for k in ("images", "rows", "maps", "errors")}}
    identity = {**cfg.identity(), "metrics": manifest_metrics if manifest_metrics is not None else metrics}
    (root / "run" / "manifest.json").write_text(json.dumps(
        {"format": "unioncam-run/1", "run_id": "rep1", "config": identity, "shards": entries,
         "counts": {"shards_done": len(entries), "shards_failed": 0}}))
    return root / "run"


@pytest.fixture(scope="module")
def boxed(tmp_path_factory) -> Path:
    """11 photos (the 11th, chelsea_010, rotated to portrait) with boxes, 4 methods, every metric."""
    run = _run(tmp_path_factory.mktemp("boxed"), 11, True, METHODS, ["ad", "ai", "insdel", "epg"])
    write_report(run, overlays=2)
    return run


@pytest.fixture(scope="module")
def boxless(tmp_path_factory) -> Path:
    """3 photos without boxes, EPG requested."""
    return _run(tmp_path_factory.mktemp("boxless"), 3, False, ["gradcam"], ["ad", "epg"])


def rows_of(run: Path) -> pd.DataFrame:
    rows = pd.concat([pd.read_parquet(f) for f in sorted((run / "metrics").glob("*.parquet"))])
    return rows[rows["error"].isna()]


class HTMLCheck(html.parser.HTMLParser):
    """Tags balanced (void elements aside), no <script>, every <img> src a data: URI or a file beside it."""

    VOID = frozenset({"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "source", "track",
                      "wbr"})

    def __init__(self, folder: Path) -> None:
        super().__init__(convert_charrefs=True)
        self.folder, self.stack, self.problems, self.images = folder, [], [], []

    def handle_starttag(self, tag, attrs):
        if tag == "script":
            self.problems.append("a <script> element")
        if tag == "img":
            src = dict(attrs).get("src") or ""
            self.images.append((dict(attrs).get("alt"), src))
            if not (src.startswith("data:image/png;base64,") or (self.folder / src).is_file()):
                self.problems.append(f"<img> src {src[:60]!r} is neither a data URI nor a file")
        if tag not in self.VOID:
            self.stack.append((tag, self.getpos()))

    def handle_endtag(self, tag):
        if tag in self.VOID:
            return
        if not self.stack or self.stack[-1][0] != tag:
            self.problems.append(f"</{tag}> at {self.getpos()} closes {self.stack[-1] if self.stack else 'nothing'}")
            return
        self.stack.pop()

    def check(self, text: str) -> list[str]:
        self.feed(text)
        self.close()
        return self.problems + [f"<{t}> at {pos} never closed" for t, pos in self.stack]


class TableCells(html.parser.HTMLParser):
    """The text of every cell of ``<table id=table_id>``, row by row (header row first)."""

    def __init__(self, table_id: str) -> None:
        super().__init__(convert_charrefs=True)
        self.table_id, self.inside, self.rows, self.cell = table_id, False, [], None

    def handle_starttag(self, tag, attrs):
        if tag == "table" and dict(attrs).get("id") == self.table_id:
            self.inside = True
        elif self.inside and tag == "tr":
            self.rows.append([])
        elif self.inside and tag in ("td", "th"):
            self.cell = ""

    def handle_endtag(self, tag):
        if tag == "table":
            self.inside = False
        elif self.inside and tag in ("td", "th") and self.cell is not None:
            self.rows[-1].append(self.cell.strip())
            self.cell = None

    def handle_data(self, data):
        if self.cell is not None:
            self.cell += data


def html_table(page: str, table_id: str) -> pd.DataFrame:
    parser = TableCells(table_id)
    parser.feed(page)
    head, *body = parser.rows
    return pd.DataFrame(body, columns=head)


def md_table(md: str, header_start: str) -> pd.DataFrame:
    lines = md.splitlines()
    i = next(i for i, line in enumerate(lines) if line.startswith(header_start))
    rows = []
    for line in lines[i:]:
        if not line.startswith("|"):
            break
        rows.append([c.strip() for c in line.strip("|").split(" | ")])
    return pd.DataFrame(rows[2:], columns=rows[0])


# -- 1. empty EPG -------------------------------------------------------------------------------------
def test_empty_epg_says_why_in_the_table_md_and_html(boxless, boxed, tmp_path):
    paths = write_report(boxless, overlays=0)
    md, page = Path(paths["markdown"]).read_text(), Path(paths["html"]).read_text()
    summary = pd.read_csv(paths["summary"])
    assert summary["n_epg"].tolist() == [0] and summary["epg"].isna().all()
    assert md_table(md, "| Method")["EPG ↑"].tolist() == ["no boxes"]
    assert html_table(page, "summary")["EPG ↑"].tolist() == ["no boxes"]
    assert f"- {EPG_WHY}" in md and f"<li>{EPG_WHY}</li>" in page
    # no manifest: the requested metrics are unknown, so the report says both possible reasons
    bare = tmp_path / "bare"
    shutil.copytree(boxless, bare, ignore=shutil.ignore_patterns("manifest.json", "report"))
    md_bare = Path(write_report(bare, overlays=0)["markdown"]).read_text()
    assert "EPG: no values: no boxes in these shards (ImageNet shards have boxes only when converted with " \
           "--boxes), or epg was not requested." in md_bare
    # epg not requested: said so, and no talk of boxes
    manifest = json.loads((boxless / "manifest.json").read_text())
    manifest["config"]["metrics"] = ["ad"]
    other = tmp_path / "other"
    shutil.copytree(boxless, other, ignore=shutil.ignore_patterns("report"))
    (other / "manifest.json").write_text(json.dumps(manifest))
    md_other = Path(write_report(other, overlays=0)["markdown"]).read_text()
    assert md_table(md_other, "| Method")["EPG ↑"].tolist() == ["not requested"] and "no boxes" not in md_other
    # with boxes: numbers, no note
    md_boxed = (boxed / "report" / "report.md").read_text()
    summary_boxed = pd.read_csv(boxed / "report" / "summary.csv").set_index("method")
    assert md_table(md_boxed, "| Method")["EPG ↑"].tolist() == [fmt_auc(summary_boxed.loc[m, "epg"]) for m in METHODS]
    assert "no boxes" not in md_boxed and (summary_boxed["n_epg"] == 11).all()


# -- 2. the AMS branch ----------------------------------------------------------------------------------
def test_ams_branch_counts_per_run_and_class_and_beta_quantiles(boxed):
    rows = rows_of(boxed)
    u = rows[rows["method"] == "unioncam"]
    ams = pd.read_csv(boxed / "report" / "ams.csv")
    run = ams[ams["by"] == "run"].iloc[0]
    dereg = int((u["selected"] == "dereg").sum())
    assert (run["n"], run["dereg"], run["region"]) == (11, dereg, 11 - dereg)
    assert run["dereg_pct"] == pytest.approx(100 * dereg / 11) and set(u["selected"]) <= {"dereg", "region"}
    for by, col in (("label", "label_name"), ("predicted", "target_name")):
        part = ams[ams["by"] == by].set_index("class")
        expected = {c: (len(g), int((g["selected"] == "dereg").sum())) for c, g in u.groupby(col)}
        assert {c: (r["n"], r["dereg"]) for c, r in part.iterrows()} == expected
    betas = pd.read_csv(boxed / "report" / "ams_beta.csv").set_index("beta")
    for col in ("beta_den", "beta_reg", "beta_dereg"):
        v = u[col].to_numpy()
        assert betas.loc[col, "n"] == 11
        assert betas.loc[col, ["min", "q25", "median", "q75", "max"]].to_numpy() == pytest.approx(
            np.quantile(v, [0, 0.25, 0.5, 0.75, 1]))
        assert betas.loc[col, "mean"] == pytest.approx(v.mean())
    margin = (u["beta_dereg"] - u["beta_reg"]).to_numpy()
    assert betas.loc["beta_dereg_minus_reg", "median"] == pytest.approx(np.median(margin))
    assert int((margin > 0).sum()) == dereg  # AMS: L_Dereg exactly when β_dereg > β_reg
    md, page = (boxed / "report" / "report.md").read_text(), (boxed / "report" / "report.html").read_text()
    line = (f"AMS chose L_Dereg on {dereg} of 11 images ({100 * dereg / 11:.2f}%) and L_Region on {11 - dereg} "
            f"({100 * (11 - dereg) / 11:.2f}%)")
    assert line in md and line in page and "## UnionCAM's AMS branch" in md
    shown = html_table(page, "ams_beta").set_index("beta")
    assert shown.loc["beta_reg", "median"] == f"{np.median(u['beta_reg']):.4f}"
    assert (boxed / "report" / "ams_beta.png").stat().st_size > 1000 and 'alt="ams_beta.png"' in page


# -- 3. label or predicted class ---------------------------------------------------------------------
def test_per_class_tables_by_label_and_by_predicted_class(boxed):
    rows = rows_of(boxed)
    rows = rows.assign(drop=100 * (rows["y"] - rows["o"]).clip(lower=0) / rows["y"])
    for name, col in (("per_class.csv", "label_name"), ("per_predicted.csv", "target_name")):
        table = pd.read_csv(boxed / "report" / name).set_index(["method", "class"])
        expected = rows.groupby(["method", col])["drop"].agg(["size", "mean"])
        assert sorted(table.index) == sorted(expected.index), name
        for idx, r in expected.iterrows():
            assert table.loc[idx, "n"] == r["size"] and table.loc[idx, "average_drop"] == pytest.approx(r["mean"])
    labels = set(pd.read_csv(boxed / "report" / "per_class.csv")["class"])
    assert labels == {f"class_{i}" for i in range(10)}  # per_class.csv stays by label (its old content)
    md = (boxed / "report" / "report.md").read_text()
    assert "## Per class, by dataset label: Average Drop (%)" in md
    assert "Grouped by the dataset label (label_name)" in md
    assert "## Per class, by predicted class: Average Drop (%)" in md
    assert "Grouped by the predicted class (target_name), the class the maps explain" in md


# -- 4. XGrad-CAM = Grad-CAM -------------------------------------------------------------------------
def test_xgradcam_equal_to_gradcam_is_noted(boxed, boxless):
    md = (boxed / "report" / "report.md").read_text()
    assert "xgradcam = gradcam in this run: their rows (O and, where recorded, insertion/deletion AUC and EPG) " \
           "agree on all 11 images." in md
    df = load_rows(boxed)
    assert identical_methods(df, "gradcam", "xgradcam") == 11
    changed = df.copy()
    pick = changed.index[(changed["method"] == "xgradcam") & changed["error"].isna()][3]
    changed.loc[pick, "o"] *= 1.001
    assert identical_methods(changed, "gradcam", "xgradcam") == 0
    assert identical_methods(df, "gradcam", "scorecam") == 0
    assert "xgradcam = gradcam" not in Path(write_report(boxless, overlays=0)["markdown"]).read_text()


# -- 5. number formats ---------------------------------------------------------------------------------
def test_one_number_format_per_column_and_the_seconds_note(boxed):
    assert (fmt_pct(10.4), fmt_pct(0.0), fmt_auc(0.0), fmt_auc(0.12345)) == ("10.40", "0.00", "0.000", "0.123")
    assert [fmt_sig3(v) for v in (0.028312, 10.44, 9.996, 1234.5, 0.0000582, 0.0)] == [
        "0.0283", "10.4", "10.0", "1230", "0.0000582", "0.00"]
    md = (boxed / "report" / "report.md").read_text()
    table = md_table(md, "| Method")
    ci = re.compile(r"^\d+\.\d{2} \[\d+\.\d{2}, \d+\.\d{2}\]$")
    assert table["Average Drop % ↓ [95% CI]"].str.match(ci).all()
    assert table["Average Increase % ↑ [95% CI]"].str.match(ci).all()
    for col in ("Insertion ↑", "Deletion ↓", "EPG ↑"):
        assert table[col].str.match(r"^\d\.\d{3}$").all(), col
    for cell in table["s/image"]:
        digits = cell.split()[0].replace(".", "").lstrip("0")
        assert len(digits) == 3, cell
    assert table.set_index("Method").loc["scorecam", "s/image"].endswith(" †")
    after = md[md.index("| unioncam |"):md.index("![ad_ai.png]")]  # the notes right under the table
    assert "- s/image: the mean wall-clock seconds per image to compute the method's map" in after
    assert "- † scorecam's maps are unioncam's region_map (REFERENCE.md: UnionCAM's L_Region" in after
    assert "- Formats: percentages" in after


# -- 6. a self-contained report.html -------------------------------------------------------------------
def test_report_html_alone_keeps_its_figures(boxed, tmp_path):
    page = (boxed / "report" / "report.html").read_text()
    alone = tmp_path / "copied" / "report.html"
    alone.parent.mkdir()
    shutil.copy(boxed / "report" / "report.html", alone)
    check = HTMLCheck(alone.parent)
    assert check.check(page) == []
    figures = [(alt, src) for alt, src in check.images if alt.endswith(".png")]
    assert [alt for alt, _ in figures] == ["ad_ai.png", "distributions.png", "ams_beta.png"]
    for alt, src in figures:
        data = base64.b64decode(src.removeprefix("data:image/png;base64,"))
        assert data == (boxed / "report" / alt).read_bytes(), alt  # the PNG files are kept beside it
    # the overlay grid is an HTML table of embedded PNGs (its 2 × 4 cells and the colour bar); the
    # markdown shows overlays.png, the same grid as one image, kept beside the report
    assert len(check.images) == 3 + 2 * len(METHODS) + 1
    assert "![overlays.png](overlays.png)" in (boxed / "report" / "report.md").read_text()
    assert (boxed / "report" / "overlays.png").stat().st_size > 1000


# -- 7. overlays ------------------------------------------------------------------------------------------
def _find_row(canvas: np.ndarray, strip: np.ndarray) -> bool:
    """Whether ``strip`` (W×3) appears as a run of pixels in some row of ``canvas``."""
    w = len(strip)
    for row in canvas:
        starts = np.flatnonzero((row[: len(row) - w + 1] == strip[0]).all(axis=1))
        if any((row[s:s + w] == strip).all() for s in starts):
            return True
    return False


def test_grid_keeps_each_images_size_and_draws_a_colour_bar():
    wide, tall = Image.new("RGB", (120, 60), "red"), Image.new("RGB", (40, 60), "green")
    plain = grid([[wide, wide], [tall, tall]], ["a", "b\nsecond line"], ["m1", "m2"])
    barred = np.asarray(grid([[wide, wide], [tall, tall]], ["a", "b"], ["m1", "m2"], colorbar_label="saliency"))
    bar = np.asarray(colorbar(COLORBAR_WIDTH, 1))[0]
    assert tuple(bar[0]) == (0, 0, 128) and tuple(bar[-1]) == (128, 0, 0)  # jet(0), jet(1)
    assert _find_row(barred, bar) and not _find_row(np.asarray(plain), bar)
    arr = np.asarray(plain)
    assert (np.all(arr == (0, 128, 0), axis=2).sum()) == 2 * 40 * 60  # the tall cells unstretched
    assert (np.all(arr == (255, 0, 0), axis=2).sum()) == 2 * 120 * 60


def test_overlays_at_the_photos_aspect_with_class_names_chosen_keys_and_colour_bar(boxed, tmp_path, capsys):
    df = load_rows(boxed)
    keys = ["chelsea_010", "chelsea_000"]
    shards = {s: str(boxed.parent / "shards" / f"{s}.tar") for s in ("t-000000", "t-000001")}
    orig = {s["key"]: s["orig_size"] for s in iter_samples(list(shards.values()), (64, 64)) if "image" in s}
    assert orig["chelsea_000"] == (80, 96) and orig["chelsea_010"] == (96, 80)  # landscape, portrait
    drawn, captions, cells = _overlay_rows(str(boxed), df, METHODS, shards, keys)
    assert drawn == keys and [len(r) for r in cells] == [4, 4]
    for key, row in zip(drawn, cells, strict=True):
        h, w = orig[key]
        assert all(c.height == 160 and c.width == round(160 * w / h) for c in row), key
    ok = df[df["error"].isna()].set_index(["key", "method"])
    target = ok.loc[("chelsea_010", "gradcam"), "target_name"]
    assert captions[0] == f"chelsea_010\nexplains: {target}\nlabel: {ok.loc[('chelsea_010', 'gradcam'), 'label_name']}"

    out = tmp_path / "run"
    shutil.copytree(boxed, out, ignore=shutil.ignore_patterns("report"))
    md = Path(write_report(out, overlay_keys=keys)["markdown"]).read_text()
    assert f"Rows are images (chelsea_010 (explains {target}, label class_0); chelsea_000 (" in md
    png = np.asarray(Image.open(out / "report" / "overlays.png").convert("RGB"))
    assert _find_row(png, np.asarray(colorbar(COLORBAR_WIDTH, 1))[0])

    before = (out / "report" / "report.md").read_text()
    with pytest.raises(OverlayKeyError, match=r"^unknown overlay key\(s\) 'nope'; key\(s\) 'corrupt' have only "
                                              r"error rows; valid keys: astronaut_002, "):
        write_report(out, overlay_keys=["nope", "corrupt", "chelsea_000"])
    assert (out / "report" / "report.md").read_text() == before  # refused before anything was written
    assert cli_main(["report", str(out), "--overlay-keys", "nope,chelsea_000"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "unioncam: error: --overlay-keys: unknown overlay key(s) 'nope'; valid keys: " \
                                      "astronaut_002, camera_006, chelsea_000, chelsea_010, clock_motion_007 … " \
                                      "(11 in all)" in err
    assert cli_main(["report", str(out), "--overlay-keys", " chelsea_000 ,"]) == 0
    assert "Rows are images (chelsea_000 (explains" in (out / "report" / "report.md").read_text()


class OverlayImages(html.parser.HTMLParser):
    """The ``alt`` and decoded pixels of every ``<img>`` inside ``<table id="overlays">``."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.inside, self.images = False, {}

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "table" and a.get("id") == "overlays":
            self.inside = True
        elif tag == "img" and self.inside:
            assert a["src"].startswith("data:image/png;base64,")  # embedded: the page alone keeps them
            data = base64.b64decode(a["src"].removeprefix("data:image/png;base64,"))
            self.images[a["alt"]] = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))

    def handle_endtag(self, tag):
        if tag == "table":
            self.inside = False


def css_font_px(css: str, chain: list[tuple[str, set[str]]]) -> float:
    """The computed font-size in px of the last element of ``chain`` (``(tag, classes)`` from ``html``
    down) under ``css``: the most specific (then last) rule of the element that sets it, else its
    parent's; descendant selectors only, px sizes only (a relative size would fail here), 16 px default."""
    rules = [(sel.strip(), body) for sels, body in re.findall(r"([^{}]+)\{([^}]*)\}", css) for sel in sels.split(",")]

    def matches(compound: str, element: tuple[str, set[str]]) -> bool:
        tag, *classes = compound.split(".")
        return tag in ("", element[0]) and set(classes) <= element[1]

    def selects(selector: str, depth: int) -> bool:
        *outer, last = selector.split()
        if not matches(last, chain[depth]):
            return False
        i = depth - 1
        for compound in reversed(outer):
            while i >= 0 and not matches(compound, chain[i]):
                i -= 1
            if i < 0:
                return False
            i -= 1
        return True

    size = 16.0
    for depth in range(len(chain)):
        declared = [(sel.count(".") + sel.count(":"), len(sel.split()), n, m.group(1), m.group(2))
                    for n, (sel, body) in enumerate(rules) if selects(sel, depth)
                    for m in [re.search(r"font-size:\s*([\d.]+)(\w+|%)", body)] if m]
        if declared:
            value, unit = max(declared)[3:]
            assert unit == "px", f"font-size {value}{unit}"
            size = float(value)
    return size


def test_overlay_labels_are_html_text_at_least_12px(boxed):
    """The overlay grid's labels are HTML text in a table (not baked into a PNG the page shrinks):
    the method names and each image's key/classes render at ≥ 12 px at any page width, and each cell
    is its overlay, embedded."""
    page = (boxed / "report" / "report.html").read_text()
    assert f"<style>{CSS}</style>" in page
    table = html_table(page, "overlays")
    assert list(table.columns) == ["", *METHODS] and len(table) == 2
    assert all("explains: " in label and "label: " in label for label in table[""])
    keys = [label.split("explains: ")[0] for label in table[""]]  # the key, then the classes (lines: <br>)
    chain = [("html", set()), ("body", set()), ("figure", set()), ("div", {"ov"}), ("table", {"ov"}), ("tr", set())]
    method_px = css_font_px(CSS, [*chain, ("th", set())])
    row_px = css_font_px(CSS, [*chain, ("th", {"row"})])
    bar_px = css_font_px(CSS, [("html", set()), ("body", set()), ("figure", set()), ("p", {"ovbar"})])
    assert min(method_px, row_px, bar_px) >= 12, (method_px, row_px, bar_px)
    assert css_font_px("body{font-size:16px} table.ov th{font-size:4px}", [*chain, ("th", set())]) == 4  # it checks
    # the cells: each method's overlay of each image, embedded, pixel for pixel the grid's
    shards = {s: str(boxed.parent / "shards" / f"{s}.tar") for s in ("t-000000", "t-000001")}
    drawn, _, cells = _overlay_rows(str(boxed), load_rows(boxed), METHODS, shards, keys)
    parser = OverlayImages()
    parser.feed(page)
    assert drawn == keys and len(parser.images) == 2 * len(METHODS)
    for key, row in zip(drawn, cells, strict=True):
        for method, cell in zip(METHODS, row, strict=True):
            assert np.array_equal(parser.images[f"{key}, {method}"], np.asarray(cell)), (key, method)
    assert 'class="ovbar">0<img' in page and 'alt="colour bar">1 saliency, 0 to 1' in page


# -- 12. ROAD over the same images ------------------------------------------------------------------
def _with_road(run: Path, out: Path, values: dict[tuple[str, int], tuple[list | None, list | None]]) -> Path:
    """A copy of the 1-method ``run`` with its rows duplicated as xgradcam, ROAD requested, and the
    ROAD lists ``values[(method, i)]`` on the i-th error-free row of each method (others: finite)."""
    shutil.copytree(run, out, ignore=shutil.ignore_patterns("report"))
    rng = np.random.default_rng(0)
    for f in sorted((out / "metrics").glob("*.parquet")):
        table = pq.read_table(f)
        renamed = pa.array(["xgradcam"] * len(table), pa.string())
        table = pa.concat_tables([table, table.set_column(table.schema.get_field_index("method"),
                                                          table.schema.field("method"), renamed)])
        seen: dict[str, int] = {}
        morf, lerf = [], []
        for method, error in zip(table["method"].to_pylist(), table["error"].to_pylist(), strict=True):
            m = lv = None
            if error is None:
                i = seen[method] = seen.get(method, -1) + 1
                m, lv = values.get((method, i), (rng.uniform(0, 0.5, 3).tolist(), rng.uniform(0.5, 1, 3).tolist()))
            morf.append(m)
            lerf.append(lv)
        for name, col in (("road_morf", morf), ("road_lerf", lerf)):
            table = table.set_column(table.schema.get_field_index(name), table.schema.field(name),
                                     pa.array(col, pa.list_(pa.float64())))
        pq.write_table(table, f)
    manifest = json.loads((out / "manifest.json").read_text())
    manifest["config"].update(methods=["gradcam", "xgradcam"], metrics=["ad", "ai", "epg", "road"])
    (out / "manifest.json").write_text(json.dumps(manifest))
    return out


def test_road_morf_lerf_and_combined_over_the_same_images(boxless, tmp_path):
    run = _with_road(boxless, tmp_path / "road", {
        ("gradcam", 0): ([None, 0.2, 0.3], [0.5, 0.6, 0.7]),  # a NaN in MoRF only
        ("xgradcam", 0): ([None, None, None], [0.5, 0.6, 0.9]),  # MoRF NaN at every percentile
        ("xgradcam", 1): (None, None)})  # ROAD failed
    paths = write_report(run, overlays=0)
    summary = pd.read_csv(paths["summary"]).set_index("method")
    rows = rows_of(run)
    for method, n in (("gradcam", 2), ("xgradcam", 1)):
        mine = rows[rows["method"] == method]
        both = [(np.mean(m), np.mean(lv)) for m, lv in zip(mine["road_morf"], mine["road_lerf"], strict=True)
                if m is not None and lv is not None and np.isfinite(np.array(m, float)).all()]
        assert len(mine) == 3 and summary.loc[method, "road_n"] == len(both) == n
        r = summary.loc[method]
        assert r["road_morf"] == pytest.approx(np.mean([m for m, _ in both]), abs=1e-12)
        assert r["road_lerf"] == pytest.approx(np.mean([lv for _, lv in both]), abs=1e-12)
        assert r["road_combined"] == (r["road_lerf"] - r["road_morf"]) / 2  # exactly
    md, page = Path(paths["markdown"]).read_text(), Path(paths["html"]).read_text()
    assert md_table(md, "| Method")["ROAD n"].tolist() == ["2", "1"] == html_table(page, "summary")["ROAD n"].tolist()
    notes = ["ROAD: 1 image(s) of method gradcam left out (ROAD n = 2 of 3): 1 where a ROAD threshold removed "
             "every pixel (NaN).",
             "ROAD: 2 image(s) of method xgradcam left out (ROAD n = 1 of 3): 1 where a ROAD threshold removed "
             "every pixel (NaN), 1 where ROAD failed (no values)."]
    for note in notes:
        assert f"- {note}" in md and f"<li>{note}</li>" in page
    assert "All three average over the same images (ROAD n, road_n in summary.csv)" in md
    assert (run / "report" / "road.png").is_file()


def test_road_notes_follow_table_1_when_it_failed_everywhere_or_was_not_requested(boxless, tmp_path):
    """ROAD requested and failed on every image: the notes still say so (Table 1 shows ROAD n = 0). ROAD values
    in a run that did not request ROAD (a rescore with --metrics ad keeps them): no ROAD notes, as Table 1
    shows no ROAD column; its figure is still drawn."""
    run = _with_road(boxless, tmp_path / "failed", {(m, i): (None, None) for m in ("gradcam", "xgradcam")
                                                    for i in range(3)})
    md = Path(write_report(run, overlays=0)["markdown"]).read_text()
    assert "- ROAD: 3 image(s) of method gradcam left out (ROAD n = 0 of 3): 3 where ROAD failed (no values)." in md
    assert "All three average over the same images" in md and not (run / "report" / "road.png").exists()

    kept = _with_road(boxless, tmp_path / "kept", {})
    manifest = json.loads((kept / "manifest.json").read_text())
    manifest["config"]["metrics"] = ["ad", "ai", "epg"]
    (kept / "manifest.json").write_text(json.dumps(manifest))
    md = Path(write_report(kept, overlays=0)["markdown"]).read_text()
    assert "ROAD" not in md.split("## Results")[1].split("\n## ")[0].replace("road.png", "")
    assert (kept / "report" / "road.png").is_file()


# -- 8. checking the report ---------------------------------------------------------------------------
def test_html_check_catches_broken_pages(tmp_path):
    assert HTMLCheck(tmp_path).check("<html><body><p>ok<br></p></body></html>") == []
    assert HTMLCheck(tmp_path).check("<html><body><p>open</body></html>")
    assert HTMLCheck(tmp_path).check("<html><body><script>x</script></body></html>")
    assert HTMLCheck(tmp_path).check('<html><body><img src="missing.png"></body></html>')


def test_report_html_is_valid_for_a_whatwg_parser(boxed):
    """html5lib (the WHATWG HTML parsing algorithm) in strict mode: any parse error fails."""
    html5lib = pytest.importorskip("html5lib")
    page = (boxed / "report" / "report.html").read_text()
    parser = html5lib.HTMLParser(strict=True)
    parser.parse(page)  # raises html5lib.html5parser.ParseError on the first error
    assert parser.errors == []


def test_every_number_in_the_html_summary_equals_the_csv_in_its_format(boxed):
    page = (boxed / "report" / "report.html").read_text()
    assert HTMLCheck(boxed / "report").check(page) == []
    shown = html_table(page, "summary").set_index("Method")
    csv = pd.read_csv(boxed / "report" / "summary.csv").set_index("method")
    assert list(shown.index) == METHODS == list(csv.index)
    formats = {"n": ("n", "{:.0f}"), "errors": ("errors", "{:.0f}"), "Insertion ↑": ("insertion_auc", "{:.3f}"),
               "Deletion ↓": ("deletion_auc", "{:.3f}"), "EPG ↑": ("epg", "{:.3f}")}
    checked = 0
    for method in METHODS:
        row, want = shown.loc[method], csv.loc[method]
        for col, (name, spec) in formats.items():
            assert row[col] == spec.format(want[name]), (method, col)
            checked += 1
        for col, cols in (("Average Drop % ↓ [95% CI]", ("average_drop", "ad_ci_low", "ad_ci_high")),
                          ("Average Increase % ↑ [95% CI]", ("average_increase", "ai_ci_low", "ai_ci_high"))):
            assert row[col] == "{:.2f} [{:.2f}, {:.2f}]".format(*(want[c] for c in cols)), (method, col)
            checked += 3
        seconds = float(re.sub(r"[^0-9.]", "", row["s/image"]))
        exponent = math.floor(math.log10(abs(want["seconds_per_image"])))
        assert seconds == pytest.approx(round(want["seconds_per_image"], 2 - exponent), rel=1e-9), method
        checked += 1
    numbers = re.findall(r"\d+(?:\.\d+)?", " ".join(shown.to_numpy().ravel()))
    assert len(numbers) == checked  # nothing else numeric in the table


def _same_number(cell: str, value: float) -> bool:
    """``cell`` shows ``value`` at the precision it prints (its decimals)."""
    decimals = len(cell.split(".")[1]) if "." in cell else 0
    return abs(float(cell) - float(value)) <= 0.5 * 10 ** -decimals + 1e-12


def test_every_number_in_the_html_ams_tables_equals_their_csvs(boxed):
    page = (boxed / "report" / "report.html").read_text()
    ams = pd.read_csv(boxed / "report" / "ams.csv")
    ams = ams[ams["by"] == "predicted"].drop(columns="by").reset_index(drop=True)
    shown = html_table(page, "ams")
    assert len(shown) == len(ams) > 0
    checked = 0
    for i in range(len(ams)):
        for col in ams.columns:
            cell = str(shown.iloc[i][col]).replace(",", "")
            if col == "class":
                assert cell == str(ams.iloc[i][col])
                continue
            assert _same_number(cell, ams.iloc[i][col]), (i, col, cell, ams.iloc[i][col])
            checked += 1
    betas = pd.read_csv(boxed / "report" / "ams_beta.csv")
    shown_b = html_table(page, "ams_beta")
    assert list(shown_b["beta"]) == list(betas["beta"])
    for i in range(len(betas)):
        for col in betas.columns[1:]:
            assert _same_number(str(shown_b.iloc[i][col]).replace(",", ""), betas.iloc[i][col]), (i, col)
            checked += 1
    assert checked > 20
