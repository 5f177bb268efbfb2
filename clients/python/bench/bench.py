# The Python client's benchmark: publishes N events pipelined (up to 1,000 in flight) through the
# asyncio API (publish_nowait) and consumes them with a handler that just returns, then prints one JSON line with
# both rates. --profile writes a cProfile of the run, to see where the client's time goes.
"""Benchmark of the sidebus Python client.

    python bench/bench.py --socket PATH --count N [--max-in-flight M] [--profile FILE]

A fresh group subscribes to a fresh type before anything is published, on its own connection,
so it receives every event. Publishing and consuming then run at the same time, on one event
loop (the consumer takes events as the daemon makes them available); with --backlog the
consumer unsubscribes at once and subscribes again after the last publish, so each rate is
measured alone. ``publish_per_s`` is N over the time until
the last publish was acknowledged; ``consume_per_s`` is N over the time from the first delivery
to the N-th handler's start (the acks
of the last handlers are confirmed before the program ends). ``client_cpu_us_per_event`` is the
process's CPU time over the run divided by N: the client's cost of one event end to end.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import json
import os
import pstats
import sys
import time
import uuid

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "src"))

import sidebus  # noqa: E402

WINDOW = 1000


async def run(socket: str, count: int, max_in_flight: int, backlog: bool) -> dict[str, object]:
    token = uuid.uuid4().hex[:10]
    event_type = f"bench.py.{token}"
    consumer = await sidebus.connect(socket=socket, name="bench-consumer")
    producer = await sidebus.connect(socket=socket, name="bench-producer")
    loop = asyncio.get_running_loop()
    consumed = 0
    first_delivery: float | None = None
    all_consumed = loop.create_future()

    async def handle(d: sidebus.Delivery) -> None:
        nonlocal consumed, first_delivery
        now = time.perf_counter()
        if first_delivery is None:
            first_delivery = now
        consumed += 1
        if consumed == count and not all_consumed.done():
            all_consumed.set_result(now)

    group = f"bench-{token}"
    sub = await consumer.subscribe(event_type, group, handle, max_in_flight=max_in_flight)
    if backlog:
        # The group exists now and keeps every event; consuming starts after the last publish.
        await sub.unsubscribe()

    pad = "x" * 200
    window = asyncio.Semaphore(WINDOW)
    errors = 0

    def released(f: asyncio.Future[sidebus.Published]) -> None:
        nonlocal errors
        window.release()
        if f.exception() is not None:
            errors += 1

    started = time.perf_counter()
    cpu_started = time.process_time()
    futures: list[asyncio.Future[sidebus.Published]] = []
    for i in range(count):
        await window.acquire()
        f = producer.publish_nowait(event_type, {"n": i, "pad": pad}, durability="local")
        f.add_done_callback(released)
        futures.append(f)
    await asyncio.gather(*futures, return_exceptions=True)
    published = time.perf_counter()
    if errors:
        raise SystemExit(f"{errors} publishes failed")
    if backlog:
        await consumer.subscribe(event_type, group, handle, max_in_flight=max_in_flight)

    done_at = await asyncio.wait_for(all_consumed, timeout=max(60.0, count / 500))
    assert first_delivery is not None
    await producer.close()
    await consumer.close()
    cpu = time.process_time() - cpu_started
    return {
        "client": "python",
        "count": count,
        "publish_per_s": round(count / (published - started)),
        "consume_per_s": round(count / (done_at - first_delivery)),
        "max_in_flight": max_in_flight,
        "mode": "backlog" if backlog else "live",
        # The client's own CPU time per event (publish, its reply, the delivery, the ack and its
        # reply), which says more than the rates on a busy machine.
        "client_cpu_us_per_event": round(cpu / count * 1e6, 1),
    }


def where_the_time_goes(stats: pstats.Stats) -> None:
    """Sums the profile's own time (tottime) by where it is spent and prints it to stderr."""
    groups: dict[str, float] = {}
    total = 0.0
    for (path, _line, fn), (_cc, _nc, tt, _ct, _callers) in stats.stats.items():  # type: ignore[attr-defined]
        total += tt
        if "sidebus/protocol" in path:
            g = "sidebus frame reader and decoder (msgpack unpack included)"
        elif "sidebus/" in path:
            g = "sidebus client code (requests, routing, handlers, acks)"
        elif "epoll" in fn or "select" in fn:
            g = "waiting in epoll (idle: the daemon's turn)"
        elif "asyncio" in path or "_contextvars" in fn or "_asyncio" in fn or "_weakrefset" in path:
            g = "asyncio machinery (tasks, futures, callbacks, the loop)"
        elif "socket" in fn:
            g = "socket send/recv system calls"
        elif "pack" in fn:
            g = "msgpack pack"
        elif "bench" in path:
            g = "the benchmark's own code"
        else:
            g = "builtins (dict, list, len, ...)"
        groups[g] = groups.get(g, 0.0) + tt
    print("where the time goes (profiled, own time):", file=sys.stderr)
    for g, t in sorted(groups.items(), key=lambda kv: -kv[1]):
        print(f"  {100 * t / total:5.1f} %  {t:6.2f} s  {g}", file=sys.stderr)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--socket", default=sidebus.default_socket())
    ap.add_argument("--count", type=int, default=20000)
    ap.add_argument("--max-in-flight", type=int, default=1024, help="the consumer's max_in_flight")
    ap.add_argument("--backlog", action="store_true",
                    help="consume only after every publish is acknowledged (the group exists before publishing), "
                         "so that each rate is measured alone")
    ap.add_argument("--profile", help="write a cProfile of the run to this file and print its top entries to stderr")
    args = ap.parse_args()
    if args.profile:
        prof = cProfile.Profile()
        prof.enable()
        result = asyncio.run(run(args.socket, args.count, args.max_in_flight, args.backlog))
        prof.disable()
        prof.dump_stats(args.profile)
        where_the_time_goes(pstats.Stats(prof))
        pstats.Stats(prof, stream=sys.stderr).sort_stats("tottime").print_stats(20)
    else:
        result = asyncio.run(run(args.socket, args.count, args.max_in_flight, args.backlog))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
