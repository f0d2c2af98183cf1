"""The lm-evaluation-harness adapter (`titans_jax.eval.lm_eval_adapter`): a tiny random model, exported and loaded by
its path as `python -m titans_jax.eval.lm_eval --model titans_jax --model_args workdir=...` does, scores a local
multiple-choice task, single log-likelihoods, rolling log-likelihoods and generations exactly as a direct computation
does.

The direct computation feeds the model one token at a time through `model.step` (the streaming form, which equals
the parallel forward: docs/architecture.md, "Decoding"), so it shares neither the adapter's padding nor its batching.
Every adapter call here reads at most 64 tokens (max_length=64), so its forward pass compiles once.
"""

import dataclasses
import io
import json
import pathlib
from contextlib import redirect_stdout

import jax
import numpy as np
import pytest

lm_eval = pytest.importorskip("lm_eval")

import orbax.checkpoint as ocp  # noqa: E402
from flax import nnx  # noqa: E402
from lm_eval.api.instance import Instance  # noqa: E402
from lm_eval.api.registry import get_model, model_registry  # noqa: E402
from lm_eval.tasks import TaskManager  # noqa: E402

import titans_jax  # noqa: E402
from titans_jax import export as export_lib  # noqa: E402
from titans_jax.eval.lm_eval import main as lm_eval_main  # noqa: E402
from titans_jax.eval.lm_eval_adapter import TitansJaxLM, pad_length  # noqa: E402

TASK_DIR = pathlib.Path(__file__).parent / "data" / "lm_eval_task"
MAX_LENGTH, BATCH, ROWS = 64, 4, 32  # ROWS: the reference's fixed batch (one compiled step)
EOD = 255  # the byte tokenizer's end of document


def _write_export(model, path) -> None:
    """A params-only export of `model` (the layout of `python -m titans_jax.export`) with the byte tokenizer."""
    meta = {"format": export_lib.FORMAT, "model": dataclasses.asdict(model.config), "dtype": "float32",
            "tokenizer": {"name": "bytes", "kind": "bytes", "vocab_size": 256, "fingerprint": "bytes", "file": None},
            "source": {"workdir": None, "step": 0}, "run": {}}
    args = ocp.args.Composite(**{export_lib.PARAMS: ocp.args.StandardSave(nnx.to_pure_dict(nnx.state(model))),
                                 export_lib.META: ocp.args.JsonSave(meta),
                                 export_lib.TOKENIZER: export_lib.FilesSave({})})
    with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as checkpointer:
        checkpointer.save(path, args)


@pytest.fixture(scope="module")
def model():
    return titans_jax.TitansLM(titans_jax.get_config("tiny-lmm", dim=32, num_layers=1), rngs=nnx.Rngs(0))


@pytest.fixture(scope="module")
def exported(model, tmp_path_factory):
    path = tmp_path_factory.mktemp("lm_eval") / "export"
    _write_export(model, path)
    return path


@pytest.fixture(scope="module")
def lm(exported):
    return TitansJaxLM.create_from_arg_string(f"workdir={exported},max_length={MAX_LENGTH}", {"batch_size": BATCH})


@pytest.fixture
def offline_datasets(tmp_path, monkeypatch):
    """`datasets` reads the task's local JSON lines from its folder, caches in tmp_path and never asks the Hub."""
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf_datasets")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.chdir(TASK_DIR)  # data_files are relative to the working directory


# ------------------------------------------------------------------------------------------------- the reference
def _logits(model, seqs: list[list[int]]) -> list[np.ndarray]:
    """Each sequence's logits [len, V] (position t after reading tokens[:t + 1]), token by token through
    `model.step` from a fresh state, all sequences side by side (rows past a sequence's end read padding)."""
    assert len(seqs) <= ROWS
    width = max(map(len, seqs))
    tokens = np.zeros((ROWS, width), np.int32)
    for r, s in enumerate(seqs):
        tokens[r, :len(s)] = s
    state, out = model.init_state(ROWS), []
    for t in range(width):
        logits, state = model.step(tokens[:, t:t + 1], state)
        out.append(logits[:, 0])
    logits = np.asarray(jax.numpy.stack(out, axis=1), np.float64)
    return [logits[r, :len(s)] for r, s in enumerate(seqs)]


def _logprob(model, pairs: list[tuple[list[int], list[int]]]) -> list[tuple[float, bool]]:
    """(sum of log p(continuation | context), all greedy) for token pairs, as lm-eval defines them."""
    seqs = [ctx + cont for ctx, cont in pairs]
    out = []
    for (ctx, _), seq, logits in zip(pairs, seqs, _logits(model, [s[:-1] for s in seqs]), strict=True):
        logp = logits - np.logaddexp.reduce(logits, axis=-1, keepdims=True)
        pos = np.arange(len(ctx) - 1, len(seq) - 1)
        targets = np.asarray(seq[len(ctx):])
        out.append((float(logp[pos, targets].sum()), bool((logits[pos].argmax(-1) == targets).all())))
    return out


def _greedy(model, prompts: list[list[int]], n: int) -> list[list[int]]:
    """Greedy continuations of n tokens, one token at a time, cut before an end-of-document token."""
    rows = [list(p) for p in prompts]
    width = max(map(len, rows)) + n
    tokens = np.zeros((ROWS, width), np.int32)
    for r, p in enumerate(rows):
        tokens[r, :len(p)] = p
    state = model.init_state(ROWS)
    for t in range(width - 1):
        logits, state = model.step(tokens[:, t:t + 1], state)
        choice = np.asarray(logits[:, 0]).argmax(-1)
        for r, p in enumerate(prompts):
            if t + 1 >= len(p):
                tokens[r, t + 1] = choice[r]
    out = []
    for r, p in enumerate(prompts):
        new = tokens[r, len(p):len(p) + n].tolist()
        out.append(new[:new.index(EOD)] if EOD in new else new)
    return out


def _enc(text: str) -> list[int]:
    return list(text.encode("utf-8"))


# ----------------------------------------------------------------------------------------------------------- tests
def test_the_model_type_is_registered_and_checks_its_arguments(exported):
    assert get_model("titans_jax") is TitansJaxLM
    assert "hf" in model_registry and "dummy" in model_registry  # lm-eval's own models stay registered
    with pytest.raises(TypeError, match="unknown model_args.*pretrained"):
        TitansJaxLM.create_from_arg_string(f"workdir={exported},pretrained=gpt2")
    with pytest.raises(ValueError, match="workdir=RUN"):
        TitansJaxLM()
    assert [pad_length(n, 1024) for n in (1, 64, 65, 129, 700, 1024)] == [64, 64, 128, 256, 1024, 1024]
    assert [pad_length(n, 100) for n in (65, 100)] == [128, 128]


def test_a_local_multiple_choice_task_scores_as_the_models_own_log_probs(model, exported, offline_datasets):
    """acc and acc_norm of lm-eval's run over a local YAML task equal those of the direct log-likelihoods."""
    results = lm_eval.simple_evaluate(
        model="titans_jax", model_args=f"workdir={exported},max_length={MAX_LENGTH}", batch_size=BATCH,
        tasks=["titans_mc"], task_manager=TaskManager(include_path=str(TASK_DIR), include_defaults=False),
        log_samples=True, bootstrap_iters=0)
    docs = [json.loads(line) for line in (TASK_DIR / "docs.jsonl").read_text().splitlines()]
    pairs = [(_enc(f"Question: {d['question']}\nAnswer:"), _enc(" " + c)) for d in docs for c in d["choices"]]
    assert max(len(a) + len(b) for a, b in pairs) <= MAX_LENGTH + 1  # no truncation in this task
    direct = iter(_logprob(model, pairs))
    lls = [np.array([next(direct)[0] for _ in d["choices"]]) for d in docs]
    acc = np.mean([ll.argmax() == d["label"] for ll, d in zip(lls, docs, strict=True)])
    lens = [np.array([len(c) for c in d["choices"]], float) for d in docs]
    acc_norm = np.mean([(ll / n).argmax() == d["label"] for ll, n, d in zip(lls, lens, docs, strict=True)])

    scores = results["results"]["titans_mc"]
    assert scores["acc,none"] == pytest.approx(acc) and scores["acc_norm,none"] == pytest.approx(acc_norm)
    samples = sorted(results["samples"]["titans_mc"], key=lambda s: s["doc_id"])
    assert len(samples) == len(docs) == 6
    for sample, ll in zip(samples, lls, strict=True):
        np.testing.assert_allclose([float(r[0][0]) for r in sample["resps"]], ll, rtol=0, atol=1e-4)
    assert len({int(ll.argmax()) for ll in lls}) > 1  # the choices do differ in score: accuracy is not constant


def test_the_command_line_runs_the_task(exported, offline_datasets):
    """`python -m titans_jax.eval.lm_eval` is lm-eval's command line with titans_jax registered."""
    out = io.StringIO()
    with redirect_stdout(out):
        assert lm_eval_main(["--model", "titans_jax", "--model_args", f"workdir={exported},max_length={MAX_LENGTH}",
                             "--tasks", "titans_mc", "--include_path", str(TASK_DIR), "--batch_size", str(BATCH),
                             ]) == 0
    table = out.getvalue()
    assert "titans_mc" in table and "acc_norm" in table, table


def test_loglikelihood_and_rolling_windows_equal_direct_computation(model, lm):
    long_context = "the king doth love the queen and the night " * 3  # 132 bytes: cut from the left
    requests = [("The king", " doth love"), ("", "hello"), ("Question: who?\nAnswer: ", "yes"),
                (long_context, " end"), ("a", "b"), ("sweet ", "night and day"), ("x" * 30, " y" * 10),
                ("good", " morrow"), ("thou art", "")]
    got = lm.loglikelihood([Instance("loglikelihood", {}, r, i) for i, r in enumerate(requests)], disable_tqdm=True)

    def pair(ctx, cont):  # lm-eval's tokenization with a byte tokenizer
        if not ctx:
            return [EOD], _enc(cont)
        spaces = len(ctx) - len(ctx.rstrip())
        ctx, cont = ctx[:len(ctx) - spaces], ctx[len(ctx) - spaces:] + cont
        whole = (_enc(ctx) + _enc(cont))[-(MAX_LENGTH + 1):]
        return whole[:len(whole) - len(_enc(cont))], _enc(cont)

    scored = [pair(*r) for r in requests if r[1]]
    want = iter(_logprob(model, scored))
    for (ctx, cont), (logp, greedy) in zip(requests, got, strict=True):
        expected = next(want) if cont else (0.0, True)
        assert logp == pytest.approx(expected[0], abs=1e-4) and greedy == expected[1], (ctx, cont)
    assert sum(map(len, pair(long_context, " end"))) == MAX_LENGTH + 1  # (its trailing space went to " end")

    short, long = "thou art more lovely and more temperate", "rough winds do shake the darling buds of may " * 4
    rolling = lm.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, (t,), i)
                                        for i, t in enumerate((short, long))], disable_tqdm=True)
    s, t = _enc(short), _enc(long)
    assert len(s) < MAX_LENGTH < 2 * MAX_LENGTH < len(t) < 3 * MAX_LENGTH
    # Disjoint windows of MAX_LENGTH predicted tokens: the first after the end-of-document id, each later one after
    # the last token of the window before it only, but the last (shorter) one after as many tokens as fill its input
    # up to MAX_LENGTH.
    windows = [([EOD], t[:64]), (t[63:64], t[64:128]), (t[len(t) - 1 - MAX_LENGTH:128], t[128:])]
    assert len(windows[2][0]) + len(windows[2][1]) == MAX_LENGTH + 1 and len(windows[2][0]) > 1
    direct = _logprob(model, [([EOD], s), *windows])
    assert rolling[0] == pytest.approx(direct[0][0], abs=1e-4)
    assert rolling[1] == pytest.approx(sum(d[0] for d in direct[1:]), abs=1e-4)


def test_generate_until_stops_at_the_until_string_and_is_greedy(model, lm):
    prompts = ["The quality of mercy", "To be, or not to be"]
    n = 16
    want = [bytes(g).decode("utf-8", errors="replace") for g in _greedy(model, [_enc(p) for p in prompts], n)]
    stop = want[0][3:5]  # a string the greedy continuation holds
    got = lm.generate_until([Instance("generate_until", {}, (prompts[0], {"until": [stop], "max_gen_toks": n}), 0),
                             Instance("generate_until", {}, (prompts[1], {"until": [], "max_gen_toks": n,
                                                                          "do_sample": False}), 1)],
                            disable_tqdm=True)
    assert got == [want[0][:want[0].index(stop)], want[1]]
    assert len(got[0]) <= 3 and len(got[1]) > 3
