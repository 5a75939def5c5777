"""``Model``, the base of every config model, in a module of its own so that the models of one
section (``device_certificates.py``) and ``models.py`` can both build on it."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict
from pydantic.alias_generators import to_camel


class Model(BaseModel):
    """Base for config models: camelCase keys, unknown keys rejected, values checked strictly."""

    model_config = ConfigDict(
        extra="forbid",
        alias_generator=to_camel,
        populate_by_name=False,
        frozen=True,
        strict=True,
    )
