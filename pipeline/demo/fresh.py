"""Judge a finished demo run on fresh examples no training saw: greedy answers in the target's chat template, exact
match, for the target, each LoRA on the base (`trained:<name>`) and on the target (`adapted:<name>`), the merged model
and (when the search chose another) the published merge (`merged:published`); each LoRA's transfer (its skill on the
target over its skill on the base).

    python -m pipeline.demo.fresh                  # runs/tiny-cpu, 100 examples per skill, seed 1
    python -m pipeline.demo.fresh --seed 7 -n 200

Each fine-tune and each retention set of the demo recipe is named after its skill, so the columns are the skills.
Prints the table and whether the merge kept ≥ 0.9× the target's retention and reached ≥ 0.7× each adapted model's
skill (exit 1 when not).
"""

from __future__ import annotations

import argparse
import sys

import torch

from pipeline.demo.synthetic import fresh_examples
from pipeline.evaluation.generate import greedy_answers, score_answers
from pipeline.evaluation.transfer import transfer_report

KEEP, LEARN = 0.9, 0.7


def exact_match(model, tokenizer, skill: str, n: int, seed: int) -> float:
    """The share of `n` fresh examples of `skill` answered exactly, greedily, stopping at the end of the turn."""
    conversations = fresh_examples(skill, n, seed=seed)
    prompts = [
        tokenizer.apply_chat_template(c[:1], add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"]
        for c in conversations
    ]
    stop_ids = [i for i in tokenizer.convert_tokens_to_ids(["<|im_end|>", "<|endoftext|>"]) if i is not None]
    answers = greedy_answers(
        model, tokenizer, prompts, stop_ids=stop_ids, max_new_tokens=16, batch_size=50, pad_id=tokenizer.pad_token_id
    )
    return score_answers(answers, [c[-1]["content"] for c in conversations]).exact_match


def lineage_models(recipe) -> dict[str, object]:
    """label → ModelSpec of the run's target, trained and adapted models, merged model and (when the search chose
    another) the published merge: the evaluate stage's own lineage of the finished run, without the base, read from the
    outputs the runner hands the evaluate step."""
    from pipeline.runner import inputs_of
    from pipeline.stages import evaluate

    scored = recipe.model_copy(
        update={"evaluate": recipe.evaluate.model_copy(update={"models": ["target", "trained", "adapted", "merged"]})}
    )
    specs = evaluate.lineage(scored, inputs_of(scored, "evaluate"))
    return {spec.label: spec for spec in specs}


def judge(recipe, *, n: int, seed: int) -> tuple[dict[str, dict[str, float]], list[str], list[str]]:
    from transformers import AutoTokenizer

    from pipeline.evaluation.lineage import Evaluation, load_model
    from pipeline.evaluation.models import release

    learned = [f.name for f in recipe.finetunes]
    kept = [r.name for r in recipe.evaluate.retention]
    tokenizer = AutoTokenizer.from_pretrained(recipe.target_model)
    settings = recipe.evaluate.model_copy(update={"dtype": "float32", "load_in_4bit": False})
    evaluation = Evaluation(
        settings, torch.device("cpu"), tokenizer, [], tokenizer.pad_token_id, adapter_dtype=recipe.apply.dtype
    )
    table = {}
    for label, spec in lineage_models(recipe).items():
        model = load_model(spec, evaluation).eval()
        table[label] = {skill: exact_match(model, tokenizer, skill, n, seed) for skill in [*learned, *kept]}
        del model
        release(torch.device("cpu"))
    return table, learned, kept


def verdict(table: dict, learned: list[str], kept: list[str], model: str = "merged") -> list[str]:
    lines = []
    for skill in kept:
        ratio = table[model][skill] / max(table["target"][skill], 1e-9)
        lines.append(
            f"{model} keeps {skill}: {ratio:.2f}x the target's ({'PASS' if ratio >= KEEP else 'FAIL'}, goal >= {KEEP})"
        )
    for skill in learned:
        ratio = table[model][skill] / max(table[f"adapted:{skill}"][skill], 1e-9)
        lines.append(
            f"{model} learns {skill}: {ratio:.2f}x adapted:{skill}'s ({'PASS' if ratio >= LEARN else 'FAIL'}"
            f", goal >= {LEARN})"
        )
    return lines


def transfer(table: dict, learned: list[str]) -> dict[str, dict]:
    """Each LoRA's transfer on fresh examples of its skill, as the evaluate stage measures it by exact match."""
    results = {label: {skill: {"exact_match": value} for skill, value in row.items()} for label, row in table.items()}
    return transfer_report(results, learned, generated=True)


def transfer_line(name: str, entry: dict) -> str:
    ratio = "–" if entry["transfer"] is None else f"{entry['transfer']:.2f}x"
    return f"transfer {name}: {entry['adapted']:.0%} on the target / {entry['trained']:.0%} on the base = {ratio}"


def markdown(table: dict, skills: list[str], n: int, seed: int) -> str:
    lines = [
        f"| model ({n} fresh examples per skill, seed {seed}) | " + " | ".join(skills) + " |",
        "|---|" + "---:|" * len(skills),
    ]
    lines += [f"| {label} | " + " | ".join(f"{row[s]:.0%}" for s in skills) + " |" for label, row in table.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    from pipeline.demo import DEMO_RECIPE
    from pipeline.recipe import load_recipe

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("recipe", nargs="?", default=str(DEMO_RECIPE))
    parser.add_argument("-n", type=int, default=100)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args(argv)
    recipe = load_recipe(args.recipe, args.set)
    table, learned, kept = judge(recipe, n=args.n, seed=args.seed)
    print(markdown(table, [*learned, *kept], args.n, args.seed))
    lines = [transfer_line(name, entry) for name, entry in transfer(table, learned).items()]
    lines += verdict(table, learned, kept)
    if "merged:published" in table:
        lines += verdict(table, learned, kept, "merged:published")
    print("\n".join(lines))
    return 0 if not any("FAIL" in line for line in verdict(table, learned, kept)) else 1


if __name__ == "__main__":
    sys.exit(main())
