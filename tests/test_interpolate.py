"""Tests of skymap.interpolate against scipy, photutils and brute force, plus invariants."""

import warnings

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from scipy.interpolate import CubicSpline

from skymap.background.interpolate import (
    IDW,
    Interpolator,
    MeshGeometry,
    SExtractorSpline,
    ZoomSpline,
    fill_holes,
)


def _grid(rng, shape):
    y, x = np.mgrid[: shape[0], : shape[1]]
    return 10 + np.sin(x / 1.7) + 0.3 * y + 0.2 * rng.normal(size=shape)


def test_geometry_grid_centres_and_partial_meshes():
    g = MeshGeometry(box_size=(4, 5), image_shape=(10, 15))
    assert g.grid_shape == (3, 3)
    assert g.padded_shape == (12, 15)
    assert g.partial == (True, False)
    np.testing.assert_array_equal(g.y_centres, [1.5, 5.5, 9.5])
    np.testing.assert_array_equal(g.x_centres, [2.0, 7.0, 12.0])


def test_interpolators_follow_the_protocol():
    for interp in (ZoomSpline(), IDW(), SExtractorSpline()):
        assert isinstance(interp, Interpolator)


@pytest.mark.parametrize("order", [1, 3, 5])
@pytest.mark.parametrize("box,shape", [((8, 8), (40, 48)), ((7, 9), (33, 40))])
def test_zoom_spline_matches_photutils(rng, order, box, shape):
    from photutils.background.interpolators import _BkgZoomInterpolator

    g = MeshGeometry(box_size=box, image_shape=shape)
    mesh = _grid(rng, g.grid_shape)
    ours = ZoomSpline(order=order)(mesh, None, g, shape)
    ref = _BkgZoomInterpolator(order=order)(mesh, shape=shape, dtype=mesh.dtype, box_size=box)
    np.testing.assert_allclose(ours, ref, rtol=0, atol=1e-12)
    assert ours.min() >= mesh.min() and ours.max() <= mesh.max()


def test_zoom_spline_constant_grid_is_constant():
    g = MeshGeometry(box_size=4, image_shape=(9, 10))
    out = ZoomSpline()(np.full(g.grid_shape, 3.5, dtype=np.float32), None, g, (9, 10))
    assert out.dtype == np.float32
    assert np.all(out == np.float32(3.5))


@pytest.mark.parametrize("box", [(5, 5), (6, 4)])
def test_idw_matches_photutils_shepard(rng, box):
    from photutils.utils import ShepardIDWInterpolator

    shape = (31, 27)
    g = MeshGeometry(box_size=box, image_shape=shape)
    mesh = _grid(rng, g.grid_shape)
    holes = np.zeros(g.grid_shape, bool)
    holes[1, 2] = holes[3, 0] = True
    interp = IDW(n_neighbors=6, power=2.0, regularization=0.5)
    ours = interp(mesh, holes, g, shape)
    yy, xx = np.meshgrid(g.y_centres, g.x_centres, indexing="ij")
    ref_f = ShepardIDWInterpolator(np.column_stack((yy[~holes], xx[~holes])), mesh[~holes])
    qy, qx = np.mgrid[: shape[0], : shape[1]]
    ref = ref_f(np.column_stack((qy.ravel(), qx.ravel())), n_neighbors=6, power=2.0,
                regularization=0.5).reshape(shape)  # fmt: skip
    np.testing.assert_allclose(ours, ref, rtol=1e-12)


def test_idw_brute_force_and_node_values(rng):
    shape = (15, 10)
    g = MeshGeometry(box_size=5, image_shape=shape)  # odd box: centres on pixels
    mesh = _grid(rng, g.grid_shape)
    out = IDW(n_neighbors=4, power=1.5)(mesh, None, g, shape)
    yy, xx = np.meshgrid(g.y_centres, g.x_centres, indexing="ij")
    cy, cx, v = yy.ravel(), xx.ravel(), mesh.ravel()
    for y, x in [(0, 0), (7, 3), (14, 9), (3, 8)]:
        d = np.hypot(cy - y, cx - x)
        near = np.argsort(d, kind="stable")[:4]
        if d[near[0]] == 0:
            expect = v[near[0]]
        else:
            w = 1 / d[near] ** 1.5
            expect = (w * v[near]).sum() / w.sum()
        assert out[y, x] == pytest.approx(expect, rel=1e-12)
    # a pixel on a mesh centre takes that mesh's value
    assert out[2, 2] == mesh[0, 0]


def test_fill_holes_idw_matches_photutils(rng):
    from photutils.utils import ShepardIDWInterpolator

    values = _grid(rng, (6, 7))
    holes = rng.random(values.shape) < 0.3
    filled = fill_holes(values, holes)
    good = np.column_stack(np.nonzero(~holes))
    ref = ShepardIDWInterpolator(good, values[~holes])(
        np.column_stack(np.nonzero(holes)), n_neighbors=10, power=1.0
    )
    np.testing.assert_allclose(filled[holes], ref, rtol=1e-12)
    np.testing.assert_array_equal(filled[~holes], values[~holes])


def test_fill_holes_nearest_is_mean_of_nearest_valid_meshes():
    v = np.array([[1.0, 2.0, 3.0], [4.0, np.nan, 6.0], [7.0, 8.0, 9.0]])
    out = fill_holes(v, method="nearest")
    assert out[1, 1] == pytest.approx((2 + 4 + 6 + 8) / 4)
    holes = np.zeros((3, 3), bool)
    holes[0, 0] = True
    assert fill_holes(v, holes, method="nearest")[0, 0] == pytest.approx(3.0)
    with pytest.raises(ValueError, match="every mesh"):
        fill_holes(np.full((2, 2), np.nan))


def _natural_bicubic(grid, ty, tx):
    """True natural bicubic spline through unit-spaced nodes (scipy), brute force."""
    my, mx = grid.shape
    if my > 1:
        rows = CubicSpline(np.arange(my), grid, axis=0, bc_type="natural")(ty)
    else:
        rows = np.repeat(grid, len(ty), axis=0)
    if mx == 1:
        return np.repeat(rows, len(tx), axis=1)
    return CubicSpline(np.arange(mx), rows, axis=1, bc_type="natural")(tx)


@pytest.mark.parametrize("grid_shape", [(4, 5), (2, 6), (1, 4), (5, 1)])
def test_sextractor_spline_natural_mode_matches_scipy(rng, grid_shape):
    box = (6, 5)
    shape = (grid_shape[0] * box[0] - 2, grid_shape[1] * box[1] - 1)
    g = MeshGeometry(box_size=box, image_shape=shape)
    assert g.grid_shape == grid_shape
    mesh = _grid(rng, grid_shape)
    ours = SExtractorSpline(exact=False)(mesh, None, g, shape)
    ty = (np.arange(shape[0]) - g.y_centres[0]) / box[0]
    tx = (np.arange(shape[1]) - g.x_centres[0]) / box[1]
    np.testing.assert_allclose(ours, _natural_bicubic(mesh, ty, tx), rtol=1e-12)


@pytest.mark.parametrize("exact", [True, False])
def test_sextractor_spline_reproduces_planes(exact):
    g = MeshGeometry(box_size=8, image_shape=(40, 30))
    y, x = np.mgrid[: g.grid_shape[0], : g.grid_shape[1]]
    mesh = 2.0 + 0.5 * y - 0.25 * x
    out = SExtractorSpline(exact=exact)(mesh, None, g, (40, 30))
    py, px = np.mgrid[:40, :30]
    y_offset = 0.5 if exact else 0.0
    ty = (py - 3.5 - y_offset) / 8
    tx = (px - 3.5) / 8
    np.testing.assert_allclose(out, 2.0 + 0.5 * ty - 0.25 * tx, rtol=1e-12)


def test_exact_sextractor_spline_differs_from_natural_only_by_damped_curvature(rng):
    g = MeshGeometry(box_size=4, image_shape=(24, 24))
    mesh = _grid(rng, g.grid_shape)
    exact = SExtractorSpline(exact=True)(mesh, None, g, (24, 24))
    natural = SExtractorSpline(exact=False)(mesh, None, g, (24, 24))
    assert 0 < np.abs(exact - natural).max() < 0.5 * np.ptp(mesh)


def test_splines_fill_nan_holes_first(rng):
    g = MeshGeometry(box_size=4, image_shape=(16, 16))
    mesh = _grid(rng, g.grid_shape)
    holed = mesh.copy()
    holed[1, 1] = np.nan
    for interp, method in ((ZoomSpline(), "idw"), (SExtractorSpline(), "nearest")):
        out = interp(holed, None, g, (16, 16))
        ref = interp(fill_holes(holed, method=method), None, g, (16, 16))
        np.testing.assert_array_equal(out, ref)


def test_validation_names_the_parameter():
    with pytest.raises(ValueError, match="order"):
        ZoomSpline(order=0)
    with pytest.raises(ValueError, match="mode"):
        ZoomSpline(mode="bogus")
    with pytest.raises(ValueError, match="n_neighbors"):
        IDW(n_neighbors=0)
    with pytest.raises(ValueError, match="power"):
        IDW(power=-1)
    with pytest.raises(ValueError, match="regularization"):
        IDW(regularization=-1)
    with pytest.raises(ValueError, match="method"):
        fill_holes(np.ones((2, 2)), method="cubic")
    g = MeshGeometry(box_size=4, image_shape=(8, 8))
    with pytest.raises(ValueError, match="mesh_values"):
        ZoomSpline()(np.ones((3, 3)), None, g, (8, 8))
    with pytest.raises(ValueError, match="shape"):
        ZoomSpline()(np.ones((2, 2)), None, g, (9, 8))
    with pytest.raises(ValueError, match="mesh_mask"):
        IDW()(np.ones((2, 2)), np.ones((2, 2), bool), g, (8, 8))


def test_inputs_are_not_modified(rng):
    g = MeshGeometry(box_size=4, image_shape=(16, 16))
    mesh = _grid(rng, g.grid_shape)
    mesh[0, 0] = np.nan
    holes = np.isnan(mesh)
    before, hbefore = mesh.copy(), holes.copy()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for interp in (ZoomSpline(), IDW(), SExtractorSpline()):
            interp(mesh, holes, g, (16, 16))
    np.testing.assert_array_equal(mesh, before)
    np.testing.assert_array_equal(holes, hbefore)


mesh_grids = st.tuples(st.integers(1, 5), st.integers(1, 5)).flatmap(
    lambda s: st.lists(
        st.floats(-1e3, 1e3, allow_nan=False), min_size=s[0] * s[1], max_size=s[0] * s[1]
    ).map(lambda v: np.array(v).reshape(s))
)


@given(mesh=mesh_grids, box=st.integers(1, 6))
def test_zoom_and_idw_stay_within_the_mesh_range(mesh, box):
    g = MeshGeometry(box_size=box, image_shape=(mesh.shape[0] * box, mesh.shape[1] * box))
    for interp in (ZoomSpline(order=3), IDW(n_neighbors=3)):
        out = interp(mesh, None, g, g.image_shape)
        assert out.shape == g.image_shape
        tol = 1e-9 * (1 + np.abs(mesh).max())
        assert out.min() >= mesh.min() - tol and out.max() <= mesh.max() + tol


@given(mesh=mesh_grids, box=st.integers(1, 6), offset=st.floats(-1e3, 1e3))
def test_interpolators_are_offset_equivariant(mesh, box, offset):
    g = MeshGeometry(box_size=box, image_shape=(mesh.shape[0] * box, mesh.shape[1] * box))
    for interp in (ZoomSpline(mode="mirror"), IDW(), SExtractorSpline()):
        a = interp(mesh + offset, None, g, g.image_shape)
        b = interp(mesh, None, g, g.image_shape) + offset
        np.testing.assert_allclose(
            a, b, rtol=0, atol=1e-9 * (1 + np.abs(mesh).max() + abs(offset))
        )


def test_zoom_reflect_mode_is_only_nearly_offset_equivariant():
    # scipy's "reflect" spline prefilter (photutils' choice, kept for parity) starts from
    # an approximate boundary sum: on a grid a few meshes wide, adding c to the meshes
    # shifts the map by c plus an error proportional to c. "mirror" is exact.
    g = MeshGeometry(box_size=16, image_shape=(16, 64))
    mesh = np.array([[0.0, 1.0, 0.5, 2.0]])
    c = 1e4
    err = {
        mode: np.abs(
            ZoomSpline(mode=mode)(mesh + c, None, g, g.image_shape)
            - c
            - ZoomSpline(mode=mode)(mesh, None, g, g.image_shape)
        ).max()
        for mode in ("reflect", "mirror")
    }
    assert err["mirror"] < 1e-9
    assert 1e-7 * c < err["reflect"] < 1e-4 * c


@pytest.mark.parametrize("interp", [ZoomSpline(), IDW(), SExtractorSpline(), ZoomSpline(order=1)])
def test_window_equals_the_same_window_of_the_full_map(rng, interp):
    shape = (53, 47)
    g = MeshGeometry(box_size=(8, 7), image_shape=shape)
    mesh = _grid(rng, g.grid_shape)
    holes = np.zeros(g.grid_shape, bool)
    holes[2, 3] = True
    full = interp(mesh, holes, g, shape)
    for rows, cols in [((0, 53), (0, 47)), ((5, 21), (30, 47)), ((52, 53), (0, 1))]:
        win = interp.window(mesh, holes, g, rows, cols)
        np.testing.assert_allclose(win, full[slice(*rows), slice(*cols)], rtol=1e-13)
    with pytest.raises(ValueError, match="rows"):
        interp.window(mesh, holes, g, (10, 5), (0, 3))
