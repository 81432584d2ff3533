"""The tiled (dask) mesh background equals the in-memory fit, and files map over a
LocalCluster."""

import numpy as np
import pytest

da = pytest.importorskip("dask.array")

from skymap.distributed import cluster_client, map_files, tiled_mesh_background  # noqa: E402
from skymap.interpolate import IDW, SExtractorSpline, ZoomSpline  # noqa: E402
from skymap.mesh import MeshBackground  # noqa: E402


@pytest.fixture(scope="module")
def structured():
    rng = np.random.default_rng(7)
    y, x = np.mgrid[:600, :700]
    sky = 100 + 0.02 * x + 8 * np.sin(x / 60.0) * np.cos(y / 45.0)
    img = (sky + rng.normal(0, 1, x.shape)).astype(np.float32)
    img[rng.random(img.shape) < 0.01] += 50  # sources
    img[100:110, 200:260] = np.nan  # a hole the statistics must skip
    mask = rng.random(img.shape) < 0.05
    return img, mask


@pytest.mark.parametrize(
    "mesh",
    [
        MeshBackground(box_size=24),
        MeshBackground.like_photutils((20, 28)),
        MeshBackground.like_sextractor(32),
        MeshBackground(box_size=30, interpolator=IDW(n_neighbors=8)),
        MeshBackground(box_size=25, interpolator=ZoomSpline(order=5)),
        MeshBackground(box_size=25, interpolator=SExtractorSpline()),
    ],
    ids=["default", "photutils", "sextractor", "idw", "spline5", "sexspline"],
)
def test_tiled_equals_in_memory_to_1e6_of_rms(structured, mesh):
    img, mask = structured
    ref = mesh.fit(img, mask=mask)
    tiled = tiled_mesh_background(da.from_array(img, chunks=150), mesh, mask=mask, tile=100)
    np.testing.assert_array_equal(tiled.mesh.mesh_background, ref.mesh_background)
    tol = 1e-6 * ref.global_rms
    assert np.abs(tiled.background.compute() - ref.background).max() <= tol
    assert np.abs(tiled.rms.compute() - ref.rms).max() <= tol


def test_tiled_coverage_mask_gets_fill_value(structured):
    img, _ = structured
    cov = np.zeros(img.shape, bool)
    cov[:, :50] = True
    mesh = MeshBackground(box_size=32, fill_value=-1.0)
    ref = mesh.fit(img, coverage_mask=cov)
    tiled = tiled_mesh_background(img, mesh, coverage_mask=cov, tile=128)
    bkg = tiled.background.compute()
    assert np.all(bkg[:, :50] == -1.0)
    assert np.abs(bkg - ref.background).max() <= 1e-6 * ref.global_rms


def test_tiles_are_aligned_to_the_mesh(structured):
    img, _ = structured
    tiled = tiled_mesh_background(img, MeshBackground(box_size=32), tile=100)
    assert tiled.tile == (96, 96)
    assert all(c % 32 == 0 for c in tiled.background.chunks[0][:-1])
    assert tiled.halo == 0  # skymap's interpolators evaluate windows exactly


def test_interpolator_without_window_uses_a_halo(structured):
    img, _ = structured

    class NoWindow:
        def __call__(self, values, mask, geometry, shape):
            return ZoomSpline()(values, mask, geometry, shape)

    mesh = MeshBackground(box_size=32, interpolator=NoWindow())
    ref = mesh.fit(img)
    tiled = tiled_mesh_background(img, mesh, tile=128)
    assert tiled.halo > 0
    assert np.abs(tiled.background.compute() - ref.background).max() <= 1e-6 * ref.global_rms


def test_tiled_rejects_bad_input():
    with pytest.raises(ValueError, match="box_size"):
        tiled_mesh_background(np.zeros((10, 10)), MeshBackground(box_size=32))
    with pytest.raises(ValueError, match="2-dimensional"):
        tiled_mesh_background(np.zeros(10), MeshBackground(box_size=2))
    with pytest.raises(ValueError, match="mask"):
        tiled_mesh_background(np.zeros((64, 64)), MeshBackground(box_size=8), mask=np.zeros(3))


def _square_or_fail(x):
    if x < 0:
        raise ValueError("negative input")
    return x * x


@pytest.fixture(scope="module")
def client():
    with cluster_client(workers=1) as c:
        yield c


def test_tiled_on_a_local_cluster_equals_in_memory(structured, client):
    img, mask = structured
    mesh = MeshBackground(box_size=32)
    ref = mesh.fit(img, mask=mask)
    tiled = tiled_mesh_background(img, mesh, mask=mask, tile=128, scheduler=client)
    bkg = client.compute(tiled.background).result()
    assert np.abs(bkg - ref.background).max() <= 1e-6 * ref.global_rms


def test_map_files_on_a_local_cluster_keeps_order_and_reports_failures(client):
    done = []
    rows = map_files(_square_or_fail, [3, -1, 2], client=client, progress=lambda: done.append(1))
    assert [r[0] for r in rows] == [3, -1, 2]
    assert rows[0][1] == 9 and rows[2][1] == 4
    assert isinstance(rows[1][2], ValueError) and rows[1][1] is None
    assert len(done) == 3
