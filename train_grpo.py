"""GRPO with Progressive Thinking Suppression Training (PAPER.md section 3).

The math sits at the top as small pure functions; the training loop below uses them.
They follow the semantics of verl's `verl/trainer/ppo/core_algos.py`
(`compute_grpo_outcome_advantage`, `compute_policy_loss_vanilla`, `kl_penalty` with
`low_var_kl`, `agg_loss`): same values and gradients for the same inputs and modes.
"""

import torch

AGG_MODES = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm")


def masked_sum(x, mask, dim=None):
    """Sum of `x` over the positions where `mask` is 1 (all of them, or along `dim`).

    Values outside the mask never reach the result, not even NaN or inf from padding.
    Example: x=[[1, 2, 9]], mask=[[1, 1, 0]] -> 3.
    """
    return torch.where(mask.bool(), x, torch.zeros_like(x)).sum(dim)


def masked_mean(x, mask, dim=None):
    """Mean of `x` over the positions where `mask` is 1 (all of them, or along `dim`).

    An empty mask gives 0 rather than 0/0.
    Example: x=[[1, 2, 9]], mask=[[1, 1, 0]] -> 1.5; along dim=-1 -> [1.5].
    """
    return masked_sum(x, mask, dim) / mask.to(x.dtype).sum(dim).clamp(min=1)


def group_advantages(rewards, group_size, eps=1e-6, scale=True):
    """GRPO advantages (Eq. 1; Eq. 2 only changes the group size G_s per PTST stage).

    `rewards` is [N] with the G = `group_size` samples of each prompt consecutive.
    A_i = (r_i - mean(group)) / (std(group) + eps), std unbiased as torch.std (verl's
    choice); `scale=False` gives A_i = r_i - mean(group) (Dr. GRPO). A group whose
    rewards are all equal carries no signal and gets exactly 0: without that rule
    float round-off in the mean (seven rewards of 0.1 in float32) would be divided by
    eps and become a spurious advantage of about -0.007.
    Example: rewards=[1, 0, 0, 0], G=4 -> mean 0.25, std sqrt(0.75/3) = 0.5,
    A = [1.5, -0.5, -0.5, -0.5] (up to eps); scale=False -> [0.75, -0.25, -0.25, -0.25].
    """
    if rewards.dim() != 1 or group_size < 2 or rewards.numel() % group_size:
        raise ValueError(
            f"rewards must be [N] with N a multiple of group_size >= 2, got shape "
            f"{tuple(rewards.shape)} and group_size={group_size}"
        )
    if not rewards.is_floating_point():
        rewards = rewards.float()
    groups = rewards.reshape(-1, group_size)
    advantages = groups - groups.mean(dim=-1, keepdim=True)
    if scale:
        advantages = advantages / (groups.std(dim=-1, keepdim=True) + eps)
    all_equal = (groups == groups[:, :1]).all(dim=-1, keepdim=True)
    return torch.where(all_equal, torch.zeros_like(advantages), advantages).view(-1)


def kl_penalty(logp, ref_logp):
    """Per-token k3 estimate of KL(pi || pi_ref), the KL term of Eq. 1.

    k3 = pi_ref/pi - log(pi_ref/pi) - 1 = exp(d) - d - 1 with d = ref_logp - logp:
    never negative, 0 where the two policies agree. As verl's `low_var_kl`, d is
    clamped to [-20, 20] before exp and the result to [-10, 10], so one wild token
    cannot blow up the loss.
    Example: logp=log(0.5), ref_logp=log(0.25) -> d=-ln 2 -> 0.5 + ln 2 - 1 = 0.1931.
    """
    log_ratio = (ref_logp - logp).clamp(-20.0, 20.0)
    return (log_ratio.exp() - log_ratio - 1.0).clamp(-10.0, 10.0)


def aggregate_loss(per_token, mask, agg="token-mean", global_tokens=None, global_seqs=None):
    """Reduce a per-token loss [N, T] to a scalar the way verl's `agg_loss` does.

    - `token-mean`: sum over response tokens / number of response tokens.
    - `seq-mean-token-mean` (original GRPO): mean over sequences of each sequence's
      token mean.
    - `seq-mean-token-sum-norm` (Dr. GRPO): mean over sequences of each sequence's
      token sum divided by the constant T = mask.shape[-1].
    Sequences with no response token do not count as sequences.

    Gradient accumulation over micro-batches (and ranks) is exact when the
    denominator is the whole optimizer step's: pass `global_tokens` (response tokens
    in the step) for `token-mean` or `global_seqs` (sequences in the step) for the
    seq modes, and sum the micro-batch losses. Under DDP, which averages gradients
    over ranks, also multiply each loss by the world size. `seq-mean-token-sum-norm`
    needs every micro-batch padded to the same T.
    Example (token-mean): a step has sequences with 3 and 1 response tokens and
    per-token losses [1, 2, 3] and [6], mean 12/4 = 3. Split into two micro-batches
    with global_tokens=4 they give 6/4 and 6/4, which sum to 3.
    """
    lengths = mask.to(per_token.dtype).sum(-1)
    token_sums = masked_sum(per_token, mask, dim=-1)
    if agg == "token-mean":
        total = token_sums.sum()
        count = lengths.sum() if global_tokens is None else global_tokens
    elif agg in ("seq-mean-token-mean", "seq-mean-token-sum-norm"):
        per_seq_norm = lengths.clamp(min=1) if agg == "seq-mean-token-mean" else mask.shape[-1]
        total = (token_sums / per_seq_norm).sum()
        count = (lengths > 0).sum() if global_seqs is None else global_seqs
    else:
        raise ValueError(f"agg must be one of {AGG_MODES}, got {agg!r}")
    return total / max(count, 1)


def policy_loss(
    logp,
    old_logp,
    advantages,
    mask,
    clip_low=0.2,
    clip_high=0.2,
    ref_logp=None,
    kl_coef=0.0,
    agg="token-mean",
    dual_clip=None,
    global_tokens=None,
    global_seqs=None,
):
    """GRPO loss of Eq. 1 (minimised, so the objective's sign is flipped), per token.

    Inputs are [N, T] with `mask` marking response tokens; `advantages` is [N] and
    each sequence's advantage is broadcast over its tokens. With r = pi/pi_old (log
    ratio clamped to [-20, 20] before exp, as verl):
        loss_t = max(-A r, -A clip(r, 1 - clip_low, 1 + clip_high))
    `dual_clip=c` (> 1) caps the loss of negative-advantage tokens at -A c, so a
    token whose probability already rose far cannot dominate the step. With
    `ref_logp`, `kl_coef * kl_penalty(logp, ref_logp)` is added per token (the
    paper's beta = 1e-2). The sum is reduced by `aggregate_loss` (`agg`,
    `global_tokens`, `global_seqs` are documented there).
    Metrics, local to this call and detached: `clip_frac_high` (A > 0 tokens held at
    1 + clip_high), `clip_frac_low` (A < 0 tokens held at 1 - clip_low); their sum is
    verl's pg_clipfrac; `dual_clip_frac` (verl's pg_clipfrac_lower), `ppo_kl` (mean
    of log pi_old - log pi, verl's ppo_kl) and, with `ref_logp`, `kl_ref` (token mean
    of the k3 term).
    Eq. 2 (PTST) applies this same loss in every stage; only the group size G_s and
    the response length cap L_s change.
    Example: one sequence, A=1, ratios [1.5, 1.0] -> losses [-1.2, -1.0]: the first
    token is clipped (no gradient), token-mean loss -1.1, clip_frac_high 0.5.
    """
    if logp.shape != old_logp.shape or logp.shape != mask.shape or advantages.shape != logp.shape[:1]:
        raise ValueError(
            f"expected logp, old_logp, mask [N, T] and advantages [N], got {tuple(logp.shape)}, "
            f"{tuple(old_logp.shape)}, {tuple(mask.shape)}, {tuple(advantages.shape)}"
        )
    if dual_clip is not None and dual_clip <= 1.0:
        raise ValueError(f"dual_clip must be > 1, got {dual_clip}")
    log_ratio = (logp - old_logp).clamp(-20.0, 20.0)
    ratio = log_ratio.exp()
    adv = advantages.unsqueeze(-1)
    unclipped = -adv * ratio
    clipped = -adv * ratio.clamp(1.0 - clip_low, 1.0 + clip_high)
    per_token = torch.maximum(unclipped, clipped)
    was_clipped = clipped > unclipped
    metrics = {
        "clip_frac_high": masked_mean((was_clipped & (adv > 0)).to(logp.dtype), mask),
        "clip_frac_low": masked_mean((was_clipped & (adv < 0)).to(logp.dtype), mask),
        "ppo_kl": masked_mean(-log_ratio, mask),
    }
    dual_clipped = torch.zeros_like(was_clipped)
    if dual_clip is not None:
        dual_clipped = (adv < 0) & (per_token > -adv * dual_clip)
        per_token = torch.where(adv < 0, torch.minimum(per_token, -adv * dual_clip), per_token)
    metrics["dual_clip_frac"] = masked_mean(dual_clipped.to(logp.dtype), mask)
    if ref_logp is not None:
        kl = kl_penalty(logp, ref_logp)
        metrics["kl_ref"] = masked_mean(kl, mask)
        per_token = per_token + kl_coef * kl
    loss = aggregate_loss(per_token, mask, agg, global_tokens, global_seqs)
    return loss, {name: value.detach() for name, value in metrics.items()}
