"""The one exception type the CLI turns into a single readable line."""


class EncdecError(Exception):
    """Bad user input or an unsupported configuration: the message says what was wrong and what is accepted."""


def load_failure(e: BaseException) -> str:
    """What a failed `load_state_dict` says, in one line: torch's first line only names the module, the details
    follow it (a size mismatch, the most telling, first where there is one)."""
    lines = [line.strip() for line in str(e).strip().splitlines()]
    details = [line for line in lines[1:] if line] or [line for line in lines[:1] if line] or [type(e).__name__]
    return next((line for line in details if line.startswith("size mismatch")), details[0])[:300]
