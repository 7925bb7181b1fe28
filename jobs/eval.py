"""Evaluate saliency methods on WebDataset shards with Ray: ``--dataset imagenet`` (ILSVRC2012 val) or
``--dataset voc`` (VOC2007 test) picks the label names and box semantics; every other option is the
job's (``python jobs/eval.py --dataset imagenet --help``).

``ray job submit --address http://127.0.0.1:8265 --working-dir . --
    python jobs/eval.py --dataset voc --shards ... --out /shared/run``
or directly ``python jobs/eval.py --dataset imagenet`` (no other arguments: the bundled sample on a local
Ray cluster). ``jobs/eval_imagenet.py`` and ``jobs/eval_voc.py`` are this entry with the dataset fixed.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

DATASETS: tuple[str, ...] = ("imagenet", "voc")


def split_dataset(argv: Sequence[str]) -> tuple[str, list[str]]:
    """``(dataset, the other arguments)``: ``--dataset`` is taken out (spelled in full, ``--dataset X`` or
    ``--dataset=X``), the rest is left for :func:`unioncam.service.runner.main`. A missing or unknown
    dataset exits with code 2 (argparse's usage error); ``--help`` without a dataset prints this entry's
    usage and exits 0."""
    pre = argparse.ArgumentParser(prog="eval.py", usage="%(prog)s --dataset {imagenet,voc} [job options ...]",
                                  add_help=False, allow_abbrev=False,
                                  description="Evaluate saliency methods on WebDataset shards with Ray.",
                                  epilog="the job's options: eval.py --dataset imagenet --help")
    pre.add_argument("--dataset", choices=DATASETS, help="which dataset the shards hold (required)")
    args, rest = pre.parse_known_args(list(argv))
    if args.dataset is None:
        if "-h" in rest or "--help" in rest:
            pre.print_help()
            raise SystemExit(0)
        pre.error("the following arguments are required: --dataset")
    return args.dataset, rest


def main(argv: Sequence[str] | None = None, dataset: str | None = None) -> int:
    """Run the evaluation job; ``dataset`` given (the two wrappers) means ``argv`` has no ``--dataset``."""
    args = list(sys.argv[1:] if argv is None else argv)
    if dataset is None:
        dataset, args = split_dataset(args)
    from unioncam.service.runner import main as run_job  # imports Ray: after the arguments are checked

    return run_job(args, dataset)


if __name__ == "__main__":
    sys.exit(main())
