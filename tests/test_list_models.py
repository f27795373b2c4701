"""``--list-models`` prints from a parameter table; the table is kept honest by building every model."""

import keras
import pytest

from covidx.models import create_model, list_models
from covidx.models.parameters import PARAMETERS
from covidx.train import list_models_table


def test_every_registered_model_has_a_count_and_the_columns_fit():
    assert set(PARAMETERS) == set(list_models())
    lines = list_models_table().splitlines()
    longest = max(len(n) for n in list_models())
    start = lines[0].index("kind")
    assert start >= longest + 1
    for line in lines[1:]:
        name = line.split()[0]
        assert line[len(name):start].strip() == ""  # no name runs into the next column
        assert f"{PARAMETERS[name]:,}" in line


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(PARAMETERS))
def test_parameter_table_matches_the_built_model(name):
    assert create_model(name).count_params() == PARAMETERS[name]
    keras.backend.clear_session()
