"""
Coarse deadlines on a Clock: met within a tick and never early, one timer
per clock however many are watched, and no timer left once none are.
"""

from __future__ import annotations

import gc
import weakref

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from l7lb.deadlines import NEVER, TICKS_PER_SECOND, Deadlines

TICK = 1 / TICKS_PER_SECOND
# Float drift of a Clock advanced in many small steps.
EPSILON = 1e-6


class Item:
    """
    A watched object that records when it expired; C{then} runs inside
    C{expired}. By default it expires once (its deadline goes to NEVER).
    """

    def __init__(self, clock: Clock, deadline: float, then=None, once=True) -> None:
        self.clock = clock
        self.deadline = deadline
        self.then = then
        self.once = once
        self.fired: list[float] = []

    def expired(self) -> None:
        self.fired.append(self.clock.seconds())
        if self.once:
            self.deadline = NEVER
        if self.then is not None:
            self.then(self)


def run(clock: Clock, until: float, step: float = 0.01) -> None:
    while clock.seconds() < until:
        clock.advance(step)


class DeadlineTests(SynchronousTestCase):
    def setUp(self):
        self.clock = Clock()
        self.deadlines = Deadlines(self.clock)

    def test_met_within_a_tick_never_early(self):
        self.clock.advance(0.1)  # watching starts off the tick grid
        deadlines = [0.1, 0.3, 0.35, 1.0, 2.61, 7.77]
        items = [Item(self.clock, d) for d in deadlines]
        for item in items:
            self.deadlines.watch(item)
        run(self.clock, 10)
        for deadline, item in zip(deadlines, items, strict=True):
            self.assertEqual(len(item.fired), 1, deadline)
            self.assertGreaterEqual(item.fired[0], deadline, deadline)
            self.assertLessEqual(item.fired[0], deadline + TICK + EPSILON, deadline)

    def test_not_met_before_the_deadline(self):
        item = Item(self.clock, 5.0)
        self.deadlines.watch(item)
        self.clock.pump([TICK] * 19)
        self.assertAlmostEqual(self.clock.seconds(), 4.75)
        self.assertEqual(item.fired, [])
        self.clock.advance(TICK)
        self.assertEqual(item.fired, [5.0])

    def test_deadline_moved_later_is_honoured(self):
        item = Item(self.clock, 1.0)
        self.deadlines.watch(item)
        self.clock.advance(0.5)
        item.deadline = 3.0
        run(self.clock, 2.9)
        self.assertEqual(item.fired, [])
        run(self.clock, 3.0 + TICK)
        self.assertEqual(len(item.fired), 1)
        self.assertGreaterEqual(item.fired[0], 3.0)

    def test_expired_again_while_the_deadline_stays_past(self):
        """
        C{expired} is called every tick for as long as the deadline stays in
        the past: it is up to the item to move it or be unwatched.
        """
        item = Item(self.clock, 1.0, once=False)
        self.deadlines.watch(item)
        self.clock.pump([TICK] * 6)
        self.assertEqual(item.fired, [1.0, 1.25, 1.5])

    def test_rearmed_in_expired(self):
        def rearm(item):
            item.deadline = self.clock.seconds() + 1.0

        item = Item(self.clock, 1.0, then=rearm, once=False)
        self.deadlines.watch(item)
        self.clock.pump([TICK] * 12)
        self.assertEqual(item.fired, [1.0, 2.0, 3.0])

    def test_one_timer_for_many_items(self):
        for i in range(100):
            self.deadlines.watch(Item(self.clock, 10.0 + i))
        self.assertEqual(len(self.clock.getDelayedCalls()), 1)
        self.clock.advance(TICK)
        self.assertEqual(len(self.clock.getDelayedCalls()), 1)

    def test_unwatch_self_inside_expired(self):
        item = Item(self.clock, 0.5, then=self.deadlines.unwatch, once=False)
        self.deadlines.watch(item)
        self.clock.pump([TICK] * 8)
        self.assertEqual(item.fired, [0.5])
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_unwatch_another_inside_expired(self):
        """
        Items expiring on the same tick: one that unwatches the other in its
        C{expired} spares it, whichever order the set yields them in.
        """
        first = Item(self.clock, 1.0)
        second = Item(self.clock, 1.0)
        first.then = lambda _: self.deadlines.unwatch(second)
        second.then = lambda _: self.deadlines.unwatch(first)
        self.deadlines.watch(first)
        self.deadlines.watch(second)
        self.clock.pump([TICK] * 4)
        self.assertEqual(len(first.fired) + len(second.fired), 1)

    def test_unwatch_everything_inside_expired(self):
        others = [Item(self.clock, 1.0) for _ in range(5)]

        def clear(_):
            for other in others:
                self.deadlines.unwatch(other)

        trigger = Item(self.clock, 1.0, then=clear)
        for item in [trigger, *others]:
            self.deadlines.watch(item)
        self.clock.pump([TICK] * 4)
        # The trigger stays watched (NEVER): ticking goes on for it alone.
        self.assertEqual(self.deadlines.items, {trigger})
        fired = sum(len(item.fired) for item in [trigger, *others])
        self.assertLessEqual(fired, 6)
        self.assertEqual(trigger.fired, [1.0])

    def test_watch_inside_expired(self):
        late = Item(self.clock, 2.0)
        early = Item(self.clock, 1.0, then=lambda _: self.deadlines.watch(late))
        self.deadlines.watch(early)
        self.clock.pump([TICK] * 12)
        self.assertEqual(early.fired, [1.0])
        self.assertEqual(late.fired, [2.0])

    def test_no_timer_once_nothing_is_watched(self):
        item = Item(self.clock, 30.0)
        self.deadlines.watch(item)
        self.assertEqual(len(self.clock.getDelayedCalls()), 1)
        self.deadlines.unwatch(item)
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.assertEqual(self.deadlines.items, set())

    def test_unwatching_an_unknown_item_is_harmless(self):
        self.deadlines.unwatch(Item(self.clock, 1.0))
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_ticking_resumes_with_the_next_watch(self):
        first = Item(self.clock, 1.0)
        self.deadlines.watch(first)
        self.deadlines.unwatch(first)
        second = Item(self.clock, 1.0)
        self.deadlines.watch(second)
        self.clock.pump([TICK] * 4)
        self.assertEqual(second.fired, [1.0])
        self.assertEqual(first.fired, [])

    def test_stop_keeps_the_items(self):
        item = Item(self.clock, 1.0)
        self.deadlines.watch(item)
        self.deadlines.stop()
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.clock.advance(5)
        self.assertEqual(item.fired, [])
        self.deadlines.watch(Item(self.clock, NEVER))
        self.clock.advance(TICK)
        self.assertEqual(item.fired, [5.0 + TICK])

    def test_stop_twice(self):
        self.deadlines.watch(Item(self.clock, 1.0))
        self.deadlines.stop()
        self.deadlines.stop()
        self.assertEqual(self.clock.getDelayedCalls(), [])


class RegistryTests(SynchronousTestCase):
    def test_one_instance_per_clock(self):
        one, two = Clock(), Clock()
        self.assertIs(Deadlines.of(one), Deadlines.of(one))
        self.assertIsNot(Deadlines.of(one), Deadlines.of(two))
        self.assertIs(Deadlines.of(two).clock, two)

    def test_shared_instance_has_one_timer(self):
        clock = Clock()
        Deadlines.of(clock).watch(Item(clock, 1.0))
        Deadlines.of(clock).watch(Item(clock, 2.0))
        self.assertEqual(len(clock.getDelayedCalls()), 1)

    def test_registry_does_not_keep_a_clock_alive(self):
        """
        The registry is keyed weakly by clock: a clock nobody else holds (a
        test's) goes away with its deadlines.
        """
        clock = Clock()
        Deadlines.of(clock)
        alive = weakref.ref(clock)
        del clock
        gc.collect()
        self.assertIsNone(alive())


class FailureIsolationTests(SynchronousTestCase):
    def test_one_failing_deadline_does_not_stop_the_others(self):
        clock = Clock()
        deadlines = Deadlines(clock)

        class Broken:
            deadline = 1.0

            def expired(self):
                raise RuntimeError("a bug")

        class Fine:
            deadline = 1.0
            fired = 0

            def expired(self):
                self.fired += 1
                deadlines.unwatch(self)

        broken, fine = Broken(), Fine()
        deadlines.watch(broken)
        deadlines.watch(fine)
        clock.advance(1.0 + 1 / TICKS_PER_SECOND)
        self.assertEqual(fine.fired, 1)
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)
        # Ticking goes on for what is still watched.
        self.assertEqual(len(clock.getDelayedCalls()), 1)
        deadlines.unwatch(broken)
        self.assertEqual(clock.getDelayedCalls(), [])
