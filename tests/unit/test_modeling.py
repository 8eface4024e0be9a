"""Padding and pooling shared by the trainer and the scorer."""

from __future__ import annotations

from types import SimpleNamespace

import torch

from rewardserve.modeling import last_real, pad_token_id, right_pad


def test_right_pad_puts_each_sequence_at_the_left_of_its_row() -> None:
    ids, mask = right_pad([[5, 6, 7], [8]], pad_id=0)
    assert ids.tolist() == [[5, 6, 7], [8, 0, 0]]
    assert mask.tolist() == [[1, 1, 1], [1, 0, 0]]


def test_last_real_reads_the_last_unmasked_position_whatever_the_pad_id() -> None:
    # Row 1 ends in the pad id itself (EOS = pad): the mask, not the id, says it is real.
    ids, mask = right_pad([[5, 6, 7], [8, 0], [9]], pad_id=0)
    values = ids.float() * 10
    assert last_real(values, mask).tolist() == [70.0, 0.0, 90.0]
    assert last_real(torch.arange(9.0).reshape(3, 3), mask).tolist() == [2.0, 4.0, 6.0]


def test_pad_id_falls_back_to_eos_then_zero() -> None:
    assert pad_token_id(SimpleNamespace(pad_token_id=3, eos_token_id=2)) == 3
    assert pad_token_id(SimpleNamespace(pad_token_id=None, eos_token_id=2)) == 2
    assert pad_token_id(SimpleNamespace(pad_token_id=None, eos_token_id=None)) == 0
