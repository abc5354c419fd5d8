"""Builds the C++/CUDA extension `nnrt_ext` from csrc/.

The CPU launchers are always built (with OpenMP, so at::parallel_for uses every core). The CUDA
launchers (csrc/*/*_cuda.cu) are added when torch is a CUDA build and a CUDA toolkit is found,
or when NNRT_FORCE_CUDA=1; NNRT_FORCE_CPU=1 leaves them out. `make setup` runs this; by hand:
    pip install -e . --no-build-isolation       # or: python setup.py build_ext --inplace
"""
import glob
import os

import torch
from setuptools import setup
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

ROOT = os.path.dirname(os.path.abspath(__file__))


def with_cuda() -> bool:
    if os.environ.get("NNRT_FORCE_CPU", "0") == "1":
        return False
    if os.environ.get("NNRT_FORCE_CUDA", "0") == "1":
        return True
    return torch.version.cuda is not None and CUDA_HOME is not None


def extension():
    sources = ["csrc/bindings.cpp"] + sorted(glob.glob("csrc/*/*_cpu.cpp"))
    cxx = ["-O3", "-std=c++20", "-fopenmp"]
    kwargs = dict(include_dirs=[os.path.join(ROOT, "csrc")], extra_link_args=["-fopenmp"])
    if with_cuda():
        sources += sorted(glob.glob("csrc/*/*_cuda.cu"))
        nvcc = ["-O3", "-std=c++20", "--expt-relaxed-constexpr", "-diag-suppress=3189"]
        return CUDAExtension("nnrt_ext", sources, define_macros=[("WITH_CUDA", None)],
                             extra_compile_args={"cxx": cxx, "nvcc": nvcc}, **kwargs)
    return CppExtension("nnrt_ext", sources, extra_compile_args={"cxx": cxx}, **kwargs)


class Build(BuildExtension.with_options(use_ninja=True)):
    def copy_extensions_to_source(self):
        # Unlink the old library first: a running process (a long training) keeps its inode,
        # instead of seeing the file overwritten in place, which can crash it.
        for path in glob.glob(os.path.join(ROOT, "nnrt_ext*.so")):
            os.unlink(path)
        super().copy_extensions_to_source()


setup(
    name="nnrt",
    version="0.1.0",
    description="Neural non-rigid tracking of RGB-D frames, with a 4D hash-grid residual deformer",
    python_requires=">=3.9",
    packages=["model", "dataset", "fusion", "utils"],
    py_modules=["options"],
    ext_modules=[extension()],
    cmdclass={"build_ext": Build},
    zip_safe=False,
)
