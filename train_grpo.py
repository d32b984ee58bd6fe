"""GRPO with Progressive Thinking Suppression Training: the RL stage of Vision-R1 (docs/method.md §3).

    torchrun --nproc_per_node 8 train_grpo.py --stage 1    # Vision-R1, stage 1: 4K x 16 (the defaults: the paper's run)
    python train_grpo.py --preset toy --stage 1 && python train_grpo.py --preset toy --stage 2   # the synthetic world, CPU
    python train_grpo.py --preset toy --schedule long      # ablations run through the same code (long, zero, ...)

Read top to bottom: the math as small pure functions (Eq. 1: group advantages, the clipped
policy loss with the k3 KL term and its aggregation; Eq. 2 only changes the group size and the
length cap per stage), the config, then a step's pieces and the loop that calls them:
`rollout` (this rank's prompts, G responses each) -> `score` (the schedule's reward, a name in
rewards.REWARDS) -> `group_advantages` -> `ppo_update` (old/ref log-probs, then the updates) ->
`step_metrics` -> log and checkpoint.
The log-prob passes pack each prompt (and encode its image) once for its group's responses
(`data.pack_shared_prompts`): the values and gradients of G separate prompt + response
sequences, without running G - 1 copies of the prompt.

The math follows the semantics of verl's `verl/trainer/ppo/core_algos.py`
(`compute_grpo_outcome_advantage`, `compute_policy_loss_vanilla`, `kl_penalty` with
`low_var_kl`, `agg_loss`): same values and gradients for the same inputs and modes.
Below, * marks settings the paper does not state, which take EasyR1's defaults (docs/method.md §3).
"""

import dataclasses
import math
import sys
from dataclasses import dataclass

import torch

import data
import generate as gen
import memplan
import model as M
import ptst
import rewards
from train_utils import (Logger, NonFiniteGuard, Timer, aligned_passes, all_reduce, command_line, exit_if_missing,
                         full_value, packed_inputs, parse_config, peak_memory_gib, refuse_bad_flags, resumed_step,
                         save_checkpoint, sharding_of, start_run)

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


# -----------------------------------------------------------------------------
# config: every hyperparameter in one place (docs/method.md §3; * marks the unconfirmed EasyR1 defaults)

@dataclass
class GRPOConfig:
    # PTST stage and checkpoints
    schedule: str = "vision-r1"                  # ptst.SCHEDULES name
    reward: str = ""                             # override the schedule's reward: a rewards.REWARDS name (hard, zero)
    stages: str = ""                             # override: 'LxGxSTEPS,...' (ptst.parse_schedule)
    stage: int = 1                               # which stage of the schedule this run trains (1-based)
    length_scale: str = "1"                      # e.g. 1/64: the paper's lengths scaled to a small world
    init: str = ""                               # start checkpoint; default: ptst.init_checkpoint
    ref: str = ""                                # frozen KL reference; default: the schedule's stage-1 start
    cold_start: str = "runs/vision-r1-ci/final"  # Vision-R1-CI (train_sft.py on the cold data)
    base: str = "checkpoints/Qwen2.5-VL-7B-Instruct"  # the base model (Vision-R1-Zero starts here)
    out_root: str = "runs/vision-r1"             # runs land in OUT_ROOT/SCHEDULE/stageN
    data: str = "vision_r1_rl.parquet"           # problem records (Vision-R1-rl parquet, JSONL, geometry3k)
    skip_bad: bool = False                       # skip and count bad records instead of failing
    min_pixels: int = 512 * 512                  # * images 512^2 - 2048^2 pixels
    max_pixels: int = 2048 * 2048                # * upper image bound in pixels
    # GRPO (Eq. 1)
    clip_low: float = 0.2                        # epsilon: the ratio's lower clip 1 - clip_low (Eq. 1)
    clip_high: float = 0.2                       # the ratio's upper clip 1 + clip_high (> clip_low: DAPO)
    dual_clip: float = 0.0                       # c > 1 caps negative-advantage losses at -A c; 0: off
    kl_coef: float = 1e-2                        # beta, k3 estimator, as a loss term
    agg: str = "token-mean"                      # * loss averaging: token-mean, seq-mean-token-mean, ...-sum-norm
    scale_advantages: bool = True                # False: Dr. GRPO's r - mean
    # rollout and optimisation
    prompts_per_rollout: int = 512               # * prompts per rollout step, over all ranks
    prompts_per_update: int = 128                # * prompts per optimizer update
    ppo_epochs: int = 1                          # * passes over each rollout's samples
    temperature: float = 1.0                     # * sampling temperature of the rollouts
    top_p: float = 1.0                           # * nucleus sampling of the rollouts (1: off)
    kv_budget_gib: float = 0.0                   # KV cache per rank (0: half the free GPU memory; CPU: 2^18 tokens)
    lr: float = 1e-6                             # * peak learning rate, held constant
    weight_decay: float = 1e-2                   # * AdamW's decoupled weight decay
    grad_clip: float = 1.0                       # * max global gradient norm
    micro_batch_tokens: int = 32768              # packed tokens per forward/backward
    activation_checkpointing: bool = True        # keep layer inputs only; recompute in backward
    ref_cpu_offload: bool = False                # keep the reference's shards in host memory between uses
    replicate_degree: int = 1                    # HSDP: N replicas, each sharded over world/N ranks (a node); 1: FSDP
    param_dtype: str = "bfloat16"                # compute dtype, any world size (fp32 masters and reduction); the reference's
    attention: str = "flash"                     # flash: flash-attn's kernels on CUDA (refused if not installed); sdpa: PyTorch's
    seed: int = 0                                # python, numpy and torch seeds; also the sampling stream's
    # the memory plan (memplan.py): config.json alone, no weights, data or processes
    plan: bool = False                           # print each phase's memory per GPU for this config and exit
    world_size: int = 0                          # GPUs the plan is for (0: this launch's WORLD_SIZE)
    gpu_memory_gib: float = 80.0                 # memory of one GPU: the plan warns of a phase that needs more
    # operations
    log_every: int = 1                           # steps between metrics lines (metrics.jsonl, stdout, wandb)
    table_every: int = 10                        # wandb table of sample completions
    save_every: int = 50                         # HF checkpoint + training state every K steps (0: end only)
    keep_last: int = 2                           # step checkpoints kept (weights and state; final always); 0: all
    dist_timeout_minutes: int = 120              # a collective's wait for a late rank before abort: rollouts have no
                                                 # collectives, so ranks finish them minutes apart; NCCL's default: 10
    max_nonfinite: int = 3                       # non-finite steps in a row (each skipped) that stop the run
    resume: bool = False                         # continue exactly from the output folder's latest training state
    wandb_project: str = "vision-r1"             # wandb project (WANDB_MODE=offline/disabled as usual)
    wandb_group: str = ""                        # wandb group: the runs to compare side by side
    run_name: str = ""                           # wandb run name (default: SCHEDULE-stageN)
    out: str = ""                                # filled in: the stage's folder

    def __post_init__(self):
        """Refuse values the run cannot use, naming the flag (parse_config: a usage error)."""
        refuse_bad_flags(self, positive=("stage", "prompts_per_rollout", "prompts_per_update", "ppo_epochs",
                                         "micro_batch_tokens", "temperature", "top_p", "grad_clip", "log_every",
                                         "max_nonfinite", "replicate_degree", "dist_timeout_minutes"),
                         non_negative=("clip_low", "clip_high", "dual_clip", "kl_coef", "lr", "weight_decay",
                                       "kv_budget_gib", "min_pixels", "max_pixels", "table_every", "save_every",
                                       "keep_last"),
                         world_multiples=("prompts_per_update",))  # each rank takes its share of an update
        if self.prompts_per_rollout % self.prompts_per_update:
            raise ValueError(f"--prompts-per-rollout {self.prompts_per_rollout}: must be a multiple of "
                             f"--prompts-per-update {self.prompts_per_update}")
        schedule = resolve_schedule(self)
        ptst.get_stage(schedule, self.stage)
        for k, stage in enumerate(schedule.stages, 1):
            if stage.group_size < 2:
                raise ValueError(f"--stages {self.stages}: stage {k} has group size {stage.group_size}; GRPO's "
                                 "advantages compare each response with the others of its group, so it needs >= 2")


# The defaults above are the paper's run; the toy preset is the synthetic world on CPU (pipeline.py, tests).
PRESETS = {
    "paper": dict(),
    "toy": dict(cold_start="runs/toy/ci/final", base="runs/toy/base/final", out_root="runs/toy/grpo",
                data="runs/toy/data/rl.jsonl", length_scale="1/32", min_pixels=28 * 28, max_pixels=112 * 112,
                prompts_per_rollout=16, prompts_per_update=16, lr=2e-5, micro_batch_tokens=4096,
                activation_checkpointing=False, save_every=10, table_every=5, param_dtype="float32"),
}


def resolve_schedule(cfg):
    """The schedule with command-line overrides (--stages, --reward) and the length scale applied."""
    schedule = ptst.get_schedule(cfg.schedule)
    if cfg.stages:
        schedule = ptst.parse_schedule(cfg.stages, like=schedule, name=cfg.schedule)
    if cfg.reward:
        schedule = dataclasses.replace(schedule, reward=cfg.reward)  # Schedule refuses an unknown name
    return ptst.scale_schedule(schedule, cfg.length_scale)


def start_flag(schedule, k):
    """The flag that decides where stage k starts when --init / --ref are not given (named in the
    message about a missing checkpoint)."""
    if k > 1:
        return f"--out-root (stage {k - 1}'s final checkpoint)"
    return "--cold-start" if schedule.start == "cold" else "--base"


# -----------------------------------------------------------------------------
# start-up

def find_inputs(cfg, schedule):
    """Fill in the stage's folder (OUT_ROOT/SCHEDULE/stageN), its start and reference checkpoints
    (--init / --ref, else where the schedule puts them: ptst.init_checkpoint) and the wandb run name;
    stop with one line naming the flag when an input is missing (a memory plan reads the start's
    config.json alone)."""
    cfg.out = ptst.stage_dir(cfg.out_root, schedule.name, cfg.stage)
    init_flag = "--init" if cfg.init else start_flag(schedule, cfg.stage)
    ref_flag = "--ref" if cfg.ref else start_flag(schedule, 1)
    cfg.init = cfg.init or ptst.init_checkpoint(cfg.out_root, schedule, cfg.stage, cfg.cold_start, cfg.base)
    cfg.ref = cfg.ref or ptst.init_checkpoint(cfg.out_root, schedule, 1, cfg.cold_start, cfg.base)
    cfg.run_name = cfg.run_name or f"{schedule.name}-stage{cfg.stage}"
    exit_if_missing(cfg.init, init_flag, "checkpoint")
    if cfg.plan:
        return
    if cfg.kl_coef:
        exit_if_missing(cfg.ref, ref_flag, "checkpoint")
    exit_if_missing(cfg.data, "--data", "file")


def load_models(cfg, device, mesh, compute):
    """(policy, reference, trained parameters, optimizer): the policy sharded over `mesh`, its LLM
    trained and its vision tower frozen (as in SFT), AdamW over what it trains, and the frozen KL
    reference (None without a KL term), kept in host memory between uses with --ref-cpu-offload."""
    policy = M.load_sharded(cfg.init, device, param_dtype=compute, mesh=mesh,
                            activation_checkpointing=cfg.activation_checkpointing)
    if policy.visual is not None:
        policy.visual.requires_grad_(False)
    reference = M.load_sharded(cfg.ref, device, dtype=compute, param_dtype=compute, mesh=mesh,
                               activation_checkpointing=False, cpu_offload=cfg.ref_cpu_offload) if cfg.kl_coef else None
    if reference is not None:
        reference.eval().requires_grad_(False)
    params = [p for p in policy.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, foreach=True)
    return policy, reference, params, optimizer


# -----------------------------------------------------------------------------
# one step: rollout -> rewards and advantages -> PPO updates -> metrics

def rollout(policy, processor, problems, step, schedule, stage, cfg, rank, world, compute, device):
    """This rank's share of step `step`'s prompts and G = stage.group_size responses to each, at most
    stage.max_tokens long: (its problems, their encoded prompts, the completions).

    An epoch is a shuffle of the problems seeded by (seed, epoch), cut into steps of
    prompts_per_rollout; rank r takes the step's prompts r, r + world, ... (a group stays on one
    rank). Sample j of the step's i-th prompt draws from the stream (seed, step, i, j): the same
    samples whatever the world size or the cache budget."""
    epoch_len = len(problems) // cfg.prompts_per_rollout
    epoch, within = divmod(step, max(epoch_len, 1))
    order = torch.randperm(len(problems), generator=torch.Generator().manual_seed(cfg.seed + epoch))
    step_ids = order[within * cfg.prompts_per_rollout:(within + 1) * cfg.prompts_per_rollout].tolist()
    mine = [problems[i] for i in step_ids[rank::world]]
    prompts = [processor.encode_problem(p, system=schedule.system_prompt) for p in mine]
    policy.eval()
    kv_budget = gen.kv_budget_tokens(policy.cfg, compute, cfg.kv_budget_gib, device)  # the cache is in `compute`
    completions = gen.generate(policy, prompts, n=stage.group_size, max_new_tokens=stage.max_tokens,
                               temperature=cfg.temperature, top_p=cfg.top_p, eos_ids=processor.eos_token_ids,
                               seed=cfg.seed * 1_000_003 + step, prompt_ids=range(len(step_ids))[rank::world],
                               kv_budget=kv_budget, tokenizer=processor.tokenizer)
    return mine, prompts, completions


def score(completions, problems, reward_fn):
    """Rewards [N] by `reward_fn` (a rewards.REWARDS entry) plus the per-sample facts the logs need:
    `correct` (rewards.reward, the answer right in the format, whatever is trained), `format` and
    `truncated`. A response cut at the length cap scores 0 under both paper rewards (docs/method.md §3)."""
    out = {"reward": [], "correct": [], "format": [], "truncated": []}
    for c in completions:
        p = problems[c.prompt_index]
        truncated = c.finish_reason == "length"
        out["reward"].append(reward_fn(c, p))
        out["correct"].append(rewards.response_reward(rewards.reward, c, p))
        out["format"].append(float(rewards.format_ok(c.text) and not truncated))
        out["truncated"].append(float(truncated))
    return {k: torch.tensor(v) for k, v in out.items()}


def prompt_groups(prompts, completions):
    """The rollout as `data.pack_shared_prompts` groups: each prompt once, with its responses; a
    response's row is its index in `completions`."""
    groups = {}
    for row, c in enumerate(completions):
        prompt = prompts[c.prompt_index]
        group = groups.setdefault(c.prompt_index, {**prompt, "continuations": [], "rows": []})
        group["continuations"].append(list(c.token_ids))
        group["rows"].append(row)
    return list(groups.values())


def response_logprobs(model, batch, max_len, temperature, device, with_entropy=False):
    """(rows, logp, entropy, mask): per-token log-probs [rows, max_len] of the responses in one
    `data.pack_shared_prompts` batch under `model`, their entropy (or None) and the mask of real
    tokens. The head runs on response positions only."""
    ids, cu, pixels, grid = packed_inputs(batch, device)
    out = model.packed_logprobs(ids, cu, batch["targets"].to(device), pixels, grid, temperature,
                                with_entropy=with_entropy, positions=batch["positions"].to(device),
                                prefix_of=batch["prefix_of"])
    logp, entropy = out if with_entropy else (out, None)
    mask = torch.arange(max_len, device=device) < batch["lengths"].to(device)[:, None]
    padded = torch.zeros(mask.shape, dtype=logp.dtype, device=device)
    return (batch["rows"], padded.masked_scatter(mask, logp),
            padded.masked_scatter(mask, entropy) if with_entropy else None, mask)


@torch.no_grad()
def frozen_logprobs(model, groups, max_len, cfg, device):
    """[N, max_len] log-probs under a model without gradients (old policy or reference). Every rank
    runs as many micro-batches as the rank with the most (`aligned_passes`): FSDP's all-gathers."""
    out = torch.zeros(sum(len(g["rows"]) for g in groups), max_len, device=device)
    for batch, weight in aligned_passes(data.pack_shared_prompts(groups, cfg.micro_batch_tokens)):
        rows, logp, _, _ = response_logprobs(model, batch, max_len, cfg.temperature, device)
        if weight:
            out[rows] = logp
    return out


@dataclass
class Samples:
    """A step's responses on this rank as the updates read them: the `prompt_groups`, and per
    response row its advantage [N] and log-probs [N, L] under the old policy (None when the update
    is on-policy: its own forward, detached), the reference (None without a KL term) and the
    sampling engine (as sampled)."""
    groups: list
    advantages: torch.Tensor
    old_logp: torch.Tensor | None
    ref_logp: torch.Tensor | None
    rollout_logp: torch.Tensor


TOKEN_STATS = ("entropy", "kl_ref", "clip_frac_high", "clip_frac_low", "ppo_kl", "rollout_logp_diff")


def ppo_update(policy, reference, optimizer, params, guard, prompts, completions, advantages, L, cfg, device, world):
    """The step's PPO updates: ppo_epochs passes over the rollout, each cut into updates of
    prompts_per_update prompts (this rank: its share), one optimizer step each, skipped by `guard`
    when the loss or gradient is not finite. Old-policy log-probs are computed first unless every
    update is on-policy (one epoch, one update). Returns the sums the step's metrics average: loss
    and grad_norm over updates (and their count), TOKEN_STATS over this rank's response tokens."""
    groups = prompt_groups(prompts, completions)
    on_policy = cfg.ppo_epochs == 1 and cfg.prompts_per_update == cfg.prompts_per_rollout
    samples = Samples(groups, advantages,
                      old_logp=None if on_policy else frozen_logprobs(policy, groups, L, cfg, device),
                      ref_logp=frozen_logprobs(reference, groups, L, cfg, device) if reference is not None else None,
                      rollout_logp=torch.tensor([c.logprobs + [0.0] * (L - len(c.logprobs)) for c in completions],
                                                device=device).view(-1, L))
    policy.train()
    per_update = cfg.prompts_per_update // world  # this rank's prompts per optimizer update
    stats = {"loss": 0.0, **dict.fromkeys(TOKEN_STATS, 0.0), "grad_norm": 0.0, "updates": 0}
    for _ in range(cfg.ppo_epochs):
        for first in range(0, len(groups), per_update):
            loss = accumulate_gradients(policy, samples, groups[first:first + per_update], L, cfg, device, world, stats)
            grad_norm = float(full_value(torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)))
            if guard.ok(loss, grad_norm):
                optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            stats["loss"] += loss
            stats["grad_norm"] += grad_norm
            stats["updates"] += 1
    return stats


def accumulate_gradients(policy, samples, groups, L, cfg, device, world, stats):
    """Forward and backward of one update's `groups` (this rank's share), micro-batch by micro-batch,
    as many passes on every rank (`aligned_passes`). Each micro-batch's loss is normalised by the
    whole update's response tokens (or sequences) over all ranks, so the summed gradients are the
    update's whatever the split (`aggregate_loss`). Adds this rank's TOKEN_STATS (token sums) to
    `stats`; returns the update's loss summed over ranks."""
    responses = [r for g in groups for r in g["continuations"]]
    global_tokens = float(all_reduce(sum(len(r) for r in responses)))
    global_seqs = float(all_reduce(sum(len(r) > 0 for r in responses)))
    loss_total = 0.0
    for batch, weight in aligned_passes(data.pack_shared_prompts(groups, cfg.micro_batch_tokens)):
        index, logp, entropy, mask = response_logprobs(policy, batch, L, cfg.temperature, device, with_entropy=True)
        rows = torch.tensor(index, device=device)
        old = logp.detach() if samples.old_logp is None else samples.old_logp[rows]
        loss, metrics = policy_loss(
            logp, old, samples.advantages[rows], mask, cfg.clip_low, cfg.clip_high,
            ref_logp=None if samples.ref_logp is None else samples.ref_logp[rows], kl_coef=cfg.kl_coef, agg=cfg.agg,
            dual_clip=cfg.dual_clip or None, global_tokens=global_tokens, global_seqs=global_seqs)
        (loss * weight * world).backward()  # FSDP averages gradients over ranks
        loss_total += weight * loss.item()
        if weight:
            n_tok = mask.sum().item()
            stats["entropy"] += entropy.sum().item()
            for name in ("kl_ref", "clip_frac_high", "clip_frac_low", "ppo_kl"):
                stats[name] += metrics.get(name, torch.tensor(0.0)).item() * n_tok
            # the sampler's distribution against the one trained on (both the step's start policy)
            stats["rollout_logp_diff"] += ((old - samples.rollout_logp[rows]).abs() * mask).sum().item()
    return float(all_reduce(loss_total))


def step_metrics(completions, scores, stats, group_size, ppo_epochs):
    """(metrics, response tokens): the step's numbers over all ranks, per response (reward mean and
    std, accuracy, format and truncation rates, length, the share in all-equal groups), per response
    token (TOKEN_STATS) and per update (loss, grad_norm); and the step's response tokens."""
    lengths = torch.tensor([float(len(c.token_ids)) for c in completions])
    group_std = scores["reward"].view(-1, group_size).std(-1)
    total_tokens = float(all_reduce(lengths.sum()))
    local = {"reward": scores["reward"].sum(), "reward_sq": (scores["reward"] ** 2).sum(),
             "accuracy": scores["correct"].sum(),
             "format_rate": scores["format"].sum(), "truncation_rate": scores["truncated"].sum(),
             "response_length": lengths.sum(), "zero_std_groups": (group_std == 0).float().sum() * group_size}
    n = float(all_reduce(len(completions)))
    metrics = {k: float(all_reduce(v)) / n for k, v in local.items()}
    metrics["reward_std"] = math.sqrt(max(metrics.pop("reward_sq") - metrics["reward"] ** 2, 0.0))
    metrics["response_length_max"] = float(all_reduce(lengths.max(), torch.distributed.ReduceOp.MAX))
    metrics["clipped_fraction"] = metrics["truncation_rate"]
    for name in TOKEN_STATS:
        metrics[name] = float(all_reduce(stats[name])) / max(total_tokens * ppo_epochs, 1)
    metrics.update(loss=stats["loss"] / stats["updates"], grad_norm=stats["grad_norm"] / stats["updates"])
    return metrics, total_tokens


# -----------------------------------------------------------------------------
# the loop

@command_line
def main(argv=None):
    cfg = parse_config(GRPOConfig, PRESETS, argv, description=__doc__)
    schedule = resolve_schedule(cfg)
    stage = ptst.get_stage(schedule, cfg.stage)
    G, L = stage.group_size, stage.max_tokens
    find_inputs(cfg, schedule)
    data.refuse_mllama(cfg.init, "train_grpo.py")
    if cfg.plan:
        return memplan.print_plan(cfg.init, cfg, lambda model, world: memplan.grpo_phases(cfg, stage, model, world))
    rank, world, device, mesh, compute = start_run(cfg, "--out-root")
    problems = data.load_problems(cfg.data, skip_bad=cfg.skip_bad)  # every record checked before step 1
    processor = data.ChatProcessor(cfg.init, cfg.min_pixels, cfg.max_pixels)
    policy, reference, params, optimizer = load_models(cfg, device, mesh, compute)
    start_step = resumed_step(cfg, policy, optimizer)
    logger = Logger(cfg, rank, job_type=f"grpo-stage{cfg.stage}")
    guard = NonFiniteGuard(cfg.max_nonfinite)
    if rank == 0:
        print(ptst.format_schedule(schedule), flush=True)
        print(f"stage {cfg.stage}: {L} tokens x {G} samples, {stage.steps} steps, from {cfg.init}, "
              f"ref {cfg.ref}, start at step {start_step}, world {world} ({sharding_of(policy)})", flush=True)

    for step in range(start_step, stage.steps):
        timer = Timer()
        mine, prompts, completions = rollout(policy, processor, problems, step, schedule, stage, cfg, rank, world,
                                             compute, device)
        time_generate = timer.lap()
        scores = score(completions, mine, rewards.REWARDS[schedule.reward])
        advantages = group_advantages(scores["reward"], G, scale=cfg.scale_advantages).to(device)
        time_score = timer.lap()
        stats = ppo_update(policy, reference, optimizer, params, guard, prompts, completions, advantages, L, cfg,
                           device, world)
        time_train = timer.lap()
        metrics, tokens = step_metrics(completions, scores, stats, G, cfg.ppo_epochs)
        metrics.update(lr=cfg.lr, time_generate=time_generate, time_score=time_score, time_train=time_train,
                       tokens_per_s=tokens / (time_generate + time_score + time_train + timer.lap()),
                       skipped_steps=guard.total, peak_mem_gib=peak_memory_gib(device), stage=cfg.stage,
                       max_tokens=L, group_size=G)
        done = step + 1
        if done % cfg.log_every == 0 or done == stage.steps:
            logger.log(done, metrics)
        if cfg.table_every and done % cfg.table_every == 0:
            logger.table(done, "samples", ["id", "reward", "finish", "response"],
                         [[mine[c.prompt_index]["id"], float(r), c.finish_reason, c.text]
                          for c, r in zip(completions[:8], scores["reward"][:8])])
        if cfg.save_every and done % cfg.save_every == 0 and done < stage.steps:
            save_checkpoint(cfg.out, done, policy, optimizer, {"stage": cfg.stage}, cfg.keep_last)

    save_checkpoint(cfg.out, stage.steps, policy, optimizer, {"stage": cfg.stage}, cfg.keep_last, final=True)
    logger.finish()
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
