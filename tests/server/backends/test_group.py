"""Target groups: the weighted schedule, each strategy's pick, backups, the order of members to
try, the group's up flag, and the retry backoff."""

from __future__ import annotations

import ipaddress
import itertools
import random
from collections import Counter
from collections.abc import Sequence

import pytest
from support import LOOPBACK

from smartroute.routing.model import STRATEGIES, RetryPolicy, Strategy
from smartroute.server.backends import group as group_module
from smartroute.server.backends.group import (
    Member,
    TargetGroup,
    next_to_try,
    retry_delay,
    smooth_schedule,
)
from smartroute.server.backends.state import TargetState

CLIENT = "192.0.2.10"
TEST_CHECK = "the test"  # the checker whose verdict takes members out in these tests


def member(port: int, weight: int = 1, backup: bool = False) -> Member:
    return Member(LOOPBACK, port, state=TargetState(LOOPBACK, port), weight=weight, backup=backup)


def members(*weights: int, backups: int = 0) -> list[Member]:
    """Primaries with ``weights`` on ports 10001, 10002, ..., then ``backups`` backups."""
    primaries = [member(10001 + i, w) for i, w in enumerate(weights)]
    return primaries + [member(10101 + i, backup=True) for i in range(backups)]


def grouped(
    listed: Sequence[Member], strategy: Strategy = "round-robin", **options: object
) -> TargetGroup:
    """A group its members' states tell of their changes (as :class:`Backends` makes them)."""
    group = TargetGroup(listed, strategy, **options)  # type: ignore[arg-type]
    for m in group.members:
        m.state.groups.append(group)
    return group


def take_out(*listed: Member) -> None:
    for m in listed:
        m.state.checked(TEST_CHECK, False, "taken out by the test")


def bring_back(*listed: Member) -> None:
    for m in listed:
        m.state.forget(TEST_CHECK)


def clients(count: int) -> list[str]:
    """``count`` distinct client IPs."""
    first = int(ipaddress.ip_address("10.0.0.1"))
    return [str(ipaddress.ip_address(first + i * 7919)) for i in range(count)]


def firsts(group: TargetGroup, picks: int, client: str = CLIENT) -> list[Member]:
    return [group.order(client)[0] for _ in range(picks)]


# -- smooth_schedule ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("weights", "counts"),
    [
        ([1], [1]),
        ([5], [1]),
        ([1, 1, 1], [1, 1, 1]),
        ([3, 1], [3, 1]),
        ([4, 2], [2, 1]),
        ([6, 9, 3], [2, 3, 1]),
        ([256, 1], [256, 1]),
    ],
)
def test_schedule_holds_each_index_its_reduced_weight_times(
    weights: list[int], counts: list[int]
) -> None:
    schedule = smooth_schedule(weights)
    assert len(schedule) == sum(counts)
    assert [schedule.count(i) for i in range(len(weights))] == counts


def test_equal_weights_give_one_of_each_in_turn() -> None:
    assert smooth_schedule([1, 1, 1]) == (0, 1, 2)
    assert smooth_schedule([2, 2, 2]) == (0, 1, 2)


def test_each_index_is_spread_over_the_cycle() -> None:
    """Stride scheduling, for every small weight vector: an index never follows itself (the
    cycle wrapping round included) while another index weighs at least as much, and an index
    lighter than another neither opens nor closes the cycle."""
    for size in range(2, 5):
        for weights in itertools.product(range(1, 7), repeat=size):
            schedule = smooth_schedule(weights)
            pairs = zip(schedule, schedule[1:] + schedule[:1], strict=True)
            for index in {a for a, b in pairs if a == b}:
                others = [w for i, w in enumerate(weights) if i != index]
                assert max(others) < weights[index], (weights, schedule)
            for end in (schedule[0], schedule[-1]):
                assert weights[end] == max(weights), (weights, schedule)


def test_a_single_pick_sits_between_the_heavy_ones() -> None:
    assert smooth_schedule([3, 1]) == (0, 0, 1, 0)
    assert smooth_schedule([1, 3]) == (1, 0, 1, 1)


# -- the strategies while every primary is up --------------------------------------------------


def test_round_robin_follows_the_weights_exactly_each_cycle() -> None:
    listed = members(3, 1, 2)
    group = grouped(listed)
    for _ in range(10):
        cycle = Counter(m.port for m in firsts(group, 6))
        assert cycle == {10001: 3, 10002: 1, 10003: 2}


def test_round_robin_order_is_the_pick_then_the_others_in_turn_then_backups() -> None:
    listed = members(1, 1, 1, backups=1)
    group = grouped(listed)
    orders = [group.order(CLIENT) for _ in range(3)]
    a, b, c, backup = listed
    assert orders == [(a, b, c, backup), (b, c, a, backup), (c, a, b, backup)]


def test_random_follows_the_weights(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(group_module, "random", random.Random(20240501))
    group = grouped(members(3, 1))
    counts = Counter(m.port for m in firsts(group, 20000))
    assert counts[10001] / 20000 == pytest.approx(0.75, abs=0.02)
    assert counts[10002] / 20000 == pytest.approx(0.25, abs=0.02)


def test_least_connections_picks_the_fewest_active() -> None:
    listed = members(1, 1, 1)
    for m, active in zip(listed, (2, 0, 1), strict=True):
        m.state.active = active
    group = grouped(listed, "least-connections")
    assert set(firsts(group, 10)) == {listed[1]}
    listed[1].state.active = 5
    assert set(firsts(group, 10)) == {listed[2]}


def test_least_connections_takes_ties_in_turn() -> None:
    listed = members(1, 1, 1)
    group = grouped(listed, "least-connections")
    assert Counter(firsts(group, 30)) == {m: 10 for m in listed}
    listed[2].state.active = 4
    picks = firsts(group, 20)
    assert Counter(picks) == {listed[0]: 10, listed[1]: 10}
    assert all(a is not b for a, b in itertools.pairwise(picks))


def test_ip_hash_keeps_a_client_on_one_member() -> None:
    group = grouped(members(1, 1, 1), "ip-hash")
    for client in clients(50):
        chosen = group.order(client)[0]
        group.order("203.0.113.99")  # others in between change nothing
        assert firsts(group, 5, client) == [chosen] * 5


def test_ip_hash_spreads_clients_about_evenly() -> None:
    group = grouped(members(1, 1, 1), "ip-hash")
    counts = Counter(group.order(client)[0].port for client in clients(5000))
    assert len(counts) == 3
    assert all(0.25 < count / 5000 < 0.42 for count in counts.values()), counts


def placement(group: TargetGroup, population: list[str]) -> dict[str, int]:
    return {client: group.order(client)[0].port for client in population}


def test_ip_hash_moves_only_the_new_targets_share_to_it() -> None:
    population = clients(5000)
    before = placement(grouped(members(1, 1, 1), "ip-hash"), population)
    after = placement(grouped(members(1, 1, 1, 1), "ip-hash"), population)
    moved = [client for client in population if after[client] != before[client]]
    assert {after[client] for client in moved} == {10004}
    assert 0.15 < len(moved) / len(population) < 0.35


def test_ip_hash_gives_a_removed_targets_clients_away_and_keeps_the_rest() -> None:
    population = clients(5000)
    listed = members(1, 1, 1, 1)
    four = grouped(listed, "ip-hash")
    with_all = placement(four, population)
    three = placement(grouped(members(1, 1, 1), "ip-hash"), population)
    take_out(listed[3])  # down: its clients go where a group without it sends them
    assert placement(four, population) == three
    take_out(listed[1])
    without = placement(four, population)
    moved = {client for client in population if without[client] != with_all[client]}
    assert moved == {client for client in population if with_all[client] in (10002, 10004)}
    assert {without[client] for client in moved} == {10001, 10003}
    bring_back(listed[1], listed[3])
    assert placement(four, population) == with_all


def test_first_always_picks_the_first_up_primary() -> None:
    backup, a, b = member(10101, backup=True), member(10001), member(10002)
    group = grouped([backup, a, b], "first")
    assert firsts(group, 5) == [a] * 5
    assert group.order(CLIENT) == (a, b, backup)
    take_out(a)
    assert firsts(group, 5) == [b] * 5
    bring_back(a)
    assert firsts(group, 5) == [a] * 5


# -- degraded groups: members down, backups --------------------------------------------------


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_backups_wait_while_a_primary_is_up(strategy: Strategy) -> None:
    listed = members(1, 1, 1, backups=2)
    primaries, backups = listed[:3], listed[3:]
    group = grouped(listed, strategy)
    for client in clients(30):
        assert not group.order(client)[0].backup
    take_out(primaries[0], primaries[1])
    for client in clients(30):
        order = group.order(client)
        assert order == (primaries[2], *backups)


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_degraded_orders_hold_up_members_only_backups_last(strategy: Strategy) -> None:
    listed = members(2, 1, 1, backups=2)
    a, b, c, backup1, backup2 = listed
    group = grouped(listed, strategy)
    take_out(b, backup1)
    for client in clients(40):
        order = group.order(client)
        assert set(order) == {a, c, backup2}
        assert order[-1] is backup2
        assert order[0] in (a, c)


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_a_backup_leads_when_every_primary_is_down(strategy: Strategy) -> None:
    listed = members(1, 1, backups=3)
    primaries, backups = listed[:2], listed[2:]
    group = grouped(listed, strategy)
    take_out(*primaries)
    assert group.up
    for client in clients(30):
        order = group.order(client)
        assert order[0].backup and set(order) == set(backups)
    take_out(backups[0], backups[2])
    assert [group.order(client) for client in clients(5)] == [(backups[1],)] * 5
    bring_back(primaries[1])
    assert group.order(CLIENT)[0] is primaries[1]


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("backups", [0, 1])
def test_nothing_to_try_when_no_member_is_up(strategy: Strategy, backups: int) -> None:
    listed = members(1, 2, backups=backups)
    group = grouped(listed, strategy)
    take_out(*listed)
    assert not group.up
    assert [group.order(client) for client in clients(10)] == [()] * 10
    bring_back(listed[0])
    assert group.up and group.order(CLIENT) == (listed[0],)


# -- the group's flag, its place among the down groups, closing ------------------------------


def test_a_group_files_itself_among_the_down_ones_while_nothing_is_up() -> None:
    downs: dict[int, TargetGroup] = {}
    listed = members(1, backups=1)
    group = grouped(listed, downs=downs, key=7)
    assert group.up and downs == {}
    take_out(listed[0])
    assert group.up and downs == {}  # the backup is up
    take_out(listed[1])
    assert not group.up and downs == {7: group}
    bring_back(listed[1])
    assert group.up and downs == {}


def test_a_group_made_with_every_member_down_starts_down() -> None:
    downs: dict[int, TargetGroup] = {}
    listed = members(1, 1)
    take_out(*listed)
    group = grouped(listed, downs=downs, key=3)
    assert not group.up and downs == {3: group}


def test_a_closed_group_leaves_the_down_ones_and_hears_no_more() -> None:
    downs: dict[int, TargetGroup] = {}
    listed = members(1, 1)
    group = grouped(listed, downs=downs, key=1)
    other = grouped(listed, "first")
    take_out(*listed)
    assert downs == {1: group}
    group.close()
    assert downs == {}
    assert all(m.state.groups == [other] for m in listed)
    bring_back(*listed)
    take_out(*listed)
    assert downs == {} and not other.up


# -- walking an order -------------------------------------------------------------------------


def test_an_order_is_walked_from_its_pick_over_the_members_still_up() -> None:
    listed = members(1, 1, 1, backups=1)
    order = grouped(listed).order(CLIENT)
    assert next_to_try(order, 0) == 0
    take_out(order[0], order[1])  # went down since the order was made
    assert next_to_try(order, 0) == 0  # the pick is tried whatever
    assert next_to_try(order, 1) == 2
    take_out(order[2], order[3])
    assert next_to_try(order, 1) == len(order)
    assert next_to_try((), 0) == 0


# -- retry backoff -----------------------------------------------------------------------------


def test_retry_delay_doubles_up_to_the_cap() -> None:
    policy = RetryPolicy(attempts=6, backoff=0.1, max_backoff=0.5, jitter=0)
    delays = [retry_delay(policy, attempt) for attempt in range(1, 6)]
    assert delays == pytest.approx([0.1, 0.2, 0.4, 0.5, 0.5])


@pytest.mark.parametrize(("draw", "factor"), [(0.0, 0.8), (0.5, 1.0), (0.999, 1.1996)])
def test_retry_delay_jitter_stays_within_its_fraction(draw: float, factor: float) -> None:
    policy = RetryPolicy(backoff=0.1, max_backoff=1.0, jitter=0.2)
    assert retry_delay(policy, 1, lambda: draw) == pytest.approx(0.1 * factor)
    assert retry_delay(policy, 9, lambda: draw) == pytest.approx(1.0 * factor)


def test_retry_delay_is_never_negative() -> None:
    policy = RetryPolicy(backoff=0.1, max_backoff=1.0, jitter=1.0)
    assert retry_delay(policy, 1, lambda: 0.0) == 0.0
    assert 0.0 <= retry_delay(policy, 2) <= 0.4
