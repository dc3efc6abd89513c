"""The shared problem's MLP in torch, for the torch workers (Captum, pyDVL, Kronfluence): one definition.

Imported inside the peers' own virtual environments (``sys.path`` holds this directory), never by ours.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import problem as spec


def build_model(layers: list[tuple[np.ndarray, np.ndarray]]) -> Any:
    """``nn.Sequential(Linear(64, H), Tanh(), Linear(H, 10))`` in eval mode, with ``weight = kernel.T``.

    Args:
        layers: ``[(kernel [in, out], bias [out]), ...]`` in the Keras layout (the width ``H`` is read from them).

    Returns:
        The torch module.
    """
    import torch
    from torch import nn

    hidden = int(layers[0][0].shape[1])  # the width is part of the problem file (Keras kernel [64, H])
    model = nn.Sequential(nn.Linear(spec.NUM_FEATURES, hidden), nn.Tanh(), nn.Linear(hidden, spec.NUM_CLASSES))
    with torch.no_grad():
        for module, (weight, bias) in zip([model[0], model[2]], spec.torch_layers(layers), strict=True):
            module.weight.copy_(torch.from_numpy(weight))
            module.bias.copy_(torch.from_numpy(bias))
    return model.eval()
