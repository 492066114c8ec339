"""Alignment losses as pure JAX functions of sequence log-probs, each returning ``(loss, metrics)``.

Conventions shared by every function here:

- Sequence log-probs are SUMS of per-token log-probs over the response tokens, shape ``[B]``
  (Sr-DPO paper convention: no length normalisation unless a function's ``normalize="mean"`` asks for it).
- ``h`` is the log-ratio margin ``[pi(y+) - ref(y+)] - [pi(y-) - ref(y-)]``; implicit rewards are
  ``beta * (pi - ref)``.
- Losses are means over the batch. Metrics are scalar means with prefix-free names (``"accuracy"``,
  ``"margin"``, ``"rewards/chosen"``, ...); the trainer adds any ``train/`` or ``eval/`` prefix. They describe
  the log-ratios the loss itself uses (length-normalised ones under ``normalize="mean"``).
- Everything is jit-able. Float hyperparameters (``beta``, ``lam``, ``eps``) may be traced; string options
  (``normalize``, ``form``, ``reduction``) must be static (bind them with ``functools.partial`` or
  ``static_argnames``). Hyperparameters are validated when they are concrete (eager calls, or Python numbers
  bound before ``jax.jit``); traced values cannot be inspected and are not checked.
- Shapes and dtypes are asserted at each function's entry with chex (through prs_jax.checks where the error
  names the function): they read shapes only, so under jit they cost nothing at run time, and a wrong shape is a
  ValueError naming the argument and the expected shape.
- Inputs are computed in at least float32 (bf16 log-probs are upcast) so that margins of long sequences
  do not lose their low bits.
- Reference log-probs are not stop-gradient'ed here: they come from frozen parameters upstream. Only the
  Sr-* refinement term ``Delta`` is wrapped in ``jax.lax.stop_gradient``, as the method prescribes.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, Literal

import chex
import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike

from prs_jax.checks import assert_floating, assert_rank, assert_shape

__all__ = [
    "LOSSES",
    "PROMPT_AUGMENTED_LOSSES",
    "a2c_loss",
    "bt_reward",
    "dpo",
    "get_loss",
    "hinge",
    "ipo",
    "returns_to_go",
    "robust",
    "sft_nll",
    "shaped_rewards",
    "soft_label_reward",
    "sr_dpo",
    "sr_ipo",
]

Metrics = dict[str, jax.Array]
LossOutput = tuple[jax.Array, Metrics]
Normalize = Literal["sum", "mean"]
KLMode = Literal["reward", "loss"]
DeltaUnits = Literal["reward", "log_ratio"]


# ----------------------------------------------------------------------------------------------------------
# Validation helpers (trace-time; they never touch traced values)
# ----------------------------------------------------------------------------------------------------------

def _concrete(value: Any) -> float | None:
    """The value as a Python float, or None when it is traced (inside jit/grad) and cannot be inspected."""
    try:
        return float(value)
    except (jax.errors.ConcretizationTypeError, jax.errors.TracerArrayConversionError):
        return None
    except TypeError as err:
        raise ValueError(f"expected a scalar hyperparameter, got {type(value).__name__}: {err}") from err


def _check_beta(beta: Any) -> None:
    """Raise if beta is concrete and not > 0."""
    value = _concrete(beta)
    if value is not None and not value > 0.0:  # `not >` also rejects NaN
        raise ValueError(f"beta must be > 0 (the KL strength of the DPO family), got beta={value!r}")


def _check_lam(lam: Any) -> None:
    """Raise if lam is concrete and not >= 0."""
    value = _concrete(lam)
    if value is not None and not value >= 0.0:
        raise ValueError(f"lam must be >= 0 (weight of the Sr-* refinement term Delta; 0 gives plain "
                         f"DPO/IPO), got lam={value!r}")


def _check_eps(eps: Any) -> None:
    """Raise if eps is concrete and outside [0, 0.5)."""
    value = _concrete(eps)
    if value is not None and not 0.0 <= value < 0.5:
        raise ValueError(f"eps must be in [0, 0.5) (the assumed probability that a preference label is "
                         f"flipped), got eps={value!r}")


def _check_choice(name: str, value: Any, choices: tuple[str, ...]) -> None:
    """Raise if a string option is not one of its choices."""
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(repr(c) for c in choices)}; got {name}={value!r}")


def _as_float(name: str, x: ArrayLike) -> jax.Array:
    """The array in at least float32 (bf16 and integer inputs are upcast; float64 stays float64)."""
    arr = jnp.asarray(x)
    if not (jnp.issubdtype(arr.dtype, jnp.floating) or jnp.issubdtype(arr.dtype, jnp.integer)
            or arr.dtype == jnp.bool_):
        raise ValueError(f"{name} must be a real-valued array, got dtype {arr.dtype}")
    return arr.astype(jnp.result_type(arr.dtype, jnp.float32))


def _batch(**arrays: ArrayLike) -> dict[str, jax.Array]:
    """Convert arrays to float and check they all have the same shape [B] (names appear in the error)."""
    out = {name: _as_float(name, x) for name, x in arrays.items()}
    first_name, first = next(iter(out.items()))
    chex.assert_rank(first, 1, exception_type=ValueError,
                     custom_message=f"{first_name} must have shape [B] (one value per sequence)")
    listed = ", ".join(f"{name}{list(x.shape)}" for name, x in out.items())
    chex.assert_equal_shape(list(out.values()), exception_type=ValueError,
                            custom_message=f"inputs must all have the same shape [B]; got {listed}")
    return out


def _per_example(name: str, x: ArrayLike | None, shape: tuple[int, ...]) -> jax.Array | None:
    """An optional per-example array: None, a scalar, or shape [B]; returned broadcast to [B]."""
    if x is None:
        return None
    arr = _as_float(name, x)
    if arr.shape not in ((), shape):
        raise ValueError(f"{name} must be a scalar or have shape {list(shape)}, got shape {list(arr.shape)}")
    return jnp.broadcast_to(arr, shape)


# ----------------------------------------------------------------------------------------------------------
# DPO family
# ----------------------------------------------------------------------------------------------------------

def _log_ratios(
    policy_chosen: ArrayLike,
    policy_rejected: ArrayLike,
    ref_chosen: ArrayLike,
    ref_rejected: ArrayLike,
    *,
    normalize: Normalize = "sum",
    chosen_tokens: ArrayLike | None = None,
    rejected_tokens: ArrayLike | None = None,
    suffix: str = "",
) -> tuple[jax.Array, jax.Array]:
    """Policy-minus-reference log-ratios of chosen and rejected, optionally divided by their token counts."""
    x = _batch(**{f"policy_chosen{suffix}": policy_chosen, f"policy_rejected{suffix}": policy_rejected,
                  f"ref_chosen{suffix}": ref_chosen, f"ref_rejected{suffix}": ref_rejected})
    chosen_b = x[f"policy_chosen{suffix}"] - x[f"ref_chosen{suffix}"]
    rejected_b = x[f"policy_rejected{suffix}"] - x[f"ref_rejected{suffix}"]
    _check_choice("normalize", normalize, ("sum", "mean"))
    if normalize == "mean":
        if chosen_tokens is None or rejected_tokens is None:
            raise ValueError("normalize='mean' needs chosen_tokens and rejected_tokens (the number of "
                             "completion tokens of each sequence, shape [B]); pass them or use "
                             "normalize='sum'")
        shape = chosen_b.shape
        n_chosen_b = _per_example("chosen_tokens", chosen_tokens, shape)
        n_rejected_b = _per_example("rejected_tokens", rejected_tokens, shape)
        # An empty completion has log-ratio 0; dividing by max(n, 1) keeps it 0 instead of NaN.
        chosen_b = chosen_b / jnp.maximum(n_chosen_b, 1.0)
        rejected_b = rejected_b / jnp.maximum(n_rejected_b, 1.0)
    return chosen_b, rejected_b


def _pair_metrics(chosen_b: jax.Array, rejected_b: jax.Array, beta: ArrayLike) -> Metrics:
    """Shared DPO-family metrics from the chosen/rejected log-ratios."""
    h_b = chosen_b - rejected_b
    chosen_reward_b = beta * chosen_b
    rejected_reward_b = beta * rejected_b
    return {
        "margin": jnp.mean(h_b),
        "accuracy": jnp.mean((h_b > 0).astype(h_b.dtype)),
        "rewards/chosen": jnp.mean(chosen_reward_b),
        "rewards/rejected": jnp.mean(rejected_reward_b),
        "rewards/margin": jnp.mean(chosen_reward_b - rejected_reward_b),
    }


def _sigmoid_loss(logits_b: jax.Array) -> jax.Array:
    """Mean of -log sigmoid(logits)."""
    return -jnp.mean(jax.nn.log_sigmoid(logits_b))


def _ipo_loss(h_b: jax.Array, beta: ArrayLike) -> jax.Array:
    """Mean of (h - 1/(2 beta))^2."""
    return jnp.mean(jnp.square(h_b - 1.0 / (2.0 * beta)))


def dpo(
    policy_chosen: ArrayLike,
    policy_rejected: ArrayLike,
    ref_chosen: ArrayLike,
    ref_rejected: ArrayLike,
    beta: float | jax.Array = 0.1,
) -> LossOutput:
    """DPO sigmoid loss: mean of -log sigmoid(beta * h) over the batch of [B] sequence log-probs."""
    _check_beta(beta)
    chosen_b, rejected_b = _log_ratios(policy_chosen, policy_rejected, ref_chosen, ref_rejected)
    loss = _sigmoid_loss(beta * (chosen_b - rejected_b))
    return loss, _pair_metrics(chosen_b, rejected_b, beta)


def ipo(
    policy_chosen: ArrayLike,
    policy_rejected: ArrayLike,
    ref_chosen: ArrayLike,
    ref_rejected: ArrayLike,
    beta: float | jax.Array = 0.1,
    *,
    normalize: Normalize = "sum",
    chosen_tokens: ArrayLike | None = None,
    rejected_tokens: ArrayLike | None = None,
) -> LossOutput:
    """IPO loss mean (h - 1/(2 beta))^2 on summed log-probs by default (normalize="sum", the paper form).

    normalize="mean" is TRL's form: each log-ratio is divided by its completion token count
    (chosen_tokens, rejected_tokens, shape [B]) before h is formed.
    """
    _check_beta(beta)
    chosen_b, rejected_b = _log_ratios(policy_chosen, policy_rejected, ref_chosen, ref_rejected,
                                       normalize=normalize, chosen_tokens=chosen_tokens,
                                       rejected_tokens=rejected_tokens)
    loss = _ipo_loss(chosen_b - rejected_b, beta)
    return loss, _pair_metrics(chosen_b, rejected_b, beta)


def hinge(
    policy_chosen: ArrayLike,
    policy_rejected: ArrayLike,
    ref_chosen: ArrayLike,
    ref_rejected: ArrayLike,
    beta: float | jax.Array = 0.1,
) -> LossOutput:
    """Hinge (SLiC-style) loss: mean of max(0, 1 - beta * h)."""
    _check_beta(beta)
    chosen_b, rejected_b = _log_ratios(policy_chosen, policy_rejected, ref_chosen, ref_rejected)
    loss = jnp.mean(jax.nn.relu(1.0 - beta * (chosen_b - rejected_b)))
    return loss, _pair_metrics(chosen_b, rejected_b, beta)


def robust(
    policy_chosen: ArrayLike,
    policy_rejected: ArrayLike,
    ref_chosen: ArrayLike,
    ref_rejected: ArrayLike,
    beta: float | jax.Array = 0.1,
    eps: float | jax.Array = 0.1,
    *,
    form: Literal["conservative", "unbiased"] = "conservative",
) -> LossOutput:
    """Label-smoothed DPO for labels flipped with probability eps; default form="conservative".

    With ls = log sigmoid and z = beta * h: "conservative" is mean[-(1-eps) ls(z) - eps ls(-z)];
    "unbiased" (robust DPO of Chowdhury et al.) is mean[-(1-eps) ls(z) + eps ls(-z)] / (1 - 2 eps).
    """
    _check_beta(beta)
    _check_eps(eps)
    _check_choice("form", form, ("conservative", "unbiased"))
    chosen_b, rejected_b = _log_ratios(policy_chosen, policy_rejected, ref_chosen, ref_rejected)
    logits_b = beta * (chosen_b - rejected_b)
    agree_b = jax.nn.log_sigmoid(logits_b)
    flip_b = jax.nn.log_sigmoid(-logits_b)
    if form == "conservative":
        # Cross-entropy against the smoothed target (1 - eps, eps): a bounded, biased but stable objective.
        loss = jnp.mean(-(1.0 - eps) * agree_b - eps * flip_b)
    else:
        # Unbiased estimate of the clean-label loss under symmetric flip noise of rate eps.
        loss = jnp.mean(-(1.0 - eps) * agree_b + eps * flip_b) / (1.0 - 2.0 * eps)
    return loss, _pair_metrics(chosen_b, rejected_b, beta)


def _refinement(
    policy_chosen_aug: ArrayLike,
    policy_rejected_aug: ArrayLike,
    ref_chosen_aug: ArrayLike,
    ref_rejected_aug: ArrayLike,
    beta: ArrayLike,
    *,
    normalize: Normalize = "sum",
    chosen_tokens: ArrayLike | None = None,
    rejected_tokens: ArrayLike | None = None,
) -> tuple[jax.Array, jax.Array]:
    """Stop-gradient Delta = beta * h_aug on the prompt-augmented query p (+) x, and h_aug itself (also sg)."""
    chosen_b, rejected_b = _log_ratios(policy_chosen_aug, policy_rejected_aug, ref_chosen_aug,
                                       ref_rejected_aug, normalize=normalize, chosen_tokens=chosen_tokens,
                                       rejected_tokens=rejected_tokens, suffix="_aug")
    h_aug_b = jax.lax.stop_gradient(chosen_b - rejected_b)
    delta_b = jax.lax.stop_gradient(beta * h_aug_b)
    return delta_b, h_aug_b


def _sr_metrics(metrics: Metrics, delta_b: jax.Array, h_aug_b: jax.Array) -> Metrics:
    """Add the Sr-* metrics: prompt-augmented accuracy/margin and mean Delta."""
    metrics["prompt_augmented_accuracy"] = jnp.mean((h_aug_b > 0).astype(h_aug_b.dtype))
    metrics["prompt_augmented_margin"] = jnp.mean(h_aug_b)
    metrics["delta"] = jnp.mean(delta_b)
    return metrics


def sr_dpo(
    policy_chosen: ArrayLike,
    policy_rejected: ArrayLike,
    ref_chosen: ArrayLike,
    ref_rejected: ArrayLike,
    policy_chosen_aug: ArrayLike,
    policy_rejected_aug: ArrayLike,
    ref_chosen_aug: ArrayLike,
    ref_rejected_aug: ArrayLike,
    beta: float | jax.Array = 0.1,
    lam: float | jax.Array = 0.5,
) -> LossOutput:
    """Sr-DPO loss: mean of -log sigmoid(beta * h - lam * sg(Delta)); lam = 0 is exactly DPO."""
    _check_beta(beta)
    _check_lam(lam)
    chosen_b, rejected_b = _log_ratios(policy_chosen, policy_rejected, ref_chosen, ref_rejected)
    delta_b, h_aug_b = _refinement(policy_chosen_aug, policy_rejected_aug, ref_chosen_aug, ref_rejected_aug,
                                   beta)
    if delta_b.shape != chosen_b.shape:
        raise ValueError(f"prompt-augmented log-probs have shape {list(delta_b.shape)} but the plain ones "
                         f"have shape {list(chosen_b.shape)}; both must be [B] for the same pairs")
    loss = _sigmoid_loss(beta * (chosen_b - rejected_b) - lam * delta_b)
    return loss, _sr_metrics(_pair_metrics(chosen_b, rejected_b, beta), delta_b, h_aug_b)


def sr_ipo(
    policy_chosen: ArrayLike,
    policy_rejected: ArrayLike,
    ref_chosen: ArrayLike,
    ref_rejected: ArrayLike,
    policy_chosen_aug: ArrayLike,
    policy_rejected_aug: ArrayLike,
    ref_chosen_aug: ArrayLike,
    ref_rejected_aug: ArrayLike,
    beta: float | jax.Array = 0.1,
    lam: float | jax.Array = 0.5,
    *,
    normalize: Normalize = "sum",
    chosen_tokens: ArrayLike | None = None,
    rejected_tokens: ArrayLike | None = None,
    delta_units: DeltaUnits = "reward",
) -> LossOutput:
    """Sr-IPO loss mean (h - lam * sg(Delta) - 1/(2 beta))^2; lam = 0 is exactly IPO with the same normalize.

    ``delta_units="reward"`` (default) is the paper's form: Delta = beta * h_aug, in implicit-reward units, enters
    next to the log-ratio margin h. The optimum is h* = 1/(2 beta) + lam * beta * h_aug, so the refinement
    shifts the IPO target by a fraction lam * beta * h_aug / (1/(2 beta)) of it: lam * beta (5% at lam 0.5,
    beta 0.1) when h_aug sits at the target. ``"log_ratio"`` (an ablation, not the paper) uses Delta / beta =
    h_aug, the units of h, so lam weighs the refinement as it does in Sr-DPO (shift fraction lam there).
    """
    _check_beta(beta)
    _check_lam(lam)
    _check_choice("delta_units", delta_units, ("reward", "log_ratio"))
    # The response tokens are the same with and without the instruction p, so one pair of token counts
    # normalises both h and Delta.
    chosen_b, rejected_b = _log_ratios(policy_chosen, policy_rejected, ref_chosen, ref_rejected,
                                       normalize=normalize, chosen_tokens=chosen_tokens,
                                       rejected_tokens=rejected_tokens)
    delta_b, h_aug_b = _refinement(policy_chosen_aug, policy_rejected_aug, ref_chosen_aug, ref_rejected_aug,
                                   beta, normalize=normalize, chosen_tokens=chosen_tokens,
                                   rejected_tokens=rejected_tokens)
    if delta_b.shape != chosen_b.shape:
        raise ValueError(f"prompt-augmented log-probs have shape {list(delta_b.shape)} but the plain ones "
                         f"have shape {list(chosen_b.shape)}; both must be [B] for the same pairs")
    shift_b = lam * (h_aug_b if delta_units == "log_ratio" else delta_b)
    loss = _ipo_loss(chosen_b - rejected_b - shift_b, beta)
    return loss, _sr_metrics(_pair_metrics(chosen_b, rejected_b, beta), delta_b, h_aug_b)


LOSSES: Mapping[str, Callable[..., LossOutput]] = {
    "sigmoid": dpo,
    "dpo": dpo,
    "ipo": ipo,
    "hinge": hinge,
    "robust": robust,
    "sr_dpo": sr_dpo,
    "sr_ipo": sr_ipo,
}
"""DPO-family losses by name. All take (policy_chosen, policy_rejected, ref_chosen, ref_rejected, ...)."""

PROMPT_AUGMENTED_LOSSES: frozenset[str] = frozenset({"sr_dpo", "sr_ipo"})
"""Losses that also need the four log-probs on the prompt-augmented query p (+) x (8 evaluations per pair)."""


def get_loss(name: str) -> Callable[..., LossOutput]:
    """The DPO-family loss registered under name; ValueError listing the known names otherwise."""
    try:
        return LOSSES[name]
    except KeyError:
        raise ValueError(f"unknown loss {name!r}; known losses: {', '.join(sorted(LOSSES))}") from None


# ----------------------------------------------------------------------------------------------------------
# Reward-model losses
# ----------------------------------------------------------------------------------------------------------

def bt_reward(
    r_chosen: ArrayLike,
    r_rejected: ArrayLike,
    margin: ArrayLike | None = None,
) -> LossOutput:
    """Bradley-Terry reward-model loss: mean of -log sigmoid(r_chosen - r_rejected - margin), margin optional."""
    x = _batch(r_chosen=r_chosen, r_rejected=r_rejected)
    diff_b = x["r_chosen"] - x["r_rejected"]
    margin_b = _per_example("margin", margin, diff_b.shape)
    logits_b = diff_b if margin_b is None else diff_b - margin_b
    loss = -jnp.mean(jax.nn.log_sigmoid(logits_b))
    metrics = {
        "accuracy": jnp.mean((diff_b > 0).astype(diff_b.dtype)),
        "margin": jnp.mean(diff_b),
        "rewards/chosen": jnp.mean(x["r_chosen"]),
        "rewards/rejected": jnp.mean(x["r_rejected"]),
    }
    return loss, metrics


def _check_probabilities(name: str, p: ArrayLike) -> None:
    """Raise if p is concrete and has a value outside [0, 1]; traced values are not inspected."""
    if isinstance(p, jax.core.Tracer):
        return
    arr = np.asarray(p, dtype=np.float64)
    if arr.size and not np.all((arr >= 0.0) & (arr <= 1.0)):  # also rejects NaN
        raise ValueError(f"{name} must hold probabilities in [0, 1]; got min {np.nanmin(arr)}, "
                         f"max {np.nanmax(arr)}")


def soft_label_reward(
    r1: ArrayLike,
    r2: ArrayLike,
    p1: ArrayLike,
) -> LossOutput:
    """RLAIF soft-label RM loss: -mean[p1 log sig(r1-r2) + (1-p1) log sig(r2-r1)]; p1 in {0,1} is Bradley-Terry."""
    _check_probabilities("p1", p1)
    x = _batch(r1=r1, r2=r2, p1=p1)
    diff_b, p1_b = x["r1"] - x["r2"], x["p1"]
    loss = -jnp.mean(p1_b * jax.nn.log_sigmoid(diff_b) + (1.0 - p1_b) * jax.nn.log_sigmoid(-diff_b))
    # Accuracy against the label's preferred candidate; pairs labelled exactly 0.5 prefer neither and are
    # left out of it. The margin is the score difference in the direction the label prefers, so that
    # p1 in {0, 1} reproduces bt_reward's metrics.
    label_sign_b = jnp.sign(p1_b - 0.5)
    decided_b = (label_sign_b != 0).astype(diff_b.dtype)
    correct_b = decided_b * (label_sign_b * diff_b > 0).astype(diff_b.dtype)
    metrics = {
        "accuracy": jnp.sum(correct_b) / jnp.maximum(jnp.sum(decided_b), 1.0),
        "margin": jnp.mean(label_sign_b * diff_b),
        "rewards/1": jnp.mean(x["r1"]),
        "rewards/2": jnp.mean(x["r2"]),
        "label/mean_p1": jnp.mean(p1_b),
    }
    return loss, metrics


# ----------------------------------------------------------------------------------------------------------
# Supervised fine-tuning
# ----------------------------------------------------------------------------------------------------------

def sft_nll(
    token_logps: ArrayLike,
    mask: ArrayLike,
    *,
    reduction: Literal["token", "sequence_mean", "sequence_sum"] = "token",
) -> LossOutput:
    """SFT negative log-likelihood of [B, T] token log-probs under a [B, T] mask; default mean per token."""
    _check_choice("reduction", reduction, ("token", "sequence_mean", "sequence_sum"))
    logps_bt = _as_float("token_logps", token_logps)
    mask_bt = _as_float("mask", mask)
    assert_rank("sft_nll", "token_logps", logps_bt, 2, " [B, T]")
    assert_shape("sft_nll", "mask", mask_bt, logps_bt.shape, " (mask must have the shape of token_logps)")
    # where() rather than multiply: padding positions may hold -inf log-probs, and -inf * 0 is NaN.
    nll_bt = jnp.where(mask_bt > 0, -logps_bt * mask_bt, 0.0)
    tokens_b = jnp.sum(mask_bt, axis=-1)
    total_tokens = jnp.sum(tokens_b)
    token_mean = jnp.sum(nll_bt) / jnp.maximum(total_tokens, 1.0)
    seq_nll_b = jnp.sum(nll_bt, axis=-1)
    has_tokens_b = (tokens_b > 0).astype(logps_bt.dtype)
    n_seqs = jnp.maximum(jnp.sum(has_tokens_b), 1.0)
    if reduction == "token":
        loss = token_mean
    elif reduction == "sequence_mean":
        # Each non-empty sequence counts once, whatever its length.
        loss = jnp.sum(seq_nll_b / jnp.maximum(tokens_b, 1.0) * has_tokens_b) / n_seqs
    else:
        loss = jnp.sum(seq_nll_b * has_tokens_b) / n_seqs
    metrics = {
        "nll": token_mean,
        "perplexity": jnp.exp(token_mean),
        "tokens": total_tokens,
    }
    return loss, metrics


# ----------------------------------------------------------------------------------------------------------
# A2C / REINFORCE with a value baseline (RLAIF section RL); the loop is prs_jax.train.a2c
# ----------------------------------------------------------------------------------------------------------

def returns_to_go(rewards_bt: jax.Array, mask_bt: jax.Array) -> jax.Array:
    """Undiscounted return to go R_t = sum_{t' >= t} r_t' over the masked positions (gamma = 1), 0 elsewhere."""
    assert_rank("returns_to_go", "rewards_bt", rewards_bt, 2, " [B, T]")
    assert_shape("returns_to_go", "mask_bt", mask_bt, rewards_bt.shape, " (the shape of rewards_bt)")
    mask = mask_bt.astype(bool)
    r = jnp.where(mask, rewards_bt.astype(jnp.float32), 0.0)
    return jnp.where(mask, jnp.flip(jnp.cumsum(jnp.flip(r, -1), -1), -1), 0.0)


def shaped_rewards(reward_b: jax.Array, kl_bt: jax.Array, mask_bt: jax.Array, *, beta: float | jax.Array,
                   kl_in_reward: bool, scale_reward: bool) -> jax.Array:
    """Per-token rewards [B, T]: w * reward at each row's last masked token (w = 1 - beta if scale_reward else 1),
    minus beta * kl_t on every masked token when the KL penalty is folded into the reward."""
    assert_rank("shaped_rewards", "mask_bt", mask_bt, 2, " [B, T]")
    assert_shape("shaped_rewards", "kl_bt", kl_bt, mask_bt.shape, " (the shape of mask_bt)")
    assert_shape("shaped_rewards", "reward_b", reward_b, mask_bt.shape[:1], " (one reward per row of mask_bt)")
    mask = mask_bt.astype(bool)
    last = jnp.sum(mask, axis=-1) - 1
    at_last = (jnp.arange(mask.shape[1])[None, :] == last[:, None]) & mask
    w = (1.0 - beta) if scale_reward else 1.0
    r = jnp.where(at_last, w * reward_b.astype(jnp.float32)[:, None], 0.0)
    if kl_in_reward:
        r = r - beta * jnp.where(mask, kl_bt.astype(jnp.float32), 0.0)
    return r


def a2c_loss(logp_bt: jax.Array, values_bt: jax.Array, old_logp_bt: jax.Array, ref_logp_bt: jax.Array,
             reward_b: jax.Array, mask_bt: jax.Array, *, beta: float | jax.Array, kl_mode: KLMode = "reward",
             scale_reward: bool = True, value_coef: float = 0.5, normalize_advantages: bool = False
             ) -> LossOutput:
    """The A2C loss as a token mean over the batch, and its metrics.

    Per response token t (gamma = 1, the sequence reward at the last token, w = 1 - beta or 1):
    kl_mode="reward": r_t = -beta (old_logp_t - ref_logp_t) + [t = last] w r; kl_mode="loss": r_t = [t = last] w r
    and the loss gains beta * 1/2 (logp_t - ref_logp_t)^2. R_t = sum_{t' >= t} r_t';
    loss = -sum_t logp_t sg(R_t - V_t) + value_coef sum_t (R_t - V_t)^2, each sum over the batch's response
    tokens divided by their number.

    logp_bt: policy log-probs of the sampled tokens (with gradient); values_bt: V(s_t) (with gradient);
    old_logp_bt: log-probs at rollout time; ref_logp_bt: reference log-probs; reward_b: sequence rewards;
    mask_bt: response tokens. All [B, T] except reward_b [B]; log-probs, values and rewards floating."""
    _check_choice("kl_mode", kl_mode, ("reward", "loss"))
    where = "a2c_loss"
    assert_rank(where, "logp_bt", logp_bt, 2, " [B, T]")
    for name, x in (("values_bt", values_bt), ("old_logp_bt", old_logp_bt), ("ref_logp_bt", ref_logp_bt),
                    ("mask_bt", mask_bt)):
        assert_shape(where, name, x, logp_bt.shape, " (the [B, T] of logp_bt)")
    assert_shape(where, "reward_b", reward_b, logp_bt.shape[:1], " [B] (one reward per row of logp_bt)")
    for name, x in (("logp_bt", logp_bt), ("values_bt", values_bt), ("old_logp_bt", old_logp_bt),
                    ("ref_logp_bt", ref_logp_bt), ("reward_b", reward_b)):
        assert_floating(where, name, x)
    mask = mask_bt.astype(bool)
    m = mask.astype(jnp.float32)
    n_tok = jnp.maximum(jnp.sum(m), 1.0)
    logp = logp_bt.astype(jnp.float32)
    values = values_bt.astype(jnp.float32)
    ref = ref_logp_bt.astype(jnp.float32)
    kl_old = jnp.where(mask, old_logp_bt.astype(jnp.float32) - ref, 0.0)  # k1 estimate per sampled token
    rewards = shaped_rewards(reward_b, kl_old, mask, beta=beta, kl_in_reward=kl_mode == "reward",
                             scale_reward=scale_reward)
    returns = returns_to_go(rewards, mask)
    adv_raw = jax.lax.stop_gradient(returns - values)
    adv = adv_raw
    if normalize_advantages:
        mean = jnp.sum(adv * m) / n_tok
        std = jnp.sqrt(jnp.sum(jnp.square(adv - mean) * m) / n_tok)
        adv = (adv - mean) / (std + 1e-8)
    policy_loss = -jnp.sum(jnp.where(mask, logp * adv, 0.0)) / n_tok
    value_loss = value_coef * jnp.sum(jnp.where(mask, jnp.square(returns - values), 0.0)) / n_tok
    loss = policy_loss + value_loss
    kl_loss = jnp.float32(0.0)
    if kl_mode == "loss":
        kl_loss = beta * jnp.sum(jnp.where(mask, 0.5 * jnp.square(logp - ref), 0.0)) / n_tok
        loss = loss + kl_loss
    reward = reward_b.astype(jnp.float32)
    adv_mean = jnp.sum(adv_raw * m) / n_tok
    metrics = {
        "policy_loss": policy_loss, "value_loss": value_loss, "kl_loss": kl_loss,
        "reward": jnp.mean(reward), "reward_std": jnp.std(reward),
        "kl": jnp.mean(jnp.sum(kl_old, axis=-1)),  # sequence KL(pi || ref) estimate at the rollout
        "return": jnp.sum(returns * m) / n_tok, "value": jnp.sum(values * m) / n_tok,
        "advantage": adv_mean, "advantage_std": jnp.sqrt(jnp.sum(jnp.square(adv_raw - adv_mean) * m) / n_tok),
        # ~0 on the first step after a rollout: the training forward agrees with the rollout's log-probs
        "logp_minus_rollout": jnp.sum(jnp.where(mask, logp - old_logp_bt, 0.0)) / n_tok,
        "response_len": jnp.mean(jnp.sum(m, axis=-1)),
    }
    return loss, metrics
