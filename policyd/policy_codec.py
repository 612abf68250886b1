"""Sans-IO codec of Postfix's policy delegation protocol (SMTPD_POLICY_README).

A request is `name=value` lines ended by one empty line; the reply is `action=...`
followed by an empty line. `RequestDecoder.feed()` takes whatever bytes arrived and
returns the complete requests (or one typed error per bad request), keeping leftovers.

Hostile input, decided per case (the server logs each error once):

| input                                   | error                  | server answers      |
| --------------------------------------- | ---------------------- | ------------------- |
| line longer than MAX_LINE_LENGTH        | LineTooLong (fatal)    | closes connection   |
| request larger than MAX_REQUEST_BYTES   | RequestTooLarge (fatal)| closes connection   |
| more than MAX_ATTRIBUTES attributes     | TooManyAttributes      | `action=DUNNO`      |
| a line without `=`, or with NUL bytes   | MalformedLine          | `action=DUNNO`      |
| no `request=smtpd_access_policy`        | UnknownRequest         | `action=DUNNO`      |

Fatal errors are the ones after which we cannot find where the next request starts
without reading unbounded input; the others end at the empty line, so the connection
stays in step with the client and one reply per request keeps Postfix synchronised.
Bytes that are not UTF-8 (a broken client's 8-bit HELO) are not an error: they are
decoded with U+FFFD replacements so every string downstream (store keys, logs) is
valid Unicode.
"""

from __future__ import annotations

from postwarden.policy.request import PolicyRequest
from postwarden.policy.verdict import Action, Verdict
from postwarden.syntax.untrusted_text import sanitise

# Postfix's longest attributes (ccert_subject, policy_context) stay far below this.
MAX_LINE_LENGTH = 8192
# Postfix 3.7 sends about 30 attributes; newer versions add a few.
MAX_ATTRIBUTES = 128
MAX_REQUEST_BYTES = 65536
# SMTP reply lines are limited to 512 octets (RFC 5321 4.5.3.1.5) including code and CRLF.
MAX_REPLY_TEXT = 400
# RFC 5322 line limit, minus room for Postfix's own folding.
MAX_HEADER_LENGTH = 990

EXPECTED_REQUEST = "smtpd_access_policy"
_FAST_PATH_START = b"request=smtpd_access_policy\n"


class ProtocolViolation(Exception):
    """One bad request. `fatal` violations mean the connection must be closed."""

    fatal = False


class LineTooLong(ProtocolViolation):
    fatal = True


class RequestTooLarge(ProtocolViolation):
    fatal = True


class TooManyAttributes(ProtocolViolation):
    pass


class MalformedLine(ProtocolViolation):
    pass


class UnknownRequest(ProtocolViolation):
    pass


DecodeResult = PolicyRequest | ProtocolViolation


class RequestDecoder:
    """Incremental decoder: `feed(bytes)` returns complete requests or violations, in order."""

    __slots__ = ("_attrs", "_bad", "_broken", "_buffer", "_request_bytes")

    def __init__(self) -> None:
        self._buffer = bytearray()
        self._attrs: dict[str, str] = {}
        self._request_bytes = 0
        self._bad: ProtocolViolation | None = None  # first problem of the current request
        self._broken = False  # a fatal violation happened: nothing more is decoded

    @property
    def pending(self) -> bool:
        """True when part of a request has been received (for per-read timeouts)."""
        return bool(self._buffer) or self._request_bytes > 0

    def feed(self, data: bytes) -> list[DecodeResult]:
        if self._broken:
            return []
        buffer = self._buffer
        buffer += data
        results: list[DecodeResult] = []
        pos = 0
        end = len(buffer)
        # Where the next "\n\n" starts (at or after pos); -1: none in this buffer, -2: not
        # looked for yet. Searched again only once pos has passed it: searching the rest of
        # the buffer at every request start made many small requests (CRLF-framed ones,
        # which never hold "\n\n") quadratic, 2 s of CPU for one 64-kB read.
        blank = -2
        while pos < end:
            if not self._request_bytes:
                # Fast path: a whole, well-formed request at the start of the buffer (what
                # Postfix sends in one write) is decoded in one go; anything unusual falls
                # through to the line-by-line path, which names the problem. The cheap
                # checks come before the copy, so a block the fast path refuses is not
                # copied at each of the requests the slow path then finds in it.
                if blank != -1 and blank < pos:
                    blank = buffer.find(b"\n\n", pos)
                if (
                    blank >= 0
                    and blank - pos < MAX_REQUEST_BYTES
                    and buffer.startswith(_FAST_PATH_START, pos)
                    and buffer.find(b"\r", pos, blank) < 0
                ):
                    request = self._whole_request(bytes(buffer[pos:blank]))
                    if request is not None:
                        results.append(request)
                        pos = blank + 2
                        continue
            nl = buffer.find(b"\n", pos)
            if nl < 0:
                if end - pos > MAX_LINE_LENGTH:
                    results.append(self._fatal(LineTooLong(f"line over {MAX_LINE_LENGTH} bytes")))
                    return results
                break
            length = nl - pos
            if length > MAX_LINE_LENGTH:
                results.append(self._fatal(LineTooLong(f"line over {MAX_LINE_LENGTH} bytes")))
                return results
            self._request_bytes += length + 1
            if self._request_bytes > MAX_REQUEST_BYTES:
                results.append(
                    self._fatal(RequestTooLarge(f"request over {MAX_REQUEST_BYTES} bytes"))
                )
                return results
            # Tolerate CRLF (an operator testing with telnet); Postfix sends bare LF.
            stop = nl - 1 if length and buffer[nl - 1] == 0x0D else nl
            if stop == pos:
                results.append(self._finish())
            else:
                self._line(bytes(buffer[pos:stop]))
            pos = nl + 1
        del buffer[:pos]
        return results

    @staticmethod
    def _whole_request(block: bytes) -> PolicyRequest | None:
        """A complete request block (without its empty line), or None to decode slowly.

        feed() passes only blocks under MAX_REQUEST_BYTES that start with the request line
        and hold no CR.
        """
        if b"\x00" in block:
            return None
        lines = block.decode("utf-8", "replace").split("\n")
        if len(lines) > MAX_ATTRIBUTES or max(map(len, lines)) > MAX_LINE_LENGTH // 4:
            return None  # possibly over a byte limit: let the exact path decide
        try:
            attrs = dict(line.split("=", 1) for line in lines)
        except ValueError:  # a line without "=": the slow path reports it
            return None
        if "" in attrs or attrs.get("request") != EXPECTED_REQUEST:
            return None
        return PolicyRequest(attrs)

    def _line(self, raw: bytes) -> None:
        if self._bad is not None:
            return  # the request is already bad: skip to its empty line
        if b"\x00" in raw:
            self._bad = MalformedLine("NUL byte in attribute line")
            return
        name, sep, value = raw.partition(b"=")
        if not sep or not name:
            self._bad = MalformedLine(f"line without name=value: {sanitise(raw, 60)!r}")
            return
        if len(self._attrs) >= MAX_ATTRIBUTES:
            self._bad = TooManyAttributes(f"more than {MAX_ATTRIBUTES} attributes")
            return
        self._attrs[name.decode("utf-8", "replace")] = value.decode("utf-8", "replace")

    def _finish(self) -> DecodeResult:
        attrs, bad = self._attrs, self._bad
        self._attrs, self._bad, self._request_bytes = {}, None, 0
        if bad is not None:
            return bad
        kind = attrs.get("request")
        if kind != EXPECTED_REQUEST:
            shown = "missing" if kind is None else repr(sanitise(kind, 60))
            return UnknownRequest(f"request= is {shown}, expected {EXPECTED_REQUEST}")
        return PolicyRequest(attrs)

    def _fatal(self, error: ProtocolViolation) -> ProtocolViolation:
        self._broken = True
        self._buffer.clear()
        return error


def _reply_text(verdict: Verdict) -> str:
    parts: list[str] = []
    code = verdict.smtp_code
    if verdict.action is Action.REJECT and code is not None and 400 <= code <= 599:
        # access(5): "4NN text" / "5NN text" answers with exactly this code. A 4xx stays a
        # 4xx: turning a temporary refusal into a permanent one would lose mail.
        parts.append(str(code))
        reply_class = str(code)[0]
    else:
        parts.append(verdict.action.value)
        reply_class = "4" if verdict.action is Action.DEFER_IF_PERMIT else "5"
    enhanced = verdict.enhanced_code
    # The enhanced code's class must match the reply's (RFC 3463); Postfix checks it.
    if enhanced and enhanced[:1] == reply_class and _is_enhanced(enhanced):
        parts.append(enhanced)
    text = sanitise(verdict.text, MAX_REPLY_TEXT).strip()
    if text:
        parts.append(text)
    return " ".join(parts)


def _is_enhanced(code: str) -> bool:
    pieces = code.split(".")
    return len(pieces) == 3 and all(p.isdigit() and 0 < len(p) <= 3 for p in pieces)


def encode_verdict(verdict: Verdict) -> bytes:
    """The reply for one verdict: `action=...\\n\\n`, text sanitised and bounded."""
    action = verdict.action
    if action is Action.DUNNO:
        return b"action=DUNNO\n\n"
    if action is Action.PREPEND:
        header = sanitise(verdict.text, MAX_HEADER_LENGTH).strip()
        name, sep, _ = header.partition(":")
        if not sep or not name or " " in name:
            # A PREPEND without a valid "Name: value" would make Postfix log a warning and
            # could corrupt the message: say nothing instead.
            return b"action=DUNNO\n\n"
        return f"action=PREPEND {header}\n\n".encode()
    return f"action={_reply_text(verdict)}\n\n".encode()
