"""Loss functions over batches: sequence log-probs on response positions only, then the pure losses.

Batch conventions (right-padded, fixed shapes; `*_loss_mask` marks the tokens that are scored, i.e. response
tokens):
    SFT:        input_ids, attention_mask, loss_mask                                  [B, T]
    pairs:      chosen_ids, chosen_mask, chosen_loss_mask, rejected_ids, ...          [B, T]
                optional margin [B], p_chosen [B] (soft label),
                optional ref_chosen, ref_rejected [B] (precomputed reference log-probs),
                Sr-*: chosen_aug_ids, chosen_aug_mask, chosen_aug_loss_mask, rejected_aug_... (p (+) x inputs)
                      and optionally ref_chosen_aug, ref_rejected_aug [B]
Only hidden states at scored positions reach the vocabulary projection: a static `r_max` (bucketed longest
response) bounds how many positions per row are gathered before the unembedding.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Literal

import jax
import jax.numpy as jnp
import numpy as np

from prs_jax.models.transformer import CausalLM, RewardModel
from prs_jax.train import losses as L
from prs_jax.train.logprobs import sequence_logprobs, token_logprobs


@dataclasses.dataclass(frozen=True)
class Static:
    """Static (hashable) facts of a batch: scored positions per row, and the log-prob method."""

    r_max: int
    logprob_method: Literal["plain", "chunked", "pallas"] = "chunked"
    remat: bool = False  # recompute each decoder layer in the backward pass (activation memory ~ one layer)


def bucket_r_max(*loss_masks: np.ndarray, minimum: int = 8) -> int:
    """Power-of-two bucket of the longest scored span (few distinct compiled shapes)."""
    longest = max(int(np.asarray(m).sum(axis=1).max()) for m in loss_masks)
    longest = max(longest, minimum)
    return min(1 << (longest - 1).bit_length(), max(np.asarray(m).shape[1] for m in loss_masks))


def unembed_matrix(model: CausalLM) -> jax.Array:
    """The [hidden, vocab] output projection (the embedding's transpose when tied)."""
    if model.lm_head is None:
        return model.model.embed_tokens.embedding[...].T
    return model.lm_head.kernel[...]


def response_logps(model: CausalLM, ids: jax.Array, mask: jax.Array, loss_mask: jax.Array, static: Static
                   ) -> tuple[jax.Array, jax.Array]:
    """Summed log-probs [B] of the scored tokens and their counts [B]; logits only at scored positions."""
    hidden, _ = model.model(ids, attention_mask=mask, remat=static.remat)
    scored = loss_mask.astype(bool).at[:, 0].set(False)  # token 0 has no prediction
    # indices of scored tokens first (stable, in order), padded with unscored ones
    order = jnp.argsort(~scored, axis=1, stable=True)[:, :static.r_max]
    valid = jnp.take_along_axis(scored, order, axis=1)
    h = jnp.take_along_axis(hidden, jnp.maximum(order - 1, 0)[..., None], axis=1)
    targets = jnp.take_along_axis(ids, order, axis=1)
    tok = token_logprobs(h, unembed_matrix(model).astype(h.dtype), targets, method=static.logprob_method)
    return sequence_logprobs(tok, valid)


def sft_loss(model: CausalLM, batch: dict[str, jax.Array], static: Static) -> tuple[jax.Array, dict]:
    """Mean negative log-likelihood per scored token."""
    total, count = response_logps(model, batch["input_ids"], batch["attention_mask"], batch["loss_mask"], static)
    n = jnp.maximum(jnp.sum(count), 1.0)
    loss = -jnp.sum(total) / n
    return loss, {"nll": loss, "tokens": jnp.sum(count)}


def _pair_logps(model: CausalLM, batch: dict[str, jax.Array], static: Static, suffix: str = ""
                ) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """Chosen and rejected in ONE forward (concatenated on the batch axis)."""
    ids = jnp.concatenate([batch[f"chosen{suffix}_ids"], batch[f"rejected{suffix}_ids"]])
    mask = jnp.concatenate([batch[f"chosen{suffix}_mask"], batch[f"rejected{suffix}_mask"]])
    lmask = jnp.concatenate([batch[f"chosen{suffix}_loss_mask"], batch[f"rejected{suffix}_loss_mask"]])
    total, count = response_logps(model, ids, mask, lmask, static)
    b = ids.shape[0] // 2
    return total[:b], total[b:], count[:b], count[b:]


@dataclasses.dataclass(frozen=True)
class PreferenceLoss:
    """DPO-family loss over pair batches: name in losses.LOSSES, beta, lambda (Sr-*), label smoothing, IPO norm."""

    name: str = "sigmoid"
    beta: float = 0.1
    lam: float = 0.5
    eps: float = 0.1
    ipo_normalize: Literal["sum", "mean"] = "sum"

    def __post_init__(self) -> None:
        L.get_loss(self.name)

    @property
    def augmented(self) -> bool:
        return self.name in L.PROMPT_AUGMENTED_LOSSES

    def __call__(self, model: CausalLM, batch: dict[str, jax.Array], static: Static,
                 frozen: dict[str, Any] | None = None) -> tuple[jax.Array, dict]:
        pc, pr, nc, nr = _pair_logps(model, batch, static)
        rc, rr = self._reference(batch, static, frozen, "")
        kw: dict[str, Any] = {}
        if self.name in ("ipo", "sr_ipo"):
            kw = dict(normalize=self.ipo_normalize, chosen_tokens=nc, rejected_tokens=nr)
        if self.name == "robust":
            kw = dict(eps=self.eps)
        if not self.augmented:
            return L.get_loss(self.name)(pc, pr, rc, rr, self.beta, **kw)
        # Delta uses the current policy on p (+) x; the loss stops its gradient, so no backward flows there
        pca, pra, _, _ = _pair_logps(model, batch, static, "_aug")
        rca, rra = self._reference(batch, static, frozen, "_aug")
        return L.get_loss(self.name)(pc, pr, rc, rr, pca, pra, rca, rra, self.beta, lam=self.lam, **kw)

    def _reference(self, batch, static, frozen, suffix):
        key_c, key_r = f"ref_chosen{suffix}", f"ref_rejected{suffix}"
        if key_c in batch:
            return batch[key_c], batch[key_r]
        if not frozen or "ref" not in frozen:
            raise ValueError(f"{self.name}: the batch has no precomputed '{key_c}' and no reference model was given.")
        rc, rr, _, _ = _pair_logps(frozen["ref"], batch, static, suffix)
        return jax.lax.stop_gradient(rc), jax.lax.stop_gradient(rr)


@dataclasses.dataclass(frozen=True)
class RewardLoss:
    """Bradley-Terry (hard labels, optional margin) or soft-label cross-entropy for reward models."""

    soft_labels: bool = False

    def __call__(self, rm: RewardModel, batch: dict[str, jax.Array], static: Any) -> tuple[jax.Array, dict]:
        ids = jnp.concatenate([batch["chosen_ids"], batch["rejected_ids"]])
        mask = jnp.concatenate([batch["chosen_mask"], batch["rejected_mask"]])
        r = rm(ids, attention_mask=mask)
        b = ids.shape[0] // 2
        if self.soft_labels:
            return L.soft_label_reward(r[:b], r[b:], batch["p_chosen"])
        return L.bt_reward(r[:b], r[b:], batch.get("margin"))
