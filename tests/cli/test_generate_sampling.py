"""`trcli generate` sampling on the tiny model, checked against a plain transformers forward:

- temperature 0 is greedy decoding (with --repetition-penalty, transformers' own greedy);
- the scored tokens are exactly the sampled ones: all of them when cut at --max-new-tokens, up to
  and including the end token (here one the model's generation_config names) or the token that
  completed a --stop string;
- a record's sample depends on (seed, record id) only: other batch sizes and a --limit run then
  the rest give the same completions; the Gumbel-max draw follows the warped distribution.
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from conftest import ok

PROMPTS = ["Hello", "\n\nHuman: Can you tell me what rain is?\n\nAssistant:", "Why is the sky blue? Tell me",
           "Money", "\n\nHuman: Please explain how to boil an egg.\n\nAssistant:", "a good name for a cat"]
N = 12  # max new tokens


def read(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def prompts_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("prompts") / "prompts.jsonl"
    path.write_text("".join(json.dumps({"id": f"p{i}", "prompt": p}) + "\n" for i, p in enumerate(PROMPTS)))
    return path


@pytest.fixture(scope="module")
def lm(tiny_model):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(tiny_model).eval(), AutoTokenizer.from_pretrained(tiny_model)


@torch.no_grad()
def greedy(lm, prompt, n: int, end_ids=(), penalty: float = 1.0):
    """Greedy decoding by hand, no cache, from a text (tokenized as the tokenizer does by default)
    or from token ids: (token ids incl. an end token, their log-probs)."""
    model, tok = lm
    ids = tok(prompt)["input_ids"] if isinstance(prompt, str) else list(prompt)
    out, logps = [], []
    for _ in range(n):
        logits = model(input_ids=torch.tensor([ids + out])).logits[0, -1].float()
        scored = logits.clone()
        if penalty != 1.0:
            seen = torch.tensor(sorted(set(ids + out)))
            scored[seen] = torch.where(scored[seen] < 0, scored[seen] * penalty, scored[seen] / penalty)
        t = int(scored.argmax())
        out.append(t)
        logps.append(float(torch.log_softmax(logits, -1)[t]))
        if t in end_ids:
            break
    return out, logps


def generate(*args, out):
    ok("generate", *map(str, args), "-o", out)
    return {r["id"]: r for r in read(out)}


def test_temperature_zero_is_greedy_and_scores_the_tokens_sampled(tmp_path, tiny_model, prompts_file, lm):
    tok = lm[1]
    got = generate("--model", tiny_model, "--prompts", prompts_file, "--temperature", "0", "--max-new-tokens", N,
                   "--batch-size", "4", "--score-with", tiny_model, out=tmp_path / "g.jsonl")
    for i, prompt in enumerate(PROMPTS):
        r = got[f"p{i}"]
        ids, logps = greedy(lm, prompt, N, end_ids=(tok.eos_token_id,))
        ended = ids[-1] == tok.eos_token_id
        assert r["stop"] == ("eos" if ended else "length")
        assert r["completion"] == tok.decode(ids[:-1] if ended else ids, skip_special_tokens=True)
        assert r["n_tokens"] == len(ids) == len(r["token_logps"])  # N when cut at N: not N + 1
        assert r["token_logps"] == pytest.approx(logps, abs=1e-4)
        assert r["ref_token_logps"] == pytest.approx(logps, abs=1e-4)
    # The repetition penalty passes through, as transformers' greedy decoding applies it.
    got = generate("--model", tiny_model, "--prompts", prompts_file, "--temperature", "0", "--max-new-tokens", N,
                   "--repetition-penalty", "1.8", out=tmp_path / "rp.jsonl")
    for i, prompt in enumerate(PROMPTS):
        ids, _ = greedy(lm, prompt, N, end_ids=(tok.eos_token_id,), penalty=1.8)
        assert got[f"p{i}"]["completion"] == tok.decode(ids, skip_special_tokens=True)


def test_the_models_eos_ids_and_stop_strings_end_a_completion(tmp_path, tiny_model, prompts_file, lm):
    tok = lm[1]
    prompt = PROMPTS[1]
    ids, logps = greedy(lm, prompt, N)
    # A token the greedy completion reaches a few tokens in, not seen before: made an eos id of the model.
    k = next(k for k in range(2, N) if ids[k] not in ids[:k] and ids[k] != tok.eos_token_id)
    model = tmp_path / "model"
    shutil.copytree(tiny_model, model)
    config = json.loads((model / "generation_config.json").read_text())
    config["eos_token_id"] = [tok.eos_token_id, ids[k]]
    (model / "generation_config.json").write_text(json.dumps(config))
    one = tmp_path / "one.jsonl"
    one.write_text(json.dumps({"id": "x", "prompt": prompt}) + "\n")
    r = generate("--model", model, "--prompts", one, "--temperature", "0", "--max-new-tokens", N,
                 "--score-with", model, out=tmp_path / "eos.jsonl")["x"]
    assert r["stop"] == "eos" and r["n_tokens"] == k + 1  # the end token is scored, and is not in the text
    assert r["completion"] == tok.decode(ids[:k], skip_special_tokens=True)
    assert r["token_logps"] == pytest.approx(logps[:k + 1], abs=1e-4)

    # A stop string: the completion is cut before it; scored up to the token that completed it.
    j = next(j for j in range(2, N) if len(tok.decode(ids[j:j + 1]).strip()) >= 2)
    stop = tok.decode(ids[j:j + 1])
    t = next(t for t in range(N) if stop in tok.decode(ids[:t + 1]))  # where the string first appears
    r = generate("--model", tiny_model, "--prompts", one, "--temperature", "0", "--max-new-tokens", N,
                 "--stop", stop, "--stop", "never-seen-zq", "--score-with", tiny_model, out=tmp_path / "stop.jsonl")["x"]
    text = tok.decode(ids[:t + 1])
    assert r["stop"] == "stop_string" and r["n_tokens"] == t + 1
    assert r["completion"] == text[: text.index(stop)] and stop not in r["completion"]
    assert r["token_logps"] == pytest.approx(logps[:t + 1], abs=1e-4)
    assert r["sampling"]["stop_strings"] == [stop, "never-seen-zq"]


def test_a_sample_depends_on_seed_and_id_only(tmp_path, tiny_model, prompts_file):
    args = ["--model", tiny_model, "--prompts", prompts_file, "--temperature", "1", "--top-p", "0.95",
            "--num-samples", "2", "--max-new-tokens", N, "--seed", "3"]
    base = generate(*args, "--batch-size", "4", out=tmp_path / "b4.jsonl")
    assert len(base) == 2 * len(PROMPTS)
    assert len({r["completion"] for r in base.values()}) > len(PROMPTS)  # samples of one prompt differ
    for size in (1, 5):  # other batch compositions and padding: the same completions (exactly, here)
        other = generate(*args, "--batch-size", size, out=tmp_path / f"b{size}.jsonl")
        assert {i: (r["completion"], r["stop"]) for i, r in other.items()} == \
               {i: (r["completion"], r["stop"]) for i, r in base.items()}
    # The first prompts, then all of them into the same file: the same records as one run.
    out = tmp_path / "limit.jsonl"
    generate(*args, "--batch-size", "4", "--limit", "2", out=out)
    assert generate(*args, "--batch-size", "4", out=out) == base
    other_seed = generate(*[a if a != "3" else "4" for a in args], "--batch-size", "4", out=tmp_path / "s4.jsonl")
    assert other_seed != base


def test_gumbel_max_samples_the_warped_distribution():
    from transformers import TemperatureLogitsWarper, TopPLogitsWarper

    from trcli.stages.generate import _logits_processor

    n, temperature, top_p = 20000, 0.7, 0.8
    logits = torch.tensor([1.0, 0.5, 0.2, -0.3, -1.0, -2.0])
    ids = [f"r{i}" for i in range(n)]
    process = _logits_processor(ids, seed=0, start=0, first_real=torch.zeros(n, dtype=torch.long),
                                temperature=temperature, top_p=top_p, repetition_penalty=1.0)
    picked = process(torch.zeros((n, 1), dtype=torch.long), logits.expand(n, -1).clone()).argmax(-1)
    freq = torch.bincount(picked, minlength=len(logits)).double() / n
    warped = TopPLogitsWarper(top_p)(None, TemperatureLogitsWarper(temperature)(None, logits[None]))
    p = torch.softmax(warped[0].double(), -1)
    assert p[-1] == 0 and freq[-1] == 0  # cut by top-p, never drawn
    assert torch.all((freq - p).abs() <= 4 * (p * (1 - p) / n).sqrt() + 1e-12), (freq, p)
    # The same row id draws the same token whatever else is in the batch.
    alone = _logits_processor(ids[:3], seed=0, start=0, first_real=torch.zeros(3, dtype=torch.long),
                              temperature=temperature, top_p=top_p, repetition_penalty=1.0)
    assert torch.equal(alone(torch.zeros((3, 1), dtype=torch.long), logits.expand(3, -1).clone()).argmax(-1),
                       picked[:3])
