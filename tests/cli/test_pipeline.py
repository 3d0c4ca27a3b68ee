"""The chained run the walking skeleton promises: prep -> sft --from -> align --from ->
generate --from -> judge, on a tiny model, with a local reward-model judge."""

import json

from conftest import ok


def test_chained_run(tmp_path, tiny_model, prep_run, sft_run):
    from trcli.tiny import build_model

    build_model(tmp_path / "rm", reward=True, hidden_size=32, seed=1)
    for method in ("dpo", "tr-dpo"):
        ok("align", "--from", sft_run, "--method", method, "--max-steps", "2", "--batch-size", "4",
           "-o", tmp_path / method)
        ok("generate", "--from", tmp_path / method, "--max-new-tokens", "4", "--limit", "4",
           "--score-with", sft_run, "-o", tmp_path / f"{method}.jsonl")
    # generate found the prompts through align -> sft -> prep.
    records = [json.loads(l) for l in (tmp_path / "tr-dpo.jsonl").read_text().splitlines()]
    assert len(records) == 4
    result = ok("judge", "--candidate", tmp_path / "tr-dpo.jsonl", "--baseline", tmp_path / "dpo.jsonl",
                "--judge", f"rm:{tmp_path / 'rm'}", "-o", tmp_path / "judge", "--json")
    summary = json.loads(result.stdout)
    assert summary["n"] == 4 and summary["wins"] + summary["losses"] + summary["ties"] == 4
    assert 0 <= summary["win_rate"] <= 1 and summary["kl"]["candidate"]["n"] == 4
    # ...and the report reads what the stages wrote: curves and win rate vs KL from SFT.
    ok("report", tmp_path / "dpo", tmp_path / "tr-dpo", tmp_path / "judge", "-o", tmp_path / "report")
    for png in ("loss.png", "kl_init.png", "win_rate_vs_kl.png"):
        assert (tmp_path / "report" / png).read_bytes().startswith(b"\x89PNG"), png
