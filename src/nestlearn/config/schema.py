"""Typed configuration: one keyword-only dataclass per section.

A run is described by :class:`RunConfig` = model + data + optim + train + eval + sample. Every
field has a default and a one-line meaning; named configs in ``configs/`` override a few of them
and CLI overrides (``section.key=value``) override those. The model section's class depends on the
architecture (``model.name``): each architecture registers a subclass of :class:`ModelConfig`
(see :mod:`nestlearn.models.registry`), so ``model.*`` keys are validated against the chosen
architecture.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(kw_only=True)
class ModelConfig:
    """Fields every language model shares; architectures subclass this."""

    name: str = "transformer"  # architecture, a key of nestlearn.models.registry
    vocab_size: int = 0  # 0 = take it from the tokenizer
    d_model: int = 256  # residual stream width
    n_layers: int = 4  # number of blocks
    max_seq_len: int = 1024  # longest sequence the model accepts (RoPE table / KV cache size)
    tie_embeddings: bool = True  # share the input embedding and the output head
    norm_eps: float = 1e-6  # RMSNorm epsilon
    init_std: float = 0.02  # std of the normal init of weights (residual outputs scaled by depth)


@dataclass(kw_only=True)
class DataConfig:
    """Where text comes from and how it becomes tokens."""

    source: str = "stdlib"  # "stdlib" (this interpreter's stdlib), a file, folder or glob, or "hf"
    val_fraction: float = 0.05  # share of documents (files) held out for validation, by hash
    split_seed: int = 0  # salt of the file-hash split; change it for another split
    max_bytes: int = 0  # cap on corpus bytes (0 = all), files taken in a fixed hashed order
    tokenizer: str = "bpe"  # "bpe" (trained locally with `tokenizers`) or "byte"
    vocab_size: int = 4096  # BPE vocabulary size, special tokens included
    bpe_train_bytes: int = 16_000_000  # cap on the training-split bytes the BPE is trained on
    cache_dir: str = ""  # token/tokenizer cache ("" = $NESTLEARN_CACHE or ~/.cache/nestlearn)
    hf_dataset: str = ""  # with source="hf": dataset name or builder ("json", "text", "parquet")
    hf_config: str = ""  # dataset configuration name, if any
    hf_data_files: str = ""  # local files for builder datasets (comma-separated paths/globs)
    hf_split: str = "train"  # split to read
    hf_text_field: str = "text"  # column holding the text


@dataclass(kw_only=True)
class OptimConfig:
    """The outer optimizer and its learning-rate schedule."""

    # "adamw", or a deep optimizer (docs/optimizers.md) on the matrices with AdamW (lr, betas,
    # eps below) on embeddings, head, norms and biases: adam_memory, momentum, preconditioned,
    # delta_momentum, dmgd, muon, dgd, m3
    name: str = "adamw"
    lr: float = 3e-3  # peak learning rate
    min_lr_ratio: float = 0.1  # final lr = lr * min_lr_ratio (cosine floor)
    warmup_steps: int = 100  # linear warmup from 0 to lr
    schedule: str = "cosine"  # "cosine" or "constant" after warmup
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    weight_decay: float = 0.1  # decoupled, on matrices only (not norms, gains, embeddings)
    grad_clip: float = 1.0  # max global grad norm (0 = off)
    # Deep optimizers (ignored by adamw); they share the warmup + cosine schedule.
    matrix_lr: float = 0.0  # peak lr of the matrix optimizer (0 = its default, docs/optimizers.md)
    momentum: float = 0.95  # momentum / retention α (momentum, preconditioned, delta_momentum,
    # dmgd, muon)
    nesterov: bool = True  # muon: Nesterov read-out of the momentum
    ns_steps: int = 5  # muon, m3: Newton–Schulz iterations
    preconditioner: str = "diagonal"  # preconditioned: identity, diagonal or kronecker
    delta_gamma: float = 0.5  # delta_momentum: fraction γ ∈ [0, 1] erased along the gradient
    dmgd_depth: int = 2  # dmgd: linear maps of the momentum MLP (1 = plain momentum)
    dmgd_hidden: int = 0  # dmgd: hidden width (0 = the smaller side of the matrix)
    dmgd_objective: str = "dot"  # dmgd: inner objective, "dot" (paper) or "l2"
    dmgd_form: str = "ours"  # dmgd: "ours" (value −I, read m(I)) or "paper" (SPEC §3 as printed:
    # value 𝟏, read m(g), retention on every map; docs/optimizers.md)
    m3_frequency: int = 8  # m3: steps per slow chunk (update period of the slow momentum)
    m3_alpha: float = 1.0  # m3: weight of the slow momentum's output
    m3_beta1: float = 0.1  # m3: write strength of the fast momentum
    m3_beta2: float = 0.05  # m3: write strength of the second moment
    m3_beta3: float = 0.5  # m3: write strength of the slow momentum
    m3_ema: bool = False  # m3: EMA accumulators (ours) instead of the paper's sums


@dataclass(kw_only=True)
class TrainConfig:
    """The training loop."""

    steps: int = 1000  # optimizer steps
    batch_size: int = 16  # sequences per micro-batch, over all ranks (split across them)
    seq_len: int = 256  # tokens per sequence
    grad_accum: int = 1  # micro-batches per optimizer step
    seed: int = 0  # model init and batch sampling
    device: str = "auto"  # "auto", "cpu", "cuda", "cuda:1", ...
    # "auto" (bf16 autocast where supported, else fp32), "fp32", "bf16", or "fp16" (autocast with
    # loss scaling: torch.amp.GradScaler; not with parallel=fsdp)
    precision: str = "auto"
    threads: int = 0  # torch intra-op threads on CPU (0 = torch's default)
    log_every: int = 10  # steps between train-loss records
    eval_every: int = 200  # steps between validations (0 = only at the end)
    ckpt_every: int = 200  # steps between checkpoints (0 = only at the end)
    keep_last: int = 2  # checkpoints kept on disk
    out_dir: str = "runs/default"  # run directory (config, metrics, checkpoints, report)
    max_minutes: float = 0.0  # wall-clock budget; stops early with a checkpoint (0 = none)
    progress: bool = True  # show a progress bar
    compile: bool = False  # torch.compile the model in place (first steps compile; docs/scale.md)
    compile_mode: str = "default"  # default, reduce-overhead, max-autotune(-no-cudagraphs)
    activation_checkpointing: bool = False  # recompute each block in backward (less memory)
    level_periods: str = ""  # outer levels: "" off, "cms" (CMS level l every C(l) steps), "glob=p"
    # Data parallelism (docs/distributed.md): "auto" (ddp under torchrun with WORLD_SIZE > 1,
    # else none), "none", "ddp" or "fsdp" (FSDP2 fully_shard). batch_size is the global batch.
    parallel: str = "auto"


@dataclass(kw_only=True)
class EvalConfig:
    """Validation during training and `nestlearn eval`."""

    batch_size: int = 16  # sequences per evaluation batch
    max_tokens: int = 131_072  # validation tokens scored (0 = the whole split)
    seq_len: int = 0  # window length (0 = train.seq_len)


@dataclass(kw_only=True)
class SampleConfig:
    """Sampling for `nestlearn generate` and the demo's sample."""

    prompt: str = "def "
    max_new_tokens: int = 200
    temperature: float = 0.8  # 0 = greedy
    top_k: int = 50  # 0 = off
    top_p: float = 0.95  # 1 = off
    seed: int = 0


@dataclass(kw_only=True)
class RunConfig:
    """Everything a run needs; saved resolved as ``config.yaml`` in the run directory."""

    name: str = "default"
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)


SECTIONS: dict[str, type] = {
    "model": ModelConfig,
    "data": DataConfig,
    "optim": OptimConfig,
    "train": TrainConfig,
    "eval": EvalConfig,
    "sample": SampleConfig,
}
