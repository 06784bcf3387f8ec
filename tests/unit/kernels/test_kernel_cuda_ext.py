"""The CUDA RMSNorm extension: its kernels compile for Ampere and Hopper, and misuse is a clear error.

The numerical check against rms_norm_ref needs a GPU: tests/gpu/test_kernels_gpu.py.
"""

import os
import shutil
import subprocess
import sysconfig
from pathlib import Path

import pytest
import torch
import torch.utils.cpp_extension as cpp_ext

import megapt.kernels.cuda_ext as cuda_ext

CSRC = Path(cuda_ext.__file__).parent / "csrc"
NVCC = shutil.which("nvcc") or (
    os.path.join(cpp_ext.CUDA_HOME, "bin", "nvcc") if cpp_ext.CUDA_HOME else None
)


@pytest.mark.skipif(not NVCC or not os.path.exists(NVCC), reason="nvcc not installed")
@pytest.mark.parametrize("arch", ["sm_80", "sm_90"])
def test_rms_norm_kernels_compile_with_nvcc(arch, tmp_path):
    # Compiles the real kernel translation unit (all dtype instantiations) to an object file,
    # with the flags torch.utils.cpp_extension gives every .cu (no implicit half conversions).
    includes = [f"-I{p}" for p in cpp_ext.include_paths()] + [f"-I{CSRC}"]
    flags = list(getattr(cpp_ext, "COMMON_NVCC_FLAGS", []))
    cmd = [
        NVCC,
        "-c",
        f"-arch={arch}",
        "-std=c++20",
        "-O3",
        *flags,
        str(CSRC / "rms_norm_cuda.cu"),
        "-o",
        str(tmp_path / f"rms_norm_{arch}.o"),
        *includes,
    ]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-4000:]
    assert (tmp_path / f"rms_norm_{arch}.o").stat().st_size > 0
    obj = str(tmp_path / f"rms_norm_{arch}.o")
    if shutil.which("nm"):  # every dtype pair the dispatcher names was instantiated
        syms = subprocess.run(["nm", "-C", obj], capture_output=True, text=True, timeout=120).stdout
        for kernel in ("rms_norm_fwd_kernel", "rms_norm_bwd_kernel"):
            for pair in (
                "float, float",
                "__half, __half",
                "__nv_bfloat16, __nv_bfloat16",
                "__half, float",
                "__nv_bfloat16, float",
            ):
                assert f"{kernel}<{pair}>" in syms, (kernel, pair)
        assert " T megapt::rms_norm_forward(" in syms and " T megapt::rms_norm_backward(" in syms
    if shutil.which("readelf"):  # device code for the arch is embedded
        sections = subprocess.run(
            ["readelf", "-S", obj], capture_output=True, text=True, timeout=60
        ).stdout
        assert ".nv_fatbin" in sections


@pytest.mark.skipif(
    os.environ.get("MEGAPT_CHECK_CUDA_BINDING") != "1" or not shutil.which("g++"),
    reason="torch binding syntax check is slow (~30 s CPU): set MEGAPT_CHECK_CUDA_BINDING=1",
)
def test_rms_norm_binding_compiles_against_torch_headers():
    cuda_inc = os.path.join(cpp_ext.CUDA_HOME or "/usr/local/cuda", "include")
    includes = [f"-I{p}" for p in cpp_ext.include_paths()]
    cmd = [
        "g++",
        "-fsyntax-only",
        "-std=c++20",
        "-DTORCH_EXTENSION_NAME=megapt_rms_norm_cuda",
        f"-I{cuda_inc}",
        f"-I{CSRC}",
        f"-I{sysconfig.get_paths()['include']}",
        *includes,
        str(CSRC / "rms_norm_binding.cpp"),
    ]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-4000:]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA error")
def test_cuda_rms_norm_without_cuda_is_a_clear_error():
    with pytest.raises(RuntimeError, match="cannot build the CUDA RMSNorm extension"):
        cuda_ext.load_extension()
    with pytest.raises(ValueError, match="CUDA device"):
        cuda_ext.rms_norm(torch.randn(2, 8), torch.ones(8))
    with pytest.raises(ValueError, match="does not match"):
        cuda_ext.rms_norm(torch.randn(2, 8), torch.ones(7))


def test_cuda_sources_ship_as_package_data():
    # setup.py's package_data globs must cover every source cuda_ext builds from
    names = {p.name for p in cuda_ext.SOURCES} | {"rms_norm.h"}
    for name in names:
        assert (CSRC / name).exists(), name
        assert Path(name).suffix in (".cu", ".cpp", ".h")
    from megapt.kernels.cuda import rms_norm  # the model's `cuda` backend looks it up here

    assert rms_norm is cuda_ext.rms_norm
