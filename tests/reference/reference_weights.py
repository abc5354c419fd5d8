"""Deterministic weights for the reference tracker networks (PWC-Net flow_net + MaskNet mask_net).

The numeric fixture in ``../shared/fixtures/nnrt_reference/`` was produced with weights given by a
closed formula, so that tests and benchmarks need no checkpoint file. For the tensor with 0-based
index ``j`` in the order of ``state_dict_shapes.json`` and the element with row-major flattened
index ``i``::

    value = float32(sin((0.7*i) + (1.3*j) + 0.1) * s)      # evaluated in float64

    s = 0.7 / sqrt(prod(shape[1:]))   for flow_net.* tensors with >= 2 dims
    s = 1.0 / sqrt(prod(shape[1:]))   for mask_net.* tensors with >= 2 dims
    s = 0.01                          for 1-D tensors (biases)

``prod(shape[1:])`` is taken literally from the stored shape (for a ConvTranspose2d weight
``[in, out, kh, kw]`` that is ``out*kh*kw``, which is what the fixture used).
"""
import json
import math
from collections import OrderedDict
from typing import Dict, Tuple

import numpy as np
import torch

FLOW_PREFIX = "flow_net."
MASK_PREFIX = "mask_net."


def _scale(key: str, shape) -> float:
    if len(shape) < 2:
        return 0.01
    gain = 0.7 if key.startswith(FLOW_PREFIX) else 1.0
    return gain / math.sqrt(math.prod(shape[1:]))


def deterministic_reference_state_dict(shapes_json: str) -> "OrderedDict[str, torch.Tensor]":
    """Builds the full tracker state dict (``flow_net.*`` then ``mask_net.*``) from the formula.

    Args:
        shapes_json: path of ``state_dict_shapes.json``, a JSON object ``{key: shape}`` whose
            key order defines the tensor index ``j``.
    Returns:
        An ordered dict ``key -> float32 tensor of the stored shape``.
    """
    with open(shapes_json) as f:
        shapes = json.load(f, object_pairs_hook=OrderedDict)
    state = OrderedDict()
    for j, (key, shape) in enumerate(shapes.items()):
        numel = math.prod(shape)
        # numpy in float64 with the argument grouped as the fixture states, so that the float32
        # rounding of every element is reproduced bit for bit.
        i = np.arange(numel, dtype=np.float64)
        values = np.sin((0.7 * i + 1.3 * j) + 0.1) * _scale(key, shape)
        state[key] = torch.from_numpy(values.astype(np.float32).reshape(shape))
    return state


def split_tracker_state_dict(state: Dict[str, torch.Tensor]
                             ) -> Tuple["OrderedDict[str, torch.Tensor]", "OrderedDict[str, torch.Tensor]"]:
    """Splits a full tracker state dict into (flow-net state, mask-net state) with bare keys.

    Keys that start with neither prefix are ignored; checking for missing or unexpected tensors
    is the job of ``utils.checkpoints.check_state_dict``.
    """
    flow = OrderedDict((k[len(FLOW_PREFIX):], v) for k, v in state.items() if k.startswith(FLOW_PREFIX))
    mask = OrderedDict((k[len(MASK_PREFIX):], v) for k, v in state.items() if k.startswith(MASK_PREFIX))
    return flow, mask
