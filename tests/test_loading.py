"""`pretrained=` strings: builtin names come from the backends' declarations, and every way of
naming a model that cannot load says what would."""

import json

import pytest
import torch

from visionzip_eval.backends import BACKENDS
from visionzip_eval.loading import builtin_models, load_pretrained


def test_builtin_names_are_declared_by_the_backends():
    names = builtin_models()
    assert {"builtin:tiny-llava", "builtin:tiny-llava-synth", "builtin:tiny-llava-next",
            "builtin:tiny-llava-onevision", "builtin:tiny-llava-original", "builtin:tiny-qwen2.5-vl"} == set(names)
    assert {cls for cls, _ in names.values()} <= set(BACKENDS)


def test_unknown_builtin_lists_the_valid_names():
    with pytest.raises(ValueError) as error:
        load_pretrained("builtin:nope", torch.float32, "cpu")
    message = str(error.value)
    assert message.startswith("unknown builtin model 'builtin:nope': choose one of builtin:tiny-llava")
    assert all(name in message for name in builtin_models())


def test_unsupported_model_type_lists_the_supported_ones(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "blip-2"}))
    with pytest.raises(ValueError, match=r"is a 'blip-2' model; supported model types: .*llava.*qwen2_5_vl"):
        load_pretrained(str(tmp_path), torch.float32, "cpu")


def test_unreachable_checkpoint_says_so():
    with pytest.raises(ValueError, match="cannot load the config of 'no-such-org/no-such-model'"):
        load_pretrained("no-such-org/no-such-model", torch.float32, "cpu")
