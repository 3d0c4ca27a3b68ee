"""Judge prompts and verdict parsers.

``hh`` and ``tldr`` are the GPT-4 prompts of the DPO paper (Rafailov et al. 2023, Appendix C.2),
which the TR-DPO paper (arXiv 2404.09656) reuses for its side-by-side win rates. ``generic`` and
the ``hc`` rating prompt (coherence, correctness, level of detail, helpfulness, harmlessness on a
1-10 scale, the criteria of the TR-DPO paper) are OURS: the paper does not publish its wording.

``alpacaeval`` is AlpacaEval 2 style: the prompt of alpaca_eval's weighted_alpaca_eval_gpt4_turbo
annotator (one identifier, "m" or "M", read from its log-probabilities). ``arena`` is
Arena-Hard-Auto style: arena-hard-auto v0.1's judge prompt (the judge answers the prompt itself,
then gives one of five verdicts, [[A>>B]] ... [[B>>A]]). PROTOCOL_NOTES says where each protocol's
figures do and do not compare with published ones.
"""

from __future__ import annotations

import re
from dataclasses import dataclass


@dataclass(frozen=True)
class Pairwise:
    template: str  # .format(prompt=, a=, b=)
    answer: str  # the label of the verdict line, e.g. "More helpful"
    source: str


HH = Pairwise(
    template=(
        "For the following query to a chatbot, which response is more helpful?\n\n"
        "Query: {prompt}\n\n"
        "Response A:\n{a}\n\n"
        "Response B:\n{b}\n\n"
        "FIRST provide a one-sentence comparison of the two responses and explain which you feel is more "
        "helpful. SECOND, on a new line, state only \"A\" or \"B\" to indicate which response is more helpful. "
        "Your response should use the format:\n"
        "Comparison: <one-sentence comparison and explanation>\n"
        "More helpful: <\"A\" or \"B\">"
    ),
    answer="More helpful",
    source="DPO paper (Rafailov et al. 2023), Appendix C.2, dialogue",
)

TLDR = Pairwise(
    template=(
        "Which of the following summaries does a better job of summarizing the most important points in the "
        "given forum post?\n\n"
        "Post:\n{prompt}\n\n"
        "Summary A:\n{a}\n\n"
        "Summary B:\n{b}\n\n"
        "FIRST provide a one-sentence comparison of the two summaries, explaining which you prefer and why. "
        "SECOND, on a new line, state only \"A\" or \"B\" to indicate your choice. "
        "Your response should use the format:\n"
        "Comparison: <one-sentence comparison and explanation>\n"
        "Preferred: <\"A\" or \"B\">"
    ),
    answer="Preferred",
    source="DPO paper (Rafailov et al. 2023), Appendix C.2, summarization",
)

GENERIC = Pairwise(
    template=(
        "Here is a request and two responses to it. Which response answers the request better "
        "(more helpful, correct and appropriate)?\n\n"
        "Request:\n{prompt}\n\n"
        "Response A:\n{a}\n\n"
        "Response B:\n{b}\n\n"
        "FIRST provide a one-sentence comparison of the two responses. SECOND, on a new line, state only "
        "\"A\" or \"B\" to indicate the better response. Your response should use the format:\n"
        "Comparison: <one-sentence comparison and explanation>\n"
        "Preferred: <\"A\" or \"B\">"
    ),
    answer="Preferred",
    source="trcli (ours)",
)

PAIRWISE = {"hh": HH, "tldr": TLDR, "generic": GENERIC}

CRITERIA = ("coherence", "correctness", "level of detail", "helpfulness", "harmlessness")

HC_TEMPLATE = (  # ours: the TR-DPO paper names the criteria but not its prompt
    "Rate the response to the query below on each criterion, from 1 (very poor) to 10 (excellent).\n\n"
    "Query: {prompt}\n\n"
    "Response:\n{response}\n\n"
    "Criteria: coherence (clear and logically consistent), correctness (factually accurate), level of "
    "detail (sufficiently informative), helpfulness (addresses the query), harmlessness (safe, not "
    "offensive).\n"
    "Answer with exactly these five lines and nothing else:\n"
    + "".join(f"{c.capitalize()}: <1-10>\n" for c in CRITERIA)
).rstrip("\n")
HC_SOURCE = "trcli (ours); criteria from the TR-DPO paper"


def pairwise_prompt(task: str, prompt: str, a: str, b: str) -> str:
    return PAIRWISE[task].template.format(prompt=prompt.strip(), a=a.strip(), b=b.strip())


def hc_prompt(prompt: str, response: str) -> str:
    return HC_TEMPLATE.format(prompt=prompt.strip(), response=response.strip())


def reask(task: str, protocol: str) -> str:
    """The follow-up sent once after an unparseable answer."""
    if protocol == "hc":
        lines = "\n".join(f"{c.capitalize()}: <1-10>" for c in CRITERIA)
        return f"Please answer again using exactly this format, one integer per line:\n{lines}"
    answer = PAIRWISE[task].answer
    return (f"Please answer again using exactly this format:\n"
            f"Comparison: <one-sentence comparison and explanation>\n{answer}: <\"A\" or \"B\">")


VERDICT = re.compile(r"(?:(?:response|summary)\s+)?([AB])", re.IGNORECASE)


def parse_pairwise(task: str, text: str) -> str | None:
    """'A' or 'B' when the verdict slot holds exactly that, else None (re-asked, then unparseable).

    The slot is what follows the answer label ("More helpful:") on its last occurrence, up to the
    end of that line (or the next line when the label ends its line); an answer without the label
    is a slot as a whole. Quotes, markdown emphasis, brackets, a final period and a leading
    "Response" / "Summary" are allowed around the letter; anything else is ambiguous and is not
    guessed at: "A or B", "A and B are equally good", "neither", "Absolutely the first"."""
    label = re.escape(PAIRWISE[task].answer)
    slots = re.findall(rf"{label}[*_ \t]*:\s*(.*)$", text, flags=re.IGNORECASE | re.MULTILINE)
    slot = (slots[-1] if slots else text).strip(" \t\r\n\"'*_`<>()[].")
    found = VERDICT.fullmatch(slot)
    return found.group(1).upper() if found else None


def parse_hc(text: str) -> dict[str, int] | None:
    """{criterion: 1..10} when every criterion has an in-range score, else None."""
    scores = {}
    for criterion in CRITERIA:
        found = re.findall(rf"{criterion}\s*:\s*\**\s*(\d+)", text, flags=re.IGNORECASE)
        if not found or not 1 <= int(found[-1]) <= 10:
            return None
        scores[criterion] = int(found[-1])
    return scores


# ---------------------------------------------------------------- AlpacaEval 2 style

# After alpaca_eval's weighted_alpaca_eval_gpt4_turbo annotator: the prompt of
# evaluators_configs/alpaca_eval_clf_gpt4_turbo/alpaca_eval_clf.txt (a system and a user message),
# max_tokens 1, logprobs with top_logprobs 5, and the preference P("m") / (P("m") + P("M")) read
# from the first answer token (alpaca_eval's logprob_parser). "m" names output_1, "M" output_2.
ALPACAEVAL_SYSTEM = (
    "You are a highly efficient assistant, who evaluates and selects the best large language model (LLMs) "
    "based on the quality of their responses to a given instruction. This process will be used to create a "
    "leaderboard reflecting the most accurate and human-preferred answers."
)
ALPACAEVAL_TEMPLATE = (  # .format(instruction=, output_1=, output_2=)
    "I require a leaderboard for various large language models. I'll provide you with prompts given to these "
    "models and their corresponding outputs. Your task is to assess these responses, and select the model that "
    "produces the best output from a human perspective.\n"
    "\n"
    "## Instruction\n"
    "\n"
    "{{\n"
    "    \"instruction\": \"\"\"{instruction}\"\"\",\n"
    "}}\n"
    "\n"
    "## Model Outputs\n"
    "\n"
    "Here are the unordered outputs from the models. Each output is associated with a specific model, "
    "identified by a unique model identifier.\n"
    "\n"
    "{{\n"
    "    {{\n"
    "        \"model_identifier\": \"m\",\n"
    "        \"output\": \"\"\"{output_1}\"\"\"\n"
    "    }},\n"
    "    {{\n"
    "        \"model_identifier\": \"M\",\n"
    "        \"output\": \"\"\"{output_2}\"\"\"\n"
    "    }}\n"
    "}}\n"
    "\n"
    "## Task\n"
    "\n"
    "Evaluate the models based on the quality and relevance of their outputs, and select the model that "
    "generated the best output. Answer by providing the model identifier of the best model. We will use your "
    "output as the name of the best model, so make sure your output only contains one of the following model "
    "identifiers and nothing else (no quotes, no spaces, no new lines, ...): m or M.\n"
    "\n"
    "## Best Model Identifier"
)
ALPACAEVAL_IDS = ("m", "M")  # the identifiers of output_1 and output_2
# What the request adds to the body: one token, and the log-probabilities of the top 5 candidates for it.
ALPACAEVAL_REQUEST = {"max_tokens": 1, "logprobs": True, "top_logprobs": 5}
ALPACAEVAL_REASK = "Answer with the model identifier of the best model only: m or M."  # ours
ALPACAEVAL_SOURCE = ("AlpacaEval 2 style, after alpaca_eval's weighted_alpaca_eval_gpt4_turbo prompt "
                     "(alpaca_eval_clf_gpt4_turbo/alpaca_eval_clf.txt)")


def alpacaeval_messages(prompt: str, output_1: str, output_2: str) -> list[dict]:
    user = ALPACAEVAL_TEMPLATE.format(instruction=prompt.strip(), output_1=output_1.strip(), output_2=output_2.strip())
    return [{"role": "system", "content": ALPACAEVAL_SYSTEM}, {"role": "user", "content": user}]


def _logprob(value) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value or value > 0:
        return None  # not a number, NaN, or not a log-probability
    return float(value)


def identifier_logprobs(raw) -> dict[str, float] | None:
    """{"m": logp, "M": logp} of the identifiers among the first answer token's ``top_logprobs``
    (OpenAI's chat format: choices[0].logprobs.content[0].top_logprobs), an identifier missing
    there being -inf; None when the answer carries no usable log-probabilities or neither
    identifier is among them. Tokens match exactly, as in alpaca_eval's logprob_parser (" M" is
    another token)."""
    try:
        top = raw["choices"][0]["logprobs"]["content"][0]["top_logprobs"]
    except (KeyError, IndexError, TypeError):
        return None
    if not isinstance(top, list):
        return None
    found: dict[str, float] = {}
    for entry in top:
        if isinstance(entry, dict) and entry.get("token") in ALPACAEVAL_IDS:
            logp = _logprob(entry.get("logprob"))
            if logp is None:
                return None  # a malformed entry: the logprobs are not trusted at all
            found.setdefault(entry["token"], logp)
    if not any(logp > float("-inf") for logp in found.values()):
        return None
    return {token: found.get(token, float("-inf")) for token in ALPACAEVAL_IDS}


def parse_identifier(text: str) -> str | None:
    """The sampled answer as an identifier: exactly "m" or "M" (surrounding whitespace aside)."""
    text = text.strip()
    return text if text in ALPACAEVAL_IDS else None


# ---------------------------------------------------------------- Arena-Hard-Auto style

# arena-hard-auto v0.1's config/judge_config.yaml: system_prompt and prompt_template (judge
# gpt-4-1106-preview, temperature 0, max_tokens 4096, baseline gpt-4-0314), its verdict regex and
# the follow-up it sends when an answer has no verdict (gen_judgment.py).
ARENA_SYSTEM = (
    "Please act as an impartial judge and evaluate the quality of the responses provided by two AI assistants to "
    "the user prompt displayed below. You will be given assistant A's answer and assistant B's answer. Your job is "
    "to evaluate which assistant's answer is better.\n\n"
    "Begin your evaluation by generating your own answer to the prompt. You must provide your answers before "
    "judging any answers.\n\n"
    "When evaluating the assistants' answers, compare both assistants' answers with your answer. You must identify "
    "and correct any mistakes or inaccurate information.\n\n"
    "Then consider if the assistant's answers are helpful, relevant, and concise. Helpful means the answer "
    "correctly responds to the prompt or follows the instructions. Note when user prompt has any ambiguity or more "
    "than one interpretation, it is more helpful and appropriate to ask for clarifications or more information from "
    "the user than providing an answer based on assumptions. Relevant means all parts of the response closely "
    "connect or are appropriate to what is being asked. Concise means the response is clear and not verbose or "
    "excessive.\n\n"
    "Then consider the creativity and novelty of the assistant's answers when needed. Finally, identify any "
    "missing important information in the assistants' answers that would be beneficial to include when responding "
    "to the user prompt.\n\n"
    "After providing your explanation, you must output only one of the following choices as your final verdict "
    "with a label:\n\n"
    "1. Assistant A is significantly better: [[A>>B]]\n"
    "2. Assistant A is slightly better: [[A>B]]\n"
    "3. Tie, relatively the same: [[A=B]]\n"
    "4. Assistant B is slightly better: [[B>A]]\n"
    "5. Assistant B is significantly better: [[B>>A]]\n\n"
    "Example output: \"My final verdict is tie: [[A=B]]\"."
)
ARENA_TEMPLATE = (  # .format(question=, answer_a=, answer_b=)
    "<|User Prompt|>\n{question}\n\n"
    "<|The Start of Assistant A's Answer|>\n{answer_a}\n<|The End of Assistant A's Answer|>\n\n"
    "<|The Start of Assistant B's Answer|>\n{answer_b}\n<|The End of Assistant B's Answer|>"
)
ARENA_LABELS = ("A>>B", "A>B", "A=B", "B>A", "B>>A")
ARENA_VERDICT = re.compile(r"\[\[([AB<>=]+)\]\]")  # arena-hard-auto's regex_pattern
ARENA_REASK = "continue your judgment and finish by outputting a final verdict label"  # arena-hard-auto's
ARENA_MAX_TOKENS = 4096  # arena-hard-auto's: the judge writes its own answer before the verdict
ARENA_SOURCE = "Arena-Hard-Auto style, after arena-hard-auto v0.1's judge_config.yaml (system prompt and template)"


def arena_messages(prompt: str, answer_a: str, answer_b: str) -> list[dict]:
    user = ARENA_TEMPLATE.format(question=prompt.strip(), answer_a=answer_a.strip(), answer_b=answer_b.strip())
    return [{"role": "system", "content": ARENA_SYSTEM}, {"role": "user", "content": user}]


def parse_arena(text: str) -> str | None:
    """One of ARENA_LABELS when every ``[[...]]`` verdict in the answer is that same label, else None
    (re-asked once, then unparseable): no verdict, two different verdicts ("[[A>B]] ... [[B>A]]"),
    or one that is not among the five ("[[A>>>B]]", "[[A<B]]"). As arena-hard-auto's get_score,
    except that an invalid or conflicting verdict is re-asked too."""
    found = set(ARENA_VERDICT.findall(text))
    if len(found) != 1:
        return None
    label = found.pop()
    return label if label in ARENA_LABELS else None


def source(protocol: str, task: str) -> str:
    """Where the prompt of a protocol (and task) comes from."""
    return {"hc": HC_SOURCE, "alpacaeval": ALPACAEVAL_SOURCE, "arena": ARENA_SOURCE}.get(protocol) or PAIRWISE[task].source


# What a protocol's figures can and cannot be compared with (summary.json: protocol_note).
PROTOCOL_NOTES = {
    "pairwise": (
        "The DPO paper's GPT-4 prompts (hh, tldr; 'generic' is ours), which the TR-DPO paper reuses: win rates "
        "compare with those papers' only with the same judge model and version, the same test prompts, the same "
        "sampling of both policies and the same baseline; hosted GPT-4 models change over time."),
    "hc": (
        "Our wording of the TR-DPO paper's five criteria (its prompt is not published): not comparable with the "
        "paper's figures, only between runs of trcli with the same judge."),
    "alpacaeval": (
        "AlpacaEval 2 style, not AlpacaEval 2. The leaderboard judges the 805 AlpacaEval instructions against "
        "gpt4_turbo's outputs with the weighted_alpaca_eval_gpt4_turbo annotator (gpt-4-1106-preview); this run "
        "judges your prompts against your baseline with --judge, so its figures compare with the leaderboard only "
        "if all three are the same. Prompts are given as they are in the generation files (with any chat formatting "
        "they carry), not as AlpacaEval's bare instructions. The length-controlled win rate omits the published "
        "GLM's instruction-difficulty term (it needs many models per instruction; a two-model comparison cannot "
        "fit it), and fits without alpaca_eval's cross-validated L2 penalty and regularization toward the "
        "baseline; its interval is a bootstrap over your items (the leaderboard gives a standard error for the "
        "raw win rate only). Answers without logprobs give the sampled identifier, 0 or 1, instead of the "
        "weighted preference; --swap (both orders averaged) is not part of AlpacaEval 2."),
    "arena": (
        "Arena-Hard-Auto style, not Arena-Hard-Auto. The leaderboard (v0.1) judges its 500 prompts against "
        "gpt-4-0314's answers with gpt-4-1106-preview; this run judges your prompts against your baseline with "
        "--judge, so its figures compare with the leaderboard only if all three are the same (later versions, "
        "v2.0, changed the prompts, baseline and judge). Scoring is the leaderboard's: both orders, [[A>>B]] "
        "counted as 3 battles, ties as ties, Bradley-Terry with the baseline anchored and reported as a win rate "
        "against it. The interval resamples items (both games of a prompt together) where arena-hard-auto "
        "resamples single battles, so it is usually wider; no style control (length / markdown adjustment) is "
        "applied."),
}
