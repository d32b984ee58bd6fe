"""Progressive Thinking Suppression Training (PTST) schedules (docs/method.md §3, Eq. 2).

A schedule is a list of GRPO stages; stage s caps the response length at L_s tokens and samples
G_s responses per prompt, keeping L_s x G_s ~ 64K tokens per prompt. Early stages force short
reasoning (suppression), later ones let it grow. Each stage starts from the previous stage's
final checkpoint.

    python ptst.py                                   # the default Vision-R1 schedule
    python ptst.py --schedule long                   # any named schedule
    python ptst.py --stages 4096x16x50,8192x8x50     # a schedule from the command line
    python ptst.py --length-scale 1/64               # same shape, tiny lengths (synthetic world)
"""
import argparse
import dataclasses
import os
from dataclasses import dataclass
from fractions import Fraction

from rewards import R1_ZERO_SYSTEM_PROMPT, REWARDS

STARTS = ("cold", "base")  # the cold-start SFT model (Vision-R1-CI) or the base model


@dataclass(frozen=True)
class Stage:
    max_tokens: int  # L_s, the response length cap
    group_size: int  # G_s, samples per prompt
    steps: int

    @property
    def tokens_per_prompt(self):
        """L_s x G_s: 4096 x 16 = 65536, the budget PTST holds about constant."""
        return self.max_tokens * self.group_size


@dataclass(frozen=True)
class Schedule:
    name: str
    stages: tuple[Stage, ...]
    start: str = "cold"
    reward: str = "hard"  # a name in rewards.REWARDS
    system_prompt: str | None = None  # None: the chat template's default system turn
    release_stage: int | None = None  # the stage whose end is the reported model; None: the last

    def __post_init__(self):
        if not self.stages:
            raise ValueError(f"schedule {self.name!r} has no stages")
        if self.start not in STARTS:
            raise ValueError(f"schedule {self.name!r}: start {self.start!r} is not one of {STARTS}")
        if self.reward not in REWARDS:
            raise ValueError(f"schedule {self.name!r}: reward {self.reward!r} is not one of rewards.REWARDS: "
                             f"{', '.join(REWARDS)}")


def _stages(spec):
    return tuple(Stage(*stage) for stage in spec)


# docs/method.md §3 and the PTST ablation of the later paper version. Steps per stage of the later
# variants are not stated; 100 per stage as in the main schedule.
SCHEDULES = {
    schedule.name: schedule
    for schedule in [
        # Vision-R1: the released model is the end of stage 2; stage 3 grows longer CoT without
        # an accuracy gain
        Schedule("vision-r1", _stages([(4096, 16, 100), (8192, 8, 100), (16384, 4, 100)]), release_stage=2),
        Schedule("long", _stages([(16384, 4, 300)])),  # Vision-R1-Long
        Schedule("zero", _stages([(4096, 16, 300)]), start="base", reward="zero",
                 system_prompt=R1_ZERO_SYSTEM_PROMPT),  # Vision-R1-Zero
        Schedule("zero-ptst", _stages([(4096, 16, 100), (8192, 8, 100)]), start="base", reward="zero",
                 system_prompt=R1_ZERO_SYSTEM_PROMPT),
        Schedule("4Kx16-4Kx16", _stages([(4096, 16, 100), (4096, 16, 100)])),
        Schedule("4Kx16-8Kx16", _stages([(4096, 16, 100), (8192, 16, 100)])),
        Schedule("4Kx16-6Kx12-8Kx8", _stages([(4096, 16, 100), (6144, 12, 100), (8192, 8, 100)])),
    ]
}
DEFAULT_SCHEDULE = "vision-r1"


def _parse_count(text, what, spec):
    """'4096' -> 4096; '4K' -> 4096 (K = 1024 tokens, as in the paper's '4K x 16')."""
    multiplier = 1024 if text[-1:] in ("k", "K") else 1
    digits = text[:-1] if multiplier > 1 else text
    if not digits.isdigit() or int(digits) < 1:
        raise ValueError(f"schedule {spec!r}: {what} {text!r} is not a positive integer")
    return int(digits) * multiplier


def parse_schedule(spec, like=SCHEDULES[DEFAULT_SCHEDULE], name="custom"):
    """A schedule from the command line: 'LxGxSTEPS,LxGxSTEPS,...' with start, reward and
    system prompt taken from `like` (the stage that is the release: the last one).

    '4096x16x100,8192x8x100' -> stages (4096, 16, 100), (8192, 8, 100); '4Kx16x100' works too.
    """
    stages = []
    for piece in spec.replace(" ", "").split(","):
        fields = piece.split("x")
        if len(fields) != 3:
            raise ValueError(f"schedule {spec!r}: stage {piece!r} is not MAX_TOKENSxGROUP_SIZExSTEPS")
        stages.append(Stage(*(_parse_count(field, what, spec) for field, what in
                              zip(fields, ("max tokens", "group size", "steps")))))
    return dataclasses.replace(like, name=name, stages=tuple(stages), release_stage=None)


def parse_length_scale(text):
    """'1/64' -> Fraction(1, 64); '0.5' -> Fraction(1, 2). Must be positive."""
    try:
        scale = Fraction(str(text))
    except (ValueError, ZeroDivisionError):
        raise ValueError(f"length scale {text!r} is not a number or a fraction like 1/64") from None
    if scale <= 0:
        raise ValueError(f"length scale {text!r} must be positive")
    return scale


def scale_schedule(schedule, length_scale):
    """Same shape, lengths times `length_scale` (rounded, at least 1); group sizes and steps kept.

    scale_schedule(vision-r1, '1/64'): 4096 x 16 -> 64 x 16, 8192 x 8 -> 128 x 8, 16384 x 4 -> 256 x 4.
    """
    scale = parse_length_scale(length_scale)
    stages = tuple(
        dataclasses.replace(stage, max_tokens=max(1, round(stage.max_tokens * scale)))
        for stage in schedule.stages
    )
    return dataclasses.replace(schedule, stages=stages)


def get_schedule(name):
    """A named schedule, with a message listing the names when it does not exist."""
    if name not in SCHEDULES:
        raise ValueError(f"unknown schedule {name!r}; known: {', '.join(SCHEDULES)}")
    return SCHEDULES[name]


def _as_schedule(schedule):
    return get_schedule(schedule) if isinstance(schedule, str) else schedule


def get_stage(schedule, k):
    """Stage k (1-based) of a schedule or schedule name: get_stage('vision-r1', 2) -> 8192 x 8."""
    schedule = _as_schedule(schedule)
    if not 1 <= k <= len(schedule.stages):
        raise ValueError(f"schedule {schedule.name!r} has stages 1..{len(schedule.stages)}, not {k}")
    return schedule.stages[k - 1]


def stage_dir(out_root, schedule_name, k):
    """Checkpoint folder of stage k: stage_dir('runs', 'vision-r1', 2) -> 'runs/vision-r1/stage2'."""
    return os.path.join(out_root, schedule_name, f"stage{k}")


def init_checkpoint(out_root, schedule, k, cold_start_dir, base_dir):
    """Where stage k starts: stage 1 from the cold-start model (start 'cold') or the base model
    (start 'base'); stage k > 1 from stage k-1's final checkpoint, '<stage_dir(k-1)>/final'."""
    schedule = _as_schedule(schedule)
    get_stage(schedule, k)
    if k > 1:
        return os.path.join(stage_dir(out_root, schedule.name, k - 1), "final")
    return cold_start_dir if schedule.start == "cold" else base_dir


def format_schedule(schedule):
    """The schedule as a text table, one row per stage, with tokens per prompt (L x G)."""
    release = schedule.release_stage or len(schedule.stages)
    lines = [
        f"schedule {schedule.name}: start from the {'cold-start' if schedule.start == 'cold' else 'base'} model, "
        f"{schedule.reward} reward, system prompt: {'R1-Zero' if schedule.system_prompt else 'template default'}",
        f"{'stage':>5} {'max tokens':>10} {'group':>5} {'steps':>5} {'tokens/prompt':>13}",
    ]
    for k, stage in enumerate(schedule.stages, start=1):
        note = "  (optional, after the released model)" if k > release else ""
        lines.append(f"{k:>5} {stage.max_tokens:>10} {stage.group_size:>5} {stage.steps:>5} "
                     f"{stage.tokens_per_prompt:>13}{note}")
    lines.append(f"total steps {sum(stage.steps for stage in schedule.stages)}")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--schedule", default=DEFAULT_SCHEDULE, choices=list(SCHEDULES))
    parser.add_argument("--stages", help="override the stages, e.g. 4096x16x100,8192x8x100")
    parser.add_argument("--length-scale", default="1", help="scale every length cap, e.g. 1/64")
    args = parser.parse_args(argv)
    schedule = get_schedule(args.schedule)
    if args.stages:
        schedule = parse_schedule(args.stages, like=schedule)
    print(format_schedule(scale_schedule(schedule, args.length_scale)))


if __name__ == "__main__":
    main()
