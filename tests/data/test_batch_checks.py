"""Shape checks of the typed batches at the log-prob API (chex, at trace time): errors name the function and field."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from prs_jax.data.batches import SharedPromptBatch
from prs_jax.train.logprobs import tail_token_batch


def _batch(**bad):
    ids = jnp.ones((2, 12), jnp.int32)
    good = tail_token_batch(ids, jnp.ones((2, 12), bool), 4)
    return good.replace(**bad)


def test_well_formed_batches_pass_inside_jit():
    jax.jit(lambda b: (b.check("f"), b.tokens.sum())[1])(_batch())
    SharedPromptBatch(*(jnp.ones(s, jnp.int32) for s in [(2, 5), (2, 5), (2, 3, 4), (2, 3, 4), (2, 3, 4)])).check("g")


@pytest.mark.parametrize("field,value,msg", [
    ("positions", np.zeros((2, 1, 11), np.int32), "response_hidden: TokenBatch.positions must have shape [2, 1, 12]"),
    ("tokens", np.zeros((2, 12), np.int32), "response_hidden: TokenBatch.tokens must have rank 3"),
    ("target_seq", np.zeros((2, 1, 3), np.int32), "TokenBatch.target_seq must have shape [2, 1, 4]"),
])
def test_malformed_token_batch_names_the_field(field, value, msg):
    with pytest.raises(ValueError, match=msg.replace("[", r"\[").replace("]", r"\]")):
        _batch(**{field: value}).check("response_hidden")


def test_malformed_shared_prompt_batch_names_the_field():
    arrays = [jnp.ones(s, jnp.int32) for s in [(2, 5), (2, 5), (2, 3, 4), (2, 3, 5), (2, 3, 4)]]
    with pytest.raises(ValueError, match="SharedPromptBatch.resp_mask must have shape"):
        SharedPromptBatch(*arrays).check("shared_prompt_logps")
