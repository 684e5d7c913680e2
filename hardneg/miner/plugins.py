"""Resolving ``module:attr`` names given by the operator on the command line or in a config file.

This imports the operator's own module, as ``uvicorn module:app`` does. It is for options the operator
sets (a dataset, a model factory, a rescoring callable), never for anything a request or a stored file names.
"""

from __future__ import annotations

import importlib
from typing import Any

from hardneg.miner.errors import ValidationError


def resolve_attr(spec: str, what: str) -> Any:
    """Import ``module:attr`` (attr may be dotted); ValidationError naming ``what`` when that fails."""
    module_name, _, attr = spec.partition(":")
    try:
        obj: Any = importlib.import_module(module_name)
    except ImportError as e:
        raise ValidationError(f"{what} {spec!r}: cannot import module {module_name!r} ({e}); "
                              f"accepted: module:attr of an importable module") from None
    for part in attr.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise ValidationError(f"{what} {spec!r}: module {module_name!r} has no attribute {attr!r}") from None
    return obj
