"""Evaluation: RULER's single-needle tasks, BABILong-style stories, MQAR and perplexity by position, on a trained run
or an export (`python -m titans_jax.eval --workdir RUN --task TASK`), and an lm-evaluation-harness adapter
(`titans_jax.eval.lm_eval_adapter`).

    model, config, tokenizer = titans_jax.load_model("runs/niah-mac")
    result = titans_jax.eval.evaluate(model, tokenizer, "niah-passkey", lengths=[512, 2048])
    print(titans_jax.eval.table(result))

Contexts go through one parallel forward pass; answers are decoded greedily from the streaming state.
"""

from titans_jax.eval.evaluate import evaluate
from titans_jax.eval.report import plot, table, write_json
from titans_jax.eval.tasks import BABILONG_TASKS, NEEDLE_TASKS, QA_TASKS, TASKS, qa_example

__all__ = ["BABILONG_TASKS", "NEEDLE_TASKS", "QA_TASKS", "TASKS", "evaluate", "plot", "qa_example", "table",
           "write_json"]
