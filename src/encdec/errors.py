"""The one exception type the CLI turns into a single readable line."""


class EncdecError(Exception):
    """Bad user input or an unsupported configuration: the message says what was wrong and what is accepted."""


class ReadFailed(EncdecError):
    """A file that is there could not be read (an I/O or permission error, a stale network handle): no sign of
    damage, so a checkpoint it is part of is not set aside as damaged."""


def printable(text: str) -> str:
    """`text` with its control characters escaped (\\x1b, \\r): a handed file's names (a link's target, a tensor's)
    reach the terminal in messages, and an escape sequence there could rewrite what is shown (a line saying the
    checkpoint's code is this encdec's own)."""
    return "".join(repr(c)[1:-1] if _is_control(c) else c for c in text)


def _is_control(c: str) -> bool:
    """C0 and C1 control characters, the line separators and the bidirectional overrides (a reordered line): not the
    rest of what str.isprintable() refuses (a narrow no-break space in a macOS file name, a CJK space)."""
    code = ord(c)
    return code < 32 or 127 <= code < 160 or 0x202A <= code <= 0x202E or 0x2066 <= code <= 0x2069 or code in (
        0x2028, 0x2029)


def _said(e: BaseException) -> str:
    """The first non-blank line of what `e` says (libraries' messages run to tracebacks of their own), or ''."""
    return next((line.strip() for line in str(e).splitlines() if line.strip()), "")


def first_line(e: BaseException, limit: int = 200) -> str:
    """What `e` says in one line, or its type's name where it says nothing."""
    return (_said(e) or type(e).__name__)[:limit]


def described(e: BaseException, limit: int = 200) -> str:
    """`e`'s type and first line ("ValueError: ..."), or its type alone where it says nothing."""
    said = _said(e)[:limit]
    return f"{type(e).__name__}: {said}" if said else type(e).__name__


def load_failure(e: BaseException) -> str:
    """What a failed `load_state_dict` says, in one line: torch's first line only names the module, the details
    follow it (a size mismatch, the most telling, first where there is one)."""
    lines = [line.strip() for line in str(e).strip().splitlines()]
    details = [line for line in lines[1:] if line] or [line for line in lines[:1] if line] or [type(e).__name__]
    return next((line for line in details if line.startswith("size mismatch")), details[0])[:300]
