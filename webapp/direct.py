"""The hot paths' own Redis transport (hotpaths.py): commands written and replies read on a connection of its
own, without redis-py's per-command layers.

Under load (bench/oneclick.py) redis-py's layers around a call (pool checkout and release, argument encoding,
the retry wrapper, the parser's buffering, response callbacks, health checks) cost about as much client CPU
as the round trip itself. Here a call is: the commands packed as RESP by hiredis, one sendall, and recv into
a hiredis Reader until every reply is in (RESP3 push messages, which are not replies, are skipped). redis-py
still opens and closes the connection, so URL, password, TLS, timeouts and database are the pool's own. A
socket error closes the connection and raises redis-py's ConnectionError, so that the caller can retry
through the full client (a socket timeout raises redis-py's TimeoutError instead: Redis is stalled, and waiting
for it again would only double the wait); an error reply is raised as the exception redis-py raises for it once
every reply has been read, so the connection stays usable.
"""
import os
import socket
import weakref

import hiredis
from redis._parsers.base import BaseParser
from redis.exceptions import ConnectionError, RedisError, TimeoutError


def pack(*args):
    """One command as RESP: an array of bulk strings (str, bytes, int or float arguments), packed in C."""
    return hiredis.pack_command(args)


class _Held:
    """A connection made with one pool's settings (not checked out of it), and the Reader of its replies."""
    __slots__ = ("pid", "conn", "encoding", "errors", "reader")

    def __init__(self, pool):
        self.pid = os.getpid()
        self.conn = pool.connection_class(**pool.connection_kwargs)
        settings = pool.connection_kwargs
        self.encoding = settings.get("encoding", "utf-8") if settings.get("decode_responses") else None
        self.errors = settings.get("encoding_errors", "strict")
        self.reader = self._new_reader()

    def _new_reader(self):
        # Error replies become the exceptions redis-py raises for them (LOADING a BusyLoadingError, OOM an
        # OutOfMemoryError, NOSCRIPT a NoScriptError, ...), as its own hiredis parser makes them.
        return hiredis.Reader(replyError=BaseParser.parse_error, encoding=self.encoding, errors=self.errors)

    def reset(self):
        """Close the connection and drop anything half-read (the next call reconnects)."""
        self.conn.disconnect()
        self.reader = self._new_reader()


# Idle connections per pool, {pool: [_Held]}: a call takes one (or makes one) and puts it back when done, so
# no two calls in flight share a connection, whoever runs them (a sync worker, the threads of a gthread worker,
# the greenlets of a gevent one), and a process holds no more connections than it ever had calls in flight.
# (A thread-local connection, as here before, became one connection per request under gevent, where a
# "thread" is the request's greenlet.) list.pop and append are atomic under the GIL and never switch
# greenlets. Weak keys: a discarded client's connections go with it. A forked child (gunicorn forks its
# workers) makes its own rather than share its parent's sockets.
_idle = weakref.WeakKeyDictionary()


def idle_connections(pool):
    """This process's idle connections of `pool` (a list; the next call takes the last one)."""
    idle = _idle.get(pool)
    if idle is None:
        idle = _idle.setdefault(pool, [])
    return idle


def _take(idle, pool):
    pid = os.getpid()
    while True:
        try:
            one = idle.pop()
        except IndexError:
            return _Held(pool)
        if one.pid == pid:
            return one
        # a parent's connection, inherited by fork: dropped (redis-py shuts a socket down only in its own process)


def call(r, packed, count, raise_errors=True):
    """Send `packed` (one or more packed commands) on an idle connection of `r`'s pool and return their
    `count` replies as a list. Raises ConnectionError (the connection is closed, nothing is half-read),
    TimeoutError when Redis does not answer within the pool's socket_timeout (closed too), or the
    first error reply (after reading all of them: a ResponseError, or the subclass redis-py raises for its code;
    LOADING is a BusyLoadingError, a ConnectionError); with raise_errors=False error replies are returned in
    their places instead."""
    pool = r.connection_pool
    idle = idle_connections(pool)
    one = _take(idle, pool)
    conn = one.conn
    try:
        if conn._sock is None:  # redis-py's Connection keeps its socket there (redis-py 5 to 8)
            conn.connect()
        sock = conn._sock
        sock.sendall(packed)
        reader = one.reader
        replies = []
        while len(replies) < count:
            reply = reader.gets()
            if reply is False:
                data = sock.recv(65536)
                if not data:
                    raise ConnectionError("Redis closed the connection")
                reader.feed(data)
            elif not isinstance(reply, hiredis.PushNotification):  # RESP3 pushes are not replies: skip them
                replies.append(reply)
    except socket.timeout as exc:  # Redis did not answer within the client's socket_timeout
        one.reset()
        raise TimeoutError("Redis did not answer in time") from exc
    except (OSError, hiredis.ProtocolError) as exc:
        one.reset()
        raise ConnectionError(f"Redis connection failed: {exc}") from exc
    except BaseException:  # our ConnectionError above too: never reuse a connection with a half-read reply
        one.reset()
        raise
    finally:
        idle.append(one)
    if raise_errors:
        for reply in replies:
            raise_error(reply)
    return replies


def raise_error(reply):
    """Raise the error reply `reply` is, or holds (a nested reply); else do nothing."""
    if isinstance(reply, RedisError):
        raise reply
    if isinstance(reply, list):
        for item in reply:
            raise_error(item)


def pipeline(r, commands, raise_errors=True):
    """Commands (tuples of arguments) in one round trip, pipelined: their replies as Redis sends them (no
    redis-py response callbacks: HGETALL is a map on RESP3, a flat list on RESP2). Not a transaction (each
    reply is as of its own command), which saves Redis the MULTI and EXEC. A connection error (not a timeout)
    is retried once, on a new connection, so the commands must be safe to run twice: reads, or a counter where
    a rare double count does not matter (the page-view count). raise_errors as for call."""
    packed = b"".join(pack(*command) for command in commands)
    try:
        return call(r, packed, len(commands), raise_errors)
    except ConnectionError:  # a dropped connection (Redis restarted, an idle timeout): call reconnects
        return call(r, packed, len(commands), raise_errors)
