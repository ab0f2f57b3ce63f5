"""Named configurations: the reference study's six config lists and its published losses."""

from __future__ import annotations

import copy

from lowbit.presets import REFERENCE, REFERENCE_LOSS, reference_config, reference_loss


def test_reference_loss_is_quoted_only_for_the_exact_reference_config():
    assert reference_loss("dorefa", copy.deepcopy(REFERENCE[("dorefa", "C1")])) == 106.02
    assert reference_loss("qat", REFERENCE[("qat", "C0")]) == 103.92
    assert reference_loss("lsq", REFERENCE[("qat", "C0")]) == 104.58  # QAT and LSQ share C0's list
    assert reference_loss("qat", reference_config("qat", 3)) is None  # no reference figure at 3 bits
    assert reference_loss("qat", reference_config("qat", 8, layers="all")) is None
    assert reference_loss("qat", REFERENCE[("qat", "C0")], dataset="fashion-mnist") is None
    assert reference_loss(None, None) is None
    # (a --quick study's 1 + 1 epochs were shown 9.5 nats "behind" the reference's 10 + 10)
    assert reference_loss("qat", REFERENCE[("qat", "C0")], epochs=(1, 1)) is None
    assert reference_loss("qat", REFERENCE[("qat", "C0")], epochs=(10, 10)) == 103.92
    assert set(REFERENCE_LOSS) == set(REFERENCE)
