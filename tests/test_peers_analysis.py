"""The parts of the Captum robustness/relevance/concepts comparison (``benchmarks/peers/analysis.py``) that run in
our environment: the Keras → torch weight layout and the generated block."""

from __future__ import annotations

import keras
import numpy as np
import pytest

from benchmarks.peers import analysis, blocks


def _random_cnn(seed: int = 0) -> keras.Model:
    rng = np.random.default_rng(seed)
    model = analysis.build_cnn(filters=3, hidden=5, seed=seed)
    model.set_weights([rng.normal(size=w.shape).astype(np.float32) for w in model.get_weights()])
    return model


def test_conv_and_dense_kernels_take_torch_layout() -> None:
    model = _random_cnn()
    weights = analysis.export_torch_weights(model)
    kernel, bias = model.get_layer("conv").get_weights()  # [3, 3, 1, 3]
    assert weights["conv.weight"].shape == (3, 1, 3, 3)
    for out in range(3):
        for row in range(3):
            for col in range(3):
                assert weights["conv.weight"][out, 0, row, col] == kernel[row, col, 0, out]
    np.testing.assert_array_equal(weights["conv.bias"], bias)
    # The last Dense layer follows no Flatten: its weight is the kernel transposed.
    np.testing.assert_array_equal(weights["logits.weight"], model.get_layer("logits").get_weights()[0].T)
    assert weights["hidden.weight"].shape == (5, 3 * 3 * 3)
    assert int(weights["pool_size"]) == 2


def test_dense_after_flatten_reorders_hwc_to_chw() -> None:
    rng = np.random.default_rng(1)
    height, width, channels, out = 2, 3, 4, 5
    kernel = rng.normal(size=(height * width * channels, out))
    feature = rng.normal(size=(height, width, channels))
    reordered = analysis.dense_kernel_after_flatten(kernel, (height, width, channels))
    # Keras: flatten the HWC map; torch: flatten the CHW map. Same output.
    np.testing.assert_allclose(feature.transpose(2, 0, 1).reshape(-1) @ reordered, feature.reshape(-1) @ kernel)
    assert not np.allclose(reordered, kernel)  # a real permutation
    with pytest.raises(ValueError, match="H·W·C"):
        analysis.dense_kernel_after_flatten(kernel, (2, 2, 4))


def test_export_reproduces_the_keras_logits_the_torch_way() -> None:
    model = _random_cnn(2)
    x = np.random.default_rng(3).random((16, 8, 8, 1), dtype=np.float32)
    torch_logits = analysis.torch_layout_forward(analysis.export_torch_weights(model), analysis.to_nchw(x))
    np.testing.assert_allclose(torch_logits, np.asarray(model(x)), rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(analysis.to_nhwc(analysis.to_nchw(x)), x)


def test_unsupported_layers_are_refused() -> None:
    padded = keras.Sequential([keras.Input((8, 8, 1)), keras.layers.Conv2D(2, 3, padding="same")])
    with pytest.raises(ValueError, match="valid"):
        analysis.export_torch_weights(padded)
    normalized = keras.Sequential([keras.Input((4,)), keras.layers.BatchNormalization()])
    with pytest.raises(TypeError, match="BatchNormalization"):
        analysis.export_torch_weights(normalized)


def test_block_is_replaced_in_place_and_other_blocks_are_kept() -> None:
    peers = f"{blocks.BEGIN}\npeers table\n{blocks.END}"
    first = analysis.replace_block(f"# Benchmarks\n\n{peers}\n", f"{analysis.BEGIN}\nold\n{analysis.END}\n")
    assert first.endswith(f"{peers}\n\n{analysis.BEGIN}\nold\n{analysis.END}\n")
    second = analysis.replace_block(first + "\ntail\n", f"{analysis.BEGIN}\nnew\n{analysis.END}")
    assert "old" not in second and f"{analysis.BEGIN}\nnew\n{analysis.END}\n\ntail\n" in second
    assert blocks.extract_block(second) == peers
    with pytest.raises(ValueError, match="must start"):
        analysis.replace_block("", "no markers")
