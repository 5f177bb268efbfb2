# The Python runner of the shared conformance suite (clients/conformance/README.md): reads
# scenarios as JSON lines on stdin, runs their steps through the sidebus package's public asyncio
# API, and writes what it observed as JSON lines on stdout. Logs go to stderr.
"""Conformance runner for the sidebus Python client."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import sys
import traceback
from typing import Any

import sidebus
from sidebus.protocol import describe, from_json, to_json

log = logging.getLogger("runner")

PUBLISH_OPTS = {"event_id", "durability", "delay_ms", "deliver_at", "partitionkey", "traceparent", "correlationid", "version", "source"}
SUBSCRIBE_OPTS = {"max_in_flight", "max_attempts", "ack_timeout_ms"}
ADMIN_OPS = {"stats", "register_schema", "get_schema", "list_schemas", "replay", "replay_cancel", "replays",
             "dlq_list", "dlq_redrive", "dlq_purge"}


class Lines:
    """stdin as JSON lines, read in a thread so that the event loop keeps running meanwhile."""

    async def next(self) -> dict[str, Any] | None:
        line = await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
        if not line:
            return None
        return json.loads(line)


def emit(msg: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(msg) + "\n")
    sys.stdout.flush()


class Sub:
    """What one subscription step observed."""

    def __init__(self, spec: dict[str, Any]) -> None:
        self.spec = spec.get("handler") or {}
        self.deliveries: list[dict[str, Any]] = []
        self.running = 0
        self.max_concurrent = 0
        self.subscription: sidebus.Subscription | None = None

    async def handle(self, d: sidebus.Delivery) -> None:
        self.deliveries.append({"attempt": d.attempt, "event": d.event})
        self.running += 1
        self.max_concurrent = max(self.max_concurrent, self.running)
        try:
            h = self.spec
            sleep_ms = h.get("sleep_ms", 0)
            extend_every = h.get("extend_every_ms")
            if sleep_ms:
                if extend_every:
                    left = sleep_ms / 1000
                    while left > 0:
                        step = min(left, extend_every / 1000)
                        await asyncio.sleep(step)
                        left -= step
                        if left > 0:
                            await d.extend()
                else:
                    await asyncio.sleep(sleep_ms / 1000)
            if d.attempt <= h.get("fail_attempts", 0):
                error = h.get("error", "handler failed")
                if h.get("dead"):
                    await d.nack(error, dead=True)
                elif h.get("nack_delay_ms") is not None:
                    await d.nack(error, delay_ms=h["nack_delay_ms"])
                else:
                    raise RuntimeError(error)
        finally:
            self.running -= 1

    def distinct(self) -> int:
        return len({d["event"].get("id") for d in self.deliveries})

    def observed(self) -> dict[str, Any]:
        return {"deliveries": self.deliveries, "max_concurrent": self.max_concurrent}


class Scenario:
    def __init__(self, lines: Lines) -> None:
        self.lines = lines
        self.clients: dict[str, sidebus.Client] = {}
        self.subs: dict[str, Sub] = {}
        self.records: dict[str, Any] = {}

    async def run(self, steps: list[dict[str, Any]]) -> None:
        for step in steps:
            kind = step.get("do")
            fn = getattr(self, f"do_{kind}", None)
            if fn is None:
                raise ValueError(f"unknown step kind {kind!r}")
            await fn(step)

    def record(self, step: dict[str, Any], value: Any) -> None:
        if step.get("record"):
            self.records[step["record"]] = value

    async def do_connect(self, step: dict[str, Any]) -> None:
        which = step.get("socket", "main")
        path = os.environ["SIDEBUS_DEGRADED_SOCKET" if which == "degraded" else "SIDEBUS_SOCKET"]
        self.clients[step["client"]] = await sidebus.connect(socket=path, name=step.get("name"))

    async def do_publish(self, step: dict[str, Any]) -> None:
        opts = step.get("opts") or {}
        unknown = set(opts) - PUBLISH_OPTS
        if unknown:
            raise ValueError(f"unknown publish options {sorted(unknown)}")
        client = self.clients[step["client"]]
        try:
            p = await client.publish(step["type"], from_json(step["data"]), **opts)
            self.record(step, {"event_id": p.event_id, "status": p.status, "duplicate": p.duplicate})
        except sidebus.SidebusError as e:
            self.record(step, {"error": describe(e)})

    async def do_publish_many(self, step: dict[str, Any]) -> None:
        client = self.clients[step["client"]]
        pad = step.get("pad_bytes")
        durability = step.get("durability")

        def data(i: int) -> dict[str, Any]:
            return {"n": i, "pad": "x" * pad} if pad else {"n": i}

        # Every publish is started (its frame written, in order) before any is awaited.
        tasks = [asyncio.ensure_future(client.publish(step["type"], data(i), durability=durability))
                 for i in range(step["count"])]
        results = await asyncio.gather(*tasks, return_exceptions=True)
        ids: list[str] = []
        statuses: dict[str, int] = {}
        errs: dict[str, int] = {}
        for r in results:
            if isinstance(r, sidebus.Published):
                ids.append(r.event_id)
                statuses[r.status] = statuses.get(r.status, 0) + 1
            elif isinstance(r, sidebus.SidebusError):
                errs[r.code] = errs.get(r.code, 0) + 1
            else:
                raise r  # type: ignore[misc]
        self.record(step, {"ids": ids, "statuses": statuses, "errors": errs})

    async def do_subscribe(self, step: dict[str, Any]) -> None:
        opts = step.get("opts") or {}
        unknown = set(opts) - SUBSCRIBE_OPTS
        if unknown:
            raise ValueError(f"unknown subscribe options {sorted(unknown)}")
        sub = Sub(step)
        self.subs[step["sub"]] = sub
        sub.subscription = await self.clients[step["client"]].subscribe(step["type"], step["group"], sub.handle, **opts)

    async def do_wait(self, step: dict[str, Any]) -> None:
        names = step["sub"] if isinstance(step["sub"], list) else [step["sub"]]
        subs = [self.subs[n] for n in names]
        loop = asyncio.get_running_loop()
        deadline = loop.time() + step.get("timeout_ms", 10000) / 1000
        while loop.time() < deadline:
            if "distinct" in step:
                got = len({d["event"].get("id") for s in subs for d in s.deliveries})
                if got >= step["distinct"]:
                    return
            elif sum(len(s.deliveries) for s in subs) >= step.get("deliveries", 0):
                return
            await asyncio.sleep(0.02)

    async def do_count(self, step: dict[str, Any]) -> None:
        self.record(step, {"deliveries": len(self.subs[step["sub"]].deliveries)})

    async def do_sleep(self, step: dict[str, Any]) -> None:
        await asyncio.sleep(step["ms"] / 1000)

    async def do_unsubscribe(self, step: dict[str, Any]) -> None:
        sub = self.subs[step["sub"]].subscription
        if sub is not None:
            await sub.unsubscribe()

    async def do_call(self, step: dict[str, Any]) -> None:
        op = step["op"]
        if op not in ADMIN_OPS:
            raise ValueError(f"unknown admin op {op!r}")
        method = getattr(self.clients[step["client"]], op)
        try:
            result = await method(**from_json(step.get("args") or {}))
            self.record(step, result if result is not None else {})
        except sidebus.SidebusError as e:
            self.record(step, {"error": describe(e)})

    async def do_close(self, step: dict[str, Any]) -> None:
        await self.clients[step["client"]].close()

    async def do_restart_daemon(self, step: dict[str, Any]) -> None:
        emit({"control": "restart_daemon"})
        msg = await self.lines.next()
        if msg is None or msg.get("control") != "done":
            raise RuntimeError(f"expected the control line done, got {msg!r}")

    async def close_all(self) -> None:
        await asyncio.gather(*(c.close() for c in self.clients.values()), return_exceptions=True)

    def observed(self) -> dict[str, Any]:
        return to_json({"records": self.records, "subs": {n: s.observed() for n, s in self.subs.items()}})


async def main() -> None:
    logging.basicConfig(stream=sys.stderr, level=os.environ.get("RUNNER_LOG", "INFO"),
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    lines = Lines()
    while True:
        msg = await lines.next()
        if msg is None:
            return
        name = msg.get("scenario")
        if name is None:
            log.warning("ignoring a line that is not a scenario: %r", msg)
            continue
        log.info("scenario %s", name)
        sc = Scenario(lines)
        try:
            await sc.run(msg.get("steps", []))
        except Exception as e:
            log.error("scenario %s failed:\n%s", name, traceback.format_exc())
            await sc.close_all()
            emit({"scenario": name, "error": f"{type(e).__name__}: {e}"})
            continue
        await sc.close_all()
        emit({"scenario": name, "observed": sc.observed()})


if __name__ == "__main__":
    asyncio.run(main())
