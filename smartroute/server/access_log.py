"""The access log: one line per answered HTTP request and per finished connection.

Three formats (the ``access_log`` setting): ``text`` (the lines smartroute always wrote),
``json`` (one object per line, every field) and ``combined`` (Apache/nginx combined format for
requests; a connection that carried no HTTP request gets a line of the same shape whose request
is ``"CONN :PORT ROUTE"``). Lines go to the ``smartroute.access`` logger (INFO) or, with a
``path``, straight to that file: one ``write`` per line on a descriptor opened with
``O_APPEND``, so worker processes appending to the same file never interleave their lines.
:func:`reopen_files` (SIGUSR1) reopens every such file, for log rotation.
"""

from __future__ import annotations

import json
import logging
import os
import time
import weakref
from typing import TYPE_CHECKING

from smartroute.settings import AccessLogSettings

if TYPE_CHECKING:
    from smartroute.protocols.http import RequestHead
    from smartroute.server.stats import ConnectionRecord

access_logger = logging.getLogger("smartroute.access")

# The text format's lines (the ``smartroute.access`` logger formats them lazily).
_REQUEST_TEXT = "%s %s:%d %s %s%s route=%s status=%s time=%.3fs"
_CONNECTION_TEXT = "%s %s:%d -> :%d route=%s domain=%s target=%s in=%d out=%d time=%.3fs %s%s"

_MONTHS = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")
_FLAGS = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC


class _File:
    """An access-log file, appended to with one system call per line."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._fd = [os.open(path, _FLAGS, 0o644)]  # boxed: the finalizer closes the current one
        weakref.finalize(self, _close, self._fd)
        _files.add(self)

    def write(self, line: str) -> None:
        data = (line + "\n").encode("utf-8", "backslashreplace")
        try:
            while data:
                data = data[os.write(self._fd[0], data) :]
        except OSError as exc:  # a full disk must not cost the connection
            logging.getLogger("smartroute").warning("access log %s: %s", self.path, exc)

    def reopen(self) -> None:
        """Open the path anew (it was renamed away by a log rotation), then close the old one."""
        fresh = os.open(self.path, _FLAGS, 0o644)
        old, self._fd[0] = self._fd[0], fresh
        os.close(old)

    def close(self) -> None:
        _files.discard(self)
        if self._fd[0] >= 0:
            os.close(self._fd[0])
            self._fd[0] = -1


def _close(box: list[int]) -> None:
    if box[0] >= 0:
        os.close(box[0])


_files: weakref.WeakSet[_File] = weakref.WeakSet()


def reopen_files() -> int:
    """Reopen every access-log file open in this process (after a rotation renamed them);
    returns how many. Lines written before it went to the old file, after it to the new one."""
    files = list(_files)
    for file in files:
        try:
            file.reopen()
        except OSError as exc:
            logging.getLogger("smartroute").error("access log %s: %s", file.path, exc)
    return len(files)


class AccessLog:
    """Formats the access-log lines of one proxy and sends them where ``settings`` says."""

    def __init__(self, settings: AccessLogSettings | None = None) -> None:
        self.settings = settings = settings or AccessLogSettings()
        self.format = settings.format
        self.file: _File | None = None  # opened by open(), while the proxy runs
        self._stamp_second = -1
        self._stamp = ""

    def open(self) -> None:
        """Open the file, if the settings name one (the proxy starts)."""
        path = self.settings.path
        if path is not None and self.file is None:
            self.file = _File(path)

    def close(self) -> None:
        """Close the file (the proxy stopped); lines go nowhere until ``open``."""
        if self.file is not None:
            self.file.close()
            self.file = None

    def reopen(self) -> int:
        """Reopen this log's file (after a rotation renamed it); how many files: 0 or 1."""
        if self.file is None:
            return 0
        self.file.reopen()
        return 1

    @property
    def enabled(self) -> bool:
        """Whether a line would go anywhere (the logger may be off for INFO)."""
        if self.settings.path is not None:
            return self.file is not None
        return access_logger.isEnabledFor(logging.INFO)

    def _emit(self, line: str) -> None:
        if self.file is not None:
            self.file.write(line)
        elif self.settings.path is None:
            access_logger.info("%s", line)

    # -- a request -------------------------------------------------------------------------

    def request(
        self,
        record: ConnectionRecord,
        head: RequestHead,
        route: str | None,
        status: int | str,
        seconds: float,
        bytes_in: int,
        bytes_out: int,
    ) -> None:
        """One answered request (``bytes_in``/``bytes_out``: what it moved, about)."""
        form = self.format
        if form == "text":
            fields = _request_fields(record, head, route, status, seconds)
            if self.file is None:  # formatted by the logger, only when a handler wants it
                access_logger.info(_REQUEST_TEXT, *fields)
                return
            line = _REQUEST_TEXT % fields
        elif form == "json":
            line = json.dumps(
                {
                    "type": "request",
                    "time": round(time.time(), 3),
                    "id": record.id,
                    "client_ip": record.client_ip,
                    "client_port": record.client_port,
                    "port": record.port,
                    "method": head.method,
                    "host": head.host,
                    "target": head.target,
                    "version": head.version,
                    "route": route,
                    "status": status,
                    "duration": round(seconds, 6),
                    "bytes_in": bytes_in,
                    "bytes_out": bytes_out,
                    "referer": head.header("referer"),
                    "user_agent": head.header("user-agent"),
                },
                separators=(",", ":"),
            )
        else:
            code = status if isinstance(status, int) else "000"
            line = (
                f'{record.client_ip} - - [{self._now()}] "{_quote(head.method)} '
                f'{_quote(head.target)} {_quote(head.version)}" {code} {bytes_out or "-"} '
                f'"{_quote(head.header("referer") or "-")}" '
                f'"{_quote(head.header("user-agent") or "-")}"'
            )
        self._emit(line)

    # -- a connection ----------------------------------------------------------------------

    def connection(self, record: ConnectionRecord, seconds: float) -> None:
        """One finished connection (in ``combined``, only one that carried no HTTP request)."""
        form = self.format
        error = record.error
        if form == "text":
            fields = (
                record.id,
                record.client_ip,
                record.client_port,
                record.port,
                record.route or "-",
                record.domain or "-",
                record.target or "-",
                record.bytes_in,
                record.bytes_out,
                seconds,
                record.outcome,
                f" error={error}" if error else "",
            )
            if self.file is None:
                access_logger.info(_CONNECTION_TEXT, *fields)
                return
            line = _CONNECTION_TEXT % fields
        elif form == "json":
            line = json.dumps(
                {
                    "type": "connection",
                    "time": round(time.time(), 3),
                    "id": record.id,
                    "client_ip": record.client_ip,
                    "client_port": record.client_port,
                    "port": record.port,
                    "route": record.route,
                    "domain": record.domain,
                    "target": record.target,
                    "bytes_in": record.bytes_in,
                    "bytes_out": record.bytes_out,
                    "duration": round(seconds, 6),
                    "outcome": record.outcome,
                    "error": error,
                    "requests": record.requests,
                },
                separators=(",", ":"),
            )
        else:
            if record.requests:
                return  # its requests have their lines
            line = (
                f'{record.client_ip} - - [{self._now()}] "CONN :{record.port} '
                f'{_quote(record.route or "-")}" {record.outcome} {record.bytes_out or "-"} '
                f'"-" "-" in={record.bytes_in} target={record.target or "-"} '
                f"time={seconds:.3f}s" + (f' error="{_quote(error)}"' if error else "")
            )
        self._emit(line)

    def _now(self) -> str:
        """``05/Dec/2026:10:00:00 +0000`` (UTC), made once a second at most."""
        now = int(time.time())
        if now != self._stamp_second:
            t = time.gmtime(now)
            self._stamp_second = now
            self._stamp = (
                f"{t.tm_mday:02d}/{_MONTHS[t.tm_mon - 1]}/{t.tm_year}:"
                f"{t.tm_hour:02d}:{t.tm_min:02d}:{t.tm_sec:02d} +0000"
            )
        return self._stamp


def log_request_text(
    record: ConnectionRecord,
    head: RequestHead,
    route: str | None,
    status: int | str,
    seconds: float,
) -> None:
    """The text line of a request on the ``smartroute.access`` logger, for a record that no
    statistics book counts (the book's :class:`AccessLog` writes the others)."""
    access_logger.info(_REQUEST_TEXT, *_request_fields(record, head, route, status, seconds))


def _request_fields(
    record: ConnectionRecord,
    head: RequestHead,
    route: str | None,
    status: int | str,
    seconds: float,
) -> tuple[object, ...]:
    target = head.target if head.target.startswith("/") else f" {head.target}"
    return (
        record.id,
        record.client_ip,
        record.client_port,
        head.method,
        head.host or "-",
        target,
        route or "-",
        status,
        seconds,
    )


def _quote(value: str) -> str:
    """A value inside a combined line's double quotes: quotes, backslashes and control
    characters escaped as nginx does (``\\xHH``), so a client cannot forge a line."""
    if value.isprintable() and '"' not in value and "\\" not in value:
        return value
    out = []
    for char in value:
        if char == '"' or char == "\\" or not char.isprintable() or ord(char) > 126:
            out.append("".join(f"\\x{b:02X}" for b in char.encode("utf-8")))
        else:
            out.append(char)
    return "".join(out)
