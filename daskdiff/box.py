"""Integer pixel boxes in the parent frame.

A :class:`Box` is a half-open rectangle of pixels ``x0 <= x < x1``, ``y0 <= y < y1`` in
parent-frame integer coordinates (LSST's ``Box2I`` with ``xy0``). Pixel ``(x, y)`` covers
``[x - 0.5, x + 0.5)``: integer coordinates are pixel centres.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .errors import InputError

__all__ = ["Box"]


@dataclass(frozen=True, slots=True)
class Box:
    """A half-open integer pixel rectangle.

    Parameters
    ----------
    x0, y0 : int
        The first column and row (parent frame).
    width, height : int
        The number of columns and rows (>= 0).
    """

    x0: int
    y0: int
    width: int
    height: int

    def __post_init__(self) -> None:
        for name in ("x0", "y0", "width", "height"):
            value = getattr(self, name)
            if not isinstance(value, int | np.integer):
                raise InputError(f"Box.{name} must be an integer, got {value!r}")
            object.__setattr__(self, name, int(value))
        if self.width < 0 or self.height < 0:
            raise InputError(f"Box size must be >= 0, got {self.width} x {self.height}")

    @classmethod
    def from_bounds(cls, x0: int, y0: int, x1: int, y1: int) -> Box:
        """Build a box from half-open bounds (an empty box if ``x1 <= x0`` or ``y1 <= y0``)."""
        return cls(int(x0), int(y0), max(int(x1) - int(x0), 0), max(int(y1) - int(y0), 0))

    @classmethod
    def from_shape(cls, shape: tuple[int, int], *, x0: int = 0, y0: int = 0) -> Box:
        """Build a box from an array shape ``(ny, nx)`` and an origin."""
        return cls(x0, y0, int(shape[1]), int(shape[0]))

    @property
    def x1(self) -> int:
        """One past the last column."""
        return self.x0 + self.width

    @property
    def y1(self) -> int:
        """One past the last row."""
        return self.y0 + self.height

    @property
    def shape(self) -> tuple[int, int]:
        """The array shape ``(height, width)``."""
        return (self.height, self.width)

    @property
    def area(self) -> int:
        """The number of pixels."""
        return self.width * self.height

    @property
    def is_empty(self) -> bool:
        """Whether the box holds no pixel."""
        return self.area == 0

    @property
    def center(self) -> tuple[float, float]:
        """The centre ``(x, y)`` in pixel coordinates."""
        return (self.x0 + (self.width - 1) / 2.0, self.y0 + (self.height - 1) / 2.0)

    def corners(self) -> np.ndarray:
        """Return the outer corners ``(4, 2)`` as ``(x, y)`` (pixel edges, counter-clockwise)."""
        xa, xb = self.x0 - 0.5, self.x1 - 0.5
        ya, yb = self.y0 - 0.5, self.y1 - 0.5
        return np.array([[xa, ya], [xb, ya], [xb, yb], [xa, yb]])

    def contains(self, x: float | np.ndarray, y: float | np.ndarray) -> np.ndarray | bool:
        """Return whether points ``(x, y)`` (pixel centres within ±0.5) lie inside the box."""
        x = np.asarray(x)
        y = np.asarray(y)
        inside = (x >= self.x0 - 0.5) & (x < self.x1 - 0.5) & (y >= self.y0 - 0.5)
        return inside & (y < self.y1 - 0.5)

    def contains_box(self, other: Box) -> bool:
        """Return whether ``other`` lies entirely inside this box."""
        return (
            other.x0 >= self.x0 and other.y0 >= self.y0 and other.x1 <= self.x1
            and other.y1 <= self.y1
        )

    def intersection(self, other: Box) -> Box:
        """Return the overlap of two boxes (possibly empty)."""
        return Box.from_bounds(
            max(self.x0, other.x0), max(self.y0, other.y0),
            min(self.x1, other.x1), min(self.y1, other.y1),
        )

    def overlaps(self, other: Box) -> bool:
        """Return whether two boxes share at least one pixel."""
        return not self.intersection(other).is_empty

    def union(self, other: Box) -> Box:
        """Return the smallest box holding both boxes."""
        if self.is_empty:
            return other
        if other.is_empty:
            return self
        return Box.from_bounds(
            min(self.x0, other.x0), min(self.y0, other.y0),
            max(self.x1, other.x1), max(self.y1, other.y1),
        )

    def grow(self, border: int | tuple[int, int]) -> Box:
        """Return the box grown by ``border`` pixels on every side (``(bx, by)`` per axis)."""
        bx, by = (border, border) if np.isscalar(border) else border  # type: ignore[misc]
        return Box.from_bounds(self.x0 - bx, self.y0 - by, self.x1 + bx, self.y1 + by)

    def shift(self, dx: int, dy: int) -> Box:
        """Return the box moved by ``(dx, dy)`` pixels."""
        return Box(self.x0 + dx, self.y0 + dy, self.width, self.height)

    def slices(self, origin: tuple[int, int] | None = None) -> tuple[slice, slice]:
        """Return ``(yslice, xslice)`` indexing this box in an array.

        ``origin = (x0, y0)`` is the parent position of the array's first pixel (default: this
        box's own origin).
        """
        ox, oy = (self.x0, self.y0) if origin is None else origin
        return (slice(self.y0 - oy, self.y1 - oy), slice(self.x0 - ox, self.x1 - ox))

    def xs(self) -> np.ndarray:
        """Return the column coordinates."""
        return np.arange(self.x0, self.x1)

    def ys(self) -> np.ndarray:
        """Return the row coordinates."""
        return np.arange(self.y0, self.y1)

    def to_list(self) -> list[int]:
        """Return ``[x0, y0, width, height]`` (for JSON)."""
        return [self.x0, self.y0, self.width, self.height]

    @classmethod
    def from_list(cls, values: list[int] | tuple[int, ...]) -> Box:
        """Inverse of :meth:`to_list`."""
        return cls(*[int(v) for v in values])

    @classmethod
    def bounding(cls, x: np.ndarray, y: np.ndarray) -> Box:
        """Return the smallest box holding every pixel that the points ``(x, y)`` fall in."""
        x = np.asarray(x, dtype=float)
        y = np.asarray(y, dtype=float)
        return cls.from_bounds(
            int(np.floor(x.min() + 0.5)), int(np.floor(y.min() + 0.5)),
            int(np.floor(x.max() + 0.5)) + 1, int(np.floor(y.max() + 0.5)) + 1,
        )
