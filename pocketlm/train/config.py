"""TrainConfig: every knob of a training run, with the defaults of the real recipe.

Defaults live only here. `pocketlm train --config FILE.toml` overrides them from the file's `[train]`
table (and the model shape from `[model]`), and flags override the file. The resolved config is saved
as `runs/NAME/config.json`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from pocketlm.cache.config import DEFAULT_MIXTURE


@dataclass
class TrainConfig:
    # run and data
    name: str = field(default="default", metadata={"help": "run folder name under runs_dir"})
    runs_dir: str = field(default="runs", metadata={"help": "where run folders live"})
    cache: str = field(default="cache/default", metadata={"help": "token cache dir from `pocketlm cache build`"})
    pretrain_mix: tuple[str, ...] = field(default=tuple(f"{n}={w}" for n, w in DEFAULT_MIXTURE.items()),
                                          metadata={"help": "pretrain sources as SOURCE=WEIGHT"})
    eval_sources: tuple[str, ...] = field(default=("wikitext",),
                                          metadata={"help": "extra sources evaluated, never trained on"})
    # Weights are shares of packed rows. Uniform weights made the 39-chat primer a third of all rows,
    # and the model answered unrelated questions with memorised primer replies.
    sft_sources: tuple[str, ...] = field(default=("dolly=0.6", "oasst1=0.3", "primer=0.1"),
                                         metadata={"help": "SFT sources as SOURCE=WEIGHT (a bare name weighs 1)"})
    model: str = field(default="v1", metadata={"help": "model preset (v1 | tiny); TOML [model] overrides fields"})
    # batch: each optimizer step sees micro_batch * accum_steps * world rows of seq_len tokens
    seq_len: int = field(default=1024, metadata={"help": "tokens per row"})
    micro_batch: int = field(default=8, metadata={"help": "rows per forward/backward"})
    accum_steps: int = field(default=8, metadata={"help": "micro-batches accumulated per optimizer step"})
    # optimization
    # The pretrain length, first that applies: tokens (> 0), pretrain_steps (set), epochs. The default is
    # 4 passes over the cache's pretrain mixture: past a few passes the model memorises (docs/LOG.md).
    tokens: float = field(default=0.0, metadata={"help": "pretrain token budget, e.g. 2e8 (sets the steps)"})
    pretrain_steps: int | None = field(default=None, metadata={"help": "optimizer steps of the pretrain phase "
                                                                        "(unset: from --tokens or --epochs)"})
    epochs: float = field(default=4.0, metadata={"help": "passes over the pretrain mixture's train split, when "
                                                         "neither --tokens nor --pretrain-steps is given"})
    sft_steps: int = field(default=1000, metadata={"help": "optimizer steps of the SFT phase"})
    lr: float = field(default=3e-3, metadata={"help": "peak learning rate (pretrain)"})
    sft_lr: float = field(default=3e-4, metadata={"help": "peak learning rate (SFT)"})
    # Chat levers (bench/chat_levers.py measures them); the defaults leave training as it was.
    sft_eot_weight: float = field(default=1.0, metadata={"help": "SFT: loss weight of <|eot|> targets (the token "
                                                                 "that ends a reply); 1 = as any other token"})
    sft_pack: bool = field(default=True, metadata={"help": "SFT: best-fit pack several chats per row; false = "
                                                           "one chat per row (the rest padding)"})
    midtrain_frac: float = field(default=0.0, metadata={"help": "pretrain: the last fraction of its steps mixes "
                                                                "SFT chats into each batch; 0 = off"})
    midtrain_chat_share: float = field(default=0.2, metadata={"help": "share of a midtraining batch's rows drawn "
                                                                      "from the SFT sources (sft_sources' mixture)"})
    min_lr_frac: float = field(default=0.1, metadata={"help": "final LR as a fraction of the peak"})
    warmup_steps: int | None = field(default=None, metadata={"help": "linear warmup steps; unset: warmup_frac"})
    warmup_frac: float = field(default=0.05, metadata={"help": "warmup as a share of each phase's steps"})
    schedule: str = field(default="wsd", metadata={"help": "wsd (warmup-stable-decay) | cosine"})
    decay_frac: float = field(default=0.2, metadata={"help": "wsd: share of steps spent decaying"})
    optimizer: str = field(default="muon", metadata={"help": "muon (Muon on hidden matrices + AdamW) | adamw"})
    muon_lr: float = field(default=0.02, metadata={"help": "Muon peak LR (pretrain; SFT scales it by sft_lr/lr)"})
    muon_momentum: float = field(default=0.95, metadata={"help": "Muon Nesterov momentum"})
    z_loss: float = field(default=0.0, metadata={"help": "weight of the z-loss mean(logsumexp(logits)^2); 0 = off"})
    weight_decay: float = field(default=0.1, metadata={"help": "decoupled decay on matrices (not norms/embeddings)"})
    beta2: float = field(default=0.95, metadata={"help": "AdamW beta2 (beta1 is 0.9)"})
    grad_clip: float = field(default=1.0, metadata={"help": "max global grad norm; 0 disables"})
    # evaluation, logging, checkpoints
    eval_every: int = field(default=250, metadata={"help": "steps between evaluations (and best/last saves)"})
    patience: int = field(default=3, metadata={"help": "stop a phase after this many evaluations without a "
                                                             "better validation loss; 0 = never"})
    eval_batches: int = field(default=20, metadata={"help": "validation batches per source"})
    log_every: int = field(default=10, metadata={"help": "steps between metrics lines (each one syncs the device)"})
    sample_tokens: int = field(default=48, metadata={"help": "greedy tokens per sample prompt at each eval; 0 = none"})
    # Snapshots: weights only, fp16, in {phase}/snapshots/, for watching and comparing how the model changes.
    # A v1 snapshot is ~68 MB, so 14 per phase keeps a two-phase v1 night under 2 GB (28 x 68 MB = 1.9 GB);
    # a phase with more evaluations than that keeps one every ceil(evaluations / snapshot_max) instead.
    snapshot_every: int = field(default=1, metadata={"help": "keep a snapshot every this many evaluations "
                                                             "(widened to fit snapshot_max); 0 = none"})
    snapshot_max: int = field(default=14, metadata={"help": "most snapshots a phase keeps"})
    tensorboard: bool = field(default=False, metadata={"help": "also write the metrics as TensorBoard event files "
                                                               "in runs/NAME/tensorboard/ (pip install "
                                                               "'pocketlm[tensorboard]')"})
    # hardware
    device: str = field(default="auto", metadata={"help": "auto (cuda > mps > cpu) | cuda | mps | cpu"})
    precision: str = field(default="auto", metadata={"help": "auto | fp32 | bf16 | fp16"})
    compile: bool | None = field(default=None,
                                 metadata={"help": "torch.compile; unset: on for CUDA only (model/accel.py)"})
    checkpointing: bool = field(default=False, metadata={"help": "activation checkpointing per block"})
    # several processes (torchrun): how compiled DDP overlaps the gradient all-reduce with the backward
    ddp_bucket_mb: float = field(default=25.0, metadata={"help": "DDP gradient bucket size in MB"})
    ddp_static_graph: bool = field(default=False, metadata={"help": "DDP static_graph (the same parameters get "
                                                                     "gradients every step)"})
    ddp_graph_split: bool = field(default=True, metadata={"help": "with compile: split the graph at DDP's buckets so "
                                                                  "their all-reduces overlap the backward"})
    compiled_autograd: bool = field(default=False, metadata={"help": "with compile: compile the backward too; under "
                                                                     "DDP its all-reduces are traced into that graph"})
    seed: int = field(default=0, metadata={"help": "model init and data order"})


def warmup_for(cfg: TrainConfig, steps: int) -> int:
    """Warmup steps of a phase of `steps` steps: warmup_steps when set, else warmup_frac of the phase."""
    if cfg.warmup_steps is not None:
        return min(cfg.warmup_steps, steps)
    return max(1, round(cfg.warmup_frac * steps))


def config_dict(cfg: TrainConfig) -> dict[str, Any]:
    """The config as JSON-ready values (tuples become lists), for config.json and checkpoints."""
    return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(cfg).items()}
