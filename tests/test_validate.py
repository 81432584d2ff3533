import numpy as np
import pytest

from skymap._validate import as_image, as_mask, as_pair, check_choice, check_positive


def test_as_pair_names_parameter():
    assert as_pair("box_size", 5) == (5, 5)
    assert as_pair("box_size", (3, 4)) == (3, 4)
    with pytest.raises(ValueError, match="box_size"):
        as_pair("box_size", 0)
    with pytest.raises(ValueError, match="box_size"):
        as_pair("box_size", (1, 2, 3))
    with pytest.raises(ValueError, match="box_size"):
        as_pair("box_size", 2.5)


def test_as_image_converts_integer_and_big_endian():
    img = np.arange(6, dtype=">i2").reshape(2, 3)
    out = as_image(img)
    assert out.dtype == np.float32 and out.dtype.isnative
    np.testing.assert_array_equal(out, img.astype(float))
    be = np.ones((2, 2), dtype=">f8")
    assert as_image(be).dtype.isnative


def test_as_image_rejects_bad_input():
    with pytest.raises(ValueError, match="image"):
        as_image(np.ones(3))
    with pytest.raises(TypeError, match="image"):
        as_image(np.array([["a"]]))
    with pytest.raises(ValueError, match="empty"):
        as_image(np.ones((0, 3)))


def test_as_mask_shape_and_dtype():
    assert as_mask(None, (2, 2)) is None
    m = as_mask(np.array([[0, 2], [0, 0]]), (2, 2))
    assert m.dtype == bool and m[0, 1] and not m[0, 0]
    with pytest.raises(ValueError, match="mask"):
        as_mask(np.zeros((3, 3), bool), (2, 2))


def test_checks_name_parameter():
    with pytest.raises(ValueError, match="method.*'a', 'b'"):
        check_choice("method", "c", ["a", "b"])
    with pytest.raises(ValueError, match="sigma"):
        check_positive("sigma", -1)
