import math

import pytest

from pipeline.config import EnergySpec
from pipeline.energy.carbon import (
    DEFAULT_GRID_INTENSITY_G_PER_KWH,
    GRID_INTENSITY_SOURCE,
    JOULES_PER_KWH,
    gco2e_per_1m_inferences,
    grams_co2e,
)


def test_one_kwh_emits_the_grid_intensity():
    assert grams_co2e(3.6e6, 500.0) == pytest.approx(500.0)
    assert grams_co2e(0.0, 500.0) == 0.0


def test_per_million_inferences():
    # 0.36 J/inference x 1e6 = 3.6e5 J = 0.1 kWh; at 473 g/kWh that is 47.3 g.
    assert gco2e_per_1m_inferences(0.36, 473.0) == pytest.approx(47.3)
    # Linear in both factors.
    assert gco2e_per_1m_inferences(0.72, 473.0) == pytest.approx(2 * 47.3)
    assert gco2e_per_1m_inferences(0.36, 946.0) == pytest.approx(2 * 47.3)


def test_default_intensity_is_documented_and_matches_the_config_default():
    assert JOULES_PER_KWH == 3_600_000
    assert EnergySpec().grid_intensity_g_per_kwh == DEFAULT_GRID_INTENSITY_G_PER_KWH
    assert "473" in GRID_INTENSITY_SOURCE and "Ember" in GRID_INTENSITY_SOURCE


@pytest.mark.parametrize("bad", [-1.0, math.nan])
def test_bad_intensity_names_the_config_field(bad):
    with pytest.raises(ValueError, match="grid_intensity_g_per_kwh"):
        grams_co2e(1.0, bad)


def test_negative_energy_is_refused():
    with pytest.raises(ValueError, match=">= 0 J"):
        grams_co2e(-1.0, 100.0)
