import pytest

import skymap


def test_version_and_lazy_submodules():
    assert skymap.__version__ == "0.1.0"
    assert "stats" in dir(skymap)
    with pytest.raises(AttributeError, match="no attribute"):
        skymap.not_a_thing
