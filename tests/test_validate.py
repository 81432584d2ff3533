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


def test_combine_masks_of_large_images_in_one_pass_equal_numpy():
    # the compiled, banded pass (float32 and float64 images of 2^18 pixels or more)
    # against numpy's ~isfinite | masks; strided masks and small images take numpy's
    from skymap._validate import combine_masks

    rng = np.random.default_rng(5)
    for dtype in (np.float32, np.float64):
        img = rng.normal(size=(600, 515)).astype(dtype)
        img[rng.random(img.shape) < 0.01] = np.nan
        img[3, 4], img[5, 6], img[7, 8] = np.inf, -np.inf, np.finfo(dtype).max
        m1, m2 = rng.random(img.shape) < 0.1, rng.random(img.shape) < 0.1
        bad = ~np.isfinite(img)
        assert np.array_equal(combine_masks(img), bad)
        assert np.array_equal(combine_masks(img, None, m1), bad | m1)
        assert np.array_equal(combine_masks(img, m1, m2), bad | m1 | m2)
        wide = np.zeros((600, 1030), bool)
        wide[:, ::2] = m1
        assert np.array_equal(combine_masks(img, wide[:, ::2]), bad | m1)
        assert np.array_equal(combine_masks(img[:, ::2], m1[:, ::2]), bad[:, ::2] | m1[:, ::2])
        masked = np.ma.array(img, mask=m2)  # numpy's path: a masked array's own result
        assert np.array_equal(np.asarray(combine_masks(masked, m1)), bad | m1)
        before = m1.copy()
        combine_masks(img, m1)
        assert np.array_equal(m1, before)  # the caller's mask is not written
