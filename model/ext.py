"""The compiled extension (csrc/), imported with a clear message when it was not built, and the
choice of device, which must never pick CUDA when this build cannot run there."""
import sys

import torch

try:
    import nnrt_ext as C  # noqa: N812
except ImportError as error:  # pragma: no cover - exercised only on a broken set-up
    raise ImportError(
        f"the C++ extension nnrt_ext could not be imported ({error}); run `make setup` in the "
        "repository root to build it"
    ) from error

__all__ = ["C", "DeviceError", "cuda_unavailable_reason", "resolve_device"]

DEVICE_CHOICES = ("auto", "cpu", "cuda")
_REBUILD = ("install a CUDA toolkit (nvcc, with CUDA_HOME set to its root), then rebuild with "
            "`make clean && NNRT_FORCE_CUDA=1 make setup`")


class DeviceError(ValueError):
    """The requested device cannot run this build (one line, with the fix)."""


def cuda_unavailable_reason() -> str:
    """Why CUDA cannot be used here, or "" when torch sees a GPU and nnrt_ext has CUDA launchers.

    Both are needed: pip's CUDA torch on a machine without a CUDA toolkit sees the GPU, but the
    extension was then built with its CPU launchers only.
    """
    if torch.version.cuda is None:
        return "torch is a CPU-only build (install the CUDA build of torch, then rebuild nnrt_ext)"
    if not torch.cuda.is_available():
        return "torch sees no GPU"
    if not C.with_cuda():
        return "nnrt_ext was built without its CUDA launchers; " + _REBUILD
    return ""


def resolve_device(requested: str) -> torch.device:
    """The torch device for a --device flag value: "auto", "cpu", "cuda" or "cuda:K".

    "auto" is CUDA when it can run here, else the CPU; when a GPU is visible but cannot be used
    (the build lacks its launchers) it says so on stderr, once, so a slow CPU run is not a
    surprise. An explicit "cuda" that cannot run raises DeviceError naming the fix.
    """
    name = str(requested)
    if name == "auto":
        reason = cuda_unavailable_reason()
        if reason and torch.cuda.is_available():
            print(f"note: running on the CPU although a GPU is visible: {reason}", file=sys.stderr)
        return torch.device("cpu" if reason else "cuda")
    if name == "cpu":
        return torch.device("cpu")
    if name == "cuda" or name.startswith("cuda:"):
        reason = cuda_unavailable_reason()
        if reason:
            raise DeviceError(f"--device {name}: CUDA cannot be used: {reason}")
        try:
            device = torch.device(name)
        except RuntimeError as error:
            raise DeviceError(f"--device {name}: not a device name ({error})") from None
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise DeviceError(f"--device {name}: only {torch.cuda.device_count()} GPU(s) visible")
        return device
    raise DeviceError(f"--device {name}: expected one of auto, cpu, cuda, cuda:K")
