"""Fixed-shape batching helpers: bucketed lengths, right padding, and an index-addressable example source."""

from __future__ import annotations

from typing import Any, Callable, Generic, Literal, Sequence, TypeVar

import numpy as np

from prs_jax.errors import DataError

__all__ = ["PadTo", "bucket_length", "pad_right", "pad_id_of", "ExampleSource"]

PadTo = Literal["bucket", "max_length"]
T = TypeVar("T")


def bucket_length(longest: int, *, max_length: int | None = None, pad_to: PadTo = "bucket",
                  multiple: int = 64) -> int:
    """Padded length for a batch whose longest row has `longest` tokens: the next multiple of `multiple`
    (capped at max_length), or exactly max_length. Few distinct lengths means few jit compilations."""
    if multiple < 1:
        raise ValueError(f"bucket_length: multiple must be positive, got {multiple}.")
    if max_length is not None and longest > max_length:
        raise DataError(f"a row has {longest} tokens, more than max_length={max_length}; tokenise with the same "
                        "max_length as the collation (it truncates or drops long rows).")
    if pad_to == "max_length":
        if max_length is None:
            raise ValueError("bucket_length: pad_to='max_length' needs max_length.")
        return max_length
    if pad_to != "bucket":
        raise ValueError(f"bucket_length: pad_to must be 'bucket' or 'max_length', got {pad_to!r}.")
    length = max(multiple, -(-longest // multiple) * multiple)
    return min(length, max_length) if max_length is not None else length


def pad_right(seqs: Sequence[np.ndarray], length: int, pad_value: int | float = 0,
              dtype: Any = np.int32) -> np.ndarray:
    """Stack 1-D sequences into a [len(seqs), length] array, right-padded with pad_value."""
    out = np.full((len(seqs), length), pad_value, dtype=dtype)
    for i, s in enumerate(seqs):
        if len(s) > length:
            raise DataError(f"pad_right: row {i} has {len(s)} tokens, more than the padded length {length}.")
        out[i, :len(s)] = s
    return out


def pad_id_of(tokenizer: Any) -> int:
    """The tokenizer's pad id, else its EOS id, else 0 (padded positions are masked out anyway)."""
    for attr in ("pad_token_id", "eos_token_id"):
        v = getattr(tokenizer, attr, None)
        if isinstance(v, int):
            return v
    return 0


class ExampleSource(Generic[T]):
    """Tokenised examples addressable by index; `collate(indices)` gives (arrays, static) as the trainer's
    BatchSource protocol asks. `collate_fn` builds the arrays, `static_fn` (optional) the static facts."""

    def __init__(self, examples: Sequence[T], collate_fn: Callable[[Sequence[T]], dict[str, np.ndarray]],
                 static_fn: Callable[[dict[str, np.ndarray]], Any] | None = None,
                 length_fn: Callable[[T], int] | None = None):
        if not examples:
            raise DataError("ExampleSource: no examples (every row was dropped, or the source is empty).")
        self.examples = list(examples)
        self.collate_fn = collate_fn
        self.static_fn = static_fn
        self.length_fn = length_fn

    def lengths(self) -> np.ndarray | None:
        """Token length of every example (for length-grouped batches), or None without a `length_fn`."""
        if self.length_fn is None:
            return None
        return np.array([self.length_fn(e) for e in self.examples], dtype=np.int64)

    def __len__(self) -> int:
        return len(self.examples)

    def collate(self, indices: np.ndarray) -> tuple[dict[str, np.ndarray], Any]:
        batch = self.collate_fn([self.examples[int(i)] for i in np.asarray(indices).reshape(-1)])
        return batch, (self.static_fn(batch) if self.static_fn is not None else None)
