"""`make gpu-test`: every CUDA path against its CPU path, on a machine with a GPU.

Runs the tests marked `gpu` (tests/test_gpu.py: each op with a CUDA launcher in float32 and
float64, outputs and gradients; generate.py on CUDA scoring like the CPU run; 20 training steps
of every stage on CUDA) and prints one summary line. Without a usable GPU (no GPU, CPU-only
torch, or nnrt_ext built without its CUDA launchers) it says so, tests nothing and exits 0.
"""
import os
import re
import subprocess
import sys

from model.ext import cuda_unavailable_reason

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def main() -> int:
    reason = cuda_unavailable_reason()
    if reason:
        print(f"gpu-test: no GPU/CUDA found ({reason}); nothing was tested")
        return 0
    result = subprocess.run([sys.executable, "-m", "pytest", "-m", "gpu", "-q", "-rs",
                             os.path.join(REPO, "tests", "test_gpu.py")], cwd=REPO,
                            capture_output=True, text=True)
    sys.stdout.write(result.stdout[-20000:])
    sys.stderr.write(result.stderr[-5000:])
    counts = re.findall(r"(\d+) (passed|failed|skipped|error|errors)", result.stdout)
    summary = ", ".join(f"{n} {word}" for n, word in counts) or "no test ran"
    verdict = "CUDA matches CPU" if result.returncode == 0 else "FAILED"
    print(f"gpu-test: {verdict}: {summary}")
    return result.returncode


if __name__ == "__main__":
    sys.exit(main())
