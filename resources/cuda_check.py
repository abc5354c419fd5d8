"""Proves that every CUDA launcher (csrc/*/*.cu) compiles, on a machine without a GPU.

`make cuda-check` runs this. Each .cu file is compiled to an object file with nvcc (host and
device code, for sm_80 and sm_90) against the torch headers of .venv, exactly as setup.py's
CUDA build would compile it, but without linking (linking needs a CUDA build of torch, 5.5 GB;
see ../shared/ENV.md). The CPU wheel lacks one generated header, c10/cuda/impl/
cuda_cmake_macros.h; a one-line stand-in is written to build/cuda-check/include.
Exit status 1 when a file fails to compile (nvcc's errors are shown), 2 when nvcc is missing.
"""
import glob
import os
import shutil
import subprocess
import sys
import sysconfig
import time

import torch.utils.cpp_extension as cpp

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT = os.path.join(ROOT, "build", "cuda-check")
ARCHS = ("80", "90")


def nvcc_path() -> str:
    home = os.environ.get("CUDA_HOME")
    if home and os.path.isfile(os.path.join(home, "bin", "nvcc")):
        return os.path.join(home, "bin", "nvcc")
    return shutil.which("nvcc")


def main() -> int:
    nvcc = nvcc_path()
    if not nvcc:
        print("cuda-check: nvcc not found (set CUDA_HOME or put nvcc on PATH)", file=sys.stderr)
        return 2
    shim = os.path.join(OUT, "include", "c10", "cuda", "impl")
    os.makedirs(shim, exist_ok=True)
    with open(os.path.join(shim, "cuda_cmake_macros.h"), "w") as handle:
        handle.write("// Stand-in for the header a CUDA build of torch generates.\n#pragma once\n")
    includes = [os.path.join(ROOT, "csrc"), os.path.join(OUT, "include"),
                sysconfig.get_paths()["include"]] + cpp.include_paths()
    flags = ["-std=c++20", "-O3", "-DWITH_CUDA", "--expt-relaxed-constexpr", "-diag-suppress=3189",
             "-Xcompiler", "-fPIC", "-DTORCH_EXTENSION_NAME=nnrt_ext", "-DTORCH_API_INCLUDE_EXTENSION_H",
             "-D_GLIBCXX_USE_CXX11_ABI=1"]
    flags += [f"-gencode=arch=compute_{a},code=sm_{a}" for a in ARCHS]
    sources = sorted(glob.glob(os.path.join(ROOT, "csrc", "*", "*.cu")))
    if not sources:
        print("cuda-check: no .cu files under csrc/", file=sys.stderr)
        return 1
    failed = []
    for source in sources:
        obj = os.path.join(OUT, os.path.relpath(source, ROOT).replace(os.sep, "_") + ".o")
        command = [nvcc, "-c", source, "-o", obj] + flags + [f"-I{p}" for p in includes]
        start = time.perf_counter()
        result = subprocess.run(command, capture_output=True, text=True)
        seconds = time.perf_counter() - start
        if result.returncode != 0:
            failed.append(source)
            print(f"FAIL {os.path.relpath(source, ROOT)} ({seconds:.0f} s)\n{result.stderr[-6000:]}")
        else:
            print(f"ok   {os.path.relpath(source, ROOT)} -> {os.path.relpath(obj, ROOT)} "
                  f"({os.path.getsize(obj) // 1024} KiB, {seconds:.0f} s)")
    print(f"cuda-check: {len(sources) - len(failed)} of {len(sources)} CUDA files compile "
          f"(nvcc {nvcc}, sm_{', sm_'.join(ARCHS)})")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
