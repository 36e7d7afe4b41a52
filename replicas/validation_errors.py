"""One way to turn a pydantic ValidationError into a message that names each field by its path,
e.g. `engine.block_size: Input should be greater than or equal to 1`."""

from __future__ import annotations

from pydantic import ValidationError


def format_validation_error(err: ValidationError) -> str:
    """Every problem as `dotted.path: message`, joined by "; ". A model validator's own error
    (no path) is kept as written: it names its fields itself."""
    problems = []
    for e in err.errors():
        msg = str(e["msg"]).removeprefix("Value error, ")
        path = ".".join(str(p) for p in e["loc"])
        problems.append(f"{path}: {msg}" if path else msg)
    return "; ".join(problems)


class ParamError(ValueError):
    """A request parameter that cannot be served; `param` names it (as the engine calls it:
    front ends translate it into their own field paths). Raised once, at the boundary."""

    def __init__(self, param: str, message: str) -> None:
        super().__init__(message)
        self.param = param

    def __reduce__(self) -> tuple[object, ...]:  # crosses process boundaries (Ray) intact
        return type(self), (self.param, str(self))
