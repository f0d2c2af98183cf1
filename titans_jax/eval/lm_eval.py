"""lm-evaluation-harness's own command line, with the model type ``titans_jax`` registered.

    python -m titans_jax.eval.lm_eval --model titans_jax --model_args workdir=RUN --tasks piqa,arc_easy \\
        --batch_size 16 [--include_path DIR] [--output_path out/] [any other lm_eval flag]

lm-eval (0.4.13) finds a model type only in its built-in table or among classes imported before it runs: it reads no
entry points, and ``--include_path`` adds tasks, not models. So the plain ``lm_eval --model titans_jax`` command
answers "no model for this name found"; this module imports ``titans_jax.eval.lm_eval_adapter`` (which registers
the model) and then hands every argument to lm-eval's own command line unchanged. Needs ``pip install lm-eval``.
"""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    """Runs lm-eval's command line on ``argv`` (default ``sys.argv[1:]``) with ``titans_jax`` registered; returns 0
    (lm-eval exits by itself on bad flags)."""
    try:
        from lm_eval.__main__ import cli_evaluate
    except ImportError as e:
        raise SystemExit("python -m titans_jax.eval.lm_eval needs lm-evaluation-harness: pip install lm-eval") from e
    import titans_jax.eval.lm_eval_adapter  # noqa: F401  (registers the model type)

    args = sys.argv[1:] if argv is None else list(argv)
    saved, sys.argv = sys.argv, ["lm-eval", *args]  # lm-eval's parser reads sys.argv itself
    try:
        cli_evaluate()
    finally:
        sys.argv = saved
    return 0


if __name__ == "__main__":
    sys.exit(main())
