"""Labels of a tiled mask joined across tiles: each tile labels its regions on its
own, and the driver joins them from the tiles' edge rows and columns only."""

from __future__ import annotations

import numpy as np

__all__ = ["merge_labels", "touching"]


def merge_labels(info) -> list[list[np.ndarray]]:
    """Per tile, which of its labels (index = label) belong to a region that holds a
    seed anywhere: tile labels made global by offsets, joined where they touch across
    a tile boundary (8-connected), grouped by connected components. ``info[i, j]`` is
    (label count, seeded labels, (top, bottom, left, right) edges of the labels)."""
    from scipy import ndimage, sparse
    from scipy.sparse.csgraph import connected_components

    nty, ntx = info.shape
    counts = np.array([[info[i, j][0] for j in range(ntx)] for i in range(nty)])
    offset = np.concatenate([[0], np.cumsum(counts.ravel())])[:-1].reshape(nty, ntx)
    total = int(counts.sum())

    def glob(i, j, lab):
        return np.where(lab > 0, lab + offset[i, j], 0)

    pairs = []
    # The two-pixel strip along each boundary, labelled 8-connected: labels in one
    # piece of a strip touch across the boundary (diagonals included).
    for j in range(ntx - 1):
        strip = np.stack(
            [
                np.concatenate([glob(i, j, info[i, j][2][3]) for i in range(nty)]),
                np.concatenate([glob(i, j + 1, info[i, j + 1][2][2]) for i in range(nty)]),
            ],
            axis=1,
        )
        pairs.append(touching(strip, ndimage))
    for i in range(nty - 1):
        strip = np.stack(
            [
                np.concatenate([glob(i, j, info[i, j][2][1]) for j in range(ntx)]),
                np.concatenate([glob(i + 1, j, info[i + 1, j][2][0]) for j in range(ntx)]),
            ]
        )
        pairs.append(touching(strip, ndimage))
    edges = np.concatenate([np.zeros((2, 0), np.int64), *pairs], axis=1)
    graph = sparse.coo_matrix(
        (np.ones(edges.shape[1], np.int8), (edges[0], edges[1])), shape=(total + 1, total + 1)
    )
    _, component = connected_components(graph, directed=False)
    seeded = np.zeros(component.max() + 1, bool)
    for i in range(nty):
        for j in range(ntx):
            s = info[i, j][1]
            seeded[component[s[s > 0] + offset[i, j]]] = True
    return [
        [
            np.concatenate(
                [[False], seeded[component[offset[i, j] + 1 : offset[i, j] + counts[i, j] + 1]]]
            )
            for j in range(ntx)
        ]
        for i in range(nty)
    ]


def touching(strip: np.ndarray, ndimage) -> np.ndarray:
    """(2, m) pairs of the labels of ``strip`` that lie in one 8-connected piece."""
    pieces, _ = ndimage.label(strip > 0, structure=np.ones((3, 3), bool))
    ok = pieces > 0
    order = np.argsort(pieces[ok], kind="stable")
    p, lab = pieces[ok][order], strip[ok][order]
    same = p[1:] == p[:-1]
    return np.stack([lab[:-1][same], lab[1:][same]]).astype(np.int64)
