#!/usr/bin/env python3
# The shop's notifications service (Python): mails a confirmation for every order.created, as
# consumer group `notifications`. An order whose email has no `@` makes the handler raise: the
# client nacks it with the error, the daemon retries it, and after MAX_ATTEMPTS it is a dead letter.
"""notifications: order confirmations by mail (printed), over sidebus."""

import asyncio
import signal

import sidebus

MAX_ATTEMPTS = 3


async def send_confirmation(delivery: sidebus.Delivery) -> None:
    order = delivery.data
    email = order.get("email", "")
    if "@" not in email:
        then = "it goes to the dead-letter queue" if delivery.attempt >= MAX_ATTEMPTS else "it will be retried"
        print(f"notifications: order {order['orderId']}: cannot mail {email!r} "
              f"(attempt {delivery.attempt} of {MAX_ATTEMPTS}, {then})", flush=True)
        raise ValueError(f"invalid email address {email!r}: no @")  # raising nacks with this text
    print(f"notifications: order {order['orderId']}: mailed {email} a confirmation of "
          f"{order['amount']} {order['currency']}", flush=True)


async def main() -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    async with await sidebus.connect(name="notifications") as client:  # the socket: $SIDEBUS_SOCKET
        await client.subscribe("order.created", "notifications", send_confirmation, max_attempts=MAX_ATTEMPTS)
        print("notifications: subscribed to order.created as group notifications", flush=True)
        await stop.wait()
    # Leaving the block closed the client gracefully: running handlers finished first.
    print("notifications: stopped", flush=True)


if __name__ == "__main__":
    asyncio.run(main())
