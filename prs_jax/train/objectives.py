"""Loss objects over typed batches (prs_jax.data.batches): sequence log-probs from the one log-prob API
(prs_jax.train.logprobs.sequence_logps), then the pure losses of prs_jax.train.losses.

    SFTLoss          TokenBatch -> mean NLL per scored token
    PreferenceLoss   PairBatch  -> DPO family (and Sr-* with the p (+) x view `batch.aug`)
    RewardLoss       PairBatch  -> Bradley-Terry / soft-label loss on the reward at each response's last token

Every loss is called by the trainer as `loss(model, batch, static=None, frozen=None)`; `static` is not used
(static facts live in the batch's tree structure and in the loss's LogProbConfig).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Literal

import jax
import jax.numpy as jnp

from prs_jax.data.batches import PairBatch, SharedPromptBatch, TokenBatch
from prs_jax.models.transformer import CausalLM, RewardModel
from prs_jax.train import losses as L
from prs_jax.train.logprobs import LogProbConfig, sequence_logps, shared_prompt_logps, unembed_matrix

__all__ = ["SFTLoss", "PreferenceLoss", "RewardLoss", "pair_logps", "LogProbConfig", "unembed_matrix"]


def _pairs(batch: PairBatch | TokenBatch | SharedPromptBatch, aug: bool = False) -> TokenBatch | SharedPromptBatch:
    view = batch if isinstance(batch, (TokenBatch, SharedPromptBatch)) else (batch.aug if aug else batch.x)
    if view is None:
        raise ValueError("pair_logps: the batch has no p (+) x view (`aug`); collate pairs tokenised with a "
                         "prompt prefix (tokenize_pairs(..., prompt_prefix=...)).")
    if view.seqs_per_example != 2:
        raise ValueError(f"pair_logps: a pair batch holds 2 sequences per example (chosen, rejected), this one "
                         f"{view.seqs_per_example}; build it with prs_jax.data.pairs.collate_pairs.")
    return view


def pair_logps(model: CausalLM, batch: PairBatch | TokenBatch | SharedPromptBatch,
               config: LogProbConfig = LogProbConfig(), *, aug: bool = False
               ) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """(chosen, rejected) summed log-probs [B] and token counts [B] of the x view (or `aug`: the p (+) x view),
    in ONE forward whatever the layout (packed and cascade: the prompt is computed once)."""
    view = _pairs(batch, aug)
    if isinstance(view, SharedPromptBatch):
        sums, counts = shared_prompt_logps(model, view, config)
    else:
        sums, counts = sequence_logps(model, view, config)
    return sums[:, 0], sums[:, 1], counts[:, 0], counts[:, 1]


@dataclasses.dataclass(frozen=True)
class SFTLoss:
    """Mean negative log-likelihood per scored token of a TokenBatch."""

    logprob: LogProbConfig = LogProbConfig()

    def __call__(self, model: CausalLM, batch: TokenBatch, static: Any = None) -> tuple[jax.Array, dict]:
        total, count = sequence_logps(model, batch, self.logprob)
        n = jnp.maximum(jnp.sum(count), 1.0)
        loss = -jnp.sum(total) / n
        return loss, {"nll": loss, "tokens": jnp.sum(count)}


@dataclasses.dataclass(frozen=True)
class PreferenceLoss:
    """DPO-family loss over PairBatches: name in losses.LOSSES, beta, lambda (Sr-*), label smoothing, IPO norm."""

    name: str = "sigmoid"
    beta: float = 0.1
    lam: float = 0.5
    eps: float = 0.1
    ipo_normalize: Literal["sum", "mean"] = "sum"
    logprob: LogProbConfig = LogProbConfig()
    # Sr-*: the reference of Delta's log-ratios: "augmented" = pi_ref(.|p (+) x), the paper's Delta; "plain" =
    # pi_ref(.|x), an ablation (Delta then also carries the reference's own response to p)
    delta_reference: Literal["augmented", "plain"] = "augmented"
    ipo_delta_units: L.DeltaUnits = "reward"  # Sr-IPO only: losses.sr_ipo's delta_units

    def __post_init__(self) -> None:
        L.get_loss(self.name)
        if self.delta_reference not in ("augmented", "plain"):
            raise ValueError(f"delta_reference must be 'augmented' or 'plain', got {self.delta_reference!r}")

    @property
    def augmented(self) -> bool:
        return self.name in L.PROMPT_AUGMENTED_LOSSES

    def __call__(self, model: CausalLM, batch: PairBatch, static: Any = None,
                 frozen: dict[str, Any] | None = None) -> tuple[jax.Array, dict]:
        pc, pr, nc, nr = pair_logps(model, batch, self.logprob)
        rc, rr = self._reference(batch, frozen, aug=False)
        kw: dict[str, Any] = {}
        if self.name in ("ipo", "sr_ipo"):
            kw = dict(normalize=self.ipo_normalize, chosen_tokens=nc, rejected_tokens=nr)
        if self.name == "sr_ipo":
            kw["delta_units"] = self.ipo_delta_units
        if self.name == "robust":
            kw = dict(eps=self.eps)
        if not self.augmented:
            return L.get_loss(self.name)(pc, pr, rc, rr, self.beta, **kw)
        # Delta uses the current policy on p (+) x; the loss stops its gradient, so no backward flows there
        pca, pra, _, _ = pair_logps(model, batch, self.logprob, aug=True)
        rca, rra = (rc, rr) if self.delta_reference == "plain" else self._reference(batch, frozen, aug=True)
        return L.get_loss(self.name)(pc, pr, rc, rr, pca, pra, rca, rra, self.beta, lam=self.lam, **kw)

    def _reference(self, batch: PairBatch, frozen: dict[str, Any] | None, aug: bool) -> tuple[jax.Array, jax.Array]:
        rc, rr = (batch.ref_chosen_aug, batch.ref_rejected_aug) if aug else (batch.ref_chosen, batch.ref_rejected)
        if rc is not None and rr is not None:
            return rc, rr
        if not frozen or "ref" not in frozen:
            which = "ref_chosen_aug" if aug else "ref_chosen"
            raise ValueError(f"{self.name}: the batch has no precomputed '{which}' and no reference model was given.")
        rc, rr, _, _ = pair_logps(frozen["ref"], batch, self.logprob, aug=aug)
        return jax.lax.stop_gradient(rc), jax.lax.stop_gradient(rr)


@dataclasses.dataclass(frozen=True)
class RewardLoss:
    """Bradley-Terry (hard labels, optional margin) or soft-label cross-entropy for reward models; the reward
    is the head's output at each response's last token (packed pairs: both responses in one row)."""

    soft_labels: bool = False
    remat: bool = False

    def __call__(self, rm: RewardModel, batch: PairBatch, static: Any = None) -> tuple[jax.Array, dict]:
        view = _pairs(batch)
        if not isinstance(view, TokenBatch):
            raise ValueError("RewardLoss: collate reward-model pairs with layout 'packed' or 'separate' (the "
                             "cascade layout serves log-prob losses only).")
        b, v, t = view.tokens.shape
        flat = lambda x: x.reshape((-1,) + x.shape[2:])  # noqa: E731
        hidden, _ = rm.model(flat(view.tokens), positions=flat(view.positions),
                             segment_ids=flat(view.segment_ids), remat=self.remat)
        s = view.seqs_per_row
        hit = flat(view.target_seq)[..., None] == jnp.arange(s, dtype=jnp.int32)  # [BV, R, S]
        last = jnp.max(jnp.where(hit, flat(view.target_slot)[..., None], 0), axis=1)  # [BV, S]
        h = jnp.take_along_axis(hidden, last[..., None], axis=1).reshape(b, v * s, -1)
        r = rm.head(h)[..., 0]
        if self.soft_labels:
            return L.soft_label_reward(r[:, 0], r[:, 1], batch.p_chosen)
        return L.bt_reward(r[:, 0], r[:, 1], batch.margin)

