"""Builds dkm_kernels and its C++ CPU extension (dkm_kernels._C) from csrc/.

Install with `pip install --no-build-isolation .` so that the build uses the torch already
installed (an isolated build would download another torch to compile against).
"""
import glob
import os
import sys

from setuptools import find_packages, setup

try:
    import torch  # noqa: F401
    from torch.utils.cpp_extension import BuildExtension, CppExtension
except ImportError:
    sys.exit(
        "dkm_kernels builds against the installed torch: install torch first "
        "(CPU-only machine: pip install torch==2.13.0), then "
        "pip install --no-build-isolation ."
    )


def cpu_extension():
    sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")))
    if not sources or os.environ.get("DKM_KERNELS_NO_EXTENSION") == "1":
        return []
    return [
        CppExtension(
            "dkm_kernels._C",
            sources,
            extra_compile_args={"cxx": ["-O3", "-fopenmp"]},
            extra_link_args=["-fopenmp"],
        )
    ]


setup(
    name="dkm_kernels",
    version="0.1.0",
    description="Memory-efficient Differentiable K-Means (DKM) weight clustering: fused Triton and C++ kernels",
    long_description=open("README.md").read(),
    long_description_content_type="text/markdown",
    packages=find_packages(include=["dkm_kernels", "dkm_kernels.*"]),
    python_requires=">=3.9",
    # torch is not listed: the build needs it already, and a requirement here could replace the
    # user's torch (a CPU build, say) with another one.
    install_requires=["numpy"],
    extras_require={
        "test": ["pytest", "pytest-benchmark", "scikit-learn", "tqdm", "matplotlib"],
        "triton": ["triton"],
    },
    ext_modules=cpu_extension(),
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
    entry_points={"console_scripts": ["dkm-kernels=dkm_kernels.cli:main"]},
)
