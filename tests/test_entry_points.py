"""jobs/eval.py and its two wrappers: one evaluation entry, the dataset fixed or given."""

from __future__ import annotations

import importlib.util
import runpy
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
KIT_FOX = "n02119789"  # torchvision 278



# -- the one evaluation entry ---------------------------------------------------------------------
@pytest.fixture
def eval_entry(monkeypatch, fake_runner):
    """``jobs/eval.py`` as a module, with ``unioncam.service.runner`` replaced by a recorder (no Ray)."""
    spec = importlib.util.spec_from_file_location("eval", REPO / "jobs" / "eval.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    monkeypatch.setitem(sys.modules, "eval", module)  # what the wrappers import
    return module, fake_runner


def test_eval_entry_takes_the_dataset(eval_entry):
    entry, calls = eval_entry
    assert entry.main(["--limit", "3", "--dataset", "voc", "--methods", "gradcam"]) == 0
    assert entry.main(["--dataset=imagenet"]) == 0
    assert [(c.dataset, c.limit, c.shards) for c in calls] == [
        ("voc", 3, "datasets/sample/voc/sample-voc-*.tar"),
        ("imagenet", None, "datasets/sample/imagenet/sample-imagenet-*.tar")]
    assert calls[0].methods == ["gradcam"]


@pytest.mark.parametrize("argv", [[], ["--limit", "2"], ["--dataset", "cifar"], ["--data", "voc"]])
def test_eval_entry_refuses_a_missing_or_unknown_dataset(eval_entry, argv, capsys):
    entry, calls = eval_entry
    assert entry.main(argv) == 2
    assert "--dataset" in capsys.readouterr().err and calls == []


def test_eval_entry_help_without_a_dataset(eval_entry, capsys):
    entry, _ = eval_entry
    assert entry.main(["--help"]) == 0 and "--dataset" in capsys.readouterr().out


@pytest.mark.parametrize("dataset", ["imagenet", "voc"])
def test_the_two_documented_commands_are_the_entry_with_the_dataset_fixed(eval_entry, dataset, monkeypatch):
    _, calls = eval_entry
    monkeypatch.setattr(sys, "argv", [f"jobs/eval_{dataset}.py", "--limit", "5"])
    with pytest.raises(SystemExit) as exc:
        runpy.run_path(str(REPO / "jobs" / f"eval_{dataset}.py"), run_name="__main__")
    assert exc.value.code == 0 and [(c.dataset, c.limit) for c in calls] == [(dataset, 5)]
