"""judge with local models: rm:PATH (a tiny reward model) and hf:PATH (a tiny causal LM)."""

from __future__ import annotations

import json

import pytest
import torch
from test_judge import write_generations

from conftest import ok, run_cli
from trcli.stages.judge import candidate_first
from trcli.tiny import build_model

WORDS = ["calm", "rain", "eggs", "cats", "money", "sky", "swim", "exam"]


def _items() -> list[tuple[str, str, str]]:
    """Two styles that alternate sides, so a judge preferring one style gives a mixed verdict."""
    items = []
    for i, w in enumerate(WORDS):
        one, two = f"reply {w} number {i}", f"answer {w}, again {i}."
        items.append(("", one, two) if i % 2 else ("", two, one))
    return items


ITEMS = _items()


def test_reward_model_judge(tmp_path):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    rm = tmp_path / "rm"
    build_model(rm, hidden_size=32, layers=2, reward=True, seed=3)
    cand, base = write_generations(tmp_path / "gens", ITEMS)
    res = ok("judge", "--candidate", cand, "--baseline", base, "--judge", f"rm:{rm}", "-o", tmp_path / "out", "--json")
    r = json.loads(res.stdout)

    # Each text scored on its own (no padding) must give the batched verdicts.
    model = AutoModelForSequenceClassification.from_pretrained(rm).eval()
    tok = AutoTokenizer.from_pretrained(rm)
    score = lambda text: model(**tok(text, return_tensors="pt")).logits[0, 0].item()  # noqa: E731
    rows = [json.loads(line) for line in open(cand)], [json.loads(line) for line in open(base)]
    with torch.no_grad():
        expected = [(score(c["prompt"] + c["completion"]), score(b["prompt"] + b["completion"])) for c, b in zip(*rows)]
    wins = sum(c > b for c, b in expected)
    assert 0 < wins < len(ITEMS)  # a seed whose verdicts are mixed, so a side swap would show
    assert (r["wins"], r["losses"], r["n"]) == (wins, len(ITEMS) - wins, len(ITEMS))
    assert r["win_rate"] == pytest.approx(wins / len(ITEMS))
    annotations = [json.loads(line) for line in (tmp_path / "out" / "annotations.jsonl").read_text().splitlines()]
    for a, (c, b) in zip(annotations, expected):
        assert a["scores"]["candidate"] == pytest.approx(c, abs=1e-4)
        assert a["scores"]["baseline"] == pytest.approx(b, abs=1e-4)
    assert "tokens" not in r and r["position_consistency"] is None


@pytest.fixture(scope="module")
def says_a(tmp_path_factory):
    """A causal LM that always prefers " A": its final layer norm outputs a constant vector (zero
    gain, bias v), so every position has the same logits, and the head makes "A" likelier than "B"."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = tmp_path_factory.mktemp("hf") / "says-a"
    build_model(path, hidden_size=32, layers=2)
    model = AutoModelForCausalLM.from_pretrained(path)
    tok = AutoTokenizer.from_pretrained(path)
    a, b = (tok(s, add_special_tokens=False)["input_ids"][-1] for s in (" A", " B"))
    with torch.no_grad():
        norm = model.gpt_neox.final_layer_norm
        norm.weight.zero_()
        norm.bias.copy_(torch.linspace(-1, 1, norm.bias.numel()))
        v = norm.bias / norm.bias.norm() ** 2
        model.get_output_embeddings().weight[a] = 5 * v
        model.get_output_embeddings().weight[b] = -5 * v
    model.save_pretrained(path)
    return path


def test_hf_judge_position_bias(tmp_path, says_a):
    cand, base = write_generations(tmp_path / "gens", ITEMS)
    args = ["judge", "--candidate", cand, "--baseline", base, "--judge", f"hf:{says_a}", "--task", "hh", "--json"]
    r = json.loads(ok(*args, "-o", tmp_path / "one").stdout)
    # Always "A": the candidate wins exactly where the seeded order put it first.
    first = sum(candidate_first(42, f"q{i}") for i in range(len(ITEMS)))
    assert 0 < first < len(ITEMS)
    assert r["wins"] == first and r["losses"] == len(ITEMS) - first
    r = json.loads(ok(*args, "--seed", "7", "-o", tmp_path / "seed").stdout)
    assert r["wins"] == sum(candidate_first(7, f"q{i}") for i in range(len(ITEMS)))
    # Both orders: a judge that always says "A" never agrees with itself.
    r = json.loads(ok(*args, "--swap", "-o", tmp_path / "swap").stdout)
    assert r["ties"] == len(ITEMS) and r["win_rate"] == 0.5 and r["position_consistency"] == 0.0


def test_hc_needs_an_endpoint(tmp_path, says_a):
    cand, base = write_generations(tmp_path / "gens", ITEMS[:2])
    res = run_cli("judge", "--candidate", cand, "--baseline", base, "--judge", f"hf:{says_a}", "--protocol", "hc",
                  "-o", tmp_path / "out")
    assert res.exit_code == 2 and "--protocol hc needs a judge on an endpoint" in res.stderr
