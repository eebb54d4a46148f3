"""What crosses from a student's kernel to the judge is plain data, decoded into fresh objects."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from course_utils.grading.verdict import Unsupported, decode, encode


def round_trip(value, **kwargs):
    return decode(json.loads(json.dumps(encode(value))), **kwargs)


@pytest.mark.parametrize("value", [
    None, True, 0, -7, 2**70, 1.5, float("inf"), "Odile lives in Fenwick.", [1, "a", None],
    (1, (2.0, [3])), {"input_ids": [1, 2], 3: "x", (1, 2): None}, torch.Size([2, 3]), torch.float16,
])
def test_plain_values_come_back_equal_and_of_the_same_type(value):
    back = round_trip(value)
    assert back == value and type(back) is type(value)


@pytest.mark.parametrize("tensor", [
    torch.tensor(3.5), torch.arange(12).view(3, 4), torch.randn(2, 3, dtype=torch.bfloat16),
    torch.zeros(0, 5), torch.tensor([True, False]), torch.randn(4, 4)[:, 1],  # non-contiguous
])
def test_tensors_come_back_bit_for_bit(tensor):
    back = round_trip(tensor)
    assert type(back) is torch.Tensor and back.dtype == tensor.dtype and back.shape == tensor.shape
    assert torch.equal(back, tensor)


def test_numpy_values_come_back():
    array = np.arange(6, dtype=np.float32).reshape(2, 3)
    assert np.array_equal(round_trip(array), array) and round_trip(np.float64(2.5)) == 2.5


def test_subclasses_arrive_as_their_plain_base_type():
    class Sneaky(float):
        def __eq__(self, other):  # a student's "equal to anything"
            return True

    back = round_trip(Sneaky(1.0))
    assert type(back) is float and back != 2.0
    assert type(round_trip(torch.nn.Parameter(torch.ones(2)))) is torch.Tensor


def test_other_objects_arrive_as_unsupported_and_fail_type_checks():
    back = round_trip(object())
    assert isinstance(back, Unsupported) and not isinstance(back, (float, torch.Tensor))
    assert isinstance(round_trip(lambda: 1), Unsupported)


def test_code_from_a_student_is_never_decoded_by_the_judge():
    """Functions travel only from the judge to the kernel (a test's own judge function)."""
    message = json.loads(json.dumps(encode(lambda x: x + 1, context_names={})))
    assert isinstance(decode(message), Unsupported)
    assert decode(message, trusted=True)(1) == 2


def test_model_configs_travel_as_their_settings():
    from transformers import LlamaConfig

    config = LlamaConfig(hidden_size=64, num_hidden_layers=3, num_attention_heads=4)
    back = round_trip(config)
    assert type(back) is LlamaConfig and back.to_dict() == config.to_dict()
