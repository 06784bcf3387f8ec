"""The package installs both ways and ships kernels/ as `megapt.kernels` (no clash with PyPI's `kernels`),
with the optional C extension `megapt.data._segcache` built wherever a C compiler is available."""

import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _run(args, **kw):
    return subprocess.run(args, capture_output=True, text=True, timeout=300, **kw)


def test_installed_package_imports_kernels_under_megapt(tmp_path):
    # Whatever install the test session uses (CI: editable), megapt.kernels resolves to kernels/.
    r = _run(
        [sys.executable, "-c", "import megapt.kernels as k, megapt.cli; print(k.__file__)"],
        cwd=tmp_path,
    )
    assert r.returncode == 0, r.stderr
    assert Path(r.stdout.strip()).resolve().parent == (ROOT / "kernels").resolve()


def test_a_checkout_on_sys_path_leaves_the_name_kernels_to_the_pypi_package(tmp_path):
    # transformers >= 5.25 requires PyPI's `kernels` and runs `from kernels import CUDAProperties`
    # on import; from the repository root (python -m, pytest) kernels/ would be found first.
    probe = (
        "import importlib.machinery as m, os, sys; "
        "path = [p for p in sys.path if os.path.abspath(p or '.') != sys.argv[1]]; "
        "s = m.PathFinder.find_spec('kernels', path); print(s.origin if s else '')"
    )
    pypi = _run([sys.executable, "-c", probe, str(ROOT)], cwd=tmp_path).stdout.strip()
    if not pypi:
        pytest.skip("PyPI's kernels package is not installed here (transformers < 5.25)")
    code = (
        "import kernels, megapt.kernels as k; print(kernels.__file__); print(k.__file__); "
        "print(callable(k.rms_norm))"
    )
    r = _run([sys.executable, "-c", code], cwd=ROOT)
    assert r.returncode == 0, r.stderr
    top, ours, ok = r.stdout.split()
    assert Path(top) == Path(pypi) and ok == "True"
    assert Path(ours).resolve().parent == (ROOT / "kernels").resolve()


def _have_compiler() -> bool:
    import sysconfig

    cc = (sysconfig.get_config_var("CC") or "cc").split()[0]
    return shutil.which(cc) is not None


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """The package as a user gets it: a wheel built from the checkout, `pip install --target`."""
    tmp = tmp_path_factory.mktemp("install")
    wheel_dir = tmp / "wheel"
    r = _run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(wheel_dir),
            str(ROOT),
        ],
        cwd=tmp,
    )
    assert r.returncode == 0, r.stderr
    (wheel,) = wheel_dir.glob("megapt-*.whl")
    target = tmp / "site"
    r = _run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "--no-deps",
            "-q",
            "--target",
            str(target),
            str(wheel),
        ]
    )
    assert r.returncode == 0, r.stderr
    return wheel, target


@pytest.mark.slow
def test_plain_pip_install_ships_megapt_kernels(installed, tmp_path):
    wheel, target = installed
    names = zipfile.ZipFile(wheel).namelist()
    assert "megapt/kernels/__init__.py" in names
    assert not any(n.startswith("kernels/") for n in names), (
        "top-level 'kernels' would clash with PyPI"
    )
    has_ext = any(n.startswith("megapt/data/_segcache") for n in names)
    if _have_compiler():
        assert has_ext, "the C segment cache was not built into the wheel"
    env = dict(os.environ, PYTHONPATH=str(target), PYTHONNOUSERSITE="1")
    # -S: no site-packages, so neither the editable finder nor the source tree can answer the import.
    r = _run(
        [sys.executable, "-S", "-c", "import megapt.kernels as k; print(k.__file__)"],
        cwd=tmp_path,
        env=env,
    )
    assert r.returncode == 0, r.stderr
    assert Path(r.stdout.strip()).is_relative_to(target)
    if has_ext:
        r = _run(
            [
                sys.executable,
                "-S",
                "-c",
                "import megapt.data._segcache as m; print(m.__file__); "
                "print(m.SegmentCache().split('x_1 = 2'))",
            ],
            cwd=tmp_path,
            env=env,
        )
        assert r.returncode == 0, r.stderr
        path, segs = r.stdout.splitlines()
        assert Path(path).is_relative_to(target) and segs == "['x', '_', '1', ' =', ' 2']"


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_megapt_bench_runs_from_an_installed_wheel(installed, tmp_path):
    """`megapt bench` needs nothing from a source checkout: every benchmark ships in the wheel, and
    a tiny training benchmark runs from a folder that is not the repository."""
    wheel, target = installed
    names = set(zipfile.ZipFile(wheel).namelist())
    for module in (
        "cli",
        "runners",
        "sweep",
        "worker",
        "report",
        "fingerprint",
        "planner",
        "data",
        "loader",
        "kernels/run",
        "kernels/attention",
        "kernels/common",
    ):
        assert f"megapt/bench/{module}.py" in names, module
    assert not any(n.startswith("benchmarks/") for n in names)
    # the installed copy answers before the editable one (PYTHONPATH precedes site-packages)
    env = dict(
        os.environ,
        PYTHONPATH=str(target),
        DS_ACCELERATOR="cpu",
        OMP_NUM_THREADS="1",
        TOKENIZERS_PARALLELISM="false",
    )
    megapt = [str(target / "bin" / "megapt")]
    r = _run(megapt + ["bench", "--help"], cwd=tmp_path, env=env)
    assert r.returncode == 0, r.stderr
    assert "data,loader,kernels,planner" in r.stdout.replace(" ", "").replace("\n", "")
    r = _run(
        megapt + ["bench", "kernels", "--script-args=--dry-run --quick", "--out", "k.json"],
        cwd=tmp_path,
        env=env,
    )
    assert r.returncode == 0, r.stderr
    assert json.loads((tmp_path / "k.json").read_text())["planned_cases"]["rope"]
    micro = [
        "--model.n_layers=1",
        "--model.d_model=64",
        "--model.n_heads=2",
        "--model.n_kv_heads=1",
        "--tokenizer.vocab_size=256",
        "--data.seq_len=16",
        "--train.micro_batch=1",
        "--train.device=cpu",
    ]
    r = _run(
        megapt
        + [
            "bench",
            "train",
            *micro,
            "--runners",
            "engine,plain",
            "--warmup",
            "0",
            "--steps",
            "2",
            "--no-peak",
            "--timeout",
            "240",
        ],
        cwd=tmp_path,
        env=env,
    )
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    (out,) = (tmp_path / "benchmarks" / "results").glob("*.json")  # the default path, under the cwd
    doc = json.loads(out.read_text())
    (point,) = doc["results"]
    assert (
        point["status"] == "ok" and point["results"]["engine"]["tokens_per_s_total"]["median"] > 0
    )
    assert doc["plots"] == [] and doc["plots_note"]  # one point: nothing to plot, and it says why
    # the point's worker (`python -m megapt.bench.worker`, same environment) is the installed copy
    r = _run(
        [sys.executable, "-c", "import megapt.bench.worker as w; print(w.__file__)"],
        cwd=tmp_path,
        env=env,
    )
    assert r.returncode == 0 and Path(r.stdout.strip()).is_relative_to(target), r.stdout + r.stderr
