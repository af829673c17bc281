"""The FSM core: the derived table against the kernel's, paths, unwind and reset."""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

import pytest
from hypothesis import given
from hypothesis import strategies as st

from devices import fsm
from devices.errors import TransitionError, TransitionNotAllowed
from devices.fsm import ARCS, LEGAL_FEATURE_SETS, SAVING_GROUP, Feature, State

S = State
E = S.ERROR

# The kernel's vfio_from_fsm_table (seed 000, all features on), transcribed by hand:
# KERNEL_TABLE[current][target] is the next state.
KERNEL_TABLE: dict[State, dict[State, State]] = {
    S.STOP: {S.STOP: S.STOP, S.RUNNING: S.RUNNING_P2P, S.PRE_COPY: S.RUNNING_P2P,
             S.PRE_COPY_P2P: S.RUNNING_P2P, S.STOP_COPY: S.STOP_COPY, S.RESUMING: S.RESUMING,
             S.RUNNING_P2P: S.RUNNING_P2P, E: E},
    S.RUNNING: {S.STOP: S.RUNNING_P2P, S.RUNNING: S.RUNNING, S.PRE_COPY: S.PRE_COPY,
                S.PRE_COPY_P2P: S.RUNNING_P2P, S.STOP_COPY: S.RUNNING_P2P,
                S.RESUMING: S.RUNNING_P2P, S.RUNNING_P2P: S.RUNNING_P2P, E: E},
    S.PRE_COPY: {S.STOP: S.RUNNING, S.RUNNING: S.RUNNING, S.PRE_COPY: S.PRE_COPY,
                 S.PRE_COPY_P2P: S.PRE_COPY_P2P, S.STOP_COPY: S.PRE_COPY_P2P,
                 S.RESUMING: S.RUNNING, S.RUNNING_P2P: S.RUNNING, E: E},
    S.PRE_COPY_P2P: {S.STOP: S.RUNNING_P2P, S.RUNNING: S.RUNNING_P2P, S.PRE_COPY: S.PRE_COPY,
                     S.PRE_COPY_P2P: S.PRE_COPY_P2P, S.STOP_COPY: S.STOP_COPY,
                     S.RESUMING: S.RUNNING_P2P, S.RUNNING_P2P: S.RUNNING_P2P, E: E},
    S.STOP_COPY: {S.STOP: S.STOP, S.RUNNING: S.STOP, S.PRE_COPY: E, S.PRE_COPY_P2P: E,
                  S.STOP_COPY: S.STOP_COPY, S.RESUMING: S.STOP, S.RUNNING_P2P: S.STOP, E: E},
    S.RESUMING: {S.STOP: S.STOP, S.RUNNING: S.STOP, S.PRE_COPY: S.STOP,
                 S.PRE_COPY_P2P: S.STOP, S.STOP_COPY: S.STOP, S.RESUMING: S.RESUMING,
                 S.RUNNING_P2P: S.STOP, E: E},
    S.RUNNING_P2P: {S.STOP: S.STOP, S.RUNNING: S.RUNNING, S.PRE_COPY: S.RUNNING,
                    S.PRE_COPY_P2P: S.PRE_COPY_P2P, S.STOP_COPY: S.STOP,
                    S.RESUMING: S.STOP, S.RUNNING_P2P: S.RUNNING_P2P, E: E},
    E: dict.fromkeys(S, E),
}  # fmt: skip

# The kernel's state_flags_table: ERROR needs every flag, so it is never supported.
KERNEL_STATE_FLAGS: dict[State, int] = {
    S.STOP: 1, S.RUNNING: 1, S.STOP_COPY: 1, S.RESUMING: 1, S.RUNNING_P2P: 1 | 2,
    S.PRE_COPY: 1 | 4, S.PRE_COPY_P2P: 1 | 2 | 4, E: ~0,
}  # fmt: skip


def kernel_next_state(current: State, target: State, flags: int) -> State:
    """vfio_mig_get_next_state, including the later fix that stops its skip loop at ERROR."""

    def supported(state: State) -> bool:
        return KERNEL_STATE_FLAGS[state] & flags == KERNEL_STATE_FLAGS[state]

    if not supported(current) or not supported(target):
        return E
    nxt = KERNEL_TABLE[current][target]
    while nxt != E and not supported(nxt):
        nxt = KERNEL_TABLE[nxt][target]
    return nxt


CASES = list(itertools.product(LEGAL_FEATURE_SETS, State, State))


@pytest.mark.parametrize(("features", "current", "target"), CASES)
def test_next_state_equals_kernel(features: Feature, current: State, target: State) -> None:
    """The table derived from the arcs equals the kernel's algorithm for all 256 cases."""
    assert fsm.next_state(current, target, features) == kernel_next_state(
        current, target, int(features)
    )


def test_case_count() -> None:
    """The conformance test covers 4 feature sets x 64 pairs."""
    assert len(CASES) == 256


@pytest.mark.parametrize(
    "features", [Feature(0), Feature.P2P, Feature.PRE_COPY, Feature.P2P | Feature.PRE_COPY]
)
def test_undefined_feature_sets_are_refused(features: Feature) -> None:
    """A feature set the uAPI does not define is a usage error, not a silent table lookup."""
    with pytest.raises(ValueError, match="undefined migration feature set"):
        fsm.next_state(S.RUNNING, S.STOP, features)


def test_documented_combination_paths() -> None:
    """Spot-check paths the kernel comment spells out, with all features on."""
    full = LEGAL_FEATURE_SETS[-1]
    assert fsm.path(S.PRE_COPY, S.STOP_COPY, full) == (S.PRE_COPY, S.PRE_COPY_P2P, S.STOP_COPY)
    assert fsm.path(S.PRE_COPY, S.RESUMING, full) == (
        S.PRE_COPY,
        S.RUNNING,
        S.RUNNING_P2P,
        S.STOP,
        S.RESUMING,
    )
    assert fsm.path(S.RESUMING, S.PRE_COPY, full) == (
        S.RESUMING,
        S.STOP,
        S.RUNNING_P2P,
        S.RUNNING,
        S.PRE_COPY,
    )
    assert fsm.path(S.STOP_COPY, S.PRE_COPY, full) == ()
    assert fsm.path(S.RUNNING, S.RUNNING, full) == (S.RUNNING,)
    assert fsm.path(E, E, full) == ()
    without_p2p = Feature.STOP_COPY | Feature.PRE_COPY
    assert fsm.path(S.PRE_COPY, S.STOP_COPY, without_p2p) == (S.PRE_COPY, S.STOP_COPY)


states = st.sampled_from(list(State))
feature_sets = st.sampled_from(LEGAL_FEATURE_SETS)


@given(feature_sets, states, states)
def test_paths_use_only_own_arcs_and_respect_saving_group(
    features: Feature, current: State, target: State
) -> None:
    """Every path uses arcs of its feature set; saving states are interior only inside the group."""
    walk = fsm.path(current, target, features)
    if not walk:
        return
    assert walk[0] == current
    assert walk[-1] == target
    arcs = list(itertools.pairwise(walk))
    assert all(arc in ARCS[features] for arc in arcs)
    interior = walk[1:-1]
    if any(s in SAVING_GROUP for s in interior):
        assert all(s in SAVING_GROUP for s in walk)
    assert len(walk) <= len(State)


# -- the transition engine ---------------------------------------------------------------


@dataclass
class ScriptedDevice:
    """A device whose arcs succeed unless listed in ``fail``; it records every arc it ran."""

    features: Feature
    state: State
    name: str = "dev0"
    fail: set[tuple[State, State]] = field(default_factory=set)
    fail_to_error: bool = False
    ran: list[tuple[State, State]] = field(default_factory=list)
    resets: int = 0

    def step(self, arc_from: State, arc_to: State) -> None:
        if (arc_from, arc_to) in self.fail:
            if self.fail_to_error:
                self.state = S.ERROR
            raise OSError(5, f"injected failure {arc_from.name}->{arc_to.name}")
        self.ran.append((arc_from, arc_to))

    async def hard_reset(self) -> None:
        self.resets += 1


def multi_arc_failures() -> list[tuple[Feature, State, State, int]]:
    """Every (features, start, target, failing arc index) of every multi-arc path."""
    cases = []
    for features, start, target in CASES:
        walk = fsm.path(start, target, features)
        if len(walk) > 2:
            cases.extend((features, start, target, position) for position in range(len(walk) - 1))
    return cases


def expected_after_failure(
    features: Feature, start: State, walk: tuple[State, ...], position: int
) -> State:
    """The unwind rule of seed 003 applied to a failure at arc ``position`` of ``walk``."""
    reached = walk[position]
    if (start in SAVING_GROUP and reached not in SAVING_GROUP) or (
        start == S.RESUMING and reached != S.RESUMING
    ):
        return S.ERROR
    back = fsm.path(reached, start, features)
    return start if back else S.ERROR


@pytest.mark.parametrize(("features", "start", "target", "position"), multi_arc_failures())
def test_unwind_after_failed_arc(
    features: Feature, start: State, target: State, position: int
) -> None:
    """A failing arc at any position unwinds to the start, or to ERROR when the session is lost."""
    walk = fsm.path(start, target, features)
    failing = (walk[position], walk[position + 1])
    device = ScriptedDevice(features, start, fail={failing})
    with pytest.raises(TransitionError) as info:
        fsm.walk(device, target)
    expected = expected_after_failure(features, start, walk, position)
    assert device.state == expected
    assert info.value.state == expected
    assert info.value.failed_arc == failing
    assert isinstance(info.value.__cause__, OSError)
    assert device.ran[:position] == list(itertools.pairwise(walk))[:position]
    if expected == start and position > 0:
        # the walk back retraced the path, arc by arc
        assert device.ran[position:] == list(
            itertools.pairwise(fsm.path(walk[position], start, features))
        )


def test_unwind_cases_cover_every_multi_arc_path() -> None:
    """Each multi-arc path contributes one case per arc, and there are such paths in every set."""
    cases = multi_arc_failures()
    for features in LEGAL_FEATURE_SETS:
        assert any(c[0] == features for c in cases)


def test_failed_step_back_ends_in_error() -> None:
    """If the walk back itself fails, the device is in ERROR and the original error is raised."""
    full = LEGAL_FEATURE_SETS[-1]
    device = ScriptedDevice(
        full, S.RUNNING, fail={(S.RUNNING_P2P, S.STOP), (S.RUNNING_P2P, S.RUNNING)}
    )
    with pytest.raises(TransitionError, match="RUNNING_P2P -> STOP failed") as info:
        fsm.walk(device, S.STOP)
    assert device.state == S.ERROR
    assert info.value.state == S.ERROR
    assert "RUNNING_P2P->STOP" in str(info.value.__cause__)


def test_arc_that_breaks_the_device_is_not_unwound() -> None:
    """An arc hook that reports ERROR itself leaves the device in ERROR with no walk back."""
    full = LEGAL_FEATURE_SETS[-1]
    device = ScriptedDevice(full, S.RUNNING, fail={(S.RUNNING_P2P, S.STOP)}, fail_to_error=True)
    with pytest.raises(TransitionError):
        fsm.walk(device, S.STOP)
    assert device.state == S.ERROR
    assert device.ran == [(S.RUNNING, S.RUNNING_P2P)]


@pytest.mark.parametrize(("start", "target"), [
    (S.STOP_COPY, S.PRE_COPY), (S.STOP_COPY, S.PRE_COPY_P2P), (S.RUNNING, S.ERROR),
    (S.ERROR, S.RUNNING),
])  # fmt: skip
def test_forbidden_transitions_touch_nothing(start: State, target: State) -> None:
    """A transition the FSM forbids raises TransitionNotAllowed and runs no arc."""
    device = ScriptedDevice(LEGAL_FEATURE_SETS[-1], start)
    with pytest.raises(TransitionNotAllowed, match=f"{start.name} -> {target.name}"):
        fsm.walk(device, target)
    assert device.state == start
    assert device.ran == []


def test_unsupported_state_is_not_allowed() -> None:
    """A device without P2P cannot be asked for RUNNING_P2P."""
    device = ScriptedDevice(Feature.STOP_COPY, S.RUNNING)
    with pytest.raises(TransitionNotAllowed):
        fsm.walk(device, S.RUNNING_P2P)


def test_walk_returns_arcs_taken() -> None:
    """A successful walk returns exactly the arcs the device ran."""
    device = ScriptedDevice(LEGAL_FEATURE_SETS[-1], S.RESUMING)
    arcs = fsm.walk(device, S.RUNNING)
    assert arcs == ((S.RESUMING, S.STOP), (S.STOP, S.RUNNING_P2P), (S.RUNNING_P2P, S.RUNNING))
    assert device.ran == list(arcs)
    assert device.state == S.RUNNING
    assert fsm.walk(device, S.RUNNING) == ()


@pytest.mark.parametrize("state", list(State))
async def test_reset_from_every_state(state: State) -> None:
    """Reset brings a device to RUNNING from any state, ERROR included."""
    device = ScriptedDevice(LEGAL_FEATURE_SETS[-1], state)
    await fsm.reset(device)
    assert device.state == S.RUNNING
    assert device.resets == 1
