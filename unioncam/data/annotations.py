"""PASCAL VOC-style annotation XML (``<object><name>…<bndbox>…``), as VOC2007 and ImageNet's val boxes use it.

One parser for both converters: it returns each object's box as written, in the file's own pixel
convention (both datasets write inclusive pixel indices); :mod:`unioncam.data.voc` and
:mod:`unioncam.data.imagenet` convert to continuous coordinates (:mod:`unioncam.evaluation`) themselves.
"""

from __future__ import annotations

import os
import xml.etree.ElementTree as ET
from dataclasses import dataclass

BOX_TAGS: tuple[str, ...] = ("xmin", "ymin", "xmax", "ymax")


@dataclass(frozen=True)
class XMLObject:
    """One ``<object>``: its ``name`` (stripped), its ``<bndbox>`` as written (``xmin, ymin, xmax,
    ymax``; a missing coordinate is NaN; None when the object has no ``<bndbox>``), and the
    ``difficult`` and ``truncated`` flags (``1`` is True; absent is False)."""

    name: str
    box: tuple[float, float, float, float] | None
    difficult: bool
    truncated: bool


def xml_objects(root: ET.Element) -> list[XMLObject]:
    """Every ``<object>`` under ``root``, in document order.

    Raises:
        ValueError: a coordinate is not a number.
    """
    out = []
    for obj in root.iter("object"):
        bb = obj.find("bndbox")
        box = None if bb is None else tuple(float(bb.findtext(t, "nan")) for t in BOX_TAGS)
        out.append(XMLObject(obj.findtext("name", "").strip(), box,  # type: ignore[arg-type]
                             difficult=obj.findtext("difficult", "0").strip() == "1",
                             truncated=obj.findtext("truncated", "0").strip() == "1"))
    return out


def read_xml_objects(path: str | os.PathLike[str]) -> list[XMLObject]:
    """:func:`xml_objects` of the annotation file ``path``.

    Raises:
        OSError: the file cannot be read. xml.etree.ElementTree.ParseError: it is not XML.
        ValueError: a coordinate is not a number.
    """
    return xml_objects(ET.parse(path).getroot())


def parse_xml_objects(text: str | bytes) -> list[XMLObject]:
    """:func:`xml_objects` of an annotation given as a string."""
    return xml_objects(ET.fromstring(text))
