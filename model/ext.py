"""The compiled extension (csrc/), imported with a clear message when it was not built."""
import torch  # noqa: F401  (loads libtorch before the extension links against it)

try:
    import nnrt_ext as C  # noqa: N812
except ImportError as error:  # pragma: no cover - exercised only on a broken set-up
    raise ImportError(
        f"the C++ extension nnrt_ext could not be imported ({error}); run `make setup` in the "
        "repository root to build it"
    ) from error

__all__ = ["C"]
