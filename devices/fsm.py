"""The device migration state machine of the VFIO migration uAPI v2 with PRE_COPY.

A device implements only *arcs*: single steps between two states, each with its own
action (the "Mealy" view: PRE_COPY -> RUNNING ends the data session,
RUNNING_P2P -> RUNNING does not). Which arcs exist depends on the device's feature set
(``ARCS`` below, one entry per legal set). Every other change of state is a
*combination transition* the core walks arc by arc. The rules that pick the walk:

1. Take the shortest path over the arcs of the device's feature set.
2. A saving-group state (PRE_COPY, PRE_COPY_P2P, STOP_COPY) may be an interior node of
   the path only when the whole path stays inside the saving group: such a walk keeps
   its data session (PRE_COPY -> PRE_COPY_P2P -> STOP_COPY). Any other path touches the
   saving group at its ends only, so a data session is never opened and closed as a
   side effect of passing through.
3. STOP_COPY -> PRE_COPY and STOP_COPY -> PRE_COPY_P2P are blocked outright.
4. ERROR can never be requested, nothing leaves ERROR but a reset, and a state the
   feature set lacks can be neither the start nor the target.

These rules give exactly one path for every allowed pair; the table is derived once at
import and checked against the kernel's own ``vfio_mig_get_next_state`` by the tests.

Failure unwind (``set_state``): if an arc fails, the core walks back to the starting
state. The device is in ERROR instead when the walk back is impossible (the start was in
the saving group and the walk left it, or the start was RESUMING and the walk left it:
the data session is gone) or a step back fails. ``reset`` takes any state, ERROR
included, to RUNNING.
"""

from __future__ import annotations

import enum
import itertools
from collections.abc import Iterator, Mapping
from typing import Final, Protocol

import structlog

from devices.errors import TransitionError, TransitionNotAllowed

log = structlog.get_logger(__name__)


class State(enum.IntEnum):
    """Device migration states, numbered as the uAPI numbers them."""

    ERROR = 0
    STOP = 1
    RUNNING = 2
    STOP_COPY = 3
    RESUMING = 4
    RUNNING_P2P = 5
    PRE_COPY = 6
    PRE_COPY_P2P = 7


class Feature(enum.IntFlag):
    """Migration feature flags a device reports (VFIO_MIGRATION_*)."""

    STOP_COPY = 1
    P2P = 2
    PRE_COPY = 4


Arc = tuple[State, State]

#: States sharing one data session; moving among them keeps the session.
SAVING_GROUP = frozenset({State.PRE_COPY, State.PRE_COPY_P2P, State.STOP_COPY})

#: States that open a data channel: the saving group and RESUMING.
CHANNEL_STATES = SAVING_GROUP | {State.RESUMING}

#: Where the device runs (advances its state), quiesced for P2P or not.
RUNNING_STATES = frozenset({State.RUNNING, State.RUNNING_P2P, State.PRE_COPY, State.PRE_COPY_P2P})

#: ERROR for the paths every arc takes: a member looked up through its class costs 70 ns
#: on Python 3.11 (an enum property), a module global 5.
ERROR: Final = State.ERROR

#: The feature sets the uAPI defines; any other combination is undefined.
LEGAL_FEATURE_SETS: tuple[Feature, ...] = (
    Feature.STOP_COPY,
    Feature.STOP_COPY | Feature.P2P,
    Feature.STOP_COPY | Feature.PRE_COPY,
    Feature.STOP_COPY | Feature.P2P | Feature.PRE_COPY,
)

#: The features a state needs to exist at all.
STATE_NEEDS: Mapping[State, Feature] = {
    State.STOP: Feature.STOP_COPY,
    State.RUNNING: Feature.STOP_COPY,
    State.STOP_COPY: Feature.STOP_COPY,
    State.RESUMING: Feature.STOP_COPY,
    State.RUNNING_P2P: Feature.STOP_COPY | Feature.P2P,
    State.PRE_COPY: Feature.STOP_COPY | Feature.PRE_COPY,
    State.PRE_COPY_P2P: Feature.STOP_COPY | Feature.P2P | Feature.PRE_COPY,
}

_S = State
_SAVE_AND_RESUME: frozenset[Arc] = frozenset({
    (_S.STOP, _S.STOP_COPY), (_S.STOP_COPY, _S.STOP),
    (_S.STOP, _S.RESUMING), (_S.RESUMING, _S.STOP),
})  # fmt: skip
_RUN_STOP: frozenset[Arc] = frozenset({(_S.RUNNING, _S.STOP), (_S.STOP, _S.RUNNING)})
_P2P: frozenset[Arc] = frozenset({
    (_S.RUNNING, _S.RUNNING_P2P), (_S.RUNNING_P2P, _S.RUNNING),
    (_S.RUNNING_P2P, _S.STOP), (_S.STOP, _S.RUNNING_P2P),
})  # fmt: skip
_PRE_COPY: frozenset[Arc] = frozenset({
    (_S.RUNNING, _S.PRE_COPY), (_S.PRE_COPY, _S.RUNNING), (_S.PRE_COPY, _S.STOP_COPY),
})  # fmt: skip
_PRE_COPY_WITH_P2P: frozenset[Arc] = frozenset({
    (_S.RUNNING, _S.PRE_COPY), (_S.PRE_COPY, _S.RUNNING),
    (_S.PRE_COPY, _S.PRE_COPY_P2P), (_S.PRE_COPY_P2P, _S.PRE_COPY),
    (_S.PRE_COPY_P2P, _S.RUNNING_P2P), (_S.RUNNING_P2P, _S.PRE_COPY_P2P),
    (_S.PRE_COPY_P2P, _S.STOP_COPY),
})  # fmt: skip

#: The arcs a driver implements, per legal feature set (the kernel's list in vfio_main.c).
ARCS: Mapping[Feature, frozenset[Arc]] = {
    Feature.STOP_COPY: _SAVE_AND_RESUME | _RUN_STOP,
    Feature.STOP_COPY | Feature.P2P: _SAVE_AND_RESUME | _P2P,
    Feature.STOP_COPY | Feature.PRE_COPY: _SAVE_AND_RESUME | _RUN_STOP | _PRE_COPY,
    Feature.STOP_COPY | Feature.P2P | Feature.PRE_COPY: _SAVE_AND_RESUME
    | _P2P
    | _PRE_COPY_WITH_P2P,
}

#: Combination transitions the uAPI forbids whatever the arcs would allow.
BLOCKED: frozenset[Arc] = frozenset(
    {(State.STOP_COPY, State.PRE_COPY), (State.STOP_COPY, State.PRE_COPY_P2P)}
)


def supports(features: Feature, state: State) -> bool:
    """Whether a device with ``features`` has ``state`` at all (ERROR is never requestable)."""
    needs = STATE_NEEDS.get(state)
    return needs is not None and features & needs == needs


def _table(features: Feature) -> Mapping[Arc, State]:
    """The next-arc table of ``features``; ValueError for a set the uAPI leaves undefined."""
    table = _NEXT.get(features)
    if table is None:
        raise ValueError(f"undefined migration feature set {features!r}")
    return table


def _walks(start: State, arcs: frozenset[Arc]) -> Iterator[tuple[State, ...]]:
    """Every simple walk from ``start`` over ``arcs`` that obeys the saving-group rule."""
    successors: dict[State, list[State]] = {}
    for src, dst in sorted(arcs):
        successors.setdefault(src, []).append(dst)

    def extend(walk: tuple[State, ...]) -> Iterator[tuple[State, ...]]:
        yield walk
        last = walk[-1]
        for nxt in successors.get(last, ()):
            if nxt in walk:
                continue
            inside_group = all(s in SAVING_GROUP for s in (*walk, nxt))
            if len(walk) > 1 and last in SAVING_GROUP and not inside_group:
                continue  # the saving-group state `last` would become interior
            yield from extend((*walk, nxt))

    yield from extend((start,))


def _derive_next_table(features: Feature) -> dict[Arc, State]:
    """Next step for every (current, target) pair, by shortest-path search over the arcs."""
    arcs = ARCS[features]
    table: dict[Arc, State] = {}
    for current, target in itertools.product(State, State):
        if (
            not supports(features, current)
            or not supports(features, target)
            or (current, target) in BLOCKED
        ):
            table[current, target] = State.ERROR
            continue
        if current == target:
            table[current, target] = current
            continue
        candidates = [w for w in _walks(current, arcs) if w[-1] == target]
        shortest = min(map(len, candidates))
        paths = [w for w in candidates if len(w) == shortest]
        if len(paths) != 1:
            raise AssertionError(f"FSM rules leave {current.name}->{target.name} ambiguous")
        table[current, target] = paths[0][1]
    return table


_NEXT: Mapping[Feature, Mapping[Arc, State]] = {
    features: _derive_next_table(features) for features in LEGAL_FEATURE_SETS
}


def next_state(current: State, target: State, features: Feature) -> State:
    """The next arc's destination on the way from ``current`` to ``target``.

    Returns ``State.ERROR`` when the transition is not allowed. Pure and O(1): the table
    is precomputed at import. Raises ValueError for a feature set the uAPI leaves undefined.
    """
    return _table(features)[current, target]


def path(current: State, target: State, features: Feature) -> tuple[State, ...]:
    """The whole walk from ``current`` to ``target``, both included; ``()`` if not allowed."""
    walk = [current]
    while walk[-1] != target:
        step = next_state(walk[-1], target, features)
        if step == State.ERROR:
            return ()
        walk.append(step)
    return tuple(walk) if current != State.ERROR else ()


class ArcDriven(Protocol):
    """A device whose driver implements single arcs; the engine walks combinations.

    The engine owns ``state``: it sets it after each arc completes. An arc hook that
    cannot leave the device unchanged on failure sets ``state`` to ERROR before raising.
    """

    name: str
    features: Feature
    state: State

    def step(self, arc_from: State, arc_to: State) -> None:
        """Perform one arc; raise to fail it, leaving the device in ``arc_from``.

        A plain call: a model's arc never waits, and the walk runs for every device and
        arc inside the downtime window, where each coroutine layer cost a tenth of it.
        """

    async def hard_reset(self) -> None:
        """Bring the device to a fresh RUNNING state whatever it was doing (VFIO_DEVICE_RESET)."""


def session_lost(start: State, now: State) -> bool:
    """Whether walking from ``start`` to ``now`` closed the data session ``start`` had."""
    left_saving = start in SAVING_GROUP and now not in SAVING_GROUP
    left_resuming = start == State.RESUMING and now != State.RESUMING
    return left_saving or left_resuming


def walk(device: ArcDriven, target: State) -> tuple[Arc, ...]:
    """Walk ``device`` to ``target`` one arc at a time; return the arcs taken.

    On a failing arc the device is walked back to where it started. Raises
    TransitionNotAllowed when the FSM forbids the change (the device is untouched) and
    TransitionError, whose ``__cause__`` is the arc's own exception and whose ``state``
    is the resulting state, when an arc fails. It never waits, so nothing (a cancel, a
    report) comes between a walk's arcs.
    """
    start = device.state
    if start == target:
        return ()
    # One table for the walk: a switchover runs this for every device and arc in the
    # downtime window, where each lookup's feature check was a tenth of the arc.
    table = _table(device.features)
    if table[start, target] == ERROR:
        raise TransitionNotAllowed(
            device.name,
            f"transition {start.name} -> {target.name} is not allowed "
            f"for features {device.features!r}",
            start=start,
            target=target,
            state=start,
        )
    taken: list[Arc] = []
    current = start
    while current != target:
        arc = (current, table[current, target])
        try:
            device.step(*arc)
        except Exception as exc:
            raise arc_failed(device, start, target, arc, exc) from exc
        current = device.state = arc[1]  # listeners see every arc (a debug event: 2.7 us)
        taken.append(arc)
    return tuple(taken)


def arc_failed(
    device: ArcDriven, start: State, target: State, arc: Arc, error: Exception
) -> TransitionError:
    """Log a failed arc, walk the device back to ``start``, and say what happened (the
    error to raise from ``error``)."""
    log.warning(
        "arc_failed",
        device=device.name,
        arc_from=arc[0].name,
        arc_to=arc[1].name,
        error=str(error),
    )
    _unwind(device, start)
    return TransitionError(
        device.name,
        f"{arc[0].name} -> {arc[1].name} failed on the way "
        f"{start.name} -> {target.name}: {error}; device is now {device.state.name}",
        start=start,
        target=target,
        state=device.state,
        failed_arc=arc,
    )


def _unwind(device: ArcDriven, start: State) -> None:
    """Best-effort walk back to ``start`` after a failed arc; ERROR if it cannot be done."""
    if device.state == State.ERROR:
        return
    if session_lost(start, device.state):
        device.state = State.ERROR
        return
    while device.state != start:
        back = next_state(device.state, start, device.features)
        if back == State.ERROR:
            device.state = State.ERROR
            return
        try:
            device.step(device.state, back)
        except Exception as exc:
            log.error(
                "unwind_failed",
                device=device.name,
                arc_from=device.state.name,
                arc_to=back.name,
                error=str(exc),
            )
            device.state = State.ERROR
            return
        device.state = back


async def reset(device: ArcDriven) -> None:
    """Take ``device`` from any state, ERROR included, to RUNNING (VFIO_DEVICE_RESET)."""
    await device.hard_reset()
    device.state = State.RUNNING
    log.info("device_reset", device=device.name)


def describe(features: Feature) -> str:
    """Every combination transition of a feature set with its walk, one per line."""
    lines = [f"feature set {features!r}"]
    states = [s for s in State if supports(features, s)]
    for current, target in itertools.product(states, states):
        if current != target:
            walk = path(current, target, features)
            shown = " -> ".join(s.name for s in walk) if walk else "blocked"
            lines.append(f"  {current.name:>12} to {target.name:<12} {shown}")
    return "\n".join(lines)
