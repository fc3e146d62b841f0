"""Polygons rasterised as OpenCV's `cv2.polylines(mask, pts, True, 1, 1)` + `cv2.fillPoly(mask, pts, 1)` draw them
on points cast to int32, in numpy: how the SELF1E (and LISA) ReasonSeg loader turns a polygon into a mask.

OpenCV (4.12, the authors' release, and 4.13 alike) draws each edge with an 8-connected Bresenham line clipped to
the image (both calls draw the same lines: `fillPoly` outlines its edges too) and fills the scanlines between
pairs of edge crossings (even-odd), the crossings in 16.16 fixed point from edges clipped to the image. This module
follows those rules; `tests/test_data_reasonseg.py` checks it on hand-drawn cases, and it was compared with
`cv2` 4.12.0 / 4.13.0 on 4,500 random polygons (self-intersecting ones and points outside the image included):
identical masks.
"""

import numpy as np

XY_SHIFT = 16  # OpenCV's fixed point: 16 fractional bits


def _div_toward_zero(a: int, b: int) -> int:
    """C integer division (rounds toward zero)."""
    quotient = abs(a) // abs(b)
    return quotient if (a >= 0) == (b >= 0) else -quotient


def clip_line(width: int, height: int, x1: int, y1: int, x2: int, y2: int) -> tuple[bool, int, int, int, int]:
    """OpenCV's `clipLine`: the segment cut to the image (first to the rows, then to the columns, each end moved
    along the segment with integer division), and whether any of it lies inside."""
    right, bottom = width - 1, height - 1

    def code(x, y):
        return (x < 0) + (x > right) * 2 + (y < 0) * 4 + (y > bottom) * 8

    c1, c2 = code(x1, y1), code(x2, y2)
    if (c1 & c2) == 0 and (c1 | c2) != 0:
        if c1 & 12:
            row = 0 if c1 < 8 else bottom
            x1, y1 = x1 + _div_toward_zero((row - y1) * (x2 - x1), y2 - y1), row
            c1 = (x1 < 0) + (x1 > right) * 2
        if c2 & 12:
            row = 0 if c2 < 8 else bottom
            x2, y2 = x2 + _div_toward_zero((row - y2) * (x2 - x1), y2 - y1), row
            c2 = (x2 < 0) + (x2 > right) * 2
        if (c1 & c2) == 0 and (c1 | c2) != 0:
            if c1:
                column = 0 if c1 == 1 else right
                x1, y1, c1 = column, y1 + _div_toward_zero((column - x1) * (y2 - y1), x2 - x1), 0
            if c2:
                column = 0 if c2 == 1 else right
                x2, y2, c2 = column, y2 + _div_toward_zero((column - x2) * (y2 - y1), x2 - x1), 0
    return (c1 | c2) == 0, x1, y1, x2, y2


def _inside(width: int, height: int, *points: tuple[int, int]) -> bool:
    return all(0 <= x < width and 0 <= y < height for x, y in points)


def draw_line(mask: np.ndarray, x1: int, y1: int, x2: int, y2: int) -> None:
    """Set the pixels of OpenCV's 8-connected line from (x1, y1) to (x2, y2) (`LineIterator`, left to right)."""
    height, width = mask.shape
    if not _inside(width, height, (x1, y1), (x2, y2)):
        inside, x1, y1, x2, y2 = clip_line(width, height, x1, y1, x2, y2)
        if not inside:
            return
    if x2 < x1:
        x1, y1, x2, y2 = x2, y2, x1, y1
    dx, dy, step_y = x2 - x1, abs(y2 - y1), -1 if y2 < y1 else 1
    k = np.arange(max(dx, dy) + 1)
    # Bresenham with OpenCV's error term: the minor coordinate rounds to nearest, halves toward the start.
    if dy > dx:
        xs, ys = x1 + (2 * k * dx + dy - 1) // (2 * dy), y1 + step_y * k
    else:
        xs, ys = x1 + k, y1 + step_y * ((2 * k * dy + dx - 1) // (2 * dx) if dx else 0 * k)
    mask[ys, xs] = 1


def _edges(points: list[tuple[int, int]], width: int, height: int) -> np.ndarray:
    """OpenCV's `CollectPolyEdges`: one (y0, y1, x at y0, dx per row) per non-horizontal edge, x in 16.16 fixed
    point from the edge clipped to the image."""
    edges = []
    for (xa, ya), (xb, yb) in zip(points[-1:] + points[:-1], points):
        start, end = (xa, ya), (xb, yb)
        if not _inside(width, height, start, end):
            _, cxa, cya, cxb, cyb = clip_line(width, height, xa, ya, xb, yb)
            start, end = ((cxa, cya), (cxb, cyb)) if cya != cyb else ((cxa, ya), (cxb, yb))
        if ya == yb:
            continue
        dx = _div_toward_zero((end[0] - start[0]) << XY_SHIFT, end[1] - start[1])
        top_y, (clipped_x, clipped_y) = (ya, start) if ya < yb else (yb, end)
        edges.append((top_y, max(ya, yb), (clipped_x << XY_SHIFT) + (top_y - clipped_y) * dx, dx))
    return np.array(edges, dtype=np.int64).reshape(-1, 4)


def _fill(mask: np.ndarray, edges: np.ndarray) -> None:
    """OpenCV's `FillEdgeCollection`: on each row, the crossings of the edges with y0 <= row < y1, sorted, filled
    pairwise from ceil(left) to floor(right)."""
    height, width = mask.shape
    if len(edges) < 2:
        return
    rows = np.arange(max(0, int(edges[:, 0].min())), min(int(edges[:, 1].max()), height))
    if not len(rows):
        return
    y0, y1, x0, dx = (edges[:, i][None] for i in range(4))
    active = (y0 <= rows[:, None]) & (rows[:, None] < y1)
    crossings = np.where(active, x0 + dx * (rows[:, None] - y0), np.iinfo(np.int64).max)
    crossings.sort(axis=1)
    pairs = active.sum(1)[:, None] // 2 > np.arange(crossings.shape[1] // 2)[None]
    left = (crossings[:, 0 : 2 * pairs.shape[1] : 2] + (1 << XY_SHIFT) - 1) >> XY_SHIFT
    right = crossings[:, 1 : 2 * pairs.shape[1] : 2] >> XY_SHIFT
    pairs &= (left < width) & (right >= 0)
    changes = np.zeros((len(rows), width + 1), dtype=np.int64)
    row_index = np.broadcast_to(np.arange(len(rows))[:, None], pairs.shape)[pairs]
    np.add.at(changes, (row_index, np.clip(left[pairs], 0, width)), 1)
    np.add.at(changes, (row_index, np.clip(right[pairs], -1, width - 1) + 1), -1)
    mask[rows] |= (changes.cumsum(1)[:, :width] > 0).astype(mask.dtype)


def opencv_polygon_mask(points, height: int, width: int) -> np.ndarray:
    """`uint8` `[height, width]` 0/1 mask of one polygon `[[x, y], ...]` (pixels), as the SELF1E ReasonSeg loader
    draws it: points cast to int32 (truncated toward zero), `cv2.polylines(..., True, 1, 1)` then
    `cv2.fillPoly(..., 1)`."""
    points = [(int(x), int(y)) for x, y in np.asarray(points, dtype=np.float64).astype(np.int32).tolist()]
    mask = np.zeros((height, width), dtype=np.uint8)
    _fill(mask, _edges(points, width, height))
    for (xa, ya), (xb, yb) in zip(points[-1:] + points[:-1], points):
        draw_line(mask, xa, ya, xb, yb)
    return mask


__all__ = ["opencv_polygon_mask"]
