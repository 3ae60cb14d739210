"""Packaging. Every package under fxpasses/ is listed in pyproject.toml's `[tool.setuptools] packages`: an
editable install finds unlisted subpackages anyway, a wheel silently leaves them out."""
from __future__ import annotations

import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_every_subpackage_is_listed():
    listed = set(tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {".".join(p.parent.relative_to(REPO).parts) for p in (REPO / "fxpasses").rglob("__init__.py")}
    assert found - listed == set(), f"packages missing from pyproject.toml: {sorted(found - listed)}"


def _built_wheel(tmp_path: Path) -> Path:
    """fxpasses' wheel, built from a copy of the sources (an in-tree build would leave build/ and
    *.egg-info in the checkout) with the environment's setuptools, offline."""
    import shutil
    import subprocess
    import sys

    src = tmp_path / "src"
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for d in ("fxpasses", "patterns"):
        shutil.copytree(REPO / d, src / d, ignore=ignore)
    for f in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / f, src / f)
    out = tmp_path / "dist"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                    "--no-index", "-w", str(out), str(src)], check=True, capture_output=True, text=True)
    (wheel,) = out.glob("fxpasses-*.whl")
    return wheel


def test_the_wheel_declares_a_torch_range_the_product_plugin_only_and_ships_the_pattern_sets(tmp_path):
    import configparser
    import zipfile

    from packaging.requirements import Requirement
    from packaging.version import Version

    wheel = _built_wheel(tmp_path)
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
        info = next(n for n in names if n.endswith(".dist-info/METADATA")).rsplit("/", 1)[0]
        meta = z.read(f"{info}/METADATA").decode()
        eps = configparser.ConfigParser()
        eps.read_string(z.read(f"{info}/entry_points.txt").decode())
    reqs = [Requirement(line.split(":", 1)[1].strip()) for line in meta.splitlines()
            if line.startswith("Requires-Dist:")]
    runtime = [r for r in reqs if r.marker is None]
    assert [r.name for r in runtime] == ["torch"], reqs
    torch_req = runtime[0].specifier
    # a range, not a pin: the oldest tested torch and every newer 2.x minor, never torch 3
    assert Version("2.13.0") in torch_req and Version("2.14.1") in torch_req and Version("2.99") in torch_req
    assert Version("2.12.0") not in torch_req and Version("3.0") not in torch_req
    vllm = [r for r in reqs if r.name.startswith("vllm")]
    assert vllm and all(r.marker is not None and "extra" in str(r.marker) for r in vllm), vllm
    assert dict(eps["vllm.general_plugins"]) == {"fxpasses": "fxpasses.plugin:register"}
    assert dict(eps["console_scripts"]) == {"fxpasses": "fxpasses.cli:main"}
    shipped = {n.split("/")[-1] for n in names if n.startswith("fxpasses/patterns/")}
    assert {p.name for p in (REPO / "patterns").glob("*.toml")} <= shipped, shipped


def test_the_wheel_installs_without_deps_beside_an_existing_torch_and_imports(tmp_path):
    """A fresh venv that reuses this environment's torch and vLLM (a path entry, not their .pth
    hooks, so the checkout's editable fxpasses stays out): `pip install --no-deps` of the wheel, then
    the plugin and the pass import from the wheel, beside the torch that was there."""
    import os
    import subprocess
    import sys
    import sysconfig
    import venv

    wheel = _built_wheel(tmp_path)
    env_dir = tmp_path / "fresh"
    venv.EnvBuilder(with_pip=True).create(env_dir)
    py = env_dir / "bin" / "python"
    site = subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          check=True, capture_output=True, text=True).stdout.strip()
    (Path(site) / "reuse_project_env.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    subprocess.run([str(py), "-m", "pip", "install", "-q", "--no-deps", "--no-index", str(wheel)],
                   check=True, capture_output=True, text=True)
    probe = ("import fxpasses, fxpasses.plugin, fxpasses.vllm_pass, torch; "
             "assert callable(fxpasses.plugin.register); "
             "print(fxpasses.__file__); print(torch.__file__); print(torch.__version__)")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    out = subprocess.run([str(py), "-c", probe], check=True, capture_output=True, text=True, cwd=tmp_path,
                         env=env).stdout.split("\n")
    assert out[0].startswith(site), out  # fxpasses from the wheel, not the checkout
    assert out[1].startswith(sysconfig.get_paths()["purelib"]), out  # the torch that was already there
    import torch
    assert out[2] == torch.__version__
