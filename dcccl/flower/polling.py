"""Sending a batch of messages and collecting their replies, checking for replies as often as the run config asks.

Flower 1.42's ``Grid.send_and_receive`` on a real SuperLink checks for replies every 3 seconds (a fixed interval),
so every exchange waits 1.5 s on average after its last reply arrived. This does the same over the grid's
``push_messages`` and ``pull_messages``, every ``poll-interval`` seconds of the run config.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable
from typing import Any, Optional

from flwr.app import Message
from flwr.serverapp import Grid

from dcccl.errors import ConfigError

DEFAULT_POLL_INTERVAL = 0.2  # seconds between two checks for replies: a few small requests a second to the SuperLink


def poll_interval_of(value: Any) -> float:
    """``poll-interval`` of the run config as seconds between two checks for replies (``None``: the default).

    Raises:
        ConfigError: Unless it is a number of seconds from 0.01 to 60.
    """
    if value is None:
        return DEFAULT_POLL_INTERVAL
    try:
        seconds = float(value)
    except (TypeError, ValueError):
        seconds = math.nan
    if isinstance(value, bool) or not 0.01 <= seconds <= 60:
        raise ConfigError(f"poll-interval must be a number of seconds from 0.01 to 60, got {value!r}")
    return seconds


def send_and_receive(grid: Grid, messages: Iterable[Message], timeout: Optional[float],
                     interval: float = DEFAULT_POLL_INTERVAL) -> list[Message]:
    """Send ``messages`` and return the replies that came within ``timeout`` seconds (``None``: wait for all),
    checking for them every ``interval`` seconds; as ``Grid.send_and_receive`` does, at another pace."""
    waiting = set(grid.push_messages(messages))
    deadline = None if timeout is None else time.monotonic() + timeout
    replies: list[Message] = []
    while waiting:
        came = list(grid.pull_messages(waiting))
        replies.extend(came)
        waiting.difference_update(reply.metadata.reply_to_message_id for reply in came)
        if not waiting or (deadline is not None and time.monotonic() >= deadline):
            break
        time.sleep(interval if deadline is None else max(0.0, min(interval, deadline - time.monotonic())))
    return replies
