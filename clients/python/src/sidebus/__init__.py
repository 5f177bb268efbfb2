# The package's public names: the asyncio client, the blocking wrapper, the typed errors.
"""sidebus: a Python client for the sidebus sidecar event bus.

```python
import sidebus

client = await sidebus.connect(name="orders")          # $SIDEBUS_SOCKET or /run/sidebus/sidebus.sock
await client.publish("order.created", {"orderId": "o-1", "amount": 42.5})

async def handle(delivery: sidebus.Delivery) -> None:  # return = ack, raise = nack
    print(delivery.data)

await client.consume("order.created", "inventory", handle)
```

For scripts without asyncio: :class:`sidebus.BlockingClient` (also ``sidebus.sync.connect``).
"""

from . import sync
from .client import DEFAULT_SOCKET, Client, Delivery, Event, Handler, Published, Subscription, connect, default_socket
from .errors import (
    BadFrame,
    BadRequest,
    Backpressure,
    ClientClosed,
    ConnectionLost,
    FrameTooLarge,
    IncompatibleSchema,
    Internal,
    NotFound,
    SidebusError,
    Timeout,
    Unauthorized,
    Unavailable,
    UnknownOp,
    UnknownTag,
    UnknownVersion,
    UnsupportedProtocol,
    ValidationFailed,
)
from .protocol import PROTOCOL_VERSION
from .sync import BlockingClient, BlockingDelivery

__version__ = "0.1.0"

__all__ = [
    "DEFAULT_SOCKET",
    "PROTOCOL_VERSION",
    "BadFrame",
    "BadRequest",
    "Backpressure",
    "BlockingClient",
    "BlockingDelivery",
    "Client",
    "ClientClosed",
    "ConnectionLost",
    "Delivery",
    "Event",
    "FrameTooLarge",
    "Handler",
    "IncompatibleSchema",
    "Internal",
    "NotFound",
    "Published",
    "SidebusError",
    "Subscription",
    "Timeout",
    "Unauthorized",
    "Unavailable",
    "UnknownOp",
    "UnknownTag",
    "UnknownVersion",
    "UnsupportedProtocol",
    "ValidationFailed",
    "connect",
    "default_socket",
    "sync",
]
