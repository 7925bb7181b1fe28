"""Evaluate saliency methods on WebDataset shards with Ray: ``--dataset imagenet`` (ILSVRC2012 val) or
``--dataset voc`` (VOC2007 test) picks the label names and box semantics; every other option is the
job's (``python jobs/eval.py --dataset imagenet --help``). It is ``unioncam eval`` (:mod:`unioncam.cli`).

``ray job submit --address http://127.0.0.1:8265 --working-dir . --
    python jobs/eval.py --dataset voc --shards ... --out /shared/run``
or directly ``python jobs/eval.py --dataset imagenet`` (no other arguments: the bundled sample on a local
Ray cluster). ``jobs/eval_imagenet.py`` and ``jobs/eval_voc.py`` are this entry with the dataset fixed.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence


def main(argv: Sequence[str] | None = None, dataset: str | None = None) -> int:
    """Run the evaluation job as ``unioncam eval``; ``dataset`` given (the two wrappers) means
    ``argv`` has no ``--dataset``."""
    from unioncam.cli import main as cli

    args = list(sys.argv[1:] if argv is None else argv)
    return cli(["eval", *([f"--dataset={dataset}"] if dataset else []), *args])


if __name__ == "__main__":
    sys.exit(main())
