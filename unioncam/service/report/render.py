"""Rendering the report's blocks as Markdown and as self-contained HTML."""

from __future__ import annotations

import base64
import html
from typing import Any

import pandas as pd

from unioncam.evaluation.protocols import PROTOCOL_NAMES, Protocol, get_protocol

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

