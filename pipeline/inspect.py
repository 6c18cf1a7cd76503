"""`python -m pipeline.inspect RECIPE --finetune NAME -n 3`: the prepared examples as the trainer sees them.

Tokens that count toward the loss are green on a terminal and [in brackets] when piped. Then a check that matters
more than any other for chat fine-tunes: every assistant turn ends with a trained end-of-turn token (a model that
never learns `<|im_end|>` never stops generating).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from datasets import load_from_disk

from pipeline.data.templates import load_tokenizer
from pipeline.recipe import RecipeError, load_recipe
from pipeline.stages import prepare

TRAINED, UNTRAINED, RESET = "\033[1;32m", "\033[2m", "\033[0m"


def show_tokens(pieces: list[str], mask: list[int], colour: bool) -> str:
    """The tokens in order, each run of trained ones marked (ANSI colour or brackets)."""
    parts, previous = [], 0
    for piece, trained in zip(pieces, mask, strict=True):
        if trained != previous:
            parts.append((TRAINED if trained else UNTRAINED) if colour else ("[" if trained else "]"))
        elif colour and not parts:
            parts.append(UNTRAINED)
        parts.append(piece)
        previous = trained
    if colour:
        parts.append(RESET)
    elif previous:
        parts.append("]")
    return "".join(parts)


def end_of_turn_problems(
    ids: list[int], mask: list[int], end_of_turn_id: int, assistant_turns: int, truncated: bool
) -> list[str]:
    """What is wrong with the labels of one example: each run of trained tokens must end with the end-of-turn token,
    one per assistant turn (the last may be cut by truncation)."""
    runs, start = [], None
    for position, trained in enumerate([*mask, 0]):
        if trained and start is None:
            start = position
        elif not trained and start is not None:
            runs.append((start, position))
            start = None
    problems = []
    unterminated = [end for _, end in runs if ids[end - 1] != end_of_turn_id]
    if unterminated and not (truncated and unterminated == [runs[-1][1]]):
        problems.append(
            f"{len(unterminated)} trained span(s) do not end with the end-of-turn token (token {unterminated[0] - 1})"
        )
    trained_ends = sum(1 for i, m in zip(ids, mask, strict=True) if m and i == end_of_turn_id)
    if trained_ends < assistant_turns - truncated:
        problems.append(f"{assistant_turns} assistant turn(s) but only {trained_ends} trained end-of-turn token(s)")
    return problems


def inspect_examples(prepare_dir: Path, tokenizer, count: int, split: str, colour: bool) -> int:
    """Print `count` examples of a prepared split; returns the number of examples whose labels are wrong."""
    report = json.loads((prepare_dir / "report.json").read_text(encoding="utf-8"))
    end_of_turn = report["end_of_turn_token"]
    end_of_turn_id = tokenizer.convert_tokens_to_ids(end_of_turn)
    dataset = load_from_disk(str(prepare_dir / split))
    failures = 0
    for index in range(min(count, len(dataset))):
        row = dataset[index]
        ids, mask = row["input_ids"], row["assistant_masks"]
        pieces = [tokenizer.decode([token]) for token in ids]
        print(f"── {split}[{index}]: {len(ids)} tokens, {sum(mask)} trained " + "─" * 20)
        print(show_tokens(pieces, mask, colour))
        if row.get("messages") is None:
            print("format text: every token is trained, no turns to check")
            continue
        turns = sum(1 for m in row["messages"] if m["role"] == "assistant")
        truncated = len(ids) < len(tokenizer(row["text"], add_special_tokens=False)["input_ids"])
        problems = end_of_turn_problems(ids, mask, end_of_turn_id, turns, truncated)
        failures += bool(problems)
        verdict = (
            "; ".join(problems)
            if problems
            else f"ok: {turns} assistant turn(s), each ends with a trained {end_of_turn}"
        )
        print(f"end-of-turn check: {'PROBLEM: ' if problems else ''}{verdict}")
    if not len(dataset):
        print(f"{prepare_dir / split} is empty")
    return failures


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipeline.inspect", description=__doc__.splitlines()[0])
    parser.add_argument("recipe")
    parser.add_argument("--finetune", required=True, help="the fine-tune's name in the recipe")
    parser.add_argument("-n", type=int, default=3, help="how many examples (default 3)")
    parser.add_argument("--split", choices=["train", "eval"], default="train")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args(argv)
    try:
        recipe = load_recipe(args.recipe, args.overrides)
        if args.finetune not in [f.name for f in recipe.finetunes]:
            raise RecipeError(
                f"--finetune {args.finetune}: not in {args.recipe} (fine-tunes: "
                f"{', '.join(f.name for f in recipe.finetunes)})"
            )
    except RecipeError as error:
        print(error, file=sys.stderr)
        return 2
    prepare_dir = prepare.STAGE.output_path(recipe, args.finetune)
    if not (prepare_dir / "report.json").is_file():
        print(
            f"no prepared data in {prepare_dir}; run `python -m pipeline.run {args.recipe} --stage prepare` first",
            file=sys.stderr,
        )
        return 1
    tokenizer = load_tokenizer(recipe.base_model, "base_model", recipe.trust_remote_code)
    failures = inspect_examples(prepare_dir, tokenizer, args.n, args.split, colour=sys.stdout.isatty())
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
