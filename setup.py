"""Build of fastseq: the Python package, the Triton kernels (as ``fastseq.kernels``) and, where it can be built,
the compiled extension ``fastseq._C``.

The extension needs torch at build time, so build it with ``pip install --no-build-isolation .`` after torch is
installed. Environment switches:

- ``FASTSEQ_NO_EXTENSION=1``: skip the compiled extension (pure Python + Triton package).
- ``FASTSEQ_NO_CUDA=1``: build only the C++ (CPU) part even where a CUDA toolkit is found.
- ``CUDA_HOME``: the CUDA toolkit whose ``nvcc`` compiles ``csrc/cuda/*.cu``. Unset, it is the toolkit of the ``nvcc``
  on ``PATH`` (as nvcc itself reports it, so a wrapper script or a symlink in ``/usr/local/bin`` still leads to the
  real toolkit), else ``/usr/local/cuda``.
- ``TORCH_CUDA_ARCH_LIST``: the GPU architectures to compile for; default ``"8.0;9.0"``.
- ``MAX_JOBS``: parallel compile jobs (ninja).
- ``FASTSEQ_REQUIRE_EXTENSION=1``: fail the install when the extension does not build (by default a failed
  build is reported and the package installs without it).

Without torch in the build environment, or without a C++ compiler, the package installs without the
extension, and ``fastseq.backends()`` says why "cpp" and "cuda" are unavailable.
"""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import sys

from setuptools import setup

HERE = os.path.dirname(os.path.abspath(__file__))


def _flag(name: str) -> bool:
    return os.environ.get(name, "0") not in ("", "0")


def _note(msg: str) -> None:
    print(f"fastseq setup: {msg}", file=sys.stderr)


def _nvcc_toolkit_root() -> str | None:
    """The toolkit of the ``nvcc`` on PATH, as nvcc reports it (``-dryrun`` prints the folder it really runs from):
    torch's own guess, the parent of ``which nvcc``, is wrong for a wrapper script or a symlink such as
    ``/usr/local/bin/nvcc``."""
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        return None
    try:
        out = subprocess.run([nvcc, "-dryrun", "-c", "x.cu", "-o", "x.o"], capture_output=True, text=True,
                             timeout=60)
    except (OSError, subprocess.SubprocessError):
        return None
    for line in (out.stdout + out.stderr).splitlines():
        if line.startswith("#$ _HERE_="):
            root = os.path.dirname(os.path.realpath(line.split("=", 1)[1].strip()))
            if os.path.exists(os.path.join(root, "include", "cuda_runtime.h")):
                return root
    return None


def _find_cuda_home() -> None:
    """Sets CUDA_HOME for torch's build helpers (which read it when imported) where the caller did not."""
    if os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH") or _flag("FASTSEQ_NO_CUDA"):
        return
    root = _nvcc_toolkit_root()
    if root is None and os.path.exists("/usr/local/cuda/include/cuda_runtime.h"):
        root = "/usr/local/cuda"
    if root is not None:
        os.environ["CUDA_HOME"] = root
        _note(f"CUDA_HOME={root} (the toolkit of nvcc)")


def _nvidia_wheel_includes(cuda_home: str) -> list[str]:
    """Header folders of the CUDA libraries in the nvidia-* wheels torch depends on (cuBLAS, cuSPARSE, …), for a
    toolkit that has only the compiler and runtime: torch's ATen/cuda headers include them."""
    if os.path.exists(os.path.join(cuda_home, "include", "cublas_v2.h")):
        return []
    try:
        import nvidia
    except ImportError:
        return []
    found = set()
    for base in getattr(nvidia, "__path__", []):
        for header in glob.glob(os.path.join(base, "*", "include", "cublas_v2.h")):
            found.add(os.path.dirname(header))
    return sorted(found)


def _extension():
    """``(ext_modules, cmdclass)`` for fastseq._C, or empty where it cannot be built here."""
    if _flag("FASTSEQ_NO_EXTENSION"):
        _note("FASTSEQ_NO_EXTENSION is set: building without the compiled extension")
        return [], {}
    try:
        import torch

        if torch.version.cuda is not None:  # a CPU build of torch has no CUDA headers to build against
            _find_cuda_home()
        from torch.utils import cpp_extension
    except ImportError:
        _note("torch is not importable at build time (use --no-build-isolation): no compiled extension")
        return [], {}
    cxx = os.environ.get("CXX", "c++")
    if shutil.which(cxx) is None:
        _note(f"no C++ compiler ({cxx}) found: building without the compiled extension")
        return [], {}
    sources = sorted(glob.glob("csrc/*.cpp") + glob.glob("csrc/cpu/*.cpp"))
    cuda_sources = sorted(glob.glob("csrc/cuda/*.cu") + glob.glob("csrc/cuda/*.cpp"))
    # No -std flag: torch's BuildExtension passes the standard the installed torch needs (C++20 from 2.14).
    cxx_flags = ["-O3"]
    if os.name != "nt":
        # As torch's own build: no errno from math functions and no trapping floating-point exceptions, so that
        # branch-free selects stay selects and the C++ kernels' per-unit loops vectorise (IEEE results unchanged).
        # No debug info: a fifth of the compile time and 1 MB instead of 19 MB.
        cxx_flags += ["-fno-math-errno", "-fno-trapping-math", "-g0"]
    link_flags = []
    if _gcc_with_openmp(cxx):
        # at::parallel_for is inline OpenMP in torch's Linux builds: without -fopenmp the C++ kernels' pointwise
        # loops run on one thread. GCC's libgomp is the runtime torch itself loads (same soname).
        cxx_flags.append("-fopenmp")
        link_flags.append("-fopenmp")
    else:
        _note("not GCC on Linux: the C++ kernels' pointwise loops run single-threaded (their GEMMs still thread)")
    use_cuda = bool(cuda_sources) and not _flag("FASTSEQ_NO_CUDA") and cpp_extension.CUDA_HOME is not None
    if cuda_sources and not use_cuda:
        why = ("FASTSEQ_NO_CUDA is set" if _flag("FASTSEQ_NO_CUDA") else
               f"torch {torch.__version__} is a CPU build" if torch.version.cuda is None else
               "no CUDA toolkit found (set CUDA_HOME, or put nvcc on PATH)")
        _note(f"CUDA sources skipped: {why}")
    if use_cuda:
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
        # -O3 and -lineinfo (source lines for compute-sanitizer and profilers, no effect on the code). No
        # --use_fast_math: the gate math (csrc/rnn_pointwise.h) is written for IEEE float32 division and rounding, and
        # its accuracy is measured that way; fast math would flush denormals and approximate the divisions.
        ext = cpp_extension.CUDAExtension(
            "fastseq._C", sources + cuda_sources,
            include_dirs=_nvidia_wheel_includes(cpp_extension.CUDA_HOME),
            extra_compile_args={"cxx": cxx_flags + ["-DFASTSEQ_WITH_CUDA"],
                                "nvcc": ["-O3", "-DFASTSEQ_WITH_CUDA", "-lineinfo"]},
            extra_link_args=link_flags)
    else:
        ext = cpp_extension.CppExtension("fastseq._C", sources, extra_compile_args={"cxx": cxx_flags},
                                         extra_link_args=link_flags)
    what = f"C++ and CUDA for {os.environ['TORCH_CUDA_ARCH_LIST']}" if use_cuda else "C++"
    _note(f"building fastseq._C against torch {torch.__version__} ({what})")
    build_ext = cpp_extension.BuildExtension.with_options(use_ninja=shutil.which("ninja") is not None)
    return [ext], {"build_ext": _optional(build_ext)}


def _gcc_with_openmp(cxx: str) -> bool:
    """Whether ``cxx`` is GCC on Linux, whose ``-fopenmp`` uses libgomp, the OpenMP runtime torch's Linux wheels
    load (clang's would be a second runtime in the process)."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        macros = subprocess.run([cxx, "-dM", "-E", "-x", "c++", os.devnull], capture_output=True, text=True,
                                timeout=60).stdout
    except (OSError, subprocess.SubprocessError):
        return False
    return "__GNUC__" in macros and "__clang__" not in macros


def _optional(build_ext):
    """``build_ext`` that reports a failed extension build and installs the package without it, unless
    ``FASTSEQ_REQUIRE_EXTENSION=1``: the extension is an accelerator, never a requirement."""

    class OptionalBuildExt(build_ext):
        def build_extension(self, ext):
            try:
                super().build_extension(ext)
            except Exception as e:  # compiler errors surface as several exception types
                if _flag("FASTSEQ_REQUIRE_EXTENSION"):
                    raise
                _note(f"building {ext.name} FAILED ({type(e).__name__}: {e}); installing without it. "
                      f"fastseq.backends() will report it missing. Set FASTSEQ_REQUIRE_EXTENSION=1 to fail.")

    return OptionalBuildExt


ext_modules, cmdclass = _extension()

setup(
    packages=["fastseq", "fastseq.ops", "fastseq.nn", "fastseq.bench", "fastseq.kernels"],
    package_data={"fastseq": ["crossovers.json"]},
    package_dir={"fastseq": "fastseq", "fastseq.kernels": "kernels"},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
