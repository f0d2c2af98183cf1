"""A trained model as parameters only, and loading a model from a training run or such an export.

    python -m titans_jax.export --workdir RUN --out DIR [--step N] [--dtype bfloat16|float32] [--overwrite]

An export is one orbax checkpoint directory, written atomically (a temporary directory renamed into place on a local
disk; a commit marker written last on GCS), so a reader never sees half of one::

    DIR/
      params/        the model's parameters (no optimizer state): the nested dict of `nnx.to_pure_dict`, in --dtype
      meta/metadata  JSON: {"format", "model" (ModelConfig fields), "dtype", "tokenizer", "source", "run"}
      tokenizer/     the tokenizer's file (a SentencePiece .model, ...) as it was; empty for the byte tokenizer

`load_model(PATH)` (also `titans_jax.load_model`) takes a training workdir or an export, local or a URL, and returns
`(model, config, tokenizer)`; it reads neither the optimizer state nor any data. `python -m titans_jax.sample` takes
either.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import os
import sys
from typing import Any

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp
from etils import epath
from flax import nnx

from titans_jax.checkpoint import Checkpointer
from titans_jax.configs import ModelConfig
from titans_jax.train import workdir as workdir_lib
from titans_jax.train.config import RunConfig, load_config
from titans_jax.train.state import abstract_model, model_part, titans_model_fn

__all__ = ["EXPORT_DTYPES", "FORMAT", "export", "is_export", "load_model", "main", "read_export_meta"]

FORMAT = "titans_jax.export/1"
EXPORT_DTYPES = ("float32", "bfloat16")
PARAMS, META, TOKENIZER = "params", "meta", "tokenizer"  # the export's orbax items


# ------------------------------------------------------------------------------------------- the tokenizer's file
class _FileHandler(ocp.CheckpointHandler):
    """An orbax item of plain files, written as they are (the tokenizer's file rides in the export's atomic commit)."""

    def save(self, directory: epath.Path, args: FilesSave) -> None:
        if jax.process_index() == 0:
            for name, data in args.files.items():
                (directory / name).write_bytes(data)

    def restore(self, directory: epath.Path, args: FilesRestore | None = None) -> dict[str, bytes]:
        del args
        return {p.name: p.read_bytes() for p in directory.iterdir() if not p.is_dir()}

    def metadata(self, directory: epath.Path) -> None:
        return None

    def finalize(self, directory: epath.Path) -> None:
        pass

    def close(self) -> None:
        pass


@ocp.args.register_with_handler(_FileHandler, for_save=True)
@dataclasses.dataclass
class FilesSave(ocp.args.CheckpointArgs):
    """Files to save: `{file name: contents}`."""

    files: dict[str, bytes]


@ocp.args.register_with_handler(_FileHandler, for_restore=True)
@dataclasses.dataclass
class FilesRestore(ocp.args.CheckpointArgs):
    """Restores every file of the item as `{file name: contents}`."""


def _tokenizer_files(spec: str) -> tuple[dict[str, Any], dict[str, bytes]]:
    """`(metadata, files)` of the tokenizer a run used (`train.tokenizer`): the files that define it (none for bytes;
    a SentencePiece .model; a tokenizer.json and the tokenizer_config.json beside it), copied into the export. The
    first file is the one `get_tokenizer` opens."""
    from titans_jax.data import get_tokenizer

    tok = get_tokenizer(spec)
    if hasattr(tok, "files"):
        paths = list(tok.files())
    else:
        paths = [] if tok.name in ("bytes", "byte") else [spec]
    files = {os.path.basename(p): epath.Path(p).read_bytes() for p in paths}
    meta = {"name": str(tok.name), "kind": getattr(tok, "kind", "bytes" if not paths else "file"),
            "vocab_size": int(tok.vocab_size), "fingerprint": getattr(tok, "fingerprint", None),
            "file": os.path.basename(paths[0]) if paths else None}
    return meta, files


def _local_tokenizer_dir(src: epath.Path, names: list[str]) -> str:
    """A local folder holding the export's tokenizer files (`src` itself when it is local): tokenizer libraries read
    local files. From a URL they are copied to a cache folder named by their content, so loads reuse one copy."""
    if workdir_lib.is_local(src):
        return os.fspath(src)
    data = {name: (src / name).read_bytes() for name in names}
    digest = hashlib.sha256()
    for name in sorted(data):
        digest.update(name.encode() + b"\0" + hashlib.sha256(data[name]).digest())
    cache = os.path.join(os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "titans_jax", "tokenizers",
                         digest.hexdigest()[:16])
    os.makedirs(cache, exist_ok=True)
    for name, content in data.items():
        dst = os.path.join(cache, name)
        if not os.path.exists(dst):
            tmp = f"{dst}.{os.getpid()}.tmp"
            with open(tmp, "wb") as f:
                f.write(content)
            os.replace(tmp, dst)
    return cache


# ------------------------------------------------------------------------------------------------------------ export
def _read_run_config(workdir: epath.Path) -> RunConfig:
    path = workdir_lib.config_path(workdir)
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: is {str(workdir)!r} a training workdir?")
    return load_config(path).resolved()


def _restore_model_state(workdir: epath.Path, step: int | None, target: Any) -> tuple[Any, int]:
    """`(model state, step)`: checkpoint `step` (default: the latest) of a workdir, read into `target`'s layout (see
    `Checkpointer.restore_subtree`); the optimizer state is not read."""
    ckpt_dir = workdir_lib.checkpoint_dir(workdir)
    if not ckpt_dir.exists():
        raise FileNotFoundError(f"no checkpoint in {ckpt_dir}")
    with Checkpointer(ckpt_dir, read_only=True, async_save=False) as ckpt:
        step = ckpt.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no committed checkpoint in {ckpt.directory}")
        return ckpt.restore_subtree(step, model_part(target))[0], step


def export(workdir: epath.PathLike, out: epath.PathLike, *, step: int | None = None, dtype: str = "float32",
           overwrite: bool = False) -> epath.Path:
    """Writes checkpoint `step` (default: the latest) of `workdir` as a params-only export in `out` (see the module
    docstring); returns `out`. The parameters pass through host memory, never the accelerators.

    Args:
      workdir: a training workdir (local or a URL).
      out: the export directory (local or a URL); it must not exist unless `overwrite`.
      step: the checkpoint step (default: the latest committed one).
      dtype: the parameters' dtype in the export, "float32" (as trained) or "bfloat16" (half the size).
      overwrite: replace an existing `out`.

    Raises:
      FileNotFoundError: `workdir` has no config.json or no committed checkpoint (or not `step`).
      FileExistsError: `out` exists and not `overwrite`.
      ValueError: an unknown dtype.
    """
    if dtype not in EXPORT_DTYPES:
        raise ValueError(f"--dtype must be one of {EXPORT_DTYPES}, got {dtype!r}")
    workdir, out = workdir_lib.path(workdir), workdir_lib.path(out)
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} already exists; pass --overwrite to replace it")
    cfg = _read_run_config(workdir)
    tok_meta, tok_files = _tokenizer_files(cfg.train.tokenizer)
    _, abstract = abstract_model(titans_model_fn(cfg.model, cfg.train.seed))
    target = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, jnp.dtype(dtype)), abstract)
    state, step = _restore_model_state(workdir, step, target)
    meta = {"format": FORMAT, "model": dataclasses.asdict(cfg.model), "dtype": dtype, "tokenizer": tok_meta,
            "source": {"workdir": str(workdir), "step": step}, "run": cfg.to_dict()}
    args = ocp.args.Composite(**{PARAMS: ocp.args.StandardSave(nnx.to_pure_dict(state)), META: ocp.args.JsonSave(meta),
                                 TOKENIZER: FilesSave(tok_files)})
    with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as checkpointer:
        checkpointer.save(out, args, force=overwrite)
    return out


# -------------------------------------------------------------------------------------------------------------- load
def is_export(path: epath.PathLike) -> bool:
    """Whether `path` is an export (`python -m titans_jax.export`)."""
    p = workdir_lib.path(path)
    return (p / META).is_dir() and (p / PARAMS).is_dir()


def read_export_meta(path: epath.PathLike) -> dict[str, Any]:
    """An export's JSON metadata (model config, dtype, tokenizer, source run)."""
    p = workdir_lib.path(path)
    with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as checkpointer:
        meta = checkpointer.restore(p, ocp.args.Composite(**{META: ocp.args.JsonRestore()}))[META]
    if meta.get("format") != FORMAT:
        raise ValueError(f"{p} holds an export of format {meta.get('format')!r}; this version reads {FORMAT!r}")
    return meta


def load_model(path: epath.PathLike, *, step: int | None = None, mesh: jax.sharding.Mesh | None = None
               ) -> tuple[nnx.Module, ModelConfig, Any]:
    """`(model, config, tokenizer)` from a training workdir or an export, local or a URL (`gs://...`).

    Only the model's parameters are read: not the optimizer state, not the data. The parameters are placed on `mesh`
    (default: this host's devices, replicated) in the model's own parameter dtype (float32; a bfloat16 export is
    widened exactly).

    Args:
      path: a training workdir (its checkpoint `step`, default the latest) or an export.
      step: the checkpoint step of a workdir (an export holds one model: `step` must be None).
      mesh: the device mesh of the parameters.

    Returns:
      The `TitansLM`, its `ModelConfig`, and the tokenizer (`titans_jax.data.get_tokenizer`'s object).

    Raises:
      FileNotFoundError: `path` is neither a workdir (config.json) nor an export (meta/, params/), or a workdir has no
        committed checkpoint (or not `step`).
    """
    from titans_jax.data import get_tokenizer
    from titans_jax.sharding import make_mesh

    p = workdir_lib.path(path)
    mesh = mesh if mesh is not None else make_mesh(None, devices=jax.local_devices())
    if is_export(p):
        if step is not None:
            raise ValueError(f"{p} is an export (one model): --step applies to training workdirs only")
        meta = read_export_meta(p)
        config = ModelConfig.from_dict(meta["model"])
        graphdef, abstract = abstract_model(titans_model_fn(config, 0), mesh)
        target = nnx.to_pure_dict(abstract)
        with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as checkpointer:
            pure = checkpointer.restore(p, ocp.args.Composite(**{PARAMS: ocp.args.StandardRestore(target)}))[PARAMS]
        nnx.replace_by_pure_dict(abstract, pure)
        state = abstract
        tok = meta["tokenizer"]
        if tok["file"] is None:
            tokenizer = get_tokenizer("bytes")
        else:
            names = [f.name for f in (p / TOKENIZER).iterdir()]
            tokenizer = get_tokenizer(os.path.join(_local_tokenizer_dir(p / TOKENIZER, names), tok["file"]))
            if tok.get("fingerprint") not in (None, getattr(tokenizer, "fingerprint", None)):
                raise ValueError(f"the tokenizer files in {p / TOKENIZER} do not match the export's metadata")
    elif workdir_lib.config_path(p).exists():
        cfg = _read_run_config(p)
        config = cfg.model
        graphdef, abstract = abstract_model(titans_model_fn(config, cfg.train.seed), mesh)
        state, _ = _restore_model_state(p, step, abstract)
        tokenizer = get_tokenizer(cfg.train.tokenizer)
    else:
        raise FileNotFoundError(f"{p} is neither a training workdir (no {workdir_lib.CONFIG_FILE}) nor an export "
                                f"(no {META}/ and {PARAMS}/, see python -m titans_jax.export)")
    return nnx.merge(graphdef, state), config, tokenizer


# ------------------------------------------------------------------------------------------------------ command line
def main(argv: list[str] | None = None) -> int:
    """Command line; returns the exit status (2 for a missing workdir or checkpoint, an existing --out, bad flags)."""
    p = argparse.ArgumentParser(prog="python -m titans_jax.export", description=__doc__.split("\n\n")[0])
    p.add_argument("--workdir", required=True, help="the training run (local or a URL such as gs://bucket/run)")
    p.add_argument("--out", required=True, help="the export directory to create (local or a URL)")
    p.add_argument("--step", type=int, default=None, help="checkpoint step (default: the latest)")
    p.add_argument("--dtype", choices=EXPORT_DTYPES, default="float32",
                   help="the parameters' dtype: float32 (as trained, default) or bfloat16 (half the size)")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    args = p.parse_args(argv)
    try:
        out = export(args.workdir, args.out, step=args.step, dtype=args.dtype, overwrite=args.overwrite)
    except (ValueError, FileNotFoundError, FileExistsError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    meta = read_export_meta(out)
    print(f"exported step {meta['source']['step']} of {meta['source']['workdir']} to {out} ({meta['dtype']})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
