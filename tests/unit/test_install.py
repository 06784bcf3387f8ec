"""The package installs both ways and ships kernels/ as `megapt.kernels` (no clash with PyPI's `kernels`),
with the optional C extension `megapt.data._segcache` built wherever a C compiler is available."""
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
    r = _run([sys.executable, "-c", "import megapt.kernels as k, megapt.cli; print(k.__file__)"], cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert Path(r.stdout.strip()).resolve().parent == (ROOT / "kernels").resolve()


def _have_compiler() -> bool:
    import sysconfig

    cc = (sysconfig.get_config_var("CC") or "cc").split()[0]
    return shutil.which(cc) is not None


@pytest.mark.slow
def test_plain_pip_install_ships_megapt_kernels(tmp_path):
    wheel_dir = tmp_path / "wheel"
    r = _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
              "-w", str(wheel_dir), str(ROOT)], cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    (wheel,) = wheel_dir.glob("megapt-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "megapt/kernels/__init__.py" in names
    assert not any(n.startswith("kernels/") for n in names), "top-level 'kernels' would clash with PyPI"
    has_ext = any(n.startswith("megapt/data/_segcache") for n in names)
    if _have_compiler():
        assert has_ext, "the C segment cache was not built into the wheel"
    target = tmp_path / "site"
    r = _run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target), str(wheel)])
    assert r.returncode == 0, r.stderr
    env = dict(os.environ, PYTHONPATH=str(target), PYTHONNOUSERSITE="1")
    # -S: no site-packages, so neither the editable finder nor the source tree can answer the import.
    r = _run([sys.executable, "-S", "-c", "import megapt.kernels as k; print(k.__file__)"], cwd=tmp_path, env=env)
    assert r.returncode == 0, r.stderr
    assert Path(r.stdout.strip()).is_relative_to(target)
    if has_ext:
        r = _run([sys.executable, "-S", "-c", "import megapt.data._segcache as m; print(m.__file__); "
                  "print(m.SegmentCache().split('x_1 = 2'))"], cwd=tmp_path, env=env)
        assert r.returncode == 0, r.stderr
        path, segs = r.stdout.splitlines()
        assert Path(path).is_relative_to(target) and segs == "['x', '_', '1', ' =', ' 2']"
