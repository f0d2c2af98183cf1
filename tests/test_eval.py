"""The evaluation harness: greedy answers equal the model's own parallel argmax, untrained models score at chance,
the result document, table and plots, and the command line on a trained workdir."""

import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from titans_jax import eval as ev
from titans_jax.configs import get_config
from titans_jax.data import get_tokenizer
from titans_jax.eval import runner
from titans_jax.eval.evaluate import held_out_windows
from titans_jax.model import TitansLM

TOK = get_tokenizer("bytes")


@pytest.fixture(scope="module")
def models():
    """Untrained tiny models: a memory variant with attention (MAC) and full attention with a short KV cache."""
    return {v: TitansLM(get_config(f"tiny-{v}", dim=32, num_layers=1, max_seq_len=256), rngs=nnx.Rngs(1))
            for v in ("mac", "transformer")}


@pytest.mark.parametrize("variant", ["mac", "transformer"])
def test_greedy_answer_is_the_argmax_of_the_models_own_parallel_logits(models, variant):
    model = models[variant]
    examples = [ev.qa_example("niah-number", 0, i, 420, TOK, depth=0.5) for i in range(2)]
    prompts = np.stack([ex.prompt for ex in examples])
    assert prompts.shape == (2, 420 - 8)  # prompt + answer (" " and 7 digits) = the length
    fitted = runner.fit_context(model, 420)  # the transformer's cache of 256 is widened, parameters kept
    gen = runner.greedy_answers(fitted, prompts, 8)
    assert gen.shape == (2, 8)
    full = jnp.asarray(np.concatenate([prompts, gen], axis=1))
    argmax = np.asarray(jnp.argmax(model(full), axis=-1))  # the plain parallel call, no state, no cache
    np.testing.assert_array_equal(argmax[:, 411:419], gen)
    ok = runner.score_answers(examples, gen, TOK)
    assert ok.dtype == bool and ok.shape == (2,)


def test_ragged_prompts_each_continue_their_own_prompt(models):
    """Word answers differ in length, so prompts of one length differ too: each row's greedy answer is still the argmax
    of its own parallel logits."""
    model = models["mac"]
    examples = [ev.qa_example("niah-word", 0, i, 430, TOK) for i in range(6)]
    examples = sorted(examples, key=lambda e: len(e.answer))[::5][:2]  # the shortest and the longest answer
    assert len(examples[0].prompt) != len(examples[1].prompt)
    gen = runner.greedy_answers(model, [e.prompt for e in examples], 6)
    for ex, g in zip(examples, gen, strict=True):
        full = jnp.asarray(np.concatenate([ex.prompt, g])[None])
        argmax = np.asarray(jnp.argmax(model(full), axis=-1))[0]
        np.testing.assert_array_equal(argmax[len(ex.prompt) - 1 : len(ex.prompt) + 5], g)


def test_scoring_is_exact_match_of_the_whole_value():
    ex = ev.qa_example("niah-passkey", 0, 0, 420, TOK)
    right = np.asarray([TOK.encode(" " + ex.target)])
    wrong = right.copy()
    wrong[0, -1] = TOK.encode("x")[0]
    assert runner.score_answers([ex], right, TOK).tolist() == [True]
    assert runner.score_answers([ex], wrong, TOK).tolist() == [False]


@pytest.mark.parametrize("task", ["niah-passkey", "niah-number", "niah-word", "niah-uuid", "babilong-qa1", "babilong-qa2",
                                  "babilong-qa3", "babilong-qa4", "babilong-qa5", "mqar"])
def test_an_untrained_model_scores_at_chance(models, task):
    kwargs = dict(lengths=[128], num_pairs=[8]) if task == "mqar" else dict(lengths=[640])
    result = ev.evaluate(models["mac"], TOK, task, samples=6, batch_size=6, seed=2, progress=False,
                         memory_stats=False, **kwargs)
    accs = [r["accuracy"] for r in result["results"]]
    # Chance: 1e-7 for a 7-digit value, about 1/8 for a bAbI place or person, 1/128 for an MQAR value.
    assert all(a <= (0.34 if task.startswith("babilong") else 0.1) for a in accs), accs
    assert all(r["samples"] == 6 for r in result["results"])


def test_result_document_table_and_heatmap(models, tmp_path):
    result = ev.evaluate(models["mac"], TOK, "niah-passkey", lengths=[420, 520], depths=[0.0, 1.0], samples=3,
                         batch_size=2, seed=0, progress=False, memory_stats=False, name="mac-untrained")
    assert result["task"] == "niah-passkey" and result["model"]["variant"] == "mac"
    assert [(r["length"], r["depth"]) for r in result["results"]] == [(420, 0.0), (420, 1.0), (520, 0.0), (520, 1.0)]
    assert all(set(r) == {"length", "depth", "accuracy", "samples", "needle_depth"} and r["samples"] == 3
               for r in result["results"])
    # Per cell two batches of 2 rows (3 samples, one padded), each row its prompt and 8 answer tokens: the length.
    assert result["timing"]["tokens_per_s"] > 0
    assert result["timing"]["tokens"] == sum(2 * 2 * length for length in (420, 420, 520, 520))
    text = ev.table(result)
    assert "length" in text and "all" in text and text.count("\n") == 7
    ev.write_json(result, str(tmp_path / "r.json"))
    assert json.loads((tmp_path / "r.json").read_text())["results"] == result["results"]
    png = ev.plot(result, str(tmp_path / "heat.png"))
    assert open(png, "rb").read(8) == b"\x89PNG\r\n\x1a\n"


def test_ppl_by_position_bucket(models, corpus, data_dir, monkeypatch):
    monkeypatch.setenv("TITANS_JAX_DATA_DIR", data_dir)
    result = ev.evaluate(models["mac"], TOK, "ppl", lengths=[64, 128], samples=4, batch_size=2, data=corpus,
                         bucket=32, progress=False, memory_stats=False)
    rows = result["results"]
    assert [(r["length"], r["position_bucket"]) for r in rows] == [
        (64, [0, 32]), (64, [32, 64]), (128, [0, 32]), (128, [32, 64]), (128, [64, 96]), (128, [96, 128])]
    assert all(r["tokens"] == 4 * 32 for r in rows)
    # Bytes: bits per byte are bits per token; against a direct computation on the same held-out windows.
    assert all(math.isclose(r["bits_per_byte"], r["bits_per_token"]) for r in rows)
    tokens = np.concatenate(list(held_out_windows(corpus, "bytes", 2, 4)(64)))
    logp = jax.nn.log_softmax(models["mac"](jnp.asarray(tokens[:, :-1])), axis=-1)
    nll = -np.take_along_axis(np.asarray(logp), tokens[:, 1:, None], axis=-1)[..., 0]
    expected = nll.reshape(4, 2, 32).mean(axis=(0, 2)) / math.log(2)
    np.testing.assert_allclose([r["bits_per_byte"] for r in rows[:2]], expected, rtol=1e-5)
    assert all(6.0 < r["bits_per_byte"] < 11.0 for r in rows)  # untrained: about log2(256) = 8


def test_evaluate_errors_name_the_argument(models):
    m = models["mac"]
    with pytest.raises(ValueError, match="Unknown task 'niah-essay'"):
        ev.evaluate(m, TOK, "niah-essay", lengths=[400])
    with pytest.raises(ValueError, match="depths apply|--depths applies"):
        ev.evaluate(m, TOK, "babilong-qa1", lengths=[400], depths=[0.5])
    with pytest.raises(ValueError, match="depths must lie in"):
        ev.evaluate(m, TOK, "niah-passkey", lengths=[400], depths=[50])
    with pytest.raises(ValueError, match="lengths must be positive"):
        ev.evaluate(m, TOK, "niah-passkey", lengths=[0])
    with pytest.raises(ValueError, match="too short"):
        ev.evaluate(m, TOK, "niah-passkey", lengths=[100], progress=False, memory_stats=False)


def test_command_line_on_a_trained_workdir(tmp_path, corpus, data_dir, capsys):
    from titans_jax.eval.__main__ import main as eval_main
    from titans_jax.train.__main__ import main as train_main

    run = tmp_path / "run"
    assert train_main(["--config", "tiny-mag", "--workdir", str(run), "--data", corpus, "--steps", "1",
                       "--batch-size", "8", "--seq-len", "32", "--set", "model.dim=32", "model.num_layers=1",
                       "train.sample_tokens=0", "train.eval_batches=1", f"train.data_dir={data_dir}"]) == 0
    capsys.readouterr()
    out, png = tmp_path / "res" / "niah.json", tmp_path / "res" / "niah.png"
    assert eval_main(["--workdir", str(run), "--task", "niah-passkey", "--lengths", "400", "--depths", "0", "1",
                      "--samples", "2", "--batch-size", "2", "--out", str(out), "--plot", str(png),
                      "--no-progress"]) == 0
    text = capsys.readouterr().out
    assert "length  depth  accuracy  samples" in text and "tokens/s" in text
    doc = json.loads(out.read_text())
    assert doc["task"] == "niah-passkey" and doc["model"]["variant"] == "mag" and doc["workdir"] == str(run)
    assert [(r["length"], r["depth"], r["samples"]) for r in doc["results"]] == [(400, 0.0, 2), (400, 1.0, 2)]
    stats = doc["memory_stats"]  # MAG has a memory: its statistics on the first batch at the longest length
    assert {"memory/layer0/alpha", "memory/layer0/loss_before", "memory/layer0/w_norm"} <= set(stats)
    assert all(math.isfinite(v) for v in stats.values())
    assert png.read_bytes()[:4] == b"\x89PNG"
    # Errors name the argument: depths on a task without needles, a missing workdir, a too-short length.
    assert eval_main(["--workdir", str(run), "--task", "mqar", "--depths", "0.5"]) == 2
    assert "--depths applies to the needle tasks" in capsys.readouterr().err
    assert eval_main(["--workdir", str(tmp_path / "nothing"), "--task", "mqar"]) == 2
    assert "neither a training workdir" in capsys.readouterr().err
    assert eval_main(["--workdir", str(run), "--task", "niah-word", "--lengths", "64", "--no-progress"]) == 2
    assert "too short" in capsys.readouterr().err
