"""GRPO math (Eq. 1, Eq. 2): hand-computed values, parity with verl, gradients."""

import math
from collections import defaultdict

import pytest
import torch

from train_grpo import (
    AGG_MODES,
    aggregate_loss,
    group_advantages,
    kl_penalty,
    masked_mean,
    masked_sum,
    policy_loss,
)


def f64(values):
    return torch.tensor(values, dtype=torch.float64)


# ---------------------------------------------------------------- hand-computed values


def test_group_advantages_hand_values():
    rewards = f64([1, 0, 0, 0, 1, 1, 0, 0])
    # group 1: mean 0.25, unbiased var (0.75^2 + 3 * 0.25^2) / 3 = 0.25, std 0.5
    #   (the population std sqrt(0.75 / 4) = 0.433 would give 1.732, not 1.5)
    # group 2: mean 0.5, unbiased var 4 * 0.25 / 3 = 1/3, 0.5 / sqrt(1/3) = 0.8660254
    s = 0.5 / math.sqrt(1 / 3)
    expected = f64([1.5, -0.5, -0.5, -0.5, s, s, -s, -s])
    torch.testing.assert_close(group_advantages(rewards, 4, eps=0.0), expected)
    # eps is added to the std: 0.75 / (0.5 + 1e-6)
    assert group_advantages(rewards, 4)[0].item() == pytest.approx(0.75 / (0.5 + 1e-6), rel=1e-12)


def test_group_advantages_without_std_scaling():
    rewards = f64([1, 0, 0, 0, 1, 1, 0, 0])
    # r - mean: group 1 mean 0.25, group 2 mean 0.5
    expected = f64([0.75, -0.25, -0.25, -0.25, 0.5, 0.5, -0.5, -0.5])
    torch.testing.assert_close(group_advantages(rewards, 4, scale=False), expected)


@pytest.mark.parametrize("scale", [True, False])
def test_all_equal_groups_get_exactly_zero(scale):
    # seven rewards of 0.1 in float32: mean - 0.1 = -7.5e-9 and std = 8e-9, so the bare
    # formula gives about -0.0074 instead of 0
    rewards = torch.tensor([0.1] * 7 + [1.0] * 7 + [0.0] * 7 + [1, 0, 0, 0, 0, 0, 0])
    advantages = group_advantages(rewards, 7, scale=scale)
    assert torch.equal(advantages[:21], torch.zeros(21))
    assert (advantages[21:] != 0).all()
    assert torch.isfinite(advantages).all()


@pytest.mark.parametrize("shape, group_size", [((5,), 4), ((4,), 1), ((2, 4), 4)])
def test_group_advantages_rejects_bad_input(shape, group_size):
    with pytest.raises(ValueError, match="group_size"):
        group_advantages(torch.zeros(shape), group_size)


def test_kl_penalty_hand_values_and_clamps():
    logp = f64([math.log(0.5), -1.0, 0.0, 0.0, 0.0, 0.0])
    ref_logp = f64([math.log(0.25), -1.0, 30.0, -30.0, -5.0, 2.0])
    expected = f64([
        0.5 + math.log(2) - 1,  # d = -ln 2: exp(d) - d - 1 = 0.1931
        0.0,  # d = 0: the two policies agree
        10.0,  # d = 30 -> clamped to 20; exp(20) - 21 -> clamped to 10
        10.0,  # d = -30 -> clamped to -20; exp(-20) + 19 -> clamped to 10
        math.exp(-5) + 4,  # d = -5: 4.0067, inside both clamps
        math.exp(2) - 3,  # d = 2: 4.3891
    ])
    torch.testing.assert_close(kl_penalty(logp, ref_logp), expected)


def test_masked_sum_and_mean_ignore_padding():
    x = f64([[1, 2, 9], [4, float("nan"), float("inf")]])
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    assert masked_sum(x, mask).item() == 7.0  # 1 + 2 + 4
    assert masked_mean(x, mask).item() == pytest.approx(7 / 3)
    torch.testing.assert_close(masked_mean(x, mask, dim=-1), f64([1.5, 4.0]))
    assert masked_mean(x, torch.zeros_like(mask)).item() == 0.0


# Two sequences, T = 3, old_logp = 0 so logp is the log-ratio; clip 0.2 on both sides.
#   seq 0, A = +1, ratios [1.5, 1.0, 0.9]: losses max(-A r, -A clip(r)) =
#       [max(-1.5, -1.2), -1.0, -0.9] = [-1.2, -1.0, -0.9]   (1.5 clipped high)
#   seq 1, A = -1, ratio [0.5] then padding: loss max(0.5, 0.8) = 0.8   (clipped low)
HAND_LOGP = [[math.log(1.5), 0.0, math.log(0.9)], [math.log(0.5), 5.0, -3.0]]
HAND_MASK = [[1, 1, 1], [1, 0, 0]]
HAND_LOSS = {
    "token-mean": (-1.2 - 1.0 - 0.9 + 0.8) / 4,  # -0.575
    "seq-mean-token-mean": (-3.1 / 3 + 0.8 / 1) / 2,  # -0.1167
    "seq-mean-token-sum-norm": (-3.1 / 3 + 0.8 / 3) / 2,  # -0.3833, T = 3
}


@pytest.mark.parametrize("agg", AGG_MODES)
def test_policy_loss_hand_values(agg):
    logp = f64(HAND_LOGP)
    loss, metrics = policy_loss(logp, torch.zeros_like(logp), f64([1, -1]), torch.tensor(HAND_MASK), agg=agg)
    assert loss.item() == pytest.approx(HAND_LOSS[agg])
    assert metrics["clip_frac_high"].item() == pytest.approx(1 / 4)
    assert metrics["clip_frac_low"].item() == pytest.approx(1 / 4)
    assert metrics["dual_clip_frac"].item() == 0.0
    # mean of log pi_old - log pi over the 4 response tokens
    assert metrics["ppo_kl"].item() == pytest.approx(-(math.log(1.5) + math.log(0.9) + math.log(0.5)) / 4)
    assert "kl_ref" not in metrics


def test_dual_clip_caps_negative_advantage_loss():
    # A = -1, ratios [4, 2]: PPO losses max(4, 1.2) = 4 and max(2, 1.2) = 2;
    # dual clip c = 3 caps them at -A c = 3: [3, 2]
    logp = f64([[math.log(4), math.log(2)]])
    args = (logp, torch.zeros_like(logp), f64([-1]), torch.ones(1, 2))
    plain, _ = policy_loss(*args)
    capped, metrics = policy_loss(*args, dual_clip=3.0)
    assert plain.item() == pytest.approx((4 + 2) / 2)
    assert capped.item() == pytest.approx((3 + 2) / 2)
    assert metrics["dual_clip_frac"].item() == pytest.approx(1 / 2)
    assert metrics["clip_frac_low"].item() == 0.0


def test_log_ratio_is_clamped_at_20():
    # A = -1 and log-ratio 25: the loss is -A exp(20), not exp(25)
    logp = f64([[25.0]])
    loss, _ = policy_loss(logp, torch.zeros_like(logp), f64([-1]), torch.ones(1, 1))
    assert loss.item() == pytest.approx(math.exp(20))


def test_kl_term_is_added_per_token():
    # ratio 1 and A = 0: the PPO part is 0; k3 with d = ln(0.25 / 0.5) is 0.1931
    logp = f64([[math.log(0.5)]])
    ref_logp = f64([[math.log(0.25)]])
    loss, metrics = policy_loss(logp, logp, f64([0]), torch.ones(1, 1), ref_logp=ref_logp, kl_coef=0.1)
    k3 = 0.5 + math.log(2) - 1
    assert loss.item() == pytest.approx(0.1 * k3)
    assert metrics["kl_ref"].item() == pytest.approx(k3)


def test_policy_loss_rejects_bad_input():
    logp, mask = torch.zeros(2, 3), torch.ones(2, 3)
    with pytest.raises(ValueError, match="agg"):
        policy_loss(logp, logp, torch.zeros(2), mask, agg="seq-mean-token-sum")
    with pytest.raises(ValueError, match="dual_clip"):
        policy_loss(logp, logp, torch.zeros(2), mask, dual_clip=1.0)
    with pytest.raises(ValueError, match="advantages"):
        policy_loss(logp, logp, torch.zeros(2, 3), mask)


# ---------------------------------------------------------------- closed-form gradients


@pytest.mark.parametrize("agg", AGG_MODES)
def test_gradient_matches_closed_form(agg):
    # d loss_t / d logp_t = -A r on the unclipped branch, 0 on the clipped and the
    # dual-clipped branches (the loss is constant there), plus the KL term
    # kl_coef * (1 - exp(ref - logp)); times the token's aggregation weight.
    log_ratio = f64([[0.1, 0.3], [-0.5, 0.05], [math.log(5), 0.0]])
    # seq 0 A=+2: r=1.105 unclipped, r=1.35 clipped high
    # seq 1 A=-1: r=0.607 clipped low, r=1.05 unclipped
    # seq 2 A=-1: r=5 dual-clipped at c=3, then padding
    advantages = f64([2, -1, -1])
    mask = torch.tensor([[1, 1], [1, 1], [1, 0]])
    old_logp = f64([[-1.0, -2.0], [-0.5, -1.5], [-3.0, -1.0]])
    logp = (old_logp + log_ratio).requires_grad_()
    ref_logp = old_logp + f64([[0.2, -0.1], [0.3, 0.0], [-0.4, 0.0]])
    loss, _ = policy_loss(logp, old_logp, advantages, mask, ref_logp=ref_logp, kl_coef=0.1, agg=agg, dual_clip=3.0)
    loss.backward()

    ratio = log_ratio.exp()
    on_unclipped_branch = torch.tensor([[1, 0], [0, 1], [0, 0]])
    grad_per_token = -advantages[:, None] * ratio * on_unclipped_branch
    grad_per_token += 0.1 * (1 - (ref_logp - logp.detach()).exp())
    weight = {
        "token-mean": torch.full((3, 1), 1 / 5),  # 5 response tokens
        "seq-mean-token-mean": 1 / (3 * f64([[2], [2], [1]])),  # 3 sequences, own length
        "seq-mean-token-sum-norm": torch.full((3, 1), 1 / (3 * 2)),  # 3 sequences, T = 2
    }[agg]
    torch.testing.assert_close(logp.grad, grad_per_token * weight * mask)


# ---------------------------------------------------------------- micro-batches


def random_batch(seed, n=8, t=6):
    """Random log-probs around the old policy (so every clipping branch occurs),
    ragged masks with one empty response, and finite junk in the padding."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, t + 1, (n,), generator=g)
    lengths[3] = 0
    mask = (torch.arange(t)[None, :] < lengths[:, None]).long()
    old_logp = -torch.rand(n, t, generator=g, dtype=torch.float64) * 3
    logp = old_logp + 0.4 * torch.randn(n, t, generator=g, dtype=torch.float64)
    logp[::2, 0] += 1.5  # ratio > 4.5: past a dual clip of 3 where A < 0
    ref_logp = logp + 0.3 * torch.randn(n, t, generator=g, dtype=torch.float64)
    logp = torch.where(mask.bool(), logp, torch.full_like(logp, 7.0))
    rewards = torch.rand(n, generator=g, dtype=torch.float64)
    return logp, old_logp, ref_logp, rewards, mask


@pytest.mark.parametrize("agg", AGG_MODES)
def test_micro_batches_sum_to_full_batch_loss_and_gradient(agg):
    logp, old_logp, ref_logp, rewards, mask = random_batch(0)
    advantages = group_advantages(rewards, 4)
    kwargs = dict(ref_logp=ref_logp, kl_coef=0.05, agg=agg, dual_clip=3.0)

    full_logp = logp.clone().requires_grad_()
    full_loss, _ = policy_loss(full_logp, old_logp, advantages, mask, **kwargs)
    full_loss.backward()

    global_tokens = int(mask.sum())
    global_seqs = int((mask.sum(-1) > 0).sum())
    split_logp = logp.clone().requires_grad_()
    split_loss = 0.0
    for part in (slice(0, 3), slice(3, 8)):
        kwargs["ref_logp"] = ref_logp[part]
        loss, _ = policy_loss(
            split_logp[part], old_logp[part], advantages[part], mask[part],
            global_tokens=global_tokens, global_seqs=global_seqs, **kwargs,
        )
        loss.backward()
        split_loss += loss.item()
    assert split_loss == pytest.approx(full_loss.item(), rel=1e-12)
    torch.testing.assert_close(split_logp.grad, full_logp.grad, rtol=1e-12, atol=1e-15)


def test_aggregate_loss_docstring_example():
    per_token = f64([[1, 2, 3], [6, 0, 0]])
    mask = torch.tensor([[1, 1, 1], [1, 0, 0]])
    assert aggregate_loss(per_token, mask).item() == 3.0
    halves = [aggregate_loss(per_token[i : i + 1], mask[i : i + 1], global_tokens=4) for i in (0, 1)]
    assert [h.item() for h in halves] == [1.5, 1.5]


# ---------------------------------------------------------------- verl oracle
# A compact re-statement of verl's formulas, read in volcengine/verl
# verl/trainer/ppo/core_algos.py (stored commit 012be9d9dcb7: compute_grpo_outcome_advantage,
# compute_policy_loss_vanilla, kl_penalty "low_var_kl") and the later global-batch
# agg_loss (dp_size=1 here), whose "seq-mean-token-sum-norm" is the mean over sequences
# divided by T. masked_mean as verl/utils/torch_functional.py. Used only as a test oracle.


def verl_masked_mean(values, mask, axis=None):
    return (torch.where(mask.bool(), values, 0.0) * mask).sum(axis) / (mask.sum(axis) + 1e-8)


def verl_grpo_outcome_advantage(scores, index, epsilon=1e-6, norm_adv_by_std_in_grpo=True):
    id2score = defaultdict(list)
    for i in range(len(scores)):
        id2score[index[i]].append(scores[i])
    id2mean = {idx: torch.mean(torch.stack(s)) for idx, s in id2score.items()}
    id2std = {idx: torch.std(torch.stack(s)) for idx, s in id2score.items()}
    out = scores.clone()
    for i in range(len(scores)):
        if norm_adv_by_std_in_grpo:
            out[i] = (scores[i] - id2mean[index[i]]) / (id2std[index[i]] + epsilon)
        else:
            out[i] = scores[i] - id2mean[index[i]]
    return out


def verl_agg_loss(loss_mat, loss_mask, loss_agg_mode):
    if loss_agg_mode == "token-mean":
        return (torch.where(loss_mask.bool(), loss_mat, 0.0) * loss_mask).sum() / loss_mask.sum()
    seq_mask = (torch.sum(loss_mask, dim=-1) > 0).float()
    if loss_agg_mode == "seq-mean-token-mean":
        seq_losses = torch.sum(loss_mat * loss_mask, dim=-1) / (torch.sum(loss_mask, dim=-1) + 1e-8)
        return (seq_losses * seq_mask).sum() / seq_mask.sum()
    seq_losses = torch.sum(loss_mat * loss_mask, dim=-1)  # seq-mean-token-sum-norm
    return (seq_losses * seq_mask).sum() / seq_mask.sum() / loss_mask.shape[-1]


def verl_policy_loss_vanilla(old_log_prob, log_prob, advantages, response_mask, loss_agg_mode,
                             cliprange_low, cliprange_high, clip_ratio_c):
    negative_approx_kl = torch.clamp(log_prob - old_log_prob, min=-20.0, max=20.0)
    ratio = torch.exp(negative_approx_kl)
    ppo_kl = verl_masked_mean(-negative_approx_kl, response_mask)
    pg_losses1 = -advantages * ratio
    pg_losses2 = -advantages * torch.clamp(ratio, 1 - cliprange_low, 1 + cliprange_high)
    clip_pg_losses1 = torch.maximum(pg_losses1, pg_losses2)
    pg_clipfrac = verl_masked_mean(torch.gt(pg_losses2, pg_losses1).float(), response_mask)
    pg_losses, pg_clipfrac_lower = clip_pg_losses1, torch.tensor(0.0)
    if clip_ratio_c is not None:  # verl always applies it (default 3.0); None = ours off
        pg_losses3 = -advantages * clip_ratio_c
        clip_pg_losses2 = torch.min(pg_losses3, clip_pg_losses1)
        pg_clipfrac_lower = verl_masked_mean(
            torch.gt(clip_pg_losses1, pg_losses3) * (advantages < 0).float(), response_mask
        )
        pg_losses = torch.where(advantages < 0, clip_pg_losses2, clip_pg_losses1)
    pg_loss = verl_agg_loss(pg_losses, response_mask, loss_agg_mode)
    return pg_loss, pg_clipfrac, ppo_kl, pg_clipfrac_lower


def verl_low_var_kl(logprob, ref_logprob):
    kl = torch.clamp(ref_logprob - logprob, min=-20, max=20)
    return torch.clamp(torch.exp(kl) - kl - 1, min=-10, max=10)


@pytest.mark.parametrize("scale", [True, False])
def test_group_advantages_match_verl(scale):
    rewards = torch.rand(24, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    rewards[8:16] = (rewards[8:16] > 0.5).double()  # a 0/1 group as from the hard reward
    index = [i // 8 for i in range(24)]
    expected = verl_grpo_outcome_advantage(rewards, index, norm_adv_by_std_in_grpo=scale)
    torch.testing.assert_close(group_advantages(rewards, 8, scale=scale), expected, rtol=1e-12, atol=0)


@pytest.mark.parametrize("agg", AGG_MODES)
@pytest.mark.parametrize("dual_clip", [None, 3.0])
@pytest.mark.parametrize("kl_coef", [0.0, 0.05])
def test_policy_loss_matches_verl(agg, dual_clip, kl_coef):
    logp, old_logp, ref_logp, rewards, mask = random_batch(2)
    advantages = group_advantages(rewards, 4)
    clip_low, clip_high = 0.2, 0.28  # asymmetric, so each bound is checked on its own

    ours_logp = logp.clone().requires_grad_()
    loss, metrics = policy_loss(
        ours_logp, old_logp, advantages, mask, clip_low, clip_high,
        ref_logp=ref_logp, kl_coef=kl_coef, agg=agg, dual_clip=dual_clip,
    )
    loss.backward()

    verl_logp = logp.clone().requires_grad_()
    verl_mask = mask.double()
    pg_loss, pg_clipfrac, ppo_kl, pg_clipfrac_lower = verl_policy_loss_vanilla(
        old_logp, verl_logp, advantages[:, None] * verl_mask, verl_mask, agg, clip_low, clip_high, dual_clip
    )
    kld = verl_low_var_kl(verl_logp, ref_logp)
    verl_loss = pg_loss + kl_coef * verl_agg_loss(kld, verl_mask, agg)  # as verl's actor adds kl_loss
    verl_loss.backward()

    assert loss.item() == pytest.approx(verl_loss.item(), rel=1e-7)
    torch.testing.assert_close(ours_logp.grad, verl_logp.grad, rtol=1e-7, atol=1e-12)
    assert (metrics["clip_frac_high"] + metrics["clip_frac_low"]).item() == pytest.approx(pg_clipfrac.item())
    assert metrics["dual_clip_frac"].item() == pytest.approx(pg_clipfrac_lower.item())
    assert metrics["ppo_kl"].item() == pytest.approx(ppo_kl.item())
    assert metrics["kl_ref"].item() == pytest.approx(verl_masked_mean(kld, verl_mask).item())
    # the random batch must exercise every branch, or this parity proves little
    assert metrics["clip_frac_high"] > 0 and metrics["clip_frac_low"] > 0
    assert dual_clip is None or metrics["dual_clip_frac"] > 0
