"""PWC-Net flow backbone with the reference tracker's parameter layout and numerics.

The architecture facts (warping grid, cost-volume order, newest-first dense concatenation, where
the leaky ReLUs are) are the reference tracker's; the literal version, written from them, is
``tests/reference/pwcnet_reference.py``. ``state_dict()`` keys are the reference's
``flow_net.*`` keys without the prefix, so reference checkpoints load unchanged.

What is done differently from the literal version, for CPU speed, without changing the result
beyond float rounding (each kept because it measured faster at 640x448 on 2 cores;
``benchmarks/bench_network.py`` times the whole against the literal reference):

* Feature maps are kept in channels-last memory format: oneDNN's convolutions then skip the
  NCHW <-> blocked reorders (most decoder and refiner convs ran 10-45% faster; the largest,
  565 -> 128, about the same).
* The shared extractor runs once on source and target stacked in one batch of 2.
* The cost volume is a banded matrix product (``model.cost_volume``) instead of 81 passes.
* The flow predictor of level l (3x3 conv, stack -> 2) and the upfeat transposed conv of level
  l-1 (4x4 stride 2, same stack -> 2) run as one 3x3 conv with 2 + 8 outputs: a transposed conv
  with kernel 4, stride 2 and padding 1 is a 3x3 conv with one output per (channel, 2x2 output
  phase) followed by a pixel shuffle (``transposed_as_phases``). oneDNN computes outputs in
  blocks of 16, so the 8 extra outputs are free and the separate transposed conv is saved.
* When no autograd graph is recorded (``torch.inference_mode()`` / ``no_grad``) on CPU float32,
  each conv and its activation run as one oneDNN kernel (``conv_act``). Elsewhere (training,
  CUDA, float64) plain ``F.conv2d`` + in-place activations run.
* In the same case the 3x3 convs with 2 outputs (level-2 flow predictor, last refiner conv)
  run as a matrix product plus shifted additions (``narrow_conv3x3``).
* The warping grid's ``linspace`` part and the divisors are cached per map size.
"""
from typing import Dict, List, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from model.cost_volume import correlation
from model.fast_conv import (CONV_POINTWISE, SLOPE, cat_channels, conv_act, fused_available,
                             transposed_as_phases)

# PWC-Net predicts flow in units of 20 pixels (the level-l decoder at 2^l-th resolution in units
# of 20 / 2^l pixels of its own map); the tracker and the flow loss convert with it.
FLOW_SCALE = 20.0

LEVEL_NAMES = ("One", "Two", "Thr", "Fou", "Fiv", "Six")
EXTRACTOR_CHANNELS = (16, 32, 64, 96, 128, 196)
DENSE_CHANNELS = (128, 128, 96, 64, 32)
CV_CHANNELS = 81
# Final dense-stack channels of each decoder level (index = level), fed to the next level's upfeat.
STACK_CHANNELS = {level: (CV_CHANNELS + (0 if level == 6 else EXTRACTOR_CHANNELS[level - 1] + 4))
                  + sum(DENSE_CHANNELS) for level in range(2, 7)}
REFINER_LAYERS = ((128, 1), (128, 2), (128, 4), (96, 8), (64, 16), (32, 1), (2, 1))

COST_VOLUMES = ("product", "normalized")


def normalize_features(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """(B, C, H, W) features centred and scaled to unit RMS over channels at every pixel.

    The "normalized" cost volume correlates these, so each entry is a correlation coefficient in
    [-1, 1]. Why: the "product" volume of leaky-ReLU features is dominated by the product of
    their (positive) means, which barely depends on the displacement; the decoders then learn to
    ignore the volume and a network trained from scratch predicts the mean flow for thousands of
    steps. Zero vectors (warped from outside the image) stay zero.
    """
    x = x - x.mean(dim=1, keepdim=True)
    return x * torch.rsqrt(x.pow(2).mean(dim=1, keepdim=True) + eps)


def _conv3x3(cin: int, cout: int, stride: int = 1, dilation: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 3, stride=stride, padding=dilation, dilation=dilation)


def _upconv(cin: int) -> nn.ConvTranspose2d:
    return nn.ConvTranspose2d(cin, 2, 4, stride=2, padding=1)


class Extractor(nn.Module):
    """Six-level feature pyramid, levels ``moduleOne``..``moduleSix`` of 3 convs + leaky ReLU."""

    def __init__(self):
        super().__init__()
        cin = 3
        for name, cout in zip(LEVEL_NAMES, EXTRACTOR_CHANNELS):
            setattr(self, "module" + name, nn.Sequential(
                _conv3x3(cin, cout, stride=2), nn.LeakyReLU(SLOPE, inplace=True),
                _conv3x3(cout, cout), nn.LeakyReLU(SLOPE, inplace=True),
                _conv3x3(cout, cout), nn.LeakyReLU(SLOPE, inplace=True)))
            cin = cout

    def forward(self, image: torch.Tensor) -> List[torch.Tensor]:
        """(N, 3, H, W) -> [(N, C_l, H/2^l, W/2^l) for l = 1..6]."""
        levels, x = [], image
        for name in LEVEL_NAMES:
            for conv in getattr(self, "module" + name)[0::2]:
                x = conv_act(conv, x, "leaky_relu")
            levels.append(x)
        return levels


class Decoder(nn.Module):
    """Decoder of one level: upsampling of the coarser estimate, warp, cost volume, dense block.

    Submodules are declared in the reference's order so that ``state_dict()`` lists the keys as
    the reference does: ``moduleUpflow``, ``moduleUpfeat`` (not at level 6), ``moduleOne`` ..
    ``moduleFiv`` (dense convs), ``moduleSix`` (flow predictor).
    """

    def __init__(self, level: int, cost_volume: str = "product"):
        super().__init__()
        self.level = level
        self.cost_volume = cost_volume
        if level < 6:
            self.moduleUpflow = _upconv(2)
            self.moduleUpfeat = _upconv(STACK_CHANNELS[level + 1])
            # Target features are warped by upflow * 20 / 2^level pixels of this level.
            self.flow_scale = FLOW_SCALE / 2 ** level
        cin = STACK_CHANNELS[level] - sum(DENSE_CHANNELS)
        for name, cout in zip(LEVEL_NAMES[:5], DENSE_CHANNELS):
            setattr(self, "module" + name, nn.Sequential(_conv3x3(cin, cout), nn.LeakyReLU(SLOPE, inplace=True)))
            cin += cout
        self.moduleSix = nn.Sequential(_conv3x3(cin, 2))
        self._grid_cache: Dict[tuple, Tuple[torch.Tensor, torch.Tensor]] = {}

    def _base_grid(self, height: int, width: int, like: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """Cached (1, h, w, 2) linspace grid and (2,) divisors ((w-1)/2, (h-1)/2) for a map size."""
        key = (height, width, like.device, like.dtype, torch.is_inference_mode_enabled())
        if key not in self._grid_cache:
            gx = torch.linspace(-1.0, 1.0, width, device=like.device, dtype=like.dtype)
            gy = torch.linspace(-1.0, 1.0, height, device=like.device, dtype=like.dtype)
            grid = torch.stack([gx.view(1, width).expand(height, width),
                                gy.view(height, 1).expand(height, width)], dim=-1).unsqueeze(0)
            divisor = torch.tensor([(width - 1.0) / 2.0, (height - 1.0) / 2.0], device=like.device, dtype=like.dtype)
            self._grid_cache[key] = (grid, divisor)
        return self._grid_cache[key]

    def warp(self, features: torch.Tensor, flow: torch.Tensor) -> torch.Tensor:
        """Samples target features at ``linspace`` grid + flow, zeroing half-outside samples.

        Args:
            features: (B, C, h, w) target features.
            flow: (B, 2, h, w) displacement in pixels of this level (channel 0 = x).
        Returns:
            (B, C, h, w) warped features times the 0/1 validity mask (1 where a sampled all-ones
            channel exceeds 0.999). Zero flow is not the identity: the grid convention is
            align_corners=False on a linspace grid, as in the reference.
        """
        batch, _, height, width = features.shape
        grid, divisor = self._base_grid(height, width, features)
        grid = grid + flow.permute(0, 2, 3, 1) / divisor
        sampled = F.grid_sample(features, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
        # The validity mask samples one all-ones channel on its own: the same per-channel
        # arithmetic as the reference's extra channel, without a (C+1)-channel copy of features.
        ones = features.new_ones(batch, 1, height, width)
        coverage = F.grid_sample(ones, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
        return sampled * (coverage > 0.999).to(features.dtype)

    def forward(self, first: torch.Tensor, second: torch.Tensor, previous: Optional[Tuple[torch.Tensor, torch.Tensor]],
                record: Optional[dict] = None) -> torch.Tensor:
        """Dense feature stack of one level.

        Args:
            first, second: (B, C_l, h, w) source and target features of this level.
            previous: (flow (B, 2, h/2, w/2) of the coarser level, upfeat (B, 2, h, w): this
                level's ``moduleUpfeat`` applied to the coarser stack, see ``head``), or None
                at level 6.
            record: optional dict receiving intermediates named as in ``pwc_intermediates.npz``.
        Returns:
            (B, C_stack, h, w) dense stack, newest conv output first.
        """
        level = self.level
        correlate = correlation if self.cost_volume == "product" else \
            (lambda a, b: correlation(normalize_features(a), normalize_features(b)))
        if previous is None:
            volume = correlate(first, second)
        else:
            upflow = self.moduleUpflow(previous[0])
            upfeat = previous[1]
            warped = self.warp(second, upflow * self.flow_scale)
            volume = correlate(first, warped)
            if record is not None:
                record.update({f"upflow_L{level}": upflow, f"upfeat_L{level}": upfeat, f"warped_tgt_L{level}": warped})
        if record is not None:
            # A copy, because the leaky ReLU below runs in place.
            record[f"cv_raw_L{level}"] = volume.clone()
        volume = F.leaky_relu(volume, SLOPE, inplace=True)
        stack = volume if previous is None else cat_channels([volume, first, upflow, upfeat])
        for name in LEVEL_NAMES[:5]:
            stack = cat_channels([conv_act(getattr(self, "module" + name)[0], stack, "leaky_relu"), stack])
        if record is not None:
            record[f"dec_features_L{level}"] = stack
        return stack

    def head(self, stack: torch.Tensor, finer: Optional["Decoder"] = None
             ) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """Flow of this level and, if ``finer`` is given, the finer level's upfeat, in one conv.

        Args:
            stack: (B, C_stack, h, w) this level's dense stack.
            finer: the decoder of the next finer level, whose ``moduleUpfeat`` reads this stack.
        Returns:
            (flow (B, 2, h, w), upfeat (B, 2, 2h, 2w) or None).
        """
        predictor = self.moduleSix[0]
        if finer is None:
            return conv_act(predictor, stack), None
        upfeat = finer.moduleUpfeat
        weight = torch.cat([predictor.weight, transposed_as_phases(upfeat.weight)], dim=0)
        bias = torch.cat([predictor.bias, upfeat.bias.repeat_interleave(4)], dim=0)
        if fused_available(stack, weight, bias):
            both = CONV_POINTWISE(stack, weight, bias, (1, 1), (1, 1), (1, 1), 1, "none", [], None)
        else:
            both = F.conv2d(stack, weight, bias, padding=1)
        return both[:, :2], F.pixel_shuffle(both[:, 2:], 2)


class Refiner(nn.Module):
    """Context network: seven dilated 3x3 convs on the level-2 stack, ``moduleMain.{0,2,..,12}``."""

    def __init__(self):
        super().__init__()
        layers, cin = [], STACK_CHANNELS[2]
        for index, (cout, dilation) in enumerate(REFINER_LAYERS):
            layers.append(_conv3x3(cin, cout, dilation=dilation))
            if index < len(REFINER_LAYERS) - 1:
                layers.append(nn.LeakyReLU(SLOPE, inplace=True))
            cin = cout
        self.moduleMain = nn.Sequential(*layers)

    def forward(self, stack: torch.Tensor) -> torch.Tensor:
        """(B, 565, h, w) -> (B, 2, h, w) flow correction."""
        convs = self.moduleMain[0::2]
        x = stack
        for conv in convs[:-1]:
            x = conv_act(conv, x, "leaky_relu")
        return conv_act(convs[-1], x)


class PWCNet(nn.Module):
    """PWC-Net as in the reference tracker (``flow_net``).

    ``forward(source, target)`` takes (B, 3, H, W) float RGB in [0, 1] with H and W multiples
    of 64 and returns ``(flow2, flow3, flow4, flow5, flow6, features2)``: raw flows
    (B, 2, H/2^l, W/2^l) (channel 0 = x; 20 * flow is in full-resolution pixels; flow2 includes
    the refiner) and the (B, 565, H/4, W/4) level-2 dense feature stack. Outputs are in
    channels-last memory format; call ``.contiguous()`` where NCHW strides matter.

    ``cost_volume``: "product" is the reference's (its weights need it); "normalized" correlates
    features normalised per pixel (``normalize_features``), this project's choice for training
    from scratch. The two have the same parameters.
    """

    def __init__(self, cost_volume: str = "product"):
        super().__init__()
        if cost_volume not in COST_VOLUMES:
            raise ValueError(f"cost_volume must be one of {COST_VOLUMES}, got {cost_volume!r}")
        self.cost_volume = cost_volume
        self.moduleExtractor = Extractor()
        for level in range(2, 7):
            setattr(self, "module" + LEVEL_NAMES[level - 1], Decoder(level, cost_volume))
        self.moduleRefiner = Refiner()
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """He-normal (fan-in) weights and zero biases, as PWC-Net's own training code does.

        With PyTorch's default init the pyramid features come out around 1e-2 and the product
        cost volume around 1e-5. He init alone did not let our from-scratch runs leave the
        zero-flow plateau either; the "normalized" cost volume did (see ``normalize_features``).
        """
        for module in self.modules():
            if isinstance(module, (nn.Conv2d, nn.ConvTranspose2d)):
                nn.init.kaiming_normal_(module.weight, mode="fan_in")
                if module.bias is not None:
                    nn.init.zeros_(module.bias)

    def forward(self, source: torch.Tensor, target: torch.Tensor, intermediates: Optional[dict] = None
                ) -> Tuple[torch.Tensor, ...]:
        """See the class docstring. ``intermediates``, if a dict, receives the named tensors of
        ``pwc_intermediates.npz`` (``ext_src_L6``, ``cv_raw_L5``, ``dec_features_L6``,
        ``upflow_L5``, ``warped_tgt_L5``, ``dec_flow_L2_before_refiner``, ...) for debugging."""
        if source.dim() != 4 or source.shape[1] != 3 or source.shape != target.shape:
            raise ValueError(f"PWCNet expects source and target of the same (B, 3, H, W) shape, got "
                             f"{tuple(source.shape)} and {tuple(target.shape)}")
        if source.shape[2] % 64 or source.shape[3] % 64:
            raise ValueError(f"PWCNet needs H and W divisible by 64, got {tuple(source.shape[2:])}")
        batch = source.shape[0]
        pair = torch.cat([source, target], dim=0).contiguous(memory_format=torch.channels_last)
        pyramid = self.moduleExtractor(pair)
        if intermediates is not None:
            for level, features in enumerate(pyramid, start=1):
                intermediates[f"ext_src_L{level}"] = features[:batch]
                intermediates[f"ext_tgt_L{level}"] = features[batch:]
        flows, previous = {}, None
        for level in range(6, 1, -1):
            features = pyramid[level - 1]
            decoder = getattr(self, "module" + LEVEL_NAMES[level - 1])
            stack = decoder(features[:batch], features[batch:], previous, intermediates)
            finer = getattr(self, "module" + LEVEL_NAMES[level - 2]) if level > 2 else None
            flows[level], upfeat = decoder.head(stack, finer)
            previous = (flows[level], upfeat)
        if intermediates is not None:
            intermediates["dec_flow_L2_before_refiner"] = flows[2]
        flow2 = flows[2] + self.moduleRefiner(stack)
        return flow2, flows[3], flows[4], flows[5], flows[6], stack
