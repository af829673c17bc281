"""The one type check for external input: JSON, msgpack, TOML and the control API.

Every reader of outside data asks ``has_type``, so the rule that a bool is not a number
(``True`` is an ``int`` to Python, never to a user) lives here once.
"""

from __future__ import annotations

import types
import typing
from typing import Any


def has_type(value: object, kinds: type | tuple[type, ...]) -> bool:
    """Whether ``value`` is one of ``kinds``, a bool counting only where bool is listed."""
    allowed = kinds if isinstance(kinds, tuple) else (kinds,)
    if isinstance(value, bool):
        return bool in allowed
    return isinstance(value, allowed)


def kinds_of(annotation: Any) -> tuple[type, ...]:
    """The types ``has_type`` takes for a resolved annotation (``float | None`` and the like).

    An int is accepted where a float is (as JSON and TOML write whole numbers).
    """
    parts = typing.get_args(annotation) if isinstance(annotation, types.UnionType) else ()
    kinds = tuple(type(None) if p is None else p for p in (parts or (annotation,)))
    if float in kinds and int not in kinds:
        kinds += (int,)
    return kinds
