"""Packaging: a library-only install (torch, torchvision, numpy, pillow) works without the service
extra; ``unioncam`` and ``unioncam.cli`` never import Ray; the command line's ``--version``, help
texts and ``unioncam eval``."""

from __future__ import annotations

import argparse
import ast
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

import unioncam
from unioncam.cli import build_parser, main

REPO = Path(__file__).resolve().parent.parent
CORE = {"torch", "torchvision", "numpy", "pillow"}
# the modules of the service extra, and of the packages around it that a library user must not pay for
SERVICE_MODULES = ("ray", "pyarrow", "pandas", "matplotlib", "yaml", "scipy")
IMPORT_NAMES = {"PIL": "pillow"}  # top-level module → package, where they differ


def python(code: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, capture_output=True, text=True, timeout=300)


def requirement_name(spec: str) -> str:
    match = re.match(r"[A-Za-z0-9][A-Za-z0-9._-]*", spec)
    assert match, spec
    return re.sub(r"[-_.]+", "-", match.group(0)).lower()


@pytest.fixture(scope="module")
def pyproject() -> dict:
    toml = pytest.importorskip("tomllib" if sys.version_info >= (3, 11) else "tomli")  # 3.10 has no tomllib
    with open(REPO / "pyproject.toml", "rb") as handle:
        return toml.load(handle)


# -- dependencies --------------------------------------------------------------------------------
def test_core_dependencies_are_the_four_library_packages(pyproject):
    core = [requirement_name(d) for d in pyproject["project"]["dependencies"]]
    assert sorted(core) == sorted(CORE)


def test_the_service_extra_holds_ray_parquet_and_the_report(pyproject):
    extras = pyproject["project"]["optional-dependencies"]
    service = extras["service"]
    names = {requirement_name(d) for d in service}
    assert any(re.match(r"ray\[[^]]*\bdefault\b", d) for d in service), service
    assert names == set(unioncam._SERVICE_MODULES.values())  # the CLI's "needs X" hint names each of them
    assert {"ray", "pyarrow", "pandas", "pyyaml", "matplotlib", "scipy"} <= names
    for kept in ("test", "demo", "dev", "s3", "models", "bench"):
        assert kept in extras


def test_the_makefile_installs_the_service_extra():
    install = [line for line in (REPO / "Makefile").read_text().splitlines() if "pip install" in line and "-e" in line]
    assert any(re.search(r"-e '\.\[service,test,demo,dev\]'", line) for line in install), install


def test_the_package_version_is_unioncam_version(pyproject):
    assert pyproject["project"]["version"] == unioncam.__version__


def _module_level_imports(path: Path) -> set[str]:
    """Top-level names of the modules ``path`` imports when it is imported (not in functions, not
    under ``if TYPE_CHECKING``)."""
    names: set[str] = set()

    def visit(body: list[ast.stmt]) -> None:
        for node in body:
            if isinstance(node, ast.Import):
                names.update(a.name.partition(".")[0] for a in node.names)
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names.add(node.module.partition(".")[0])
            elif isinstance(node, ast.If) and "TYPE_CHECKING" not in ast.unparse(node.test):
                visit(node.body)
                visit(node.orelse)
            elif isinstance(node, ast.Try):
                visit(node.body)

    visit(ast.parse(path.read_text()).body)
    return names


def test_the_library_modules_import_only_core_packages_at_module_level():
    """Every module outside ``unioncam/service/`` imports, when imported, only the standard library,
    unioncam and the four core packages (anything else is imported inside the function that needs it)."""
    stdlib = sys.stdlib_module_names
    bad = {}
    for path in sorted((REPO / "unioncam").rglob("*.py")):
        if "service" in path.relative_to(REPO / "unioncam").parts:
            continue
        third_party = {IMPORT_NAMES.get(n, n) for n in _module_level_imports(path)} - set(stdlib) - {"unioncam"}
        if third_party - CORE:
            bad[str(path.relative_to(REPO))] = sorted(third_party - CORE)
    assert bad == {}


# -- a library-only install ------------------------------------------------------------------------
def test_import_unioncam_imports_no_service_module(tmp_path):
    for module in ("unioncam", "unioncam.cli", "unioncam.service", "unioncam.service.config"):
        proc = python(f"import {module}, sys; print(sorted(m for m in {SERVICE_MODULES!r} if m in sys.modules))",
                      tmp_path)
        assert proc.returncode == 0, proc.stderr
        assert proc.stdout.strip() == "[]", (module, proc.stdout)


LIBRARY_ONLY = r"""
import json, sys
for m in SERVICE_MODULES:
    sys.modules[m] = None  # as if not installed: `import m` raises ModuleNotFoundError, find_spec gives None
import numpy as np
import torch
from PIL import Image
import unioncam
from unioncam.cli import main

out = {}
lm = unioncam.load("tiny_cnn")
res = unioncam.explain(lm, torch.rand(2, 3, *lm.input_size), "unioncam")
out["maps"] = list(res.maps.shape)
out["gradcam"] = list(unioncam.explain(lm, torch.rand(1, 3, *lm.input_size), "gradcam", targets=[3]).maps.shape)
Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 50, 3), dtype=np.uint8)).save("photo.jpg")
out["explain_rc"] = main(["explain", "photo.jpg", "--model", "tiny_cnn", "--method", "gradcam,unioncam",
                          "--out", "overlays", "--device", "cpu"])
try:
    unioncam.read_saliency
    out["read_saliency"] = "imported"
except ImportError as exc:
    out["read_saliency"] = str(exc)
from unioncam import *  # noqa: F403 (works without the extra)
out["rc"] = {cmd: main(argv) for cmd, argv in {"report": ["report", "run"], "verify": ["verify", "run"],
                                               "eval": ["eval", "--dataset", "voc", "--limit", "1"]}.items()}
out["imported"] = sorted(m for m in SERVICE_MODULES if sys.modules.get(m) is not None)
print(json.dumps(out))
"""


def test_the_library_and_explain_work_without_the_service_extra(tmp_path):
    proc = python(f"SERVICE_MODULES = {SERVICE_MODULES!r}\n{LIBRARY_ONLY}", tmp_path)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["maps"] == [2, 64, 64] and out["gradcam"] == [1, 64, 64]
    assert out["explain_rc"] == 0
    assert sorted(p.name for p in (tmp_path / "overlays").iterdir()) == ["photo_gradcam.png", "photo_unioncam.png"]
    assert "needs pyarrow" in out["read_saliency"] and "pip install 'unioncam[service]'" in out["read_saliency"]
    assert out["rc"] == {"report": 2, "verify": 2, "eval": 2}
    errors = [line for line in proc.stderr.splitlines() if line.startswith("unioncam: error:")]
    assert errors == [f"unioncam: error: unioncam {cmd} needs {pkg}, from the service extra: "
                      "pip install 'unioncam[service]'" for cmd, pkg in (("report", "pandas"), ("verify", "pyarrow"),
                                                                          ("eval", "ray"))], proc.stderr
    assert out["imported"] == []


def test_read_saliency_is_still_unioncam_read_saliency():
    from unioncam import read_saliency
    from unioncam.service.results import read_saliency as original

    assert read_saliency is original and unioncam.read_saliency is original and "read_saliency" in dir(unioncam)
    with pytest.raises(AttributeError, match="no attribute 'nosuch'"):
        unioncam.nosuch  # noqa: B018


def test_the_service_package_exports_on_first_use():
    import unioncam.service as service
    from unioncam.service.config import ConfigError, EvalConfig

    assert (service.ConfigError, service.EvalConfig) == (ConfigError, EvalConfig)
    assert set(service.__all__) <= set(dir(service))
    with pytest.raises(AttributeError):
        service.nosuch  # noqa: B018


# -- the command line ----------------------------------------------------------------------------
def test_version(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--version"])
    assert exc.value.code == 0 and capsys.readouterr().out == f"unioncam {unioncam.__version__}\n"


def test_the_console_script_prints_the_version(tmp_path):
    script = Path(sys.executable).parent / "unioncam"
    if not script.is_file():
        pytest.skip("the unioncam console script is not installed beside this Python")
    proc = subprocess.run([str(script), "--version"], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert (proc.returncode, proc.stdout) == (0, f"unioncam {unioncam.__version__}\n")


def _parsers(parser: argparse.ArgumentParser, name: str = "unioncam"):
    yield name, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub_name, sub in action.choices.items():
                yield from _parsers(sub, f"{name} {sub_name}")


def test_help_has_no_markup():
    for name, parser in _parsers(build_parser()):
        text = parser.format_help()
        for markup in ("``", ":func:", ":mod:", ":class:", ":data:", ":meth:"):
            assert markup not in text, (name, markup)
    assert build_parser().description.startswith("Class activation maps")


def test_every_argument_has_help():
    from unioncam.service.config import build_parser as job_parser

    missing = []
    parsers = [*_parsers(build_parser()), *((f"eval --dataset {d}", job_parser(d)) for d in ("imagenet", "voc"))]
    for name, parser in parsers:
        for action in parser._actions:
            if not (isinstance(action.help, str) and action.help.strip()) or action.help == argparse.SUPPRESS:
                missing.append(f"{name}: {'/'.join(action.option_strings) or action.dest}")
    assert missing == []


def test_eval_help_shows_the_jobs_options(capsys):
    assert main(["eval", "--dataset", "imagenet", "--help"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: unioncam eval --dataset imagenet") and "--shards" in out and "--config" in out
    assert main(["eval", "--dataset", "voc", "-h"]) == 0
    assert "--shards" in capsys.readouterr().out
    assert main(["eval", "--help"]) == 0  # without a dataset: this command's own help
    out = capsys.readouterr().out
    assert "--dataset {imagenet,voc}" in out and "unioncam eval --dataset imagenet --help" in out


@pytest.mark.parametrize("argv", [["eval"], ["eval", "--limit", "2"], ["eval", "--dataset", "cifar"],
                                  ["eval", "--data", "voc"]])
def test_eval_without_a_valid_dataset_is_a_one_line_error(argv, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("unioncam: error:") and "--dataset" in err[0]


def test_eval_refuses_a_config_of_the_other_dataset(tmp_path, capsys):
    config = tmp_path / "job.yaml"
    config.write_text("dataset: imagenet\n")
    assert main(["eval", "--dataset", "voc", "--config", str(config)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "dataset: imagenet" in err[0] and "voc" in err[0]


def test_eval_reports_a_bad_job_option_under_its_own_name(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["eval", "--dataset", "voc", "--no-such-option"])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and "unioncam eval --dataset voc: error: unrecognized arguments: --no-such-option" in err


def test_other_commands_still_refuse_unknown_arguments(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["verify", "run", "--limit", "2"])
    assert exc.value.code == 2 and "unrecognized arguments: --limit 2" in capsys.readouterr().err




def test_eval_passes_every_other_argument_to_the_job(fake_runner, tmp_path):
    assert main(["eval", "--limit", "3", "--dataset", "voc", "--methods", "gradcam", "--target=topk:2"]) == 0
    assert main(["eval", "--dataset=imagenet"]) == 0
    out = str(tmp_path / "run")
    assert main(["eval", "--dataset", "imagenet", "--shards", "s/*.tar", "--out", out, "--limit", "1"]) == 0
    from unioncam.methods import default_methods

    # parsed once, by the CLI: the job gets the resolved config
    assert [(c.dataset, c.limit, c.methods, c.target, c.shards, c.out) for c in fake_runner] == [
        ("voc", 3, ["gradcam"], "topk:2", "datasets/sample/voc/sample-voc-*.tar", "runs/sample-voc"),
        ("imagenet", None, default_methods(), "predicted", "datasets/sample/imagenet/sample-imagenet-*.tar",
         "runs/sample-imagenet"),
        ("imagenet", 1, default_methods(), "predicted", "s/*.tar", out)]


def test_eval_checks_the_options_before_the_job_starts(fake_runner, capsys):
    assert main(["eval", "--dataset", "imagenet", "--shards", "s/*.tar"]) == 2  # no --out
    assert "--out RUN_DIR is required" in capsys.readouterr().err and fake_runner == []


def test_eval_help_and_errors_do_not_import_ray(tmp_path):
    (tmp_path / "job.yaml").write_text("dataset: imagenet\n")
    code = ("import sys\nfrom unioncam.cli import main\n"
            "assert main(['eval', '--dataset', 'imagenet', '--help']) == 0\n"
            "assert main(['eval', '--dataset', 'voc', '--config', 'job.yaml']) == 2\n"
            "assert main(['eval']) == 2\n"
            "print('ray' in sys.modules)")
    proc = python(code, tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().splitlines()[-1] == "False"


def test_readmes_method_table_has_every_registered_method_once():
    """Docs that match the code: one row per registered method in README's table, in registry order."""
    import re

    from unioncam.methods import METHODS

    readme = (REPO / "README.md").read_text()
    table = readme[readme.index("## Methods"):readme.index("## Performance at a glance")]
    rows = re.findall(r"^\| `([a-z]+)` \| (gradient|score|activation) \|", table, flags=re.MULTILINE)
    assert [name for name, _ in rows] == METHODS.names()
    assert all(METHODS.get(name).family == family for name, family in rows)
