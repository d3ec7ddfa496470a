# -*- test-case-name: tests.test_workers -*-
"""
The admin API of a supervisor (C{[lb] workers} above 1): the same
endpoints as L{l7lb.admin}, answered from every worker's private API.

Counts are summed over the workers; any other value stays as it is when
every worker agrees and becomes C{{"per_worker": {...}}} when they differ.
C{/routes} and C{/config} come from one worker (they are the same in all).
C{/metrics} is every worker's exposition merged, with a C{worker} label,
and the supervisor's own gauges. Changes are validated once, saved once
by the supervisor, then applied in every worker.
"""

from __future__ import annotations

import json
import os
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from typing import Any, Protocol
from urllib.parse import quote

from prometheus_client import generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector, CollectorRegistry
from twisted.internet.defer import Deferred

from l7lb.admin import AdminAPI, AdminError, Answer, Managed
from l7lb.state import RuntimeState


class Fleet(Managed, Protocol):
    """
    Worker processes as the supervisor's admin API sees them (see
    L{l7lb.supervisor.Supervisor}). Workers are named by their number,
    C{"1"} to C{"N"}, which a worker started in another's place keeps.
    """

    restarts: int

    def worker_pids(self) -> dict[str, int]:
        """
        The process id of every worker that serves now, by worker.
        """
        ...

    def ask(
        self, method: bytes, path: str, body: bytes | None = None, one: bool = False
    ) -> Deferred[dict[str, tuple[int, bytes]]]:
        """
        Send a request to every serving worker's private API (to one only
        with C{one}); their answers by worker, status 0 for a worker that
        did not answer (the body then says why).
        """
        ...

    def change(self, state: RuntimeState) -> Deferred[tuple[list[str], dict[str, str]]]:
        """
        Validate, save once and apply C{state} in every worker: the problems
        (nothing was changed), or what each worker made of it.
        """
        ...

    def reload_workers(self) -> Deferred[tuple[list[str], dict[str, str]]]:
        """
        Validate the file, then reload every worker: as L{change}.
        """
        ...


class FleetAdmin(AdminAPI):
    """
    The admin API of a supervisor of worker processes: reading merges the
    workers' answers, a change is validated and saved once and then applied
    in every worker (the answer names each worker's outcome under
    C{"workers"}, and is 502 when one failed).
    """

    def __init__(self, fleet: Fleet) -> None:
        super().__init__(fleet)
        self.fleet = fleet

    def _answers(
        self, method: bytes, path: str, body: bytes | None = None
    ) -> Deferred[tuple[dict[str, Any], dict[str, tuple[int, Any]]]]:
        """
        The JSON of every worker that answered 200, and the other answers.
        """

        def split(
            replies: dict[str, tuple[int, bytes]],
        ) -> tuple[dict[str, Any], dict[str, tuple[int, Any]]]:
            ok: dict[str, Any] = {}
            others: dict[str, tuple[int, Any]] = {}
            for worker, (status, raw) in replies.items():
                if status == 0:
                    others[worker] = (status, raw.decode("utf-8", "replace"))
                    continue
                try:
                    value = json.loads(raw)
                except ValueError:
                    others[worker] = (502, {"error": "not JSON"})
                    continue
                if status == 200:
                    ok[worker] = value
                else:
                    others[worker] = (status, value)
            return ok, others

        return self.fleet.ask(method, path, body).addCallback(split)

    @staticmethod
    def _none_answered(others: dict[str, tuple[int, Any]]) -> Answer:
        """
        What to say when no worker had a good answer: the workers' own
        answer when they agree on one (a 404), else 503.
        """
        answers = [answer for answer in others.values() if answer[0] != 0]
        if answers and all(a == answers[0] for a in answers):
            return answers[0]
        return 503, {
            "error": "no worker answered",
            "workers": {w: str(answer[1]) for w, answer in others.items()},
        }

    def _merged(
        self, path: str, combine: Callable[[dict[str, Any]], dict[str, Any]]
    ) -> Deferred[Answer]:
        """
        GET C{path} from every worker; C{combine} makes one answer of the
        good ones (by worker), to which the number of workers is added.
        """

        def merge(
            answers: tuple[dict[str, Any], dict[str, tuple[int, Any]]],
        ) -> Answer:
            ok, others = answers
            if not ok:
                return self._none_answered(others)
            return 200, {**combine(ok), "workers": len(ok)}

        return self._answers(b"GET", path).addCallback(merge)

    def pools(self) -> Deferred[Answer]:
        return self._merged(
            "/pools",
            lambda ok: {"pools": merge_pools({w: a["pools"] for w, a in ok.items()})},
        )

    def pool(self, name: str) -> Deferred[Answer]:
        return self._merged(f"/pools/{_quote(name)}", merge_pool)

    def _from_one(self, path: str) -> Deferred[Answer]:
        def relay(replies: dict[str, tuple[int, bytes]]) -> Answer:
            for status, raw in replies.values():
                if status:
                    return status, json.loads(raw)
            return self._none_answered({})

        return self.fleet.ask(b"GET", path, one=True).addCallback(relay)

    def routes(self) -> Deferred[Answer]:
        return self._from_one("/routes")

    def effective_config(self) -> Deferred[Answer]:
        return self._from_one("/config")

    def stats(self) -> Deferred[Answer]:
        def combine(ok: dict[str, Any]) -> dict[str, Any]:
            stats = merge_stats(ok)
            stats.update(
                uptime_seconds=round(time.time() - self.started, 3),
                pid=os.getpid(),
                worker_restarts=self.fleet.restarts,
            )
            return stats

        return self._merged("/stats", combine)

    def metrics(self) -> Deferred[Answer]:
        def merge(replies: dict[str, tuple[int, bytes]]) -> Answer:
            texts = {
                worker: raw.decode("utf-8")
                for worker, (status, raw) in replies.items()
                if status == 200
            }
            workers = GaugeMetricFamily("l7lb_workers", "Worker processes serving now.")
            workers.add_metric([], len(self.fleet.worker_pids()))
            restarts = CounterMetricFamily(
                "l7lb_worker_restarts",
                "Worker processes started again after one exited unexpectedly.",
            )
            restarts.add_metric([], self.fleet.restarts)
            return 200, merge_metrics(texts, [workers, restarts])

        return self.fleet.ask(b"GET", "/metrics").addCallback(merge)

    @staticmethod
    def _applied(
        outcome: tuple[list[str], dict[str, str]], status: int, body: dict[str, Any]
    ) -> Answer:
        problems, workers = outcome
        if problems:
            raise AdminError(400, {"errors": problems})
        failed = any(result != "applied" for result in workers.values())
        return (502 if failed else status), {**body, "workers": workers}

    def reload(self) -> Deferred[Answer]:
        return self.fleet.reload_workers().addCallback(
            self._applied, 200, {"reloaded": True}
        )

    def apply_change(
        self, state: RuntimeState, status: int, body: dict[str, Any]
    ) -> Deferred[Answer]:
        return self.fleet.change(state).addCallback(self._applied, status, body)

    def drain(self, pool_name: str, backend_id: str) -> Deferred[Answer]:
        def merge(
            answers: tuple[dict[str, Any], dict[str, tuple[int, Any]]],
        ) -> Answer:
            ok, others = answers
            if not ok:
                return self._none_answered(others)
            first = next(iter(ok.values()))
            return 200, {
                "id": first["id"],
                "draining": True,
                "in_flight": sum(answer["in_flight"] for answer in ok.values()),
                "workers": len(ok),
            }

        path = f"/pools/{_quote(pool_name)}/backends/{_quote(backend_id)}/drain"
        return self._answers(b"POST", path).addCallback(merge)


def _quote(segment: str) -> str:
    return quote(segment, safe="")


def agree(values: dict[str, Any]) -> Any:
    """
    The value every worker gives, or C{{"per_worker": {worker: value}}}
    when they differ.
    """
    first, *rest = values.values()
    if all(value == first for value in rest):
        return first
    return {"per_worker": dict(values)}


def _total(values: Iterable[Any]) -> Any:
    """
    Numbers added up; mappings of numbers (answers by status class) added
    key by key.
    """
    values = list(values)
    if values and all(isinstance(value, dict) for value in values):
        total: Counter[str] = Counter()
        for value in values:
            total.update(value)
        return dict(total)
    return sum(value for value in values if isinstance(value, int | float))


def _merge(
    records: dict[str, dict[str, Any]], summed: frozenset[str]
) -> dict[str, Any]:
    """
    One record from each worker's: the C{summed} keys added up, the others
    as L{agree} says.
    """
    keys: dict[str, None] = {}
    for record in records.values():
        keys.update(dict.fromkeys(record))
    merged = {}
    for key in keys:
        values = {w: record[key] for w, record in records.items() if key in record}
        merged[key] = _total(values.values()) if key in summed else agree(values)
    return merged


_POOL_TOTALS = frozenset({"in_flight", "queued_now", "retries"})
_BACKEND_TOTALS = frozenset({"in_flight", "answered", "ejections"})
_STATS_TOTALS = frozenset(
    {
        "requests",
        "requests_in_flight",
        "client_connections",
        "bytes_sent",
        "bytes_received",
        "retries",
        "shed",
        "rate_limited",
    }
)


def _by_name(
    lists: dict[str, list[dict[str, Any]]], key: str
) -> Iterator[dict[str, dict[str, Any]]]:
    """
    The records of several workers' lists grouped by C{key}, in the order
    they come.
    """
    names: dict[Any, None] = {}
    for records in lists.values():
        names.update(dict.fromkeys(record[key] for record in records))
    for name in names:
        yield {
            worker: record
            for worker, records in lists.items()
            for record in records
            if record[key] == name
        }


def merge_pools(answers: dict[str, list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """
    C{GET /pools} of several workers as one.
    """
    return [merge_pool(records) for records in _by_name(answers, "name")]


def merge_pool(records: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """
    One pool as several workers describe it: in flight, queued and retries
    added up; with C{GET /pools/NAME}'s details, each backend merged too.
    """
    lists = {w: r.get("backends") for w, r in records.items()}
    merged = _merge(records, _POOL_TOTALS)
    if all(isinstance(backends, list) for backends in lists.values()):
        merged["backends"] = [
            _merge(backend, _BACKEND_TOTALS)
            for backend in _by_name(lists, "id")  # type: ignore[arg-type]
        ]
    return merged


def merge_stats(answers: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """
    C{GET /stats} of several workers as one: every count added up, and each
    worker's process id and uptime under C{per_worker}.
    """
    merged = {
        key: value
        for key, value in _merge(answers, _STATS_TOTALS).items()
        if key in _STATS_TOTALS
    }
    merged["per_worker"] = {
        worker: {
            "pid": answer.get("pid"),
            "uptime_seconds": answer.get("uptime_seconds"),
            "requests_in_flight": answer.get("requests_in_flight"),
            "client_connections": answer.get("client_connections"),
        }
        for worker, answer in answers.items()
    }
    return merged


class _Families(Collector):
    def __init__(self, families: Iterable[Metric]) -> None:
        self.families = list(families)

    def collect(self) -> Iterator[Metric]:
        return iter(self.families)


def merge_metrics(texts: dict[str, str], own: Iterable[Metric] = ()) -> bytes:
    """
    Several workers' exposition texts as one: every sample with a C{worker}
    label added, each family once (one HELP and TYPE), after the
    supervisor's C{own} families.
    """
    families: dict[str, Metric] = {}
    for worker, text in texts.items():
        for family in text_string_to_metric_families(text):
            merged = families.get(family.name)
            if merged is None:
                merged = families[family.name] = Metric(
                    family.name, family.documentation, family.type
                )
            elif merged.type != family.type:
                continue
            for sample in family.samples:
                merged.add_sample(
                    sample.name, {"worker": worker, **sample.labels}, sample.value
                )
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Families([*own, *families.values()]))
    return generate_latest(registry)
