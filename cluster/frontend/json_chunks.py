"""A large JSON response built a piece at a time: one serializer call over a 40 MB body holds
the GIL (and so the event loop, even from a worker thread) for its whole run; serializing each
choice on its own lets the loop in between."""

from __future__ import annotations

import json
from typing import Any

from pydantic import BaseModel
from starlette.responses import Response


def chunked_json(model: BaseModel, field: str = "choices") -> Response:
    """`model` as JSON (as model_dump would give it), its list `field` serialized item by
    item."""
    items: list[Any] = getattr(model, field)
    head = model.model_dump(exclude={field})
    parts = [item.model_dump_json() if isinstance(item, BaseModel) else json.dumps(item)
             for item in items]
    body = json.dumps(head)[:-1]  # reopen the object: `{...` then `, "choices": [...]}`
    joined = f'{body}{", " if head else ""}"{field}": [' + ", ".join(parts) + "]}"
    return Response(joined.encode(), media_type="application/json")
