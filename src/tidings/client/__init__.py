"""The Python SDK: ``from tidings.client import Client``."""

from tidings.client.sdk import (
    Client,
    Connected,
    DeletedForMe,
    Delivered,
    Disconnected,
    Event,
    LeftGroup,
    MessageEvent,
    PresenceChanged,
    ReadReceipt,
    RequestError,
    RoomEvent,
    SettingsChanged,
    StatesSynced,
    TypingNotice,
)

__all__ = [
    "Client",
    "Connected",
    "DeletedForMe",
    "Delivered",
    "Disconnected",
    "Event",
    "LeftGroup",
    "MessageEvent",
    "PresenceChanged",
    "ReadReceipt",
    "RequestError",
    "RoomEvent",
    "SettingsChanged",
    "StatesSynced",
    "TypingNotice",
]
