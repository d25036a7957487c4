"""Streaming detokenisation: UTF-8 safe and stop-string aware.

Tokens are byte pieces; one character (an emoji, a CJK character) can span
several tokens. An incremental UTF-8 decoder holds back incomplete bytes, so a
character is never printed broken. Stop strings may also span tokens, so the
tail of the text that could still become a stop string is held back until it
either completes one (and is dropped) or cannot any more (and is released).
"""

from __future__ import annotations

import codecs


class StreamDecoder:
    def __init__(self, stop: list[str] | None = None):
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.stop = [s for s in (stop or []) if s]
        self._hold = ""  # decoded text not yet released (possible stop-string prefix)
        self._max_stop = max((len(s) for s in self.stop), default=0)
        self.text = ""  # everything released so far
        self.stopped = False

    def feed(self, piece: bytes) -> str:
        """Add one token's bytes; return the text that is now safe to emit."""
        if self.stopped:
            return ""
        new = self._utf8.decode(piece)
        if not self.stop:
            self.text += new
            return new
        buf = self._hold + new
        # A stop string found anywhere in the buffer ends generation there.
        cut = min((i for i in (buf.find(s) for s in self.stop) if i >= 0), default=-1)
        if cut >= 0:
            self.stopped = True
            self._hold = ""
            out = buf[:cut]
            self.text += out
            return out
        # Hold back the longest suffix that is a prefix of some stop string.
        keep = 0
        for k in range(min(len(buf), self._max_stop - 1), 0, -1):
            tail = buf[-k:]
            if any(s.startswith(tail) for s in self.stop):
                keep = k
                break
        out = buf[: len(buf) - keep]
        self._hold = buf[len(buf) - keep :]
        self.text += out
        return out

    def flush(self) -> str:
        """End of generation: release held text. Bytes of a character that the last token
        left unfinished (max_tokens cut inside an emoji) are dropped: decoding them would
        print a U+FFFD that the model never wrote."""
        if self.stopped:
            return ""
        self._utf8.reset()
        out = self._hold
        self._hold = ""
        self.text += out
        return out
