"""The training loop: setup checks, (re)start from the latest checkpoint, the step loop with logging, evaluation,
checkpoints and preemption, and the end-of-run report (final validation bits per byte and a sample)."""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import time
from collections.abc import Callable, Mapping
from typing import Any

import jax
import numpy as np
from tqdm.auto import tqdm

from titans_jax import distributed, sharding
from titans_jax.checkpoint import Checkpointer, SigtermHandler
from titans_jax.data import SYNTHETIC_TASKS, eval_batches, get_tokenizer, make_dataset
from titans_jax.train import step as step_lib
from titans_jax.train.config import RunConfig
from titans_jax.train.metrics import MetricsWriter
from titans_jax.train.optim import make_optimizer
from titans_jax.train.state import ModelFn, abstract_train_state, create_train_state, model_of, param_count, titans_model_fn

log = logging.getLogger("titans_jax.train")

CONFIG_FILE = "config.json"
CHECKPOINT_DIR = "checkpoints"
RESUME_MODES = ("auto", "yes", "no")


class TrainingDiverged(RuntimeError):
    """The loss or gradient norm became NaN/inf; no state from that step on was saved."""


# ------------------------------------------------------------------------------------------------- checks
def token_byte_lengths(tokenizer: Any) -> np.ndarray | None:
    """UTF-8 bytes of each token id (for bits per byte), or None for the byte tokenizer (one byte per token).

    SentencePiece: the piece's text with the word-boundary mark as a space; byte-fallback pieces are one byte;
    control and unknown pieces count zero. (The space a leading mark stands for at the start of a text is counted,
    a negligible difference over a validation split.)
    """
    if tokenizer.name == "bytes":
        return None
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=tokenizer.model_file)
    out = np.zeros(tokenizer.vocab_size, np.float32)
    for i in range(tokenizer.vocab_size):
        if sp.is_byte(i):
            out[i] = 1
        elif not (sp.is_control(i) or sp.is_unknown(i)):
            out[i] = len(sp.id_to_piece(i).replace("\u2581", " ").encode("utf-8"))
    return out


def check_setup(cfg: RunConfig, mesh: jax.sharding.Mesh, tokenizer: Any) -> None:
    """Refuses, before anything is compiled or trained, settings that would fail or silently mistrain."""
    m, t = cfg.model, cfg.train
    if tokenizer.vocab_size > m.vocab_size:
        raise ValueError(
            f"tokenizer {t.tokenizer!r} has {tokenizer.vocab_size} tokens but model.vocab_size={m.vocab_size}: "
            f"token ids would fall outside the embedding. Set --set model.vocab_size={tokenizer.vocab_size} "
            "(or larger), or use a smaller tokenizer."
        )
    if t.seq_len > m.max_seq_len:
        raise ValueError(f"train.seq_len={t.seq_len} exceeds model.max_seq_len={m.max_seq_len}; raise model.max_seq_len.")
    shards = mesh.shape["data"] * mesh.shape["fsdp"]
    if t.batch_size % shards:
        raise ValueError(
            f"train.batch_size={t.batch_size} is not divisible by the batch-parallel devices data x fsdp = {shards} "
            f"of --mesh {t.mesh or '(all devices on data)'!r}."
        )
    if t.batch_size % jax.process_count():
        raise ValueError(f"train.batch_size={t.batch_size} is not divisible by the {jax.process_count()} processes.")


def check_batch(batch: Mapping[str, np.ndarray], vocab_size: int, where: str) -> None:
    """Token ids must index the embedding (a mismatched tokenizer or corpus would otherwise read garbage rows)."""
    tokens = batch["tokens"]
    lo, hi = int(tokens.min()), int(tokens.max())
    if lo < 0 or hi >= vocab_size:
        raise ValueError(f"{where}: token ids span [{lo}, {hi}] but model.vocab_size={vocab_size}.")


def _config_diff(a: Mapping[str, Any], b: Mapping[str, Any]) -> dict[str, tuple[Any, Any]]:
    return {k: (a.get(k), b.get(k)) for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)}


def _scalar(x: jax.Array) -> float:
    # Replicated outputs: read this process's copy (a multi-process global array cannot be fetched whole).
    return float(np.asarray(x.addressable_data(0)))


# --------------------------------------------------------------------------------------------------- train
@dataclasses.dataclass
class _Ctx:
    """What the loop's helpers share."""

    cfg: RunConfig
    workdir: str
    mesh: jax.sharding.Mesh
    ckpt: Checkpointer
    writer: MetricsWriter
    eval_fn: Callable
    eval_data: list
    pbar: Any


def _evaluate(ctx: _Ctx, state: Any) -> dict[str, float]:
    outs = [ctx.eval_fn(state, distributed.global_batch_from_local(b, ctx.mesh)) for b in ctx.eval_data]
    tot = {k: sum(_scalar(o[k]) for o in outs) for k in ("nll", "weight", "bytes")}
    return {"val_loss": tot["nll"] / max(tot["weight"], 1.0), "val_bpb": tot["nll"] / math.log(2) / max(tot["bytes"], 1.0)}


def _resume_decision(ckpt: Checkpointer, resume: str, workdir: str) -> int | None:
    if resume not in RESUME_MODES:
        raise ValueError(f"--resume {resume!r}: use one of {RESUME_MODES}")
    latest = ckpt.latest_step()
    if resume == "no" and latest is not None:
        raise ValueError(
            f"{workdir} already holds checkpoints (latest step {latest}) and --resume no was given: "
            "use a fresh --workdir, or resume."
        )
    if resume == "yes" and latest is None:
        raise FileNotFoundError(f"--resume yes: no committed checkpoint in {ckpt.directory}")
    return latest if resume != "no" else None


def _check_resume_config(cfg: RunConfig, meta: Mapping[str, Any]) -> None:
    saved = meta.get("config", {})
    diff = _config_diff(saved.get("model", {}), dataclasses.asdict(cfg.model))
    if diff:
        raise ValueError(
            f"the checkpoint was trained with another model config {{field: (saved, now)}} = {diff}. "
            "Resume with the same model (omit --config to reuse the workdir's config.json), or use a fresh --workdir."
        )
    tdiff = _config_diff(saved.get("train", {}), dataclasses.asdict(cfg.train))
    if tdiff:
        log.warning("resuming with changed train settings {field: (saved, now)} = %s", tdiff)


def _sample(cfg: RunConfig, graphdef: Any, state: Any, tokenizer: Any) -> str | None:
    t = cfg.train
    if not t.sample_tokens:
        return None
    if jax.process_count() > 1:
        log.info("no end-of-run sample in a multi-process run; use python -m titans_jax.sample --workdir ...")
        return None
    from titans_jax.generate import generate

    prompt = tokenizer.encode(t.sample_prompt) or tokenizer.encode("\n")
    out = generate(model_of(graphdef, state), np.asarray([prompt], np.int32), t.sample_tokens, rng=jax.random.key(t.seed))
    return tokenizer.decode(np.asarray(out)[0].tolist())


def train(cfg: RunConfig, workdir: str, *, resume: str = "auto", model_fn: ModelFn | None = None) -> dict[str, Any]:
    """Trains `cfg` in `workdir`, resuming from its latest checkpoint unless `resume="no"`.

    Args:
      cfg: the run configuration (the learning rate is resolved here if None).
      workdir: holds config.json, metrics.jsonl, tb/ and checkpoints/.
      resume: "auto" (resume when a checkpoint exists), "yes" (must exist) or "no" (refuse a used workdir).
      model_fn: builds the model (default: TitansLM of cfg.model seeded by cfg.train.seed).

    Returns:
      {"step", "status" ("done" | "preempted"), "val_loss", "val_bpb", "sample"}.

    Raises:
      ValueError / FileNotFoundError: bad settings or data, before training starts.
      TrainingDiverged: a non-finite loss; the checkpoints written before it are kept.
    """
    cfg = cfg.resolved()
    t = cfg.train
    is_main = jax.process_index() == 0
    mesh = sharding.make_mesh(t.mesh or None)
    tokenizer = get_tokenizer(t.tokenizer)
    check_setup(cfg, mesh, tokenizer)
    data_kw = dict(tokenizer=t.tokenizer, process_index=jax.process_index(), process_count=jax.process_count(),
                   data_dir=t.data_dir, text_field=t.text_field)
    # Data first: a missing or empty corpus fails here, before a model is built.
    train_it = make_dataset(t.data, split="train", seq_len=t.seq_len, global_batch_size=t.batch_size, seed=t.seed,
                            **data_kw)
    eval_data = list(eval_batches(t.data, seq_len=t.seq_len, global_batch_size=t.batch_size,
                                  max_batches=t.eval_batches, **data_kw))
    for i, b in enumerate(eval_data):
        check_batch(b, cfg.model.vocab_size, f"validation batch {i}")

    os.makedirs(workdir, exist_ok=True)
    ckpt = Checkpointer(os.path.join(workdir, CHECKPOINT_DIR), max_to_keep=t.keep_checkpoints, async_save=True)
    try:
        return _train(cfg, workdir, mesh, tokenizer, train_it, eval_data, ckpt, resume, model_fn, is_main)
    finally:
        ckpt.close()  # waits for a pending save (always of a good state) before exiting


def _train(cfg, workdir, mesh, tokenizer, train_it, eval_data, ckpt, resume, model_fn, is_main) -> dict[str, Any]:
    t = cfg.train
    latest = _resume_decision(ckpt, resume, workdir)
    tx, schedule = make_optimizer(t)
    model_fn = model_fn or titans_model_fn(cfg.model, t.seed)
    with_mask = t.data in SYNTHETIC_TASKS
    # Built outside `jax.set_mesh`: under a global mesh, nnx.eval_shape would shard by the raw logical names.
    graphdef, abstract = abstract_train_state(model_fn, tx, mesh)
    shardings = jax.tree.map(lambda a: a.sharding, abstract)
    report = (sharding.audit_replication(shardings, abstract, t.max_replicated_fraction)
              if t.max_replicated_fraction is not None else sharding.replicated_bytes_report(shardings, abstract))
    log.info("model %s: %.3fM parameters; mesh %s; train state %s per device (%.1f%% of bytes replicated over "
             "model-parallel axes)", cfg.model.variant, param_count(abstract) / 1e6, dict(mesh.shape),
             step_lib.format_bytes(report["per_device_bytes"]), 100 * report["replicated_fraction"])
    if latest is not None:
        state, meta = ckpt.restore(latest, abstract)
        _check_resume_config(cfg, meta)
        train_it.set_state(meta["data"])
        start = int(meta["step"])
        log.info("resumed from step %d of %s", start, ckpt.directory)
    else:
        _, state, _ = create_train_state(model_fn, tx, mesh)
        start = 0
    if is_main:
        with open(os.path.join(workdir, CONFIG_FILE), "w") as f:
            json.dump(cfg.to_dict(), f, indent=2)

    with jax.set_mesh(mesh):  # activations' logical sharding constraints read the mesh while tracing
        t0 = time.perf_counter()
        batch_abs = step_lib.abstract_batch(mesh, t.batch_size, t.seq_len, with_mask)
        train_fn = step_lib.compile_train_step(
            step_lib.make_train_step(graphdef, schedule, t.grad_accum), abstract, batch_abs, mesh)
        eval_fn = step_lib.compile_eval_step(
            step_lib.make_eval_step(graphdef, token_byte_lengths(tokenizer)), abstract, batch_abs, mesh)
        mem = step_lib.memory_report(train_fn)
        log.info("compiled train and eval steps in %.1f s; train step memory per device: %s", time.perf_counter() - t0,
                 "not reported by this backend" if mem is None else
                 ", ".join(f"{k} {step_lib.format_bytes(v)}" for k, v in mem.items()))

        writer = MetricsWriter(workdir, start, enabled=is_main)
        pbar = tqdm(total=t.steps, initial=start, disable=not is_main, unit="step", dynamic_ncols=True,
                    desc=f"train {cfg.model.variant}")
        ctx = _Ctx(cfg, workdir, mesh, ckpt, writer, eval_fn, eval_data, pbar)
        try:
            result = _loop(ctx, state, train_fn, train_it, start)
        finally:
            pbar.close()
            writer.close()
        state = result.pop("state")
        if result["status"] == "done":
            if result.get("val_bpb") is None:  # the run had already finished: report, write nothing
                result.update(_evaluate(ctx, state))
            result["sample"] = _sample(cfg, graphdef, state, tokenizer)
            if is_main:
                print(f"final validation at step {result['step']}: loss {result['val_loss']:.4f} nats/token, "
                      f"{result['val_bpb']:.4f} bits per byte", flush=True)
                if result["sample"] is not None:
                    print(f"sample:\n{result['sample']}", flush=True)
        return result


def _loop(ctx: _Ctx, state: Any, train_fn: Callable, train_it: Any, start: int) -> dict[str, Any]:
    cfg, t = ctx.cfg, ctx.cfg.train
    tokens_per_step = t.batch_size * t.seq_len
    clock = {"step": start, "time": time.perf_counter()}
    multi = jax.process_count() > 1

    def handle(s: int, metrics: Mapping[str, jax.Array]) -> None:
        """Reads step s's metrics (one step late, so the device keeps a step queued), stops on NaN, logs."""
        vals = {k: _scalar(v) for k, v in metrics.items()}
        if not vals["ok"]:
            ctx.ckpt.wait()
            good = ctx.ckpt.latest_step()
            what = "loss" if not math.isfinite(vals["loss"]) else "update (parameters overflowed)"
            raise TrainingDiverged(
                f"non-finite training {what} at step {s}: loss={vals['loss']}, grad_norm={vals['grad_norm']}, "
                f"lr={vals['lr']:.3g}. Training stopped without saving this state. Last good checkpoint: "
                + (f"step {good} in {ctx.ckpt.directory}." if good is not None else "none (no checkpoint yet).")
                + " Lower train.lr or raise train.warmup, then resume."
            )
        ctx.pbar.update(1)
        if s % t.log_every == 0 or s == t.steps:
            now = time.perf_counter()
            tps = (s - clock["step"]) * tokens_per_step / max(now - clock["time"], 1e-9)
            clock.update(step=s, time=now)
            ctx.writer.write(s, loss=vals["loss"], lr=vals["lr"], grad_norm=vals["grad_norm"], tokens_per_s=tps)
            ctx.pbar.set_postfix(loss=f"{vals['loss']:.4f}", tok_s=f"{tps:,.0f}")

    def meta(s: int) -> dict[str, Any]:
        return {"step": s, "data": train_it.get_state(), "config": cfg.to_dict()}

    result: dict[str, Any] = {"step": start, "status": "done", "val_loss": None, "val_bpb": None}
    pending = None
    with SigtermHandler() as stop:
        for s in range(start + 1, t.steps + 1):
            local = next(train_it)
            check_batch(local, cfg.model.vocab_size, f"training batch of step {s}")
            state, metrics = train_fn(state, distributed.global_batch_from_local(local, ctx.mesh))
            if pending is not None:
                handle(*pending)
            pending = (s, metrics)
            eval_now = (t.eval_every and s % t.eval_every == 0) or s == t.steps
            save_now = (t.checkpoint_every and s % t.checkpoint_every == 0) or s == t.steps
            # Every process must agree to stop at the same step; the all-gather is paced to keep steps cheap.
            preempt = stop.requested if not multi else (s % t.log_every == 0 and distributed.any_process(stop.requested))
            if not (eval_now or save_now or preempt):
                continue
            handle(*pending)  # a checkpoint is only written after its step's loss was seen to be finite
            pending = None
            result["step"] = s
            paused = time.perf_counter()
            if eval_now:
                ev = _evaluate(ctx, state)
                result.update(ev)
                ctx.writer.write(s, **ev)
                ctx.pbar.write(f"step {s}: val_loss {ev['val_loss']:.4f}, val_bpb {ev['val_bpb']:.4f}")
            if save_now or preempt:
                ctx.writer.flush()  # metrics up to s are on disk before the checkpoint of s can exist
                ctx.ckpt.save(s, state, meta(s), force=True)
            clock["time"] += time.perf_counter() - paused  # eval and save time is not training throughput
            if preempt:
                ctx.ckpt.wait()
                log.warning("stopped by signal %s at step %d after saving a checkpoint", stop.signum, s)
                result["status"] = "preempted"
                break
        if pending is not None:
            handle(*pending)
            result["step"] = pending[0]
    result["state"] = state
    return result
