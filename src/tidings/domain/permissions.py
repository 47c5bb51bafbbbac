"""Who may read or post where. Pure functions over facts the caller already fetched."""

from __future__ import annotations

from tidings.domain.ids import direct_members


def can_read(user: str, conv: str, is_member: bool) -> bool:
    """Only members read a conversation; a direct conversation's members are its pair."""
    pair = direct_members(conv)
    if pair is not None:
        return user in pair
    return is_member


def can_post(user: str, conv: str, is_member: bool) -> bool:
    return can_read(user, conv, is_member)
