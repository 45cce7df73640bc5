"""One JSON-safety rule for every file, XCom value and database column the pipeline writes.

`json_safe` turns a result tree into plain JSON: numpy scalars and arrays unwrapped, NaN and
infinities as ``null`` (strict JSON, readable by any parser), tuples and sets as lists, paths and
dates as strings, objects with ``to_dict()`` (our frozen result dataclasses) as their dict.
Anything else raises `TypeError` instead of being written half-way.

Standard library only (numpy values are recognised by their ``item``/``tolist`` methods), so every
module can use it, including the ones the DAG files import at parse time.
"""

from __future__ import annotations

import datetime as _dt
import json
import math
import os
from collections.abc import Mapping
from typing import Any

__all__ = ["json_safe", "dumps"]


def json_safe(obj: Any) -> Any:
    """Plain JSON tree of ``obj`` (see the module docstring); raises `TypeError` on other types."""
    if obj is None or isinstance(obj, (str, bool, int)):
        return obj
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, Mapping):
        return {str(k): json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    if isinstance(obj, (set, frozenset)):
        items = [json_safe(v) for v in obj]
        try:
            return sorted(items)
        except TypeError:
            return items
    if isinstance(obj, (_dt.datetime, _dt.date)):
        return obj.isoformat()
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    if hasattr(obj, "item") and getattr(obj, "ndim", None) == 0:  # numpy scalar
        return json_safe(obj.item())
    if hasattr(obj, "tolist"):  # numpy array
        return json_safe(obj.tolist())
    if hasattr(obj, "to_dict"):  # our frozen result dataclasses
        return json_safe(obj.to_dict())
    msg = f"cannot write {type(obj).__name__} {obj!r:.80} as JSON"
    raise TypeError(msg)


def dumps(obj: Any, **kwargs) -> str:
    """``json.dumps`` of `json_safe` (strict: ``allow_nan=False``)."""
    return json.dumps(json_safe(obj), allow_nan=False, **kwargs)
