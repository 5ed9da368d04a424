"""The redundancy view: per-layer CLS attention equals the eager model's own attention maps,
the concentration figures follow from it, and the CLI writes the figure."""

import math

import numpy as np
import pytest
import torch
from PIL import Image

from visionzip_eval.cli import main
from visionzip_eval.demos.redundancy import redundancy_figure, tower_redundancy
from visionzip_eval.backends.llava_hf import build_tiny_llava
from visionzip_eval.backends.llava_onevision import build_tiny_llava_onevision
from visionzip_eval.testing import sample_images


def test_per_layer_cls_attention_equals_the_eager_maps():
    model, processor = build_tiny_llava(seed=0, attn_implementation="eager")
    pixel_values = processor.image_processor([sample_images()["astronaut"]], return_tensors="pt")["pixel_values"]
    stats = tower_redundancy(model, pixel_values, top_k=20)
    with torch.no_grad():
        eager = model.model.vision_tower(pixel_values, output_attentions=True).attentions
    assert len(stats.attention) == len(eager) == 4 and stats.feature_layer == 2  # LLaVA's -2 of 4 layers
    for layer, maps in enumerate(eager):
        want = maps[0, :, 0, 1:].double().mean(0)
        want = (want / want.sum()).numpy()
        np.testing.assert_allclose(stats.attention[layer].ravel(), want, rtol=1e-5, atol=1e-8)
        top = np.sort(want)[::-1][:20].sum()
        assert stats.top_share[layer] == pytest.approx(top, rel=1e-6)
        entropy = -(want * np.log(want)).sum() / math.log(576)
        assert stats.entropy[layer] == pytest.approx(entropy, rel=1e-6)
    assert len(stats.to_dominant) == len(stats.to_neighbour) == 576 - 20
    assert (stats.to_neighbour <= 1 + 1e-9).all() and (stats.to_dominant <= 1 + 1e-9).all()


def test_towers_without_cls_and_batches_are_refused():
    model, processor = build_tiny_llava_onevision(seed=0)
    with pytest.raises(ValueError, match="reads the \\[CLS\\] token's attention"):
        tower_redundancy(model, torch.zeros(1, 3, 384, 384))
    model, _ = build_tiny_llava(seed=0)
    with pytest.raises(ValueError, match="one image at a time"):
        tower_redundancy(model, torch.zeros(2, 3, 336, 336))


def test_cli_writes_the_redundancy_figure(tmp_path, capsys):
    image = tmp_path / "coffee.png"
    sample_images()["coffee"].save(image)
    out = tmp_path / "view.png"
    assert main(["visualize", str(image), "--redundancy", "--out", str(out)]) == 0
    assert "top-54 share of CLS attention by layer" in capsys.readouterr().out
    with Image.open(out) as written:
        assert written.size[0] > 600 and written.size[1] > 400


def test_figure_has_the_maps_curves_and_histogram():
    model, processor = build_tiny_llava(seed=0)
    pixel_values = processor.image_processor([sample_images()["coffee"]], return_tensors="pt")["pixel_values"]
    figure = redundancy_figure(tower_redundancy(model, pixel_values), image=sample_images()["coffee"])
    titles = [axis.get_title() for axis in figure.axes]
    assert titles[0] == "image"
    assert sum(title.startswith("layer ") for title in titles) == 3  # layers 1, 2 and 3 (the feature layer)
    assert "how concentrated the CLS attention is, by layer" in titles
    assert "how alike the non-dominant patches are (feature layer)" in titles
