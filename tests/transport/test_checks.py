"""The one type check for external input: a bool is never a number."""

from __future__ import annotations

import pytest

from transport.checks import has_type, kinds_of


@pytest.mark.parametrize(
    ("value", "kinds", "expected"),
    [
        (True, int, False),
        (True, (int, float), False),
        (True, (bool, int), True),
        (3, int, True),
        (3, (int, float), True),
        (3.5, int, False),
        ("x", (str, list), True),
        (None, (int, type(None)), True),
    ],
)
def test_a_bool_counts_only_where_bool_is_listed(
    value: object, kinds: object, expected: bool
) -> None:
    """has_type is isinstance, except that True is not an int unless bool is allowed."""
    assert has_type(value, kinds) is expected  # type: ignore[arg-type]


def test_annotations_become_the_kinds_they_allow() -> None:
    """A float field takes ints too; an optional one takes None; a plain type is itself."""
    assert set(kinds_of(float | None)) == {float, int, type(None)}
    assert kinds_of(int) == (int,)
    assert kinds_of(bool) == (bool,)
