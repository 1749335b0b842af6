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


def _compiler_accepts(flag):
    """Whether the C++ compiler builds a tiny OpenMP program with `flag` (Apple clang, say, has no
    -fopenmp without libomp)."""
    import subprocess
    import tempfile
    import sysconfig

    compiler = os.environ.get("CXX") or (sysconfig.get_config_var("CXX") or "c++").split()[0]
    with tempfile.TemporaryDirectory() as tmp:
        source = os.path.join(tmp, "probe.cpp")
        with open(source, "w") as f:
            f.write("#include <omp.h>\nint main() { return omp_get_max_threads() > 0 ? 0 : 1; }\n")
        try:
            result = subprocess.run([compiler, flag, source, "-o", os.path.join(tmp, "probe")],
                                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        except OSError:
            return False
    return result.returncode == 0


def cpu_extension():
    sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")))
    if not sources or os.environ.get("DKM_KERNELS_NO_EXTENSION") == "1":
        return []
    if sys.platform == "win32":
        # The kernels are written with GCC/Clang vector extensions, which MSVC lacks: without the
        # extension the package runs on its portable `torch` backend.
        return []
    # Portable flags only: the AVX2 and AVX-512 kernels are compiled by target pragmas in their
    # own files (csrc/kernels_avx*.cpp) and chosen at run time. fp-contract lets the compiler fuse
    # a * b + c into FMA where the target has it.
    compile_args, link_args = ["-O3", "-ffp-contract=fast"], []
    # DKM_KERNELS_SANITIZE=address builds with AddressSanitizer (tests/run_under_asan.sh).
    sanitizer = os.environ.get("DKM_KERNELS_SANITIZE")
    if sanitizer:
        compile_args += [f"-fsanitize={sanitizer}", "-fno-omit-frame-pointer", "-g"]
        link_args.append(f"-fsanitize={sanitizer}")
    # DKM_KERNELS_OPS_NAMESPACE=name registers the ops as torch.ops.name instead of
    # torch.ops.dkm_kernels: a second build that loads beside the package's own, for benchmarks
    # that time two builds in one process (benchmarks/cpu_passes.py --baseline-library).
    ops_namespace = os.environ.get("DKM_KERNELS_OPS_NAMESPACE")
    if ops_namespace:
        if not ops_namespace.isidentifier():
            raise SystemExit(f"DKM_KERNELS_OPS_NAMESPACE={ops_namespace!r}: must be a Python identifier")
        compile_args.append(f"-DDKM_KERNELS_OPS={ops_namespace}")
    # at::parallel_for is a header template: with torch's OpenMP backend it only runs in parallel
    # if this code is compiled with OpenMP.
    if _compiler_accepts("-fopenmp"):
        compile_args.append("-fopenmp")
        link_args.append("-fopenmp")
    return [
        CppExtension(
            "dkm_kernels._C",
            sources,
            depends=sorted(glob.glob(os.path.join("csrc", "*.h"))),
            extra_compile_args={"cxx": compile_args},
            extra_link_args=link_args,
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
        "test": ["pytest", "pytest-benchmark", "hypothesis", "scikit-learn", "tqdm", "matplotlib",
                 "transformers",
                 "triton; platform_system == 'Linux'",
                 # Core ML conversion (converts and saves ML programs on Linux and macOS)
                 "coremltools; platform_system != 'Windows'"],
        "coreml": ["coremltools"],
        "triton": ["triton"],
    },
    ext_modules=cpu_extension(),
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
    entry_points={"console_scripts": ["dkm-kernels=dkm_kernels.cli:main"]},
)
