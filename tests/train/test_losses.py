"""Losses against independent NumPy implementations (values and gradients), plus the method's invariants."""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from prs_jax.train import losses as L

B = 8
BETA, LAM, EPS = 0.3, 0.7, 0.2


# ----------------------------------------------------------------------------------------------------------
# Independent NumPy references (float64); each returns (loss, {input name: analytic gradient})
# ----------------------------------------------------------------------------------------------------------

def np_log_sigmoid(x):
    return -np.logaddexp(0.0, -x)


def np_sigmoid(x):
    return np.exp(np_log_sigmoid(x))


def np_pair(inp, normalize="sum"):
    """Chosen/rejected log-ratios and the d(ratio)/d(input) scale of each side."""
    sc = sr = np.ones(len(inp["policy_chosen"]))
    if normalize == "mean":
        sc, sr = 1.0 / inp["chosen_tokens"], 1.0 / inp["rejected_tokens"]
    c = (inp["policy_chosen"] - inp["ref_chosen"]) * sc
    r = (inp["policy_rejected"] - inp["ref_rejected"]) * sr
    return c, r, sc, sr


def np_delta(inp, beta, normalize="sum"):
    sc = sr = 1.0
    if normalize == "mean":
        sc, sr = 1.0 / inp["chosen_tokens"], 1.0 / inp["rejected_tokens"]
    return beta * ((inp["policy_chosen_aug"] - inp["ref_chosen_aug"]) * sc
                   - (inp["policy_rejected_aug"] - inp["ref_rejected_aug"]) * sr)


def np_dpo_family(inp, per_example: Callable, normalize="sum", augmented=False):
    """Mean of per_example(h) -> (loss_i, dloss_i/dh) and the chain rule to the four log-prob inputs."""
    c, r, sc, sr = np_pair(inp, normalize)
    loss_i, dh = per_example(c - r)
    g = dh / len(c)
    grads = {"policy_chosen": g * sc, "ref_chosen": -g * sc, "policy_rejected": -g * sr, "ref_rejected": g * sr}
    if augmented:  # Delta is stop-gradient: no gradient reaches the prompt-augmented inputs
        grads.update({k + "_aug": np.zeros_like(g) for k in list(grads)})
    return loss_i.mean(), grads


def np_dpo(inp, beta):
    return np_dpo_family(inp, lambda h: (-np_log_sigmoid(beta * h), -beta * np_sigmoid(-beta * h)))


def np_ipo(inp, beta, normalize="sum"):
    c = 1.0 / (2.0 * beta)
    return np_dpo_family(inp, lambda h: ((h - c) ** 2, 2.0 * (h - c)), normalize)


def np_hinge(inp, beta):
    return np_dpo_family(inp, lambda h: (np.maximum(0.0, 1.0 - beta * h), np.where(1.0 - beta * h > 0, -beta, 0.0)))


def np_robust(inp, beta, eps, form):
    def conservative(h):
        z = beta * h
        return (-(1 - eps) * np_log_sigmoid(z) - eps * np_log_sigmoid(-z),
                beta * (-(1 - eps) * np_sigmoid(-z) + eps * np_sigmoid(z)))

    def unbiased(h):
        z = beta * h
        return ((-(1 - eps) * np_log_sigmoid(z) + eps * np_log_sigmoid(-z)) / (1 - 2 * eps),
                beta * (-(1 - eps) * np_sigmoid(-z) - eps * np_sigmoid(z)) / (1 - 2 * eps))

    return np_dpo_family(inp, conservative if form == "conservative" else unbiased)


def np_sr_dpo(inp, beta, lam):
    d = np_delta(inp, beta)
    return np_dpo_family(inp, lambda h: (-np_log_sigmoid(beta * h - lam * d),
                                         -beta * np_sigmoid(-(beta * h - lam * d))), augmented=True)


def np_sr_ipo(inp, beta, lam, normalize="sum"):
    d, c = np_delta(inp, beta, normalize), 1.0 / (2.0 * beta)
    return np_dpo_family(inp, lambda h: ((h - lam * d - c) ** 2, 2.0 * (h - lam * d - c)), normalize,
                         augmented=True)


def np_bt(inp):
    m = inp.get("margin", 0.0)
    d = inp["r_chosen"] - inp["r_rejected"] - m
    n = len(d)
    grads = {"r_chosen": -np_sigmoid(-d) / n, "r_rejected": np_sigmoid(-d) / n}
    if "margin" in inp:
        grads["margin"] = np_sigmoid(-d) / n
    return -np_log_sigmoid(d).mean(), grads


def np_soft(inp):
    d, p = inp["r1"] - inp["r2"], inp["p1"]
    n = len(d)
    loss = -(p * np_log_sigmoid(d) + (1 - p) * np_log_sigmoid(-d)).mean()
    g = -(p - np_sigmoid(d)) / n
    return loss, {"r1": g, "r2": -g, "p1": -d / n}


def np_sft(inp, reduction):
    lp, m = inp["token_logps"], inp["mask"]
    n_b = m.sum(-1)
    if reduction == "token":
        return -(lp * m).sum() / m.sum(), {"token_logps": -m / m.sum()}
    keep = n_b > 0
    s = keep.sum()
    if reduction == "sequence_mean":
        per_seq = -(lp * m).sum(-1)[keep] / n_b[keep]
        g = -m / np.where(keep, n_b, 1.0)[:, None] / s
    else:
        per_seq = -(lp * m).sum(-1)[keep]
        g = -m / s
    return per_seq.mean(), {"token_logps": g}


# ----------------------------------------------------------------------------------------------------------
# Inputs
# ----------------------------------------------------------------------------------------------------------

def pair_inputs(rng, augmented=False, tokens=False):
    """Reference log-probs in [-40, -5] and policy = reference + noise, so beta*h is O(1) (sigmoid not saturated)."""
    out = {}
    for suffix in ("", "_aug") if augmented else ("",):
        for side in ("chosen", "rejected"):
            ref = rng.uniform(-40.0, -5.0, B)
            out[f"ref_{side}{suffix}"] = ref
            out[f"policy_{side}{suffix}"] = ref + rng.normal(0.0, 3.0, B)
    if tokens:
        out["chosen_tokens"] = rng.integers(1, 30, B).astype(np.float64)
        out["rejected_tokens"] = rng.integers(1, 30, B).astype(np.float64)
    return {k: v.astype(np.float32) for k, v in out.items()}


def rm_inputs(rng, margin=False):
    out = {"r_chosen": rng.normal(0.0, 2.0, B), "r_rejected": rng.normal(0.0, 2.0, B)}
    if margin:
        out["margin"] = rng.uniform(0.0, 2.0, B)
    return {k: v.astype(np.float32) for k, v in out.items()}


def soft_inputs(rng):
    p1 = rng.uniform(0.0, 1.0, B)
    p1[:2] = [0.0, 1.0]
    return {k: v.astype(np.float32) for k, v in
            {"r1": rng.normal(0.0, 2.0, B), "r2": rng.normal(0.0, 2.0, B), "p1": p1}.items()}


def sft_inputs(rng):
    lp = np.log(rng.uniform(0.01, 1.0, (B, 6)))
    lengths = rng.integers(1, 7, B)
    lengths[-1] = 0  # an empty sequence (all padding)
    mask = (np.arange(6)[None, :] < lengths[:, None]).astype(np.float32)
    return {"token_logps": lp.astype(np.float32), "mask": mask}


@dataclass(frozen=True)
class Case:
    id: str
    make: Callable  # rng -> inputs
    jax_fn: Callable  # **inputs -> (loss, metrics)
    np_fn: Callable  # **inputs (float64) -> (loss, grads)


CASES = [
    Case("dpo", pair_inputs, lambda **x: L.dpo(**x, beta=BETA), lambda x: np_dpo(x, BETA)),
    Case("ipo_sum", pair_inputs, lambda **x: L.ipo(**x, beta=BETA), lambda x: np_ipo(x, BETA)),
    Case("ipo_mean", functools.partial(pair_inputs, tokens=True),
         lambda **x: L.ipo(**x, beta=BETA, normalize="mean"), lambda x: np_ipo(x, BETA, "mean")),
    Case("hinge", pair_inputs, lambda **x: L.hinge(**x, beta=BETA), lambda x: np_hinge(x, BETA)),
    Case("robust_conservative", pair_inputs, lambda **x: L.robust(**x, beta=BETA, eps=EPS),
         lambda x: np_robust(x, BETA, EPS, "conservative")),
    Case("robust_unbiased", pair_inputs, lambda **x: L.robust(**x, beta=BETA, eps=EPS, form="unbiased"),
         lambda x: np_robust(x, BETA, EPS, "unbiased")),
    Case("sr_dpo", functools.partial(pair_inputs, augmented=True),
         lambda **x: L.sr_dpo(**x, beta=BETA, lam=LAM), lambda x: np_sr_dpo(x, BETA, LAM)),
    Case("sr_ipo_sum", functools.partial(pair_inputs, augmented=True),
         lambda **x: L.sr_ipo(**x, beta=BETA, lam=LAM), lambda x: np_sr_ipo(x, BETA, LAM)),
    Case("sr_ipo_mean", functools.partial(pair_inputs, augmented=True, tokens=True),
         lambda **x: L.sr_ipo(**x, beta=BETA, lam=LAM, normalize="mean"),
         lambda x: np_sr_ipo(x, BETA, LAM, "mean")),
    Case("bt", rm_inputs, lambda **x: L.bt_reward(**x), np_bt),
    Case("bt_margin", functools.partial(rm_inputs, margin=True), lambda **x: L.bt_reward(**x), np_bt),
    Case("soft_label", soft_inputs, lambda **x: L.soft_label_reward(**x), np_soft),
    Case("sft_token", sft_inputs, lambda **x: L.sft_nll(**x), lambda x: np_sft(x, "token")),
    Case("sft_sequence_mean", sft_inputs, lambda **x: L.sft_nll(**x, reduction="sequence_mean"),
         lambda x: np_sft(x, "sequence_mean")),
    Case("sft_sequence_sum", sft_inputs, lambda **x: L.sft_nll(**x, reduction="sequence_sum"),
         lambda x: np_sft(x, "sequence_sum")),
]


def jax_value_and_grads(case: Case, inputs: dict, keys) -> tuple[jax.Array, dict]:
    """Loss and its gradient w.r.t. the inputs named in keys (the others are held constant)."""
    const = {k: v for k, v in inputs.items() if k not in keys}

    def f(diff):
        return case.jax_fn(**diff, **const)[0]

    return jax.value_and_grad(f)({k: jnp.asarray(inputs[k]) for k in keys})


# ----------------------------------------------------------------------------------------------------------
# Values and gradients
# ----------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_value_and_gradient_match_numpy(case: Case):
    inputs = case.make(np.random.default_rng(0))
    want_loss, want_grads = case.np_fn({k: v.astype(np.float64) for k, v in inputs.items()})
    loss, grads = jax_value_and_grads(case, inputs, list(want_grads))
    assert loss.dtype == jnp.float32
    np.testing.assert_allclose(float(loss), want_loss, rtol=1e-5, atol=1e-6)
    for k, want in want_grads.items():
        np.testing.assert_allclose(np.asarray(grads[k]), want, rtol=1e-5, atol=1e-7, err_msg=k)


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_numpy_analytic_gradients_match_central_differences(case: Case):
    """Checks the references themselves, so the JAX-vs-NumPy gradient test above rests on nothing unverified."""
    inputs = {k: v.astype(np.float64) for k, v in case.make(np.random.default_rng(1)).items()}
    _, analytic = case.np_fn(inputs)
    step = 1e-6
    # Delta is stop-gradient in JAX but not in plain NumPy, so differences are taken over the plain inputs only.
    for k in (k for k in analytic if not k.endswith("_aug")):
        fd = np.zeros_like(inputs[k])
        for idx in np.ndindex(inputs[k].shape):
            hi, lo = dict(inputs, **{k: inputs[k].copy()}), dict(inputs, **{k: inputs[k].copy()})
            hi[k][idx] += step
            lo[k][idx] -= step
            fd[idx] = (case.np_fn(hi)[0] - case.np_fn(lo)[0]) / (2 * step)
        np.testing.assert_allclose(analytic[k], fd, rtol=1e-6, atol=1e-8, err_msg=k)


@pytest.mark.parametrize("case", [c for c in CASES if c.id in ("sr_dpo", "soft_label")],
                         ids=lambda c: c.id)
def test_float64_inputs_stay_float64(case: Case):
    inputs = {k: v.astype(np.float64) for k, v in case.make(np.random.default_rng(1)).items()}
    want_loss, want_grads = case.np_fn(inputs)
    with jax.enable_x64(True):
        loss, grads = jax_value_and_grads(case, inputs, list(want_grads))
        assert loss.dtype == jnp.float64
        np.testing.assert_allclose(float(loss), want_loss, rtol=1e-12)
        for k, want in want_grads.items():
            np.testing.assert_allclose(np.asarray(grads[k]), want, rtol=1e-10, atol=1e-14, err_msg=k)


def test_dpo_family_metrics_match_numpy():
    inp = pair_inputs(np.random.default_rng(2), augmented=True)
    x64 = {k: v.astype(np.float64) for k, v in inp.items()}
    c, r, _, _ = np_pair(x64)
    h = c - r
    d = np_delta(x64, BETA)
    h_aug = d / BETA
    _, m = L.sr_dpo(**inp, beta=BETA, lam=LAM)
    want = {
        "margin": h.mean(),
        "accuracy": (h > 0).mean(),
        "rewards/chosen": (BETA * c).mean(),
        "rewards/rejected": (BETA * r).mean(),
        "rewards/margin": (BETA * h).mean(),
        "prompt_augmented_accuracy": (h_aug > 0).mean(),
        "prompt_augmented_margin": h_aug.mean(),
        "delta": d.mean(),
    }
    assert set(m) == set(want)
    for k, v in want.items():
        np.testing.assert_allclose(float(m[k]), v, rtol=1e-5, atol=1e-5, err_msg=k)
    assert 0.0 < float(m["accuracy"]) < 1.0  # the random pairs exercise both branches
    plain = {k: v for k, v in inp.items() if not k.endswith("_aug")}
    for fn in (L.dpo, L.ipo, L.hinge, L.robust):
        _, mf = fn(**plain, beta=BETA)
        assert set(mf) == set(want) - {"prompt_augmented_accuracy", "prompt_augmented_margin", "delta"}
        for k in mf:
            np.testing.assert_allclose(float(mf[k]), want[k], rtol=1e-5, atol=1e-5, err_msg=f"{fn.__name__}:{k}")


def test_reward_and_sft_metrics_match_numpy():
    rm = rm_inputs(np.random.default_rng(3), margin=True)
    _, m = L.bt_reward(**rm)
    diff = rm["r_chosen"].astype(np.float64) - rm["r_rejected"]
    np.testing.assert_allclose(float(m["accuracy"]), (diff > 0).mean())
    np.testing.assert_allclose(float(m["margin"]), diff.mean(), rtol=1e-5)  # margin metric excludes the shift

    soft = soft_inputs(np.random.default_rng(4))
    soft["p1"][2] = 0.5  # undecided label: left out of the accuracy
    _, m = L.soft_label_reward(**soft)
    d = soft["r1"].astype(np.float64) - soft["r2"]
    decided = soft["p1"] != 0.5
    agree = (d > 0) == (soft["p1"] > 0.5)
    np.testing.assert_allclose(float(m["accuracy"]), agree[decided].mean(), rtol=1e-6)
    np.testing.assert_allclose(float(m["margin"]), (np.sign(soft["p1"] - 0.5) * d).mean(), rtol=1e-5)

    sft = sft_inputs(np.random.default_rng(5))
    _, m = L.sft_nll(**sft)
    nll = -(sft["token_logps"].astype(np.float64) * sft["mask"]).sum() / sft["mask"].sum()
    np.testing.assert_allclose(float(m["nll"]), nll, rtol=1e-6)
    np.testing.assert_allclose(float(m["perplexity"]), math.exp(nll), rtol=1e-5)
    assert float(m["tokens"]) == sft["mask"].sum()


# ----------------------------------------------------------------------------------------------------------
# Sr-DPO / Sr-IPO invariants
# ----------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
def test_sr_with_lambda_zero_is_exactly_dpo_and_ipo(jit):
    inp = pair_inputs(np.random.default_rng(6), augmented=True, tokens=True)
    plain = {k: v for k, v in inp.items() if not k.endswith("_aug") and not k.endswith("_tokens")}
    aug = {k: v for k, v in inp.items() if k.endswith("_aug")}
    tok = {k: v for k, v in inp.items() if k.endswith("_tokens")}
    wrap = jax.jit if jit else (lambda f: f)
    pairs = [
        (wrap(functools.partial(L.sr_dpo, beta=BETA, lam=0.0)), wrap(functools.partial(L.dpo, beta=BETA)), {}),
        *([] if jit else [(functools.partial(L.sr_ipo, beta=BETA, lam=0.0), functools.partial(L.ipo, beta=BETA),
                           {})]),
        (wrap(functools.partial(L.sr_ipo, beta=BETA, lam=0.0, normalize="mean")),
         wrap(functools.partial(L.ipo, beta=BETA, normalize="mean")), tok),
    ]
    for sr_fn, base_fn, extra in pairs:
        sr_loss, sr_m = sr_fn(**plain, **aug, **extra)
        base_loss, base_m = base_fn(**plain, **extra)
        np.testing.assert_array_equal(np.asarray(sr_loss), np.asarray(base_loss))
        for k, v in base_m.items():
            np.testing.assert_array_equal(np.asarray(sr_m[k]), np.asarray(v), err_msg=k)
        if jit:
            continue  # gradients are compared eagerly; compiling grad-of-jit adds time but no coverage
        sr_g = jax.grad(lambda p: sr_fn(**p, **aug, **extra)[0])(plain)
        base_g = jax.grad(lambda p: base_fn(**p, **extra)[0])(plain)
        for k in plain:
            np.testing.assert_allclose(np.asarray(sr_g[k]), np.asarray(base_g[k]), rtol=0, atol=1e-7, err_msg=k)


@pytest.mark.parametrize("fn", [L.sr_dpo, L.sr_ipo], ids=["sr_dpo", "sr_ipo"])
def test_refinement_term_is_stop_gradient(fn):
    inp = pair_inputs(np.random.default_rng(7), augmented=True)
    aug_keys = [k for k in inp if k.endswith("_aug")]
    const = {k: v for k, v in inp.items() if k not in aug_keys}

    def loss_of_aug(aug):
        return fn(**const, **aug, beta=BETA, lam=LAM)[0]

    aug = {k: jnp.asarray(inp[k]) for k in aug_keys}
    grads = jax.grad(loss_of_aug)(aug)
    for k in aug_keys:
        assert np.all(np.asarray(grads[k]) == 0.0), k
    # ... while the value does depend on them, so the zero gradient is the stop-gradient, not a dead input.
    shifted = dict(aug, policy_chosen_aug=aug["policy_chosen_aug"] + 1.0)
    assert float(loss_of_aug(shifted)) != float(loss_of_aug(aug))


def test_sr_dpo_is_dpo_with_a_shifted_margin():
    """-log sig(beta h - lam Delta) is DPO evaluated at h - lam Delta / beta (a per-sample adaptive target)."""
    inp = pair_inputs(np.random.default_rng(8), augmented=True)
    plain = {k: v for k, v in inp.items() if not k.endswith("_aug")}
    delta = np_delta({k: v.astype(np.float64) for k, v in inp.items()}, BETA)
    shifted = dict(plain, policy_chosen=plain["policy_chosen"] - LAM * delta / BETA)
    got, _ = L.sr_dpo(**inp, beta=BETA, lam=LAM)
    want, _ = L.dpo(**shifted, beta=BETA)
    np.testing.assert_allclose(float(got), float(want), rtol=1e-5)


# ----------------------------------------------------------------------------------------------------------
# Sign conventions on hand-made cases
# ----------------------------------------------------------------------------------------------------------

def _hand_pair(h):
    """One pair with log-ratio margin h: the policy raised the chosen answer by h over the reference."""
    return dict(policy_chosen=np.array([-10.0 + h], np.float32), policy_rejected=np.array([-12.0], np.float32),
                ref_chosen=np.array([-10.0], np.float32), ref_rejected=np.array([-12.0], np.float32))


def _flipped(p):
    return dict(policy_chosen=p["policy_rejected"], policy_rejected=p["policy_chosen"],
                ref_chosen=p["ref_rejected"], ref_rejected=p["ref_chosen"])


@pytest.mark.parametrize("name", ["dpo", "ipo", "hinge", "robust"])
def test_preferred_pair_has_lower_loss_than_flipped(name):
    fn = L.LOSSES[name]
    p = _hand_pair(1.5)
    good, m_good = fn(**p, beta=0.1)
    bad, m_bad = fn(**_flipped(p), beta=0.1)
    assert float(good) < float(bad)
    assert float(m_good["accuracy"]) == 1.0 and float(m_bad["accuracy"]) == 0.0
    np.testing.assert_allclose(float(m_good["margin"]), 1.5, rtol=1e-6)
    np.testing.assert_allclose(float(m_good["rewards/chosen"]), 0.15, rtol=1e-5)
    np.testing.assert_allclose(float(m_bad["margin"]), -1.5, rtol=1e-6)


def test_sr_losses_prefer_the_preferred_pair():
    p = _hand_pair(1.5)
    aug = {k + "_aug": v for k, v in _hand_pair(0.5).items()}
    for fn in (L.sr_dpo, L.sr_ipo):
        good, m = fn(**p, **aug, beta=0.1, lam=0.5)
        bad, _ = fn(**_flipped(p), **aug, beta=0.1, lam=0.5)
        assert float(good) < float(bad), fn.__name__
        assert float(m["prompt_augmented_accuracy"]) == 1.0
        np.testing.assert_allclose(float(m["delta"]), 0.05, rtol=1e-5)
    # A positive Delta raises the bar: the same pair costs more under Sr-DPO than under DPO.
    assert float(L.sr_dpo(**p, **aug, beta=0.1, lam=0.5)[0]) > float(L.dpo(**p, beta=0.1)[0])


def test_values_at_policy_equal_reference():
    p = _hand_pair(0.0)
    aug = {k + "_aug": v for k, v in p.items()}
    np.testing.assert_allclose(float(L.dpo(**p, beta=0.1)[0]), math.log(2.0), rtol=1e-7)
    np.testing.assert_allclose(float(L.sr_dpo(**p, **aug, beta=0.1, lam=1.0)[0]), math.log(2.0), rtol=1e-7)
    np.testing.assert_allclose(float(L.robust(**p, beta=0.1, eps=0.3)[0]), math.log(2.0), rtol=1e-6)
    np.testing.assert_allclose(float(L.robust(**p, beta=0.1, eps=0.3, form="unbiased")[0]), math.log(2.0),
                               rtol=1e-6)
    np.testing.assert_allclose(float(L.ipo(**p, beta=0.1)[0]), 25.0, rtol=1e-7)  # (1 / (2 * 0.1))^2
    np.testing.assert_allclose(float(L.hinge(**p, beta=0.1)[0]), 1.0, rtol=1e-7)
    z = np.zeros(3, np.float32)
    np.testing.assert_allclose(float(L.bt_reward(z, z)[0]), math.log(2.0), rtol=1e-7)


def test_ipo_mean_divides_each_log_ratio_by_its_token_count():
    p = dict(policy_chosen=np.array([-8.0], np.float32), ref_chosen=np.array([-10.0], np.float32),
             policy_rejected=np.array([-12.0], np.float32), ref_rejected=np.array([-10.0], np.float32))
    loss, m = L.ipo(**p, beta=0.5, normalize="mean", chosen_tokens=np.array([4.0]), rejected_tokens=np.array([2]))
    h = 2.0 / 4.0 - (-2.0) / 2.0  # 1.5
    np.testing.assert_allclose(float(m["margin"]), h, rtol=1e-7)
    np.testing.assert_allclose(float(loss), (h - 1.0) ** 2, rtol=1e-6)
    np.testing.assert_allclose(float(L.ipo(**p, beta=0.5)[0]), (4.0 - 1.0) ** 2, rtol=1e-6)  # paper form


# ----------------------------------------------------------------------------------------------------------
# Reward-model losses
# ----------------------------------------------------------------------------------------------------------

def test_soft_label_with_hard_labels_equals_bradley_terry():
    rng = np.random.default_rng(9)
    r1, r2 = rng.normal(size=B).astype(np.float32), rng.normal(size=B).astype(np.float32)
    hard = (rng.uniform(size=B) < 0.5).astype(np.float32)
    hard[:2] = [0.0, 1.0]
    chosen = np.where(hard == 1.0, r1, r2)
    rejected = np.where(hard == 1.0, r2, r1)
    soft_loss, soft_m = L.soft_label_reward(r1, r2, hard)
    bt_loss, bt_m = L.bt_reward(chosen, rejected)
    np.testing.assert_allclose(float(soft_loss), float(bt_loss), rtol=1e-6)
    for k in ("accuracy", "margin"):
        np.testing.assert_allclose(float(soft_m[k]), float(bt_m[k]), rtol=1e-6, err_msg=k)
    np.testing.assert_allclose(float(L.soft_label_reward(r1, r2, np.ones(B))[0]), float(L.bt_reward(r1, r2)[0]),
                               rtol=1e-6)
    np.testing.assert_allclose(float(L.soft_label_reward(r1, r2, np.zeros(B))[0]), float(L.bt_reward(r2, r1)[0]),
                               rtol=1e-6)


def test_bt_margin_shifts_the_logit():
    rng = np.random.default_rng(10)
    rc, rr = rng.normal(size=B).astype(np.float32), rng.normal(size=B).astype(np.float32)
    m = rng.uniform(0.5, 2.0, B).astype(np.float32)
    shifted, metrics = L.bt_reward(rc, rr, margin=m)
    np.testing.assert_allclose(float(shifted), float(L.bt_reward(rc - m, rr)[0]), rtol=1e-6)
    assert float(shifted) > float(L.bt_reward(rc, rr)[0])  # a required margin makes every pair harder
    np.testing.assert_allclose(float(L.bt_reward(rc, rr, margin=0.7)[0]),
                               float(L.bt_reward(rc, rr, margin=np.full(B, 0.7, np.float32))[0]), rtol=1e-7)
    np.testing.assert_allclose(float(metrics["margin"]), float(np.mean(rc - rr)), rtol=1e-5)


def test_bt_prefers_correctly_ordered_scores():
    good, m = L.bt_reward(np.array([2.0, 1.0]), np.array([0.0, -1.0]))
    bad, m_bad = L.bt_reward(np.array([0.0, -1.0]), np.array([2.0, 1.0]))
    assert float(good) < float(bad)
    assert float(m["accuracy"]) == 1.0 and float(m_bad["accuracy"]) == 0.0
    assert float(m["margin"]) == 2.0


def test_sft_ignores_padding_even_when_it_is_minus_infinity():
    lp = np.array([[-1.0, -2.0, -np.inf], [-0.5, -np.inf, -np.inf], [-np.inf, -np.inf, -np.inf]], np.float32)
    mask = np.array([[1, 1, 0], [1, 0, 0], [0, 0, 0]], bool)
    reductions = {"token": 3.5 / 3, "sequence_mean": (1.5 + 0.5) / 2, "sequence_sum": 3.5 / 2}

    @jax.jit  # one program for all reductions keeps the test fast
    def losses_and_grads(x):
        return {r: jax.value_and_grad(lambda y, r=r: L.sft_nll(y, mask, reduction=r)[0])(x) for r in reductions}

    for reduction, (loss, g) in losses_and_grads(jnp.asarray(lp)).items():
        np.testing.assert_allclose(float(loss), reductions[reduction], rtol=1e-6, err_msg=reduction)
        assert np.all(np.isfinite(np.asarray(g))) and np.all(np.asarray(g)[~mask] == 0.0), reduction
    loss, m = L.sft_nll(np.zeros((2, 3), np.float32), np.zeros((2, 3), np.float32))
    assert float(loss) == 0.0 and float(m["tokens"]) == 0.0  # an all-padding batch is 0, not NaN


# ----------------------------------------------------------------------------------------------------------
# Hyperparameter and input errors
# ----------------------------------------------------------------------------------------------------------

PAIR = _hand_pair(1.0)
AUG = {k + "_aug": v for k, v in PAIR.items()}


@pytest.mark.parametrize("call, match", [
    (lambda: L.dpo(**PAIR, beta=0.0), r"beta must be > 0.*beta=0\.0"),
    (lambda: L.ipo(**PAIR, beta=-1.0), r"beta must be > 0"),
    (lambda: L.hinge(**PAIR, beta=float("nan")), r"beta must be > 0"),
    (lambda: L.sr_dpo(**PAIR, **AUG, beta=0.0), r"beta must be > 0"),
    (lambda: L.sr_dpo(**PAIR, **AUG, lam=-0.1), r"lam must be >= 0.*lam=-0\.1"),
    (lambda: L.sr_ipo(**PAIR, **AUG, lam=-1.0), r"lam must be >= 0"),
    (lambda: L.robust(**PAIR, eps=0.5), r"eps must be in \[0, 0\.5\).*eps=0\.5"),
    (lambda: L.robust(**PAIR, eps=-0.01), r"eps must be in \[0, 0\.5\)"),
    (lambda: L.robust(**PAIR, form="sigmoid"), r"form must be one of 'conservative', 'unbiased'"),
    (lambda: L.ipo(**PAIR, normalize="avg"), r"normalize must be one of 'sum', 'mean'"),
    (lambda: L.ipo(**PAIR, normalize="mean"), r"normalize='mean' needs chosen_tokens and rejected_tokens"),
    (lambda: L.sft_nll(np.zeros((2, 3)), np.ones((2, 3)), reduction="mean"), r"reduction must be one of"),
    (lambda: L.sft_nll(np.zeros((2, 3)), np.ones((2, 4))), r"mask must have the shape of token_logps"),
    (lambda: L.dpo(np.zeros(3), np.zeros(2), np.zeros(3), np.zeros(3)), r"policy_rejected\[2\]"),
    (lambda: L.dpo(np.zeros((2, 3)), np.zeros((2, 3)), np.zeros((2, 3)), np.zeros((2, 3))),
     r"policy_chosen must have shape \[B\]"),
    (lambda: L.sr_dpo(**PAIR, **{k: np.zeros(2) for k in AUG}), r"prompt-augmented log-probs have shape"),
    (lambda: L.bt_reward(np.zeros(3), np.zeros(3), margin=np.zeros(2)), r"margin must be a scalar or have shape"),
    (lambda: L.soft_label_reward(np.zeros(2), np.zeros(2), np.array([0.5, 1.2])), r"p1 must hold probabilities"),
    (lambda: L.get_loss("kto"), r"unknown loss 'kto'; known losses: dpo, hinge, ipo"),
])
def test_bad_arguments_raise_clear_errors(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_registry_and_jit_with_traced_hyperparameters():
    assert L.LOSSES["sigmoid"] is L.dpo and L.LOSSES["dpo"] is L.dpo
    assert {"ipo", "hinge", "robust", "sr_dpo", "sr_ipo"} <= set(L.LOSSES)
    assert L.PROMPT_AUGMENTED_LOSSES <= set(L.LOSSES)
    assert L.get_loss("sr_ipo") is L.sr_ipo
    inp = pair_inputs(np.random.default_rng(11), augmented=True)
    plain = {k: v for k, v in inp.items() if not k.endswith("_aug")}
    fns = {fn.__name__: fn for fn in L.LOSSES.values()}  # "sigmoid" and "dpo" share one function

    def args(name):
        return inp if name in L.PROMPT_AUGMENTED_LOSSES else plain

    # beta traced: the hyperparameter checks are skipped inside jit, and the values are unchanged.
    jitted = jax.jit(lambda b: {name: fn(**args(name), beta=b) for name, fn in fns.items()})(jnp.float32(BETA))
    for name, fn in fns.items():
        eager, m_eager = fn(**args(name), beta=BETA)
        np.testing.assert_allclose(float(jitted[name][0]), float(eager), rtol=1e-6, err_msg=name)
        assert set(jitted[name][1]) == set(m_eager)


def test_low_precision_inputs_are_computed_in_float32():
    p = {k: v.astype(jnp.bfloat16) for k, v in _hand_pair(1.0).items()}
    loss, m = L.dpo(**p, beta=0.1)
    assert loss.dtype == jnp.float32 and m["margin"].dtype == jnp.float32


# ----------------------------------------------------------------------------------------------------------
# Properties
# ----------------------------------------------------------------------------------------------------------

finite = functools.partial(st.floats, allow_nan=False, allow_infinity=False)

# Each property runs one compiled program with traced inputs, so examples cost microseconds, not op dispatches.
_ZERO = jnp.zeros(1, jnp.float32)


@jax.jit
def _dpo_at(h, beta):
    return L.dpo(h + _ZERO, _ZERO, _ZERO, _ZERO, beta)[0]


@jax.jit
def _soft_both_orders(r1, r2, p1):
    a = L.soft_label_reward(r1, r2, p1)
    b = L.soft_label_reward(r2, r1, 1.0 - p1)
    return a[0], a[1]["margin"], b[0], b[1]["margin"]


@jax.jit
def _sr_dpo_grad_h(h, h_aug, beta, lam):
    return jax.grad(lambda x: L.sr_dpo(x + _ZERO, _ZERO, _ZERO, _ZERO, h_aug + _ZERO, _ZERO, _ZERO, _ZERO,
                                       beta, lam)[0])(h)


@settings(max_examples=30, deadline=None)
@given(h1=finite(-60.0, 60.0), h2=finite(-60.0, 60.0), beta=finite(0.01, 2.0))
def test_dpo_loss_is_decreasing_in_the_margin(h1, h2, beta):
    lo, hi = sorted((h1, h2))
    loss_lo = float(_dpo_at(jnp.float32(lo), jnp.float32(beta)))
    loss_hi = float(_dpo_at(jnp.float32(hi), jnp.float32(beta)))
    assert loss_lo >= loss_hi - 1e-6
    assert loss_hi >= 0.0


@settings(max_examples=30, deadline=None)
@given(r1=finite(-20.0, 20.0), r2=finite(-20.0, 20.0), p1=finite(0.0, 1.0))
def test_soft_label_loss_is_symmetric_under_swapping_candidates(r1, r2, p1):
    loss, margin, swapped, margin_swapped = _soft_both_orders(*(jnp.full(1, v, jnp.float32) for v in (r1, r2, p1)))
    np.testing.assert_allclose(float(swapped), float(loss), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(float(margin_swapped), float(margin), rtol=1e-5, atol=1e-6)
    # Cross-entropy is minimised where the model's probability equals the label: loss >= label entropy.
    p = float(np.float32(p1))
    entropy = -sum(q * math.log(q) for q in (p, 1.0 - p) if q > 0)
    assert float(loss) >= entropy - 1e-5


@settings(max_examples=30, deadline=None)
@given(h=finite(-30.0, 30.0), h_aug=finite(-30.0, 30.0), lam=finite(0.0, 2.0), beta=finite(0.05, 1.0))
def test_sr_dpo_weight_is_the_sigmoid_of_the_shifted_logit(h, h_aug, lam, beta):
    """d L / d h = -beta * sigmoid(-(beta h - lam Delta)): the per-sample adaptive weight of Sr-DPO."""
    h, h_aug, lam, beta = (np.float32(v) for v in (h, h_aug, lam, beta))
    g = float(_sr_dpo_grad_h(h, h_aug, beta, lam))
    z = np.float64(beta) * h - np.float64(lam) * beta * h_aug
    np.testing.assert_allclose(g, -beta * np_sigmoid(-z), rtol=1e-4, atol=1e-6)


# ----------------------------------------------------------------------------------------------------------
# Sr-IPO scaling: where the refinement moves the IPO target
# ----------------------------------------------------------------------------------------------------------

def _sr_ipo_optimum(beta, lam, h_aug, delta_units):
    """The margin h that minimises Sr-IPO for one pair with prompt-augmented margin h_aug (grad root, bisection)."""
    aug = dict(policy_chosen_aug=np.array([h_aug]), policy_rejected_aug=np.array([0.0]),
               ref_chosen_aug=np.array([0.0]), ref_rejected_aug=np.array([0.0]))

    def grad(h):
        return float(jax.grad(lambda pc: L.sr_ipo(pc, jnp.zeros(1), jnp.zeros(1), jnp.zeros(1), **aug, beta=beta,
                                                  lam=lam, delta_units=delta_units)[0])(jnp.array([h]))[0])
    lo, hi = -100.0, 100.0
    for _ in range(80):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if grad(mid) < 0 else (lo, mid)
    return (lo + hi) / 2


def test_sr_ipo_scaling_paper_form_shifts_the_target_by_lam_beta():
    """The paper's Sr-IPO (Delta = beta * h_aug next to the unscaled h): optimum h* = 1/(2 beta) + lam beta h_aug.
    With h_aug at the IPO target the shift is lam * beta of the target: 5% at lam 0.5, beta 0.1 (the size the
    study measured); the log-ratio form shifts it by lam (50%), as lam weighs Delta in Sr-DPO."""
    beta, lam = 0.1, 0.5
    target = 1 / (2 * beta)
    assert _sr_ipo_optimum(beta, 0.0, target, "reward") == pytest.approx(target, abs=1e-6)
    paper = _sr_ipo_optimum(beta, lam, target, "reward")
    assert paper == pytest.approx(target + lam * beta * target, abs=1e-6)
    assert (paper - target) / target == pytest.approx(0.05, abs=1e-6)
    log_ratio = _sr_ipo_optimum(beta, lam, target, "log_ratio")
    assert (log_ratio - target) / target == pytest.approx(lam, abs=1e-6)
    # at lam = 0 both forms are IPO; Sr-DPO's shift of beta*h, in the same units, is lam * Delta = lam beta h_aug
    inp = pair_inputs(np.random.default_rng(11), augmented=True)
    a, _ = L.sr_ipo(**inp, beta=beta, lam=0.0, delta_units="log_ratio")
    b, _ = L.ipo(**{k: v for k, v in inp.items() if not k.endswith("_aug")}, beta=beta)
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    with pytest.raises(ValueError, match="delta_units"):
        L.sr_ipo(**inp, beta=beta, lam=lam, delta_units="nats")
