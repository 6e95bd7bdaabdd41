"""Mask planes: a registry of plane names and their bits.

A mask is a ``uint32`` array whose bits are named planes. The standard planes have fixed bits
(the order of LSST's afw), so masks written by any daskdiff version mean the same thing; users
may add their own planes, which take the next free bits and travel with the exposure.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping

import numpy as np

from .errors import InputError

__all__ = ["DEFAULT_MASK_PLANES", "MaskPlanes", "STANDARD_PLANES"]

#: The standard planes and their fixed bits.
STANDARD_PLANES: dict[str, int] = {
    "BAD": 0,
    "SAT": 1,
    "INTRP": 2,
    "CR": 3,
    "EDGE": 4,
    "DETECTED": 5,
    "DETECTED_NEGATIVE": 6,
    "SUSPECT": 7,
    "NO_DATA": 8,
    "HIGH_VARIANCE": 9,
    "SAT_TEMPLATE": 10,
    "INJECTED": 11,
    "INJECTED_TEMPLATE": 12,
    "STREAK": 13,
    "CROSSTALK": 14,
    "NOT_DEBLENDED": 15,
    "UNMASKEDNAN": 16,
}

_MAX_BITS = 32


class MaskPlanes(Mapping[str, int]):
    """An immutable mapping of mask-plane names to bit numbers.

    Parameters
    ----------
    planes : mapping of str to int, optional
        Plane names and their bits; defaults to :data:`STANDARD_PLANES`.

    Examples
    --------
    >>> planes = MaskPlanes().with_planes("FAKE_STREAK")
    >>> planes.bitmask("SAT", "CR")
    10
    """

    def __init__(self, planes: Mapping[str, int] | None = None) -> None:
        planes = dict(STANDARD_PLANES if planes is None else planes)
        bits = list(planes.values())
        if len(set(bits)) != len(bits):
            raise InputError(f"mask planes share a bit: {planes}; give every plane its own bit")
        for name, bit in planes.items():
            if not isinstance(bit, int | np.integer) or not 0 <= int(bit) < _MAX_BITS:
                raise InputError(
                    f"mask plane {name!r} has bit {bit!r}; bits must be integers in 0..31"
                )
            if not name or not name.replace("_", "").isalnum():
                raise InputError(f"mask plane name {name!r} must be letters, digits and '_'")
        self._planes = {str(k): int(v) for k, v in planes.items()}

    def __getitem__(self, name: str) -> int:
        try:
            return self._planes[name]
        except KeyError:
            known = ", ".join(sorted(self._planes, key=self._planes.get))
            raise InputError(
                f"unknown mask plane {name!r}; known planes are {known}. "
                "Add it first with MaskPlanes.with_planes(name)."
            ) from None

    def __contains__(self, name: object) -> bool:
        return name in self._planes

    def get(self, name: str, default: int | None = None) -> int | None:
        """Return the bit of plane ``name``, or ``default`` when there is no such plane."""
        return self._planes.get(name, default)

    def __iter__(self) -> Iterator[str]:
        return iter(sorted(self._planes, key=self._planes.get))

    def __len__(self) -> int:
        return len(self._planes)

    def __repr__(self) -> str:
        return f"MaskPlanes({dict(self.items())})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Mapping) and dict(self.items()) == dict(other.items())

    def __hash__(self) -> int:
        return hash(tuple(self.items()))

    def bitmask(self, *names: str) -> int:
        """Return the OR of the bit values of the named planes (0 for none)."""
        value = 0
        for name in names:
            value |= 1 << self[name]
        return value

    def with_planes(self, *names: str) -> MaskPlanes:
        """Return a registry with extra planes added on the lowest free bits.

        Planes already present keep their bits.
        """
        planes = dict(self._planes)
        for name in names:
            if name in planes:
                continue
            free = [b for b in range(_MAX_BITS) if b not in planes.values()]
            if not free:
                raise InputError(f"no free mask bit left for plane {name!r} (32 planes in use)")
            planes[name] = free[0]
        return MaskPlanes(planes)

    def names_in(self, value: int) -> list[str]:
        """Return the names of the planes set in a mask value."""
        return [name for name in self if value & (1 << self._planes[name])]

    def to_header_cards(self) -> list[tuple[str, int, str]]:
        """Return FITS cards ``MP_<NAME> = bit``, as LSST writes them."""
        return [(f"MP_{name}", bit, f"mask plane {name}") for name, bit in self.items()]

    @classmethod
    def from_header(cls, header: Mapping[str, object]) -> MaskPlanes:
        """Read planes from ``MP_<NAME>`` cards; standard planes if there are none."""
        planes = {
            key[3:]: int(value)  # type: ignore[call-overload]
            for key, value in header.items()
            if key.startswith("MP_")
        }
        return cls(planes) if planes else cls()


def combine(planes: Iterable[MaskPlanes]) -> MaskPlanes:
    """Return a registry holding every plane of the inputs, which must agree on shared names."""
    merged: dict[str, int] = {}
    for registry in planes:
        for name, bit in registry.items():
            if merged.get(name, bit) != bit:
                raise InputError(
                    f"mask plane {name!r} has bit {merged[name]} in one input and {bit} in "
                    "another; remap one of the masks before combining"
                )
            merged[name] = bit
    return MaskPlanes(merged)


DEFAULT_MASK_PLANES = MaskPlanes()
