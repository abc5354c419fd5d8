"""Flow backbone (PWC-Net), cost volume, weighting head (MaskNet) and reference checkpoints.

The numeric ground truth is ``../shared/fixtures/nnrt_reference/`` (outputs of the reference
code with formula weights); ``tests/reference/pwcnet_reference.py`` is the literal version that
the optimised modules are also compared with on inputs the fixture does not cover.
"""
import copy
import json
import os
from collections import OrderedDict

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from model.cost_volume import correlation
from model.masknet import MaskNet
from model.fast_conv import narrow_conv3x3, transposed_as_phases
from model.pwcnet import PWCNet, normalize_features
from tests.reference.reference_weights import deterministic_reference_state_dict, split_tracker_state_dict
from tests.conftest import FIXTURES, assert_close, require
from tests.reference.pwcnet_reference import correlation_reference, masknet_reference, pwcnet_reference
from utils.checkpoints import (CheckpointError, check_state_dict, load_reference_checkpoint,
                               load_reference_state_dicts)

FIXTURE = os.path.join(FIXTURES, "nnrt_reference")


def fixture_path(name: str) -> str:
    return require(os.path.join(FIXTURE, name))


def aux_input(height: int, width: int) -> torch.Tensor:
    """The fixture's MaskNet auxiliary input: sin(0.01(y+1)(c+1)) cos(0.013(x+1)), (1, 12, H, W)."""
    y = np.arange(height, dtype=np.float64)[None, :, None]
    x = np.arange(width, dtype=np.float64)[None, None, :]
    c = np.arange(12, dtype=np.float64)[:, None, None]
    return torch.from_numpy((np.sin(0.01 * (y + 1) * (c + 1)) * np.cos(0.013 * (x + 1)))[None].astype(np.float32))


def crop_input(name: str) -> torch.Tensor:
    """uint8 (448, 640, 3) crop -> (1, 3, 448, 640) float32 in [0, 1]."""
    return torch.from_numpy(np.load(fixture_path(name))).permute(2, 0, 1)[None].float() / 255.0


@pytest.fixture(scope="module")
def reference_state():
    """(flow_state, mask_state) with bare keys, from the fixture's weight formula."""
    full = deterministic_reference_state_dict(fixture_path("state_dict_shapes.json"))
    return split_tracker_state_dict(full)


@pytest.fixture(scope="module")
def networks(reference_state):
    flow_net, mask_net = PWCNet().eval(), MaskNet().eval()
    flow_net.load_state_dict(reference_state[0])
    mask_net.load_state_dict(reference_state[1])
    return flow_net, mask_net


@pytest.fixture(scope="module")
def fixture_run(networks):
    """Both networks on the fixture's crops: (outputs, intermediates, mask).

    The outputs come from the production path (no intermediates requested); the intermediates
    from a second, recording pass."""
    flow_net, mask_net = networks
    source, target = crop_input("source_crop_u8.npy"), crop_input("target_crop_u8.npy")
    intermediates = {}
    with torch.inference_mode():
        outputs = flow_net(source, target)
        mask = mask_net(outputs[5], aux_input(448, 640))
        flow_net(source, target, intermediates)
    return outputs, intermediates, mask


def test_weight_generator_reproduces_checksums():
    checksums = json.load(open(fixture_path("weights_checksums.json")), object_pairs_hook=OrderedDict)
    state = deterministic_reference_state_dict(fixture_path("state_dict_shapes.json"))
    assert list(state) == list(checksums)
    for key, tensor in state.items():
        expected = checksums[key]
        values = tensor.double().flatten()
        assert list(tensor.shape) == expected["shape"], key
        assert tensor.dtype == torch.float32, key
        assert float(values[0]) == expected["first"] and float(values[-1]) == expected["last"], key
        assert abs(float(values.sum()) - expected["sum"]) <= 1e-9 * max(1.0, abs(expected["sum"])), key
        assert abs(float((values * values).sum()) - expected["sum_sq"]) <= 1e-9 * expected["sum_sq"], key


def test_state_dict_keys_match_reference():
    shapes = json.load(open(fixture_path("state_dict_shapes.json")), object_pairs_hook=OrderedDict)
    ours = [("flow_net." + k, list(v.shape)) for k, v in PWCNet().state_dict().items()]
    ours += [("mask_net." + k, list(v.shape)) for k, v in MaskNet().state_dict().items()]
    assert ours == list(shapes.items())


def test_pwcnet_reproduces_fixture_outputs(fixture_run):
    outputs, _, _ = fixture_run
    expected = np.load(fixture_path("pwc_outputs.npz"))
    for flow, level in zip(outputs[:5], range(2, 7)):
        assert_close(flow, expected[f"flow{level}"], atol=1e-4, rtol=0, what=f"flow{level}")
    full = 20.0 * F.interpolate(outputs[0], size=(448, 640), mode="bilinear", align_corners=False)
    assert_close(full, expected["flow_full_x20"], atol=1e-3, rtol=0, what="flow_full_x20")
    features2 = outputs[5]
    assert features2.shape == (1, 565, 112, 160)
    rows, cols = expected["features2_grid_rows"], expected["features2_grid_cols"]
    grid = features2[0][:, rows][:, :, cols]
    assert_close(grid, expected["features2_grid"], atol=5e-5, rtol=0, what="features2_grid")
    per_channel = features2[0].double().flatten(1)
    assert_close(per_channel.mean(1), expected["features2_channel_mean"], atol=1e-6, rtol=0, what="features2 mean")
    assert_close(per_channel.std(1, unbiased=False), expected["features2_channel_std"], atol=1e-6, rtol=0,
                 what="features2 std")


def test_pwcnet_reproduces_fixture_intermediates(fixture_run):
    _, intermediates, _ = fixture_run
    expected = np.load(fixture_path("pwc_intermediates.npz"))
    checked = 0
    for name in expected.files:
        if name.startswith("mask_"):
            continue
        reference = expected[name]
        if name.endswith(("_mean", "_std")):
            base, statistic = name.rsplit("_", 1)
            values = intermediates[base][0].double().flatten(1)
            ours = values.mean(1) if statistic == "mean" else values.std(1, unbiased=False)
        else:
            ours = intermediates[name]
        assert_close(ours, reference, atol=1e-5 * float(np.abs(reference).max()), rtol=0, what=name)
        checked += 1
    assert checked == 53
    # The stack layout: five dense outputs (448 channels, newest first), then the decoder input
    # [lrelu(cv), source features, upflow, upfeat].
    stack = intermediates["dec_features_L5"]
    assert stack.shape[1] == 661
    tail = (F.leaky_relu(intermediates["cv_raw_L5"], 0.1), intermediates["ext_src_L5"],
            intermediates["upflow_L5"], intermediates["upfeat_L5"])
    assert torch.equal(stack[:, 448:], torch.cat(tail, dim=1))


def test_masknet_reproduces_fixture(networks, fixture_run):
    _, mask_net = networks
    outputs, _, mask = fixture_run
    expected = np.load(fixture_path("mask_outputs.npz"))
    assert_close(mask, expected["mask"], atol=1e-4, rtol=0, what="mask")
    y, x, c = np.meshgrid(np.arange(28.0), np.arange(40.0), np.arange(565.0), indexing="ij")
    features = np.sin(0.05 * (x + 1) + 0.07 * (y + 1) + 0.11 * (c + 1)) * 0.05
    features = torch.from_numpy(features.transpose(2, 0, 1)[None].astype(np.float32))
    with torch.inference_mode():
        synthetic = mask_net(features, aux_input(448, 640)[:, :, :112, :160])
        up1 = mask_net.upconv1(outputs[5])
        up2 = mask_net.upconv2(up1)
    assert_close(synthetic, expected["mask_synthetic"], atol=1e-4, rtol=0, what="mask_synthetic")
    statistics = np.load(fixture_path("pwc_intermediates.npz"))
    for name, tensor in (("mask_upconv1", up1), ("mask_upconv2", up2)):
        values = tensor[0].double().flatten(1)
        for statistic, ours in (("mean", values.mean(1)), ("std", values.std(1, unbiased=False))):
            reference = statistics[f"{name}_{statistic}"]
            assert_close(ours, reference, atol=1e-5 * float(np.abs(reference).max()), rtol=0, what=f"{name}_{statistic}")


@pytest.mark.parametrize("shape", [(1, 5, 6, 7), (2, 40, 9, 11), (1, 70, 5, 13), (1, 3, 12, 4), (2, 33, 10, 37)])
@pytest.mark.parametrize("tile, images_per_product", [(16, None), (4, None), (4, 2)])
def test_correlation_matches_loop(shape, tile, images_per_product):
    first = torch.randn(shape, requires_grad=True)
    second = torch.randn(shape, requires_grad=True)
    expected = correlation_reference(first, second)
    # Channels-last inputs, the layout PWCNet feeds in, take the copy-free path.
    ours = correlation(first.contiguous(memory_format=torch.channels_last), second, tile=tile,
                       images_per_product=images_per_product)
    assert ours.shape == (shape[0], 81, shape[2], shape[3])
    assert_close(ours, expected, atol=1e-5, rtol=1e-5, what="correlation")
    upstream = torch.randn_like(expected)
    grads_expected = torch.autograd.grad((expected * upstream).sum(), (first, second))
    grads_ours = torch.autograd.grad((ours * upstream).sum(), (first, second))
    for name, a, b in zip(("d first", "d second"), grads_ours, grads_expected):
        assert_close(a, b, atol=1e-5, rtol=1e-5, what=name)


def test_correlation_channel_order_and_padding():
    # One unit feature at (y, x) = (3, 5) of `second` is seen by the output pixel (3-dy, 5-dx) in
    # channel (dy+4)*9 + (dx+4), with value 1/C times first's value there; nothing else is non-zero.
    first = torch.full((1, 2, 8, 10), 3.0)
    second = torch.zeros(1, 2, 8, 10)
    second[0, :, 3, 5] = 1.0
    out = correlation(first, second, tile=3)
    seen = 0
    for dy in range(-4, 5):
        for dx in range(-4, 5):
            if 0 <= 3 - dy < 8 and 0 <= 5 - dx < 10:
                assert out[0, (dy + 4) * 9 + dx + 4, 3 - dy, 5 - dx] == 3.0, (dy, dx)
                seen += 1
    assert seen == 72 and torch.count_nonzero(out) == seen


def test_correlation_gradcheck_float64():
    first = torch.randn(2, 3, 5, 6, dtype=torch.float64, requires_grad=True)
    second = torch.randn(2, 3, 5, 6, dtype=torch.float64, requires_grad=True)
    for images in (1, 2):
        assert torch.autograd.gradcheck(lambda a, b: correlation(a, b, tile=4, images_per_product=images),
                                        (first, second), fast_mode=True)


def test_correlation_rejects_mismatched_inputs():
    with pytest.raises(ValueError, match="same shape"):
        correlation(torch.zeros(1, 4, 6, 6), torch.zeros(1, 4, 6, 7))


def test_networks_match_literal_reference(networks, reference_state):
    """Batch 2 at 128x192 in float32: outputs and intermediates."""
    flow_net, mask_net = networks
    source, target = torch.rand(2, 3, 128, 192), torch.rand(2, 3, 128, 192)
    aux = torch.randn(2, 12, 128, 192)
    ours_inter, ref_inter = {}, {}
    with torch.no_grad():
        ours = flow_net(source, target, ours_inter)
        expected = pwcnet_reference(reference_state[0], source, target, ref_inter)
        mask = mask_net(ours[5], aux)
        mask_expected = masknet_reference(reference_state[1], expected[5], aux)
    names = ("flow2", "flow3", "flow4", "flow5", "flow6", "features2")
    for name, a, b in zip(names, ours, expected):
        assert_close(a, b, atol=1e-5 * float(b.abs().max()), rtol=0, what=name)
    for name in ("ext_src_L6", "ext_tgt_L3", "cv_raw_L6", "cv_raw_L3", "warped_tgt_L2", "upfeat_L4",
                 "dec_features_L5", "dec_flow_L2_before_refiner"):
        b = ref_inter[name]
        assert_close(ours_inter[name], b, atol=1e-5 * float(b.abs().max()), rtol=0, what=name)
    assert_close(mask, mask_expected, atol=1e-5, rtol=0, what="mask")


def test_gradients_match_literal_reference(networks, reference_state):
    """Input gradients through both networks (in-place activations, cached grids, the banded
    cost volume) in float64, where the two agree to rounding; in float32 the gradient of this
    network is ill-conditioned (the reference itself is 1e-4 off its float64 value)."""
    flow_net, mask_net = (copy.deepcopy(net).double() for net in networks)
    flow_state = {k: v.double() for k, v in reference_state[0].items()}
    mask_state = {k: v.double() for k, v in reference_state[1].items()}
    source = torch.rand(1, 3, 64, 128, dtype=torch.float64, requires_grad=True)
    target = torch.rand(1, 3, 64, 128, dtype=torch.float64)
    aux = torch.randn(1, 12, 64, 128, dtype=torch.float64)
    grads = []
    for pwc, head in ((flow_net, mask_net), (lambda a, b: pwcnet_reference(flow_state, a, b),
                                             lambda a, b: masknet_reference(mask_state, a, b))):
        outputs = pwc(source, target)
        loss = outputs[0].sum() + 10.0 * outputs[2].sum() + 100.0 * head(outputs[5], aux).sum()
        grads.append(torch.autograd.grad(loss, source)[0])
    assert float(grads[1].abs().max()) > 0.1
    assert_close(grads[0], grads[1], atol=1e-7 * float(grads[1].abs().max()), rtol=0, what="d source")


def test_inference_and_autograd_paths_agree(networks):
    """Inference mode (fused oneDNN kernels, matrix-product narrow convs) and autograd mode
    (plain convs) give the same outputs; an autograd forward after an inference one still
    differentiates (no inference tensors cached and reused)."""
    flow_net, mask_net = networks
    source, target = torch.rand(1, 3, 64, 128), torch.rand(1, 3, 64, 128)
    aux = torch.randn(1, 12, 64, 128)
    with torch.inference_mode():
        fast = flow_net(source, target)
        fast_mask = mask_net(fast[5], aux)
    plain = flow_net(source, target)
    plain_mask = mask_net(plain[5], aux)
    assert plain[0].requires_grad and plain_mask.requires_grad
    for name, a, b in zip(("flow2", "flow3", "flow4", "flow5", "flow6", "features2"), fast, plain):
        b = b.detach()
        assert_close(a, b, atol=1e-5 * float(b.abs().max()), rtol=0, what=name)
    assert_close(fast_mask, plain_mask.detach(), atol=1e-5, rtol=0, what="mask")
    (plain[0].sum() + plain_mask.sum()).backward()
    assert flow_net.moduleRefiner.moduleMain[0].weight.grad is not None
    assert mask_net.upconv1.weight.grad is not None
    flow_net.zero_grad(set_to_none=True)
    mask_net.zero_grad(set_to_none=True)


def test_transposed_conv_as_phases():
    x = torch.randn(2, 7, 5, 6, dtype=torch.float64)
    weight = torch.randn(7, 3, 4, 4, dtype=torch.float64)
    bias = torch.randn(3, dtype=torch.float64)
    expected = F.conv_transpose2d(x, weight, bias, stride=2, padding=1)
    ours = F.pixel_shuffle(F.conv2d(x, transposed_as_phases(weight), bias.repeat_interleave(4), padding=1), 2)
    assert_close(ours, expected, atol=1e-12, rtol=0, what="phases")


@pytest.mark.parametrize("shape,outputs", [((1, 565, 9, 13), 2), ((2, 16, 7, 5), 1), ((1, 3, 1, 4), 2)])
def test_narrow_conv_matches_conv2d(shape, outputs):
    x = torch.randn(shape).contiguous(memory_format=torch.channels_last)
    weight, bias = torch.randn(outputs, shape[1], 3, 3), torch.randn(outputs)
    expected = F.conv2d(x.double(), weight.double(), bias.double(), padding=1)
    assert_close(narrow_conv3x3(x, weight, bias), expected, atol=1e-5 * float(expected.abs().max()), rtol=0,
                 what="narrow conv")


def test_pwcnet_rejects_bad_sizes():
    with pytest.raises(ValueError, match="divisible by 64"):
        PWCNet()(torch.zeros(1, 3, 64, 96), torch.zeros(1, 3, 64, 96))


def full_tracker_state(reference_state):
    flow, mask = reference_state
    state = OrderedDict(("flow_net." + k, v) for k, v in flow.items())
    state.update(("mask_net." + k, v) for k, v in mask.items())
    return state


def test_full_checkpoint_file_loads(tmp_path, reference_state):
    path = str(tmp_path / "model_A.pt")
    torch.save({"state_dict": full_tracker_state(reference_state), "epoch": 3}, path)
    flow_net, mask_net = PWCNet(), MaskNet()
    assert load_reference_checkpoint(flow_net, mask_net, path)
    for key, value in reference_state[0].items():
        assert torch.equal(flow_net.state_dict()[key], value), key
    for key, value in reference_state[1].items():
        assert torch.equal(mask_net.state_dict()[key], value), key


def test_flow_only_checkpoint_with_bare_keys_loads(tmp_path, reference_state):
    path = str(tmp_path / "chairs_things.pt")
    torch.save(reference_state[0], path)
    flow_state, mask_state = load_reference_state_dicts(path)
    assert mask_state is None and list(flow_state) == list(reference_state[0])
    flow_net, mask_net = PWCNet(), MaskNet()
    before = {k: v.clone() for k, v in mask_net.state_dict().items()}
    assert not load_reference_checkpoint(flow_net, mask_net, path)
    assert torch.equal(flow_net.moduleRefiner.moduleMain[12].bias, reference_state[0]["moduleRefiner.moduleMain.12.bias"])
    assert all(torch.equal(mask_net.state_dict()[k], v) for k, v in before.items())


def test_checkpoint_with_missing_tensor_is_refused(tmp_path, reference_state):
    state = full_tracker_state(reference_state)
    del state["flow_net.moduleFou.moduleThr.0.weight"]
    path = str(tmp_path / "broken.pt")
    torch.save(state, path)
    with pytest.raises(CheckpointError, match=r"broken\.pt.*missing tensor 'moduleFou\.moduleThr\.0\.weight'.*\(96, 437, 3, 3\)"):
        load_reference_checkpoint(PWCNet(), MaskNet(), path)


def test_checkpoint_with_misshaped_tensor_is_refused(tmp_path, reference_state):
    state = full_tracker_state(reference_state)
    state["mask_net.model.2.block1.0.weight"] = torch.zeros(16, 8, 3, 3)
    path = str(tmp_path / "misshaped.pt")
    torch.save({"model": state}, path)
    with pytest.raises(CheckpointError, match=r"misshaped\.pt \(mask_net\).*'model\.2\.block1\.0\.weight'.*"
                                              r"\(16, 8, 3, 3\), expected \(16, 16, 3, 3\)"):
        load_reference_checkpoint(PWCNet(), MaskNet(), path)


def test_unexpected_and_foreign_tensors_are_refused(reference_state):
    flow = OrderedDict(reference_state[0])
    flow["moduleSix.moduleUpflow.weight"] = torch.zeros(2, 2, 4, 4)
    with pytest.raises(CheckpointError, match="unexpected tensor 'moduleSix.moduleUpflow.weight'"):
        check_state_dict(PWCNet(), flow, "test")
    with pytest.raises(CheckpointError, match="not a reference tracker or PWC-Net checkpoint"):
        load_reference_state_dicts({"encoder.weight": torch.zeros(3)})
    with pytest.raises(CheckpointError, match="unexpected tensor 'optimizer.step'"):
        load_reference_state_dicts({"flow_net.a": torch.zeros(1), "optimizer.step": torch.zeros(1)})


def test_fresh_pwcnet_sees_its_cost_volume():
    """Training from scratch needs PWC-Net's He init: with PyTorch's default one the cost volume
    starts ~1e-5 and the decoders learn to ignore it (zero flow forever)."""
    torch.manual_seed(0)
    net = PWCNet()
    for name, module in net.named_modules():
        if isinstance(module, (torch.nn.Conv2d, torch.nn.ConvTranspose2d)):
            fan_in = module.weight[0].numel()  # torch's (and PWC-Net's) fan-in, also for deconvs
            if module.weight.numel() >= 1000:  # enough samples for a tight estimate of the std
                assert abs(module.weight.std().item() / (2.0 / fan_in) ** 0.5 - 1) < 0.1, name
            assert module.bias is None or not module.bias.any(), name
    volumes = []
    original = correlation

    def spy(first, second, **kwargs):
        volumes.append(original(first, second, **kwargs))
        return volumes[-1]

    image = torch.rand(1, 3, 64, 128, generator=torch.Generator().manual_seed(1))
    import model.pwcnet as pwcnet_module
    try:
        pwcnet_module.correlation = spy
        with torch.no_grad():
            net(image, torch.roll(image, 2, dims=-1))
    finally:
        pwcnet_module.correlation = original
    assert len(volumes) == 5
    assert volumes[-1].abs().mean() > 1e-3  # level 2


def test_normalized_cost_volume_finds_a_shift_the_product_volume_misses():
    """Features with a large shared positive part (as leaky-ReLU features have): the product
    volume peaks wherever the mean part is largest, the normalised one at the true shift, with
    correlation coefficients in [-1, 1] and exactly 1 there."""
    generator = torch.Generator().manual_seed(3)
    pattern = torch.randn(1, 16, 24, 40, generator=generator)
    ramp = torch.linspace(0, 4, 40).expand(1, 16, 24, 40)
    first = 5 + ramp + 0.3 * pattern
    dy, dx = 1, -2
    second = torch.roll(first, shifts=(dy, dx), dims=(2, 3))  # second[y+dy, x+dx] = first[y, x]
    inner = (slice(5, -5), slice(5, -5))
    expected = (dy + 4) * 9 + (dx + 4)
    product = correlation(first, second)[0].argmax(0)[inner]
    normalized = correlation(normalize_features(first), normalize_features(second))[0]
    assert (product == expected).float().mean() < 0.5
    assert (normalized.argmax(0)[inner] == expected).all()
    assert torch.allclose(normalized[expected][inner], torch.ones(()), atol=1e-4)
    assert normalized.abs().max() <= 1 + 1e-4
    assert normalize_features(torch.zeros(1, 4, 2, 2)).eq(0).all()  # warped from outside: stays 0


def test_cost_volume_is_checked_and_keeps_the_parameters():
    assert list(PWCNet("normalized").state_dict()) == list(PWCNet().state_dict())
    with pytest.raises(ValueError, match="cost_volume"):
        PWCNet("cosine")
