"""Device choice: never a device this build cannot run (issue: CUDA torch with a CPU-only build)."""
import pytest
import torch

from model import ext
from model.ext import DeviceError, resolve_device


class _FakeExtension:
    def __init__(self, with_cuda):
        self._with_cuda = with_cuda

    def with_cuda(self):
        return self._with_cuda


@pytest.fixture
def gpu_visible(monkeypatch):
    """A CUDA torch seeing one GPU; the extension's build is set per test."""
    monkeypatch.setattr(torch.version, "cuda", "13.0")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)


def test_cpu_and_auto_without_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto") == torch.device("cpu")
    with pytest.raises(DeviceError, match="--device cuda: CUDA cannot be used"):
        resolve_device("cuda")


def test_gpu_visible_but_build_without_launchers(monkeypatch, gpu_visible, capsys):
    monkeypatch.setattr(ext, "C", _FakeExtension(False))
    assert resolve_device("auto") == torch.device("cpu")
    assert "running on the CPU although a GPU is visible" in capsys.readouterr().err
    with pytest.raises(DeviceError, match="NNRT_FORCE_CUDA=1") as error:
        resolve_device("cuda")
    assert "\n" not in str(error.value)


def test_gpu_visible_and_build_with_launchers(monkeypatch, gpu_visible, capsys):
    monkeypatch.setattr(ext, "C", _FakeExtension(True))
    assert resolve_device("auto") == torch.device("cuda")
    assert resolve_device("cuda") == torch.device("cuda")
    assert resolve_device("cuda:0") == torch.device("cuda:0")
    with pytest.raises(DeviceError, match="only 1 GPU"):
        resolve_device("cuda:1")
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize("name", ["gpu", "cuda:x", ""])
def test_bad_names(name):
    with pytest.raises(DeviceError):
        resolve_device(name)


def test_cpu_only_torch(monkeypatch):
    monkeypatch.setattr(torch.version, "cuda", None)
    with pytest.raises(DeviceError, match="CPU-only build"):
        resolve_device("cuda")
