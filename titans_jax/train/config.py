"""Run configuration: `TrainConfig` (optimiser, schedule, data, cadence), `RunConfig` (model + train), and the
dotted command-line overrides (`--set model.dim=64 train.lr=1e-3`).

Override values are parsed as JSON, then as a Python literal (`ast.literal_eval`), else kept as a plain string, so
`model.variant=mag` needs no quotes. Nothing from the command line is ever passed to `eval`.
"""

from __future__ import annotations

import ast
import dataclasses
import json
import types
import typing
from collections.abc import Iterable, Mapping
from typing import Any

from etils import epath

from titans_jax.configs import (
    PRESET_PEAK_LR,
    PRESETS,
    TINY_PEAK_LR,
    ModelConfig,
    check_known_fields,
    get_config,
    is_paper_preset,
)

__all__ = ["NONFINITE_MODES", "TINY_PEAK_LR", "RunConfig", "TrainConfig", "apply_overrides", "load_config",
           "parse_profile_steps", "setup_warnings"]

# What a step with a non-finite loss, gradient or update does (TrainConfig.nonfinite).
NONFINITE_MODES = ("stop", "skip")


def parse_profile_steps(text: str) -> tuple[int, int] | None:
    """`TrainConfig.profile_steps` ("A:B", steps A to B inclusive, 1 <= A <= B; a single "A" is "A:A") as `(A, B)`;
    "" gives None (no trace).

    Raises:
      ValueError: for anything else.
    """
    if not text:
        return None
    first, colon, last = text.partition(":")
    try:
        a, b = int(first), int(last if colon else first)
    except ValueError:
        raise ValueError(f"expected A:B with integer steps, e.g. 10:12 (got {text!r})") from None
    if not 1 <= a <= b:
        raise ValueError(f"expected A:B with 1 <= A <= B, e.g. 10:12 (got {text!r})")
    return a, b


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Everything about a training run except the model. Frozen and hashable.

    The defaults are the `make train` run: the tiny MAC on Shakespeare bytes on a 2-core CPU in a few minutes.
    Paper-scale runs override batch, context and steps (see experiments/train_configs/).

    Attributes:
      steps: optimizer updates in the run (the schedule's length).
      batch_size: sequences per update over all processes (the global batch).
      seq_len: tokens per sequence (inputs; each example holds seq_len + 1 tokens).
      lr: peak learning rate. None: the one stored with the run's model preset (`configs.PRESET_PEAK_LR`: the
        revision's Table 5, "Architectural Details", for the paper's sizes; TINY_PEAK_LR for the tiny ones); a model
        that is not a preset must set it. Resolved when the run starts and written to config.json.
      warmup: linear warm-up steps (capped at `steps`), then cosine decay to `min_lr_ratio * lr` at `steps`.
      min_lr_ratio: final learning rate as a fraction of the peak (10%: docs/architecture.md, "Training loop").
      weight_decay: AdamW decoupled weight decay, not applied to norms, biases or persistent tokens.
      b1, b2, eps: AdamW moments (0.9, 0.95, 1e-8; the paper gives none: docs/architecture.md, "Training loop").
      clip: global gradient-norm clipping threshold (None or 0: off).
      nonfinite: what a step whose loss, gradient or updated parameters are not finite does. "stop" (default): the
        update is dropped and the run stops (`TrainingDiverged`), its last checkpoint the last good state. "skip":
        a step with non-finite gradients is skipped (no update, optimizer state unchanged: optax.apply_if_finite) and
        training goes on; the count of skipped steps is in every metrics record (`skipped_steps`). More than
        `max_consecutive_nonfinite` such steps in a row, or an update that overflows the parameters, still stops.
      max_consecutive_nonfinite: with nonfinite="skip", how many non-finite steps in a row are skipped.
      grad_accum: micro-batches per update; batch_size must be a multiple. Gradients are summed in float32 inside
        the jitted step, so one update equals the full-batch update up to float rounding.
      seed: model initialisation and data order.
      eval_every: validate every this many steps (and at the end); 0: only at the end.
      eval_batches: validation batches (of batch_size sequences) per evaluation.
      checkpoint_every: save every this many steps (and at the end, and on SIGTERM); 0: only at the end.
      keep_checkpoints: most recent checkpoints kept.
      log_every: write a metrics line every this many steps.
      memory_stats: at every log step, also log each memory layer's statistics on that step's batch (gate means, the
        memory's loss before and after each chunk's update, norms of W and S: `titans_jax.diagnostics`; keys
        `memory/layer{l}/...`). Models without a memory log none. One extra forward pass per log step.
      mesh: device mesh, e.g. "data=2,fsdp=2,tensor=2"; "" puts every device on `data`.
      data: "shakespeare", a local .txt/.jsonl corpus path (file, directory or glob), or a synthetic task name.
      context_weight: synthetic tasks: the loss weight of every token that is not an answer (answers weigh 1); 0
        scores the answers only. Validation always scores the answers only.
      tokenizer: "bytes" or the path of a SentencePiece .model file.
      data_dir: where corpora are built (None: $TITANS_JAX_DATA_DIR or ~/.cache/titans_jax/tfds).
      text_field: the text field of .jsonl corpora.
      sample_tokens: tokens sampled at the end of the run (0: no sample).
      sample_prompt: prompt of that sample.
      max_replicated_fraction: fail at start when more of the parameter bytes than this stay replicated over the
        model-parallel mesh axes (None: only report).
      profile_steps: "A:B" writes a `jax.profiler` trace of steps A to B (inclusive) into `<workdir>/tb` on process 0
        (TensorBoard's profile tab, or Perfetto); "" (default): no trace. See `parse_profile_steps`.
      wandb_project: also log every metrics record to Weights & Biases, in this project ("PROJECT" or
        "ENTITY/PROJECT"; needs the optional `wandb` package); None (default): no W&B. A resumed run continues the
        same W&B run (its id is kept in the checkpoints).
    """

    steps: int = 300
    batch_size: int = 16
    seq_len: int = 256
    lr: float | None = None
    warmup: int = 20
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.1
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-8
    clip: float | None = 1.0
    nonfinite: str = "stop"
    max_consecutive_nonfinite: int = 5
    grad_accum: int = 1
    seed: int = 0
    eval_every: int = 50
    eval_batches: int = 8
    checkpoint_every: int = 50
    keep_checkpoints: int = 3
    log_every: int = 10
    memory_stats: bool = True
    mesh: str = ""
    data: str = "shakespeare"
    context_weight: float = 0.0
    tokenizer: str = "bytes"
    data_dir: str | None = None
    text_field: str = "text"
    sample_tokens: int = 200
    sample_prompt: str = "ROMEO:"
    max_replicated_fraction: float | None = None
    profile_steps: str = ""
    wandb_project: str | None = None

    def __post_init__(self):
        def bad(field: str, msg: str):
            raise ValueError(f"TrainConfig.{field}: {msg} (got {getattr(self, field)!r})")

        for f in ("steps", "batch_size", "seq_len", "grad_accum", "eval_batches", "keep_checkpoints", "log_every"):
            v = getattr(self, f)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                bad(f, "must be a positive int")
        for f in ("warmup", "seed", "eval_every", "checkpoint_every", "sample_tokens", "max_consecutive_nonfinite"):
            v = getattr(self, f)
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                bad(f, "must be an int >= 0")
        if self.lr is not None and not self.lr > 0:
            bad("lr", "must be > 0")
        if not 0 <= self.min_lr_ratio <= 1:
            bad("min_lr_ratio", "must lie in [0, 1]")
        if not 0.0 <= self.context_weight <= 1.0:
            bad("context_weight", "must lie in [0, 1]")
        if self.weight_decay < 0:
            bad("weight_decay", "must be >= 0")
        if not (0 <= self.b1 < 1 and 0 <= self.b2 < 1):
            bad("b1", "b1 and b2 must lie in [0, 1)")
        if self.clip is not None and self.clip < 0:
            bad("clip", "must be >= 0 (0 or None: no clipping)")
        if self.batch_size % self.grad_accum:
            bad("batch_size", f"must be a multiple of grad_accum={self.grad_accum}")
        if not isinstance(self.memory_stats, bool):
            bad("memory_stats", "must be true or false")
        if self.nonfinite not in NONFINITE_MODES:
            bad("nonfinite", f"must be one of {NONFINITE_MODES}")
        try:
            parse_profile_steps(self.profile_steps)
        except ValueError as e:
            bad("profile_steps", str(e))
        if self.wandb_project is not None and not self.wandb_project.strip("/"):
            bad("wandb_project", "must name a project (PROJECT or ENTITY/PROJECT), or be None")

    def replace(self, **overrides: Any) -> TrainConfig:
        return dataclasses.replace(self, **overrides)


@dataclasses.dataclass(frozen=True)
class RunConfig:
    """The model and the training configuration of a run; `config.json` in the workdir is `to_dict()`.

    Attributes:
      model: the model.
      train: everything else.
      preset: the model preset the run started from (None: a model given by its fields). Its peak learning rate is
        the default of `train.lr`, and a paper-size preset is checked against its data (`setup_warnings`).
    """

    model: ModelConfig
    train: TrainConfig
    preset: str | None = None

    def __post_init__(self):
        if self.preset is not None and self.preset not in PRESETS:
            raise ValueError(f"RunConfig.preset: unknown preset {self.preset!r}; known: {sorted(PRESETS)}")

    def to_dict(self) -> dict[str, Any]:
        return {"model": dataclasses.asdict(self.model), "train": dataclasses.asdict(self.train),
                "preset": self.preset}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> RunConfig:
        """Reads `{"model": preset name | {fields} | {"base": preset, ...fields}, "train": {fields}, "preset": name}`
        (`preset` defaults to the model's preset name or base)."""
        check_known_fields(cls, d, "run config")
        model = d.get("model", "tiny-mac")
        if isinstance(model, str):
            model_cfg, preset = get_config(model), (model if model in PRESETS else None)  # a preset or a .json file
        else:
            model = dict(model)
            base = model.pop("base", None)
            model_cfg = get_config(base, **model) if base else ModelConfig.from_dict(model)
            preset = base if base in PRESETS else None
        train = dict(d.get("train", {}))
        check_known_fields(TrainConfig, train)
        return cls(model_cfg, TrainConfig(**train), d.get("preset", preset))

    def resolved(self) -> RunConfig:
        """Fills the defaults that depend on the model: the learning rate, from the preset's `PRESET_PEAK_LR`.

        Raises:
          ValueError: when `train.lr` is None and the model is not a preset (no learning rate is guessed).
        """
        if self.train.lr is not None:
            return self
        if self.preset is None:
            raise ValueError("train.lr is not set and the model is not a preset, so it has no stored learning rate: "
                             "pass --lr (or --set train.lr=...).")
        return dataclasses.replace(self, train=self.train.replace(lr=PRESET_PEAK_LR[self.preset]))


def load_config(name_or_file: epath.PathLike) -> RunConfig:
    """A preset name (`tiny-mac`, `170m-mag`, ...) with the default TrainConfig, or a JSON file (local or a URL, read
    through `etils.epath`): either a run config (`{"model": ..., "train": ...}`, e.g. a workdir's config.json) or a
    flat dict of ModelConfig fields."""
    name = str(name_or_file)
    if name in PRESETS:
        return RunConfig(get_config(name), TrainConfig(), name)
    path = epath.Path(name_or_file)
    if name.endswith(".json") or path.is_file():
        d = json.loads(path.read_text())
        if not isinstance(d, dict):
            raise ValueError(f"config file {name!r} must hold a JSON object")
        if set(d) & {"model", "train"}:
            return RunConfig.from_dict(d)
        return RunConfig(ModelConfig.from_dict(d), TrainConfig())
    return RunConfig(get_config(name), TrainConfig(), name)  # an unknown name: get_config's error lists the presets


# Corpora too small for a paper-size model (data names of `titans_jax.data`).
TINY_CORPORA = ("shakespeare",)


def setup_warnings(cfg: RunConfig) -> list[str]:
    """What is likely a mistake, but not an error, in `cfg`: a paper-size preset trained with the byte tokenizer
    (the paper uses a 32K-token vocabulary: Llama 2's tokenizer) or on a tiny corpus (the paper trains on FineWeb-Edu,
    15B to 30B tokens)."""
    if not is_paper_preset(cfg.preset):
        return []
    t, out = cfg.train, []
    if t.tokenizer in ("bytes", "byte"):
        out.append(f"preset {cfg.preset!r} is one of the paper's sizes, trained with a 32K-token vocabulary, but the "
                   "tokenizer is 'bytes': pass --tokenizer PATH (and model.vocab_size to match) for a real run.")
    if t.data in TINY_CORPORA:
        out.append(f"preset {cfg.preset!r} is one of the paper's sizes, trained on billions of tokens, but the data "
                   f"is the tiny corpus {t.data!r} (about 5M bytes): it overfits within an epoch; pass "
                   "--data with a large prepared corpus.")
    return out


# ----------------------------------------------------------------------------------------------- overrides
def parse_value(text: str) -> Any:
    """JSON (`1e-3`, `true`, `null`, `[1, 2]`), else a Python literal (`None`, `True`, `'x'`), else the string."""
    try:
        return json.loads(text)
    except ValueError:
        pass
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError, MemoryError, RecursionError):
        return text


def _field_types(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _coerce(section: str, name: str, value: Any, hint: Any) -> Any:
    """Checks `value` against the field's annotation; an int is accepted for a float field."""
    args = typing.get_args(hint) if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union else (hint,)
    if value is None and type(None) in args:
        return None
    for t in args:
        if t is float and isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
        if t is int and isinstance(value, int) and not isinstance(value, bool):
            return value
        if t is bool and isinstance(value, bool):
            return value
        if t is str and isinstance(value, str):
            return value
        if t is str and isinstance(value, int | float) and not isinstance(value, bool):
            return str(value)  # e.g. a corpus path or dtype that parsed as a number
    names = " | ".join(getattr(t, "__name__", str(t)) for t in args)
    raise ValueError(f"--set {section}.{name}={value!r}: expected {names}, got {type(value).__name__}")


def valid_keys() -> list[str]:
    """Every key `--set` accepts."""
    return [f"model.{f.name}" for f in dataclasses.fields(ModelConfig)] + [
        f"train.{f.name}" for f in dataclasses.fields(TrainConfig)
    ]


def apply_overrides(cfg: RunConfig, items: Iterable[str]) -> RunConfig:
    """Applies `key=value` strings; keys are `model.<field>` / `train.<field>` (a bare field name is accepted when
    only one section has it).

    Raises:
      ValueError: for a malformed item, an unknown key (listing the valid ones) or a value of the wrong type.
    """
    sections = {"model": ModelConfig, "train": TrainConfig}
    updates: dict[str, dict[str, Any]] = {"model": {}, "train": {}}
    for item in items:
        key, eq, raw = item.partition("=")
        key = key.strip()
        if not eq or not key:
            raise ValueError(f"--set {item!r}: expected key=value, e.g. model.dim=64 or train.lr=1e-3")
        section, dot, name = key.partition(".")
        if not dot:  # a bare field name
            owners = [s for s, c in sections.items() if key in {f.name for f in dataclasses.fields(c)}]
            if len(owners) == 1:
                section, name = owners[0], key
        fields = _field_types(sections[section]) if section in sections else {}
        if name not in fields:
            raise ValueError(f"--set: unknown key {key!r}. Valid keys: {', '.join(valid_keys())}")
        updates[section][name] = _coerce(section, name, parse_value(raw.strip()), fields[name])
    model = cfg.model.replace(**updates["model"]) if updates["model"] else cfg.model
    train = cfg.train.replace(**updates["train"]) if updates["train"] else cfg.train
    return dataclasses.replace(cfg, model=model, train=train)
