"""The hub: this process's sessions by user, fan-out of bus events, and the timer sweep."""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Callable, Collection

from tidings.bus.base import (
    Bus,
    BusEvent,
    DeletedNotice,
    DeliveredNotice,
    MessageEvent,
    PresenceChange,
    PresenceNotice,
    ReadNotice,
    ResyncHint,
    RevokeEvent,
    RoomEvent,
    SessionStarted,
    SettingsNotice,
    TypingNotice,
)
from tidings.clock import Clock
from tidings.domain.groups import is_group
from tidings.gateway.bounded import encoded_for
from tidings.gateway.rooms import RoomHub
from tidings.protocol import close
from tidings.protocol.frames import (
    Deleted,
    DeliveredEvent,
    Kicked,
    PresenceEvent,
    PresenceItem,
    Push,
    ReadEvent,
    Resync,
    ServerFrame,
    SettingsEvent,
    TypingEvent,
)
from tidings.services.groups import MemberCache
from tidings.services.messaging import to_wire
from tidings.services.presence import Presence
from tidings.session.session import Session

log = logging.getLogger(__name__)
RESYNC = Resync()
FULL_SWEEP_EVERY = 4  # each session's idle timeout and token expiry: every 4 rounds (1 s)
REVOKED_KEPT = 10_000  # users' last revocation times kept before the old ones go
RESYNC_CHUNK = 100  # resync hints written at once
LAST_PRESENCE_S = 2.0  # on stop, how long the last presence changes may take


def _share(session: Session) -> int:
    return hash(session.session_id) % FULL_SWEEP_EVERY


class Hub:
    def __init__(
        self,
        clock: Clock,
        sweep_interval_s: float = 0.25,
        login_policy: str = "unlimited",
        publish: Callable[[BusEvent], None] | None = None,
        bus: Bus | None = None,
    ) -> None:
        self.clock = clock
        self.sweep_interval_s = sweep_interval_s
        self.login_policy = login_policy
        # The bus: told which users have sessions here (routing, cluster-wide presence),
        # and where events other nodes must see are published. Without one (tests of
        # the hub alone) presence is what this hub sees.
        self.bus = bus
        self.publish = publish if publish is not None or bus is None else bus.publish
        self.presence: Presence | None = None
        self.members: MemberCache | None = None  # group member sets, for fan-out
        self.rooms: RoomHub | None = None  # live rooms' viewers and ticks
        self.presence_batch_s = 1.0
        self._presence_changed: dict[str, bool] = {}
        self._presence_task: asyncio.Task[None] | None = None
        self.by_user: dict[str, set[Session]] = {}
        # When each user last had a token or device revoked (a login in progress checks
        # it after registering: see Session._authenticate).
        self._revoked_at: dict[str, float] = {}
        self.pending: set[Session] = set()  # not yet authenticated
        self.busy: set[Session] = set()  # with pushes waiting for an ack (retransmit timers)
        # The registered sessions in FULL_SWEEP_EVERY shares (by their random session id:
        # an object's own hash is its address, the same modulo 4 for every Session).
        self._shares: list[set[Session]] = [set() for _ in range(FULL_SWEEP_EVERY)]
        self._sweeps = 0
        self._sweeper: asyncio.Task[None] | None = None
        self.pushes = 0
        # Resync hints go out after a random pause of up to resync_jitter_s (every node
        # gets its hint at once when a peer dies), then at most resync_per_s a second.
        self.resync_jitter_s = 0.5
        self.resync_per_s = 5_000.0
        self._resync_task: asyncio.Task[None] | None = None
        self._resync_again = False
        self.resyncs = 0  # statistics: hints written

    # ------------------------------------------------------------------ registry

    def track(self, session: Session) -> None:
        self.pending.add(session)

    def register(self, session: Session) -> None:
        self.pending.discard(session)
        self._shares[_share(session)].add(session)
        group = self.by_user.setdefault(session.uid, set())
        first = not group
        group.add(session)
        if first:
            if self.bus is not None:
                self.bus.user_online(session.uid)  # it reports a cluster-wide change
            else:
                self._presence_changed[session.uid] = True

    def announce(self, session: Session) -> None:
        """The session is fully admitted: apply the login policy to the user's others."""
        if self.login_policy != "unlimited" and self.publish is not None:
            self.publish(
                SessionStarted(
                    session.uid,
                    session.device,
                    session.platform,
                    session.session_id,
                    session.ready_ms,
                )
            )

    async def routed(self) -> bool:
        if self.bus is None or not self.bus.shared:
            return False
        await self.bus.flush()
        return True

    def join_room(self, session: Session, room: str) -> int:
        assert self.rooms is not None
        return self.rooms.join(session, room)

    def greet_room(self, session: Session, room: str) -> None:
        if self.rooms is not None:
            self.rooms.greet(session, room)

    def leave_room(self, session: Session, room: str) -> None:
        if self.rooms is not None:
            self.rooms.leave(session, room)

    def unregister(self, session: Session) -> None:
        if session.rooms and self.rooms is not None:
            self.rooms.leave_all(session)
        self.pending.discard(session)
        self._shares[_share(session)].discard(session)
        group = self.by_user.get(session.uid)
        if group is not None and session in group:
            group.discard(session)
            if not group:
                del self.by_user[session.uid]
                if self.bus is not None:
                    self.bus.user_offline(session.uid)
                else:
                    self._presence_changed[session.uid] = False

    def sessions(self) -> list[Session]:
        out = list(self.pending)
        for group in self.by_user.values():
            out.extend(group)
        return out

    @property
    def online(self) -> int:
        return sum(len(g) for g in self.by_user.values())

    # ------------------------------------------------------------------ bus events

    def handle(self, event: BusEvent) -> None:
        if isinstance(event, MessageEvent):
            self._fan_out(event)
        elif isinstance(event, RoomEvent):
            if self.rooms is not None:
                self.rooms.post(event)
        elif isinstance(event, RevokeEvent):
            self._revoke(event)
        elif isinstance(event, TypingNotice):
            self._broadcast(TypingEvent(event.conv, event.sender), event.users)
        elif isinstance(event, ReadNotice):
            self._read(event)
        elif isinstance(event, DeliveredNotice):
            self._broadcast(DeliveredEvent(event.conv, event.uid, event.seq), event.users)
        elif isinstance(event, DeletedNotice):
            self._write_all(Deleted(event.conv, list(event.seqs)), self._other_devices(event))
        elif isinstance(event, SessionStarted):
            self._kick_superseded(event)
        elif isinstance(event, SettingsNotice):
            st = event.settings
            frame = SettingsEvent(
                event.conv, st.muted, st.pinned, st.hidden, st.draft, 0, st.version, st.hidden_seq
            )
            self._write_all(frame, self._other_devices(event))
        elif isinstance(event, PresenceChange):
            self._presence_changed[event.uid] = event.online
        elif isinstance(event, PresenceNotice):
            self._presence_to_contacts(event)
        elif isinstance(event, ResyncHint):
            self.resync_all(event)

    def _kick_superseded(self, event: SessionStarted) -> None:
        """Apply the login policy: the newest session wins over the user's other devices
        (of the same platform, or all of them)."""
        frame = Kicked(
            event.device,
            event.platform,
            f"signed in on another {event.platform} device"
            if self.login_policy == "one_per_platform"
            else "signed in elsewhere",
        )
        newest = (event.started_ms, event.session)
        for s in list(self.by_user.get(event.uid, ())):
            if s.device == event.device or s.session_id == event.session:
                continue
            if (s.ready_ms, s.session_id) > newest:
                continue  # a later login than the announced one (which came late)
            if self.login_policy == "one_per_platform" and s.platform != event.platform:
                continue
            self._write_all(frame, [s])
            s.close(close.KICKED, "kicked")

    def _read(self, event: ReadNotice) -> None:
        """The reader's other devices learn the new position and unread count; the other
        member's devices get a read receipt (without the reader's unread count)."""
        own = self._other_devices(event)
        frame = ReadEvent(event.conv, event.uid, event.seq, 0, event.unread, event.read_n)
        self._write_all(frame, own)
        others = [u for u in event.users if u != event.uid]
        self._broadcast(ReadEvent(event.conv, event.uid, event.seq), others)

    def _broadcast(self, frame: ServerFrame, users: tuple[str, ...] | list[str]) -> None:
        """An ephemeral frame (no retransmit window) to every session of ``users``."""
        self._write_all(frame, [s for u in users for s in self.by_user.get(u, ())])

    def _other_devices(self, event: ReadNotice | SettingsNotice | DeletedNotice) -> list[Session]:
        """The acting user's sessions other than the device that acted."""
        return [s for s in self.by_user.get(event.uid, ()) if s.device != event.device]

    def _write_all(self, frame: ServerFrame, sessions: list[Session]) -> None:
        cache: dict[tuple[str, str], bytes] = {}
        for s in sessions:
            s.link.write(encoded_for(frame, s.link, cache))

    def _fan_out(self, event: MessageEvent) -> None:
        if is_group(event.record.conv) and self.members is not None:
            self.members.handle(event, self._deliver)
        else:
            self._deliver(event, event.users)

    def _deliver(self, event: MessageEvent, users: Collection[str]) -> None:
        """Push the entry to the sessions here of ``users`` (walking whichever is smaller:
        the users, or the users online here)."""
        rec = event.record
        by_user = self.by_user
        targets = []
        if len(users) > len(by_user) and isinstance(users, (set, frozenset)):
            pairs = [(uid, g) for uid, g in by_user.items() if uid in users]
        else:
            pairs = [(uid, g) for uid in users if (g := by_user.get(uid))]
        for uid, group in pairs:
            for s in group:
                if uid == rec.sender and s.device == event.exclude_device:
                    continue
                targets.append(s)
        if not targets:
            return
        push = Push(to_wire(rec))
        cache: dict[tuple[str, str], bytes] = {}
        for s in targets:
            s.push(rec.conv, rec.seq, encoded_for(push, s.link, cache))
        self.pushes += len(targets)

    def revoked_since(self, uid: str, since: float) -> bool:
        if self.bus is None or self.bus.shared:
            return True  # revocations reach this node only for users online here
        return self._revoked_at.get(uid, -1.0) >= since

    def _revoke(self, event: RevokeEvent) -> None:
        self._revoked_at[event.uid] = self.clock.monotonic()
        if len(self._revoked_at) > REVOKED_KEPT:  # only the last moments matter
            cutoff = self.clock.monotonic() - 60
            self._revoked_at = {u: t for u, t in self._revoked_at.items() if t >= cutoff}
        for s in list(self.by_user.get(event.uid, ())):
            if s.device != event.device:
                continue
            if (event.jti is not None and s.jti == event.jti) or s.issued_ms < event.before_ms:
                s.close(close.TOKEN_REVOKED, "token revoked")

    # ------------------------------------------------------------------ timers

    def start(self) -> None:
        self._sweeper = asyncio.ensure_future(self._sweep_forever())
        if self.rooms is not None:
            self.rooms.start()
        if self.presence is not None:
            self._presence_task = asyncio.ensure_future(self._presence_forever())

    def is_online(self, uid: str) -> bool:
        """Whether ``uid`` has a session on this node (the bus knows the cluster)."""
        return uid in self.by_user

    async def _presence_forever(self) -> None:
        while True:
            await asyncio.sleep(self.presence_batch_s)
            try:
                await self.flush_presence()
            except Exception:
                log.exception("presence flush failed")

    async def flush_presence(self) -> None:
        """Publish the batch of online/offline changes for the users' contacts, wherever
        they are online (with a bus, the changes are cluster-wide transitions)."""
        if not self._presence_changed or self.presence is None:
            return
        changed, self._presence_changed = self._presence_changed, {}
        for uid, online in changed.items():
            if not online:
                await self.presence.went_offline(uid)
        entries = await self.presence.fan_out(changed)
        if not entries:
            return
        notice = PresenceNotice(tuple(entries))
        if self.publish is not None:
            self.publish(notice)
        else:
            self._presence_to_contacts(notice)

    def _presence_to_contacts(self, notice: PresenceNotice) -> None:
        """One frame per session of each contact here, with the batch's items for it."""
        out: dict[str, list[PresenceItem]] = {}
        by_user = self.by_user
        for e in notice.entries:
            item = PresenceItem(e.uid, e.online, e.last_seen)
            for contact in e.contacts:
                if contact in by_user:
                    out.setdefault(contact, []).append(item)
        for contact, items in out.items():
            self._write_all(PresenceEvent(items), list(by_user.get(contact, ())))

    # ------------------------------------------------------------------ resync hints

    def resync_all(self, hint: ResyncHint) -> None:
        """Pushes to sessions here may have been lost (``hint`` says why): tell every
        one to sync, spread out. The group member sets cached here may have missed a
        change too, so they are loaded again."""
        log.info("resync hint (%s %s): %d sessions here sync", hint.reason, hint.node, self.online)
        if self.members is not None:
            self.members.clear()
        if self._resync_task is not None and not self._resync_task.done():
            self._resync_again = True  # a new pass once this one is done
            return
        self._resync_task = asyncio.ensure_future(self._resync_passes())

    async def _resync_passes(self) -> None:
        again = True
        while again:
            await asyncio.sleep(random.uniform(0, self.resync_jitter_s))
            self._resync_again = False  # hints until now are answered by this pass
            sessions = [s for g in self.by_user.values() for s in g]
            random.shuffle(sessions)
            pause = RESYNC_CHUNK / self.resync_per_s
            cache: dict[tuple[str, str], bytes] = {}
            for i in range(0, len(sessions), RESYNC_CHUNK):
                if i:
                    await asyncio.sleep(pause)
                for s in sessions[i : i + RESYNC_CHUNK]:
                    if s.state == "ready":
                        s.link.write(encoded_for(RESYNC, s.link, cache))
                        self.resyncs += 1
            again = self._resync_again

    async def _sweep_forever(self) -> None:
        while True:
            await asyncio.sleep(self.sweep_interval_s)
            self.sweep()

    def watch(self, session: Session) -> None:
        """``session`` has pushes waiting for an ack: sweep it at every round."""
        self.busy.add(session)

    def sweep(self) -> None:
        """Every round: sessions authenticating or holding unacked pushes (auth timeout,
        retransmits), and a 1/FULL_SWEEP_EVERY share of all the others in turn (idle,
        token expiry), so each is seen about once a second and no round is long."""
        now = self.clock.monotonic()
        self._sweeps += 1
        targets = {*self.pending, *self.busy, *self._shares[self._sweeps % FULL_SWEEP_EVERY]}
        self.busy = {s for s in self.busy if s.unacked_count and s.state == "ready"}
        for s in targets:
            try:
                s.tick(now)
            except Exception:
                log.exception("session tick failed")
                s.close(close.INTERNAL, "internal error")

    async def stop(self) -> None:
        """Stop the timers; the last presence changes (the sessions just closed) still
        go out, for the contacts on other nodes."""
        if self.rooms is not None:
            await self.rooms.stop()
        if self._resync_task is not None:
            self._resync_task.cancel()
        if self._presence_task is not None:
            self._presence_task.cancel()
            try:
                if self.bus is not None:
                    await self.bus.flush()  # the bus's answers about the last sessions
                async with asyncio.timeout(LAST_PRESENCE_S):
                    await self.flush_presence()
            except TimeoutError:
                log.warning("last presence flush cut short after %.0f s", LAST_PRESENCE_S)
            except Exception:
                log.exception("last presence flush failed")
        if self._sweeper is not None:
            self._sweeper.cancel()
            try:
                await self._sweeper
            except asyncio.CancelledError:
                pass

    def sends_in_flight(self) -> int:
        """Sends submitted by connected sessions and not yet answered."""
        return sum(s.inflight for s in self.sessions())

    def close_all(self, code: int, reason: str) -> None:
        for s in self.sessions():
            s.close(code, reason)
