"""megapt: pretrain decoder-only LLMs from scratch across many GPUs and nodes.

The top-level ``kernels/`` folder installs as ``megapt.kernels`` (``package_dir``), so its
import name never clashes with the unrelated ``kernels`` package on PyPI.

``megapt.data._segcache`` is a small optional C extension (plain C, CPython API) that makes BPE
tokenization several times faster; without a C compiler the install still succeeds and the
tokenizer uses its pure-Python path (same token ids).
"""

from setuptools import Extension, setup

PACKAGES = [
    "megapt",
    "megapt.model",
    "megapt.data",
    "megapt.train",
    "megapt.finetune",
    "megapt.eval",
    "megapt.kernels",
    "megapt.bench",
    "megapt.bench.kernels",
]

setup(
    name="megapt",
    version="0.1.0",
    description="Pretrain and fine-tune decoder-only transformers with DeepSpeed ZeRO and fused Triton kernels",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=PACKAGES,
    package_dir={"megapt.kernels": "kernels"},
    package_data={"megapt.kernels": ["csrc/*.cu", "csrc/*.cpp", "csrc/*.h"]},
    ext_modules=[
        Extension("megapt.data._segcache", ["megapt/data/csrc/segcache.c"], optional=True)
    ],
    install_requires=[
        # torch is installed first, by hand (see README): a bare `torch` requirement lets pip
        # pull a multi-GB CUDA build. Any torch >= 2.4 satisfies this bound.
        "torch>=2.4",
        "deepspeed>=0.19",
        "accelerate>=1.0",
        "datasets>=3.0",
        "sentencepiece>=0.2",
        "webdataset>=0.2.100",
        "tensorboard>=2.16",
        "pyyaml>=6.0",
        "numpy>=1.26",
        "tqdm>=4.66",
        "safetensors>=0.4",
        "pyarrow>=15",
    ],
    extras_require={
        # triton: every kernel compiles for sm_90 with 3.3.1, 3.6.0 and 3.9.0 (python -m megapt.kernels.aot_check);
        # the CPU interpreter the tests use needs >= 3.7 with numpy >= 2.3. ninja: the optional CUDA extension.
        "gpu": ["triton>=3.3", "ninja>=1.11"],
        # shards at a URL (megapt.urls): s3:// (AWS, MinIO, Ceph), gs://, https://
        "s3": ["s3fs>=2023.6"],
        "gcs": ["gcsfs>=2023.6"],
        "http": ["aiohttp>=3.8"],
        # moto[server]: the S3 server the remote-data tests start on 127.0.0.1
        # ruff/mypy/stubs pinned: a new release may add findings, and CI fails on them (.ci/run)
        "dev": [
            "pytest>=8",
            "pytest-timeout>=2.3",
            "triton>=3.3",
            "transformers>=4.45",
            "moto[server]>=5.0",
            "s3fs>=2023.6",
            "ruff==0.17.6",
            "mypy==2.4.1",
            "types-PyYAML==6.0.12.20261122",
            "types-tqdm==4.70.0.20261122",
        ],
        # `megapt bench` PNG plots (without it the JSON says plots were skipped)
        "bench": ["matplotlib>=3.7"],
    },
    entry_points={"console_scripts": ["megapt=megapt.cli:run"]},
)
