"""How a harness turns fuzz bytes into a stream and the reads it arrives in.

Byte 0 is the number of cuts (0-16, modulo 17), then two bytes per cut, its offset in the
stream (modulo the stream's length + 1); the rest is the stream. The fuzzer so chooses
where a line, a CRLF or a netstring is split, while an input never costs more than 17
reads: reading a 70-kB input a byte at a time would cost 70,000 calls and slow the run
to a crawl without reaching any code that 17 well-chosen cuts do not.
"""

from __future__ import annotations

import itertools

MAX_CUTS = 16


def stream_and_reads(data: bytes) -> tuple[int, bytes, list[bytes]]:
    """(byte 0, the stream, the stream cut into reads); the reads join to the stream."""
    if not data:
        return 0, b"", []
    choice = data[0]
    cuts = choice % (MAX_CUTS + 1)
    header, stream = data[1 : 1 + 2 * cuts], data[1 + 2 * cuts :]
    offsets = sorted(
        {
            int.from_bytes(header[i : i + 2], "big") % (len(stream) + 1)
            for i in range(0, len(header) - 1, 2)
        }
    )
    edges = [0, *offsets, len(stream)]
    reads = [stream[a:b] for a, b in itertools.pairwise(edges) if b > a]
    return choice, stream, reads
