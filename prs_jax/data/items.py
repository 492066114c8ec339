"""Prompt items: the unit of every prompt set and of the restartable outputs (their `id` keys a resume)."""

from __future__ import annotations

import dataclasses
from typing import Any


@dataclasses.dataclass(frozen=True)
class PromptItem:
    """One prompt x with an optional preference z; `id` keys resumable runs."""

    id: str
    prompt: str
    preference: str | None = None
    metadata: dict[str, Any] = dataclasses.field(default_factory=dict, hash=False, compare=False)
