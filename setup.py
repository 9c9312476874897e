"""Builds slimrate._C from csrc/: C++/OpenMP always; CUDA sources only when torch has CUDA and nvcc
is found. SLIMRATE_CUDA=0/1 overrides the detection (1 fails loudly if CUDA cannot be built)."""

import glob
import os

from setuptools import setup
from torch.utils import cpp_extension


def want_cuda() -> bool:
    flag = os.environ.get("SLIMRATE_CUDA")
    available = cpp_extension.CUDA_HOME is not None and __import__("torch").version.cuda is not None
    if flag == "1" and not available:
        raise RuntimeError("SLIMRATE_CUDA=1 but torch has no CUDA or nvcc/CUDA_HOME was not found")
    return available if flag is None else flag == "1"


def extension():
    sources = ["csrc/ops.cpp", *sorted(glob.glob("csrc/cpu/*.cpp")), *sorted(glob.glob("csrc/core/*.cpp"))]
    # No FP traps or errno are used, so the vectoriser may if-convert selects (csrc/core/rate.cpp).
    cxx = ["-O3", "-std=c++17", "-fopenmp", "-fno-trapping-math", "-fno-math-errno"]
    kwargs = dict(include_dirs=[os.path.abspath("csrc")], extra_link_args=["-fopenmp"])
    if want_cuda():
        sources += sorted(glob.glob("csrc/cuda/*.cu")) + sorted(glob.glob("csrc/cuda/*.cpp"))
        nvcc = ["-O3", "-std=c++17", "-lineinfo"]
        return cpp_extension.CUDAExtension(
            "slimrate._C", sources, extra_compile_args={"cxx": cxx + ["-DSLIMRATE_WITH_CUDA"], "nvcc": nvcc},
            **kwargs)
    return cpp_extension.CppExtension("slimrate._C", sources, extra_compile_args={"cxx": cxx}, **kwargs)


setup(ext_modules=[extension()], cmdclass={"build_ext": cpp_extension.BuildExtension})
