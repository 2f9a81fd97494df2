"""The lines a child process writes to a pipe, each waited for with a timeout.

A `select` on the pipe and a buffered `readline` do not mix: readline reads whatever the pipe
holds, several lines at a time when the child wrote them close together (as on a loaded
machine), and select then waits for bytes that have already come. These lines are read from
the file descriptor itself into a buffer of their own, which `ready` looks at first.
"""

from __future__ import annotations

import os
import select
import time
from typing import IO, Any


class PipeLines:
    def __init__(self, pipe: IO[Any] | None) -> None:
        assert pipe is not None
        self._fd = pipe.fileno()
        self._buffer = b""
        self._ended = False

    def ready(self, seconds: float) -> bool:
        """Whether a whole line, or the end of the output, is here within `seconds`."""
        deadline = time.monotonic() + seconds
        while b"\n" not in self._buffer and not self._ended:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self._fd], [], [], left)[0]:
                return False
            chunk = os.read(self._fd, 1 << 16)
            self._buffer += chunk
            self._ended = not chunk
        return True

    def line(self, seconds: float, what: str = "the process") -> str | None:
        """The next line, stripped; None when the output ends first. Fails the test when
        neither comes within `seconds`."""
        assert self.ready(seconds), f"{what} said nothing for {seconds:g} s"
        if b"\n" not in self._buffer:
            return None
        text, _, self._buffer = self._buffer.partition(b"\n")
        return text.decode().strip()

    def unread(self) -> str:
        """What came and was not read as a line yet."""
        return self._buffer.decode()
