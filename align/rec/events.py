"""Live events: what a user just did, held in memory so their next recommendation reads it with no
retraining (``POST /events`` of ``align serve``; align/serve/app.py).

An event is ``{"user": "u17", "item": "000123", "event": "click", "timestamp": 1714000000}``
(``timestamp`` optional: seconds, or ISO-8601 text read as ``align prep interactions`` reads a
log's times; the server's clock when absent). ``parse_event`` checks one and names the field at
fault; ``LiveEvents`` keeps them, within two bounds:

* per user, the newest ``max_events_per_user`` events by timestamp (arrival order breaks ties):
  adding one more drops that user's oldest, so a user costs at most N events whatever they do;
* at most ``max_users`` users: adding an event of a new user past the bound forgets the least
  recently used one (an event or a read of their history counts as a use), so the store never
  holds more than N x M events (about 130 bytes each: item ids and event names are the
  catalogue's and the allowed list's own strings, shared, not copied per event).

The head reads the user's items in time order (``user_items``): the service appends them to the
user's history from the interaction log. The event type is checked and kept, not weighed: the
head was trained on which items a user touched, not how (align/rec/data.py).
"""
from __future__ import annotations

import bisect
import math
import reprlib
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Mapping, Sequence, Tuple

import numpy as np

from align.data.tables import as_seconds

EVENT_FIELDS = ("user", "item", "event", "timestamp")
DEFAULT_EVENT_TYPES = ("view", "click", "purchase")  # the shop simulator's (align/rec/simulate.py)


class EventError(ValueError):
    """An event that cannot be kept: the field at fault and what to send instead."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field, self.message = field, message


@dataclass(frozen=True)
class Event:
    """One checked event: ``item`` and ``event`` are the catalogue's and the allowed list's strings."""

    user: str
    item: str
    event: str
    time: float  # seconds


def parse_event(body: Any, items: Mapping[str, str], event_types: Mapping[str, str],
                clock: Callable[[], float] = time.time) -> Event:
    """A JSON object -> ``Event``; ``EventError`` naming the first field at fault otherwise.

    ``items`` and ``event_types`` map each allowed value to itself (so the event keeps the shared
    string); ``clock`` dates an event sent without a timestamp."""
    if not isinstance(body, dict):
        raise EventError("body", f"an event is a JSON object such as {{\"user\": \"u17\", \"item\": \"<item id>\", "
                                 f"\"event\": \"click\"}}, got {type(body).__name__}")
    for key in body:
        if key not in EVENT_FIELDS:
            raise EventError(key, f"unknown field {key!r}; an event has {', '.join(EVENT_FIELDS)} (timestamp optional)")
    for key in EVENT_FIELDS[:3]:
        if key not in body:
            raise EventError(key, f"the event has no {key!r}; send user, item and event (and optionally timestamp)")
    user, item, kind = body["user"], body["item"], body["event"]
    if isinstance(user, bool) or not isinstance(user, (str, int)) or not str(user).strip():
        raise EventError("user", f"user must be a non-empty id string, got {user!r}")
    if not isinstance(item, str) or item not in items:
        raise EventError("item", f"unknown item {item!r}: not in this server's catalogue (add it with "
                                 f"`align embed --append` and restart)")
    if not isinstance(kind, str) or kind not in event_types:
        raise EventError("event", f"unknown event type {kind!r}; this server takes {', '.join(event_types)} "
                                  f"(align serve --event-types)")
    return Event(str(user), items[item], event_types[kind], parse_timestamp(body.get("timestamp"), clock))


def parse_timestamp(value: Any, clock: Callable[[], float] = time.time) -> float:
    """Seconds from a number or ISO-8601 text (naive = UTC); ``clock()`` when ``value`` is None."""
    if value is None:
        return float(clock())
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise EventError("timestamp", f"timestamp must be seconds or ISO-8601 text, got {value!r}")
    try:
        seconds = float(as_seconds(np.array([value], dtype=object))[0]) if isinstance(value, str) else float(value)
    except OverflowError:  # a JSON integer past float's range
        seconds = math.inf
    if not math.isfinite(seconds):
        raise EventError("timestamp", f"timestamp {reprlib.repr(value)} is not a finite number of seconds or "
                                      "ISO-8601 text")
    return seconds


class LiveEvents:
    """Per user, their newest events by time; at most ``max_users`` users, least recently used
    forgotten first (see the module docstring). Safe to call from several threads."""

    def __init__(self, max_events_per_user: int = 50, max_users: int = 10_000) -> None:
        if max_events_per_user < 1 or max_users < 1:
            raise ValueError(f"LiveEvents: max_events_per_user ({max_events_per_user}) and max_users ({max_users}) "
                             f"must be >= 1")
        self.max_events_per_user, self.max_users = max_events_per_user, max_users
        # user -> [(time, arrival, item, event)] sorted by time; the OrderedDict's order is recency
        self._users: "OrderedDict[str, List[Tuple[float, int, str, str]]]" = OrderedDict()
        self._arrivals = 0
        self._evicted = 0
        self._lock = threading.Lock()

    def add(self, event: Event) -> int:
        """Keep ``event``; returns how many events its user now has (at most ``max_events_per_user``)."""
        with self._lock:
            self._arrivals += 1
            kept = self._users.get(event.user)
            if kept is None:
                kept = self._users[event.user] = []
                while len(self._users) > self.max_users:
                    self._users.popitem(last=False)  # the least recently used user
                    self._evicted += 1
            else:
                self._users.move_to_end(event.user)
            bisect.insort(kept, (event.time, self._arrivals, event.item, event.event))
            if len(kept) > self.max_events_per_user:
                del kept[0]  # the oldest goes (the new one itself when it is older than all kept)
            return len(kept)

    def user_events(self, user: str) -> List[Event]:
        """The user's kept events, oldest first (empty for a user the store does not hold)."""
        with self._lock:
            kept = self._users.get(user)
            if kept is None:
                return []
            self._users.move_to_end(user)
            return [Event(user, item, kind, when) for when, _, item, kind in kept]

    def user_items(self, user: str) -> List[str]:
        """The items of the user's kept events, oldest first: what joins their history."""
        return [event.item for event in self.user_events(user)]

    def __len__(self) -> int:
        return len(self._users)

    def stats(self) -> Dict[str, int]:
        """The bounds and what the store holds now (``/healthz`` shows them)."""
        with self._lock:
            held = sum(len(kept) for kept in self._users.values())
            return {"users": len(self._users), "events": held, "max_users": self.max_users,
                    "max_events_per_user": self.max_events_per_user, "received": self._arrivals,
                    "evicted_users": self._evicted}


def identity_map(values: Sequence[str]) -> Dict[str, str]:
    """Each value to itself: what ``parse_event`` looks allowed values up in."""
    return {value: value for value in values}


def names_list(text: str) -> Tuple[str, ...]:
    """``"view, click,purchase"`` -> ("view", "click", "purchase"): a comma-separated flag's names."""
    return tuple(name.strip() for name in text.split(",") if name.strip())
