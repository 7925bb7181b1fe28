"""Evaluate saliency methods on VOC2007 test WebDataset shards with Ray (see ``--help``).

``ray job submit --address http://127.0.0.1:8265 --working-dir . --
    python jobs/eval_voc.py --shards ... --out /shared/run``
or directly ``python jobs/eval_voc.py`` (no arguments: the bundled sample on a local Ray cluster).
The same as ``python jobs/eval.py --dataset voc ...`` (:mod:`eval`).
"""

import sys

from eval import main  # jobs/eval.py, beside this file (a script's folder is first on sys.path)

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:], "voc"))
