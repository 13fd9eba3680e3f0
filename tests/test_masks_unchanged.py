"""Behaviour pinned across refactors: the embedded SmolLM2-135M gets the same masks, bit for bit,
as when ``tests/fixtures/mask_hashes.json`` was made (``python tests/fixtures/mask_hashes.py``)."""
import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent / "fixtures"))
import mask_hashes  # noqa: E402

FIXTURE = json.loads(mask_hashes.FIXTURE.read_text())


def test_fixture_covers_every_setting_and_every_layer():
    assert set(FIXTURE["hashes"]) == set(mask_hashes.SETTINGS) == {"magnitude", "wanda", "wanda_2:4", "sparsegpt"}
    assert FIXTURE["settings"]["common"] == mask_hashes.COMMON  # the settings the hashes were made with
    assert FIXTURE["settings"]["threads"] == mask_hashes.THREADS
    for setting, layers in FIXTURE["hashes"].items():
        assert len(layers) == 30 * 7, setting  # SmolLM2-135M: 30 blocks x 7 linear layers
    assert len({tuple(h.values()) for h in FIXTURE["hashes"].values()}) == 4  # four different mask sets


@pytest.mark.slow
@pytest.mark.parametrize("setting", sorted(mask_hashes.SETTINGS))
def test_masks_equal_the_fixture_bit_for_bit(setting):
    got = mask_hashes.hashes(setting)
    want = FIXTURE["hashes"][setting]
    assert got.keys() == want.keys()
    differ = [name for name in want if got[name] != want[name]]
    assert not differ, f"{setting}: {len(differ)} layers changed, first {differ[:3]}"
