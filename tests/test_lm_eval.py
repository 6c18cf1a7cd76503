"""lm-eval tasks on the tiny fixture, on CPU and offline: a local `multiple_choice` task read from a jsonl file and a
`generate_until` task, scored by the real harness and checked against what the model itself computes; the evaluate
stage scoring every model of the lineage (the published merge beside the chosen one), cached per (model, task,
settings); the scores in report.json, report.md, the chart and the model card's `model-index`."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from helpers.stages import step_inputs
from matplotlib.figure import Figure
from transformers import AutoModelForCausalLM, AutoTokenizer

from pipeline.evaluation import lm_eval_tasks
from pipeline.evaluation.lineage import Evaluation, evaluate_lineage
from pipeline.evaluation.models import ModelSpec
from pipeline.recipe import EvaluateConfig, Recipe, RecipeError, format_validation_error
from pipeline.stages import StageRef, evaluate

THINGS = ["sky", "grass", "sea", "blood", "snow", "coal", "sun", "leaf"]
COLORS = ["blue", "green", "red", "white", "black", "yellow"]
PROMPTS = ["a b", "c d", "e f g", "h", "i j", "k l"]


def write_tasks(directory: Path, colors: list[dict], echo: list[dict]) -> Path:
    """A task directory as a team would keep one: `tiny_colors` (multiple choice: which color is the thing) and
    `tiny_echo` (generate until a newline), each a YAML over a jsonl beside it."""
    directory.mkdir(parents=True, exist_ok=True)
    common = {"dataset_path": "json", "test_split": "test"}
    tasks = {
        "tiny_colors": (
            colors,
            {
                "output_type": "multiple_choice",
                "doc_to_text": "{{question}} is",
                "doc_to_choice": "{{choices}}",
                "doc_to_target": "answer",
                "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True}],
            },
        ),
        "tiny_echo": (
            echo,
            {
                "output_type": "generate_until",
                "doc_to_text": "{{prompt}}",
                "doc_to_target": "{{answer}}",
                "generation_kwargs": {"until": ["\n"], "max_gen_toks": 4, "do_sample": False},
                "metric_list": [{"metric": "exact_match", "aggregation": "mean", "higher_is_better": True}],
            },
        ),
    }
    for name, (docs, definition) in tasks.items():
        data = directory / f"{name}.jsonl"
        data.write_text("".join(json.dumps(doc) + "\n" for doc in docs))
        files = {"dataset_kwargs": {"data_files": {"test": str(data)}}}
        (directory / f"{name}.yaml").write_text(yaml.safe_dump({"task": name, **common, **files, **definition}))
    return directory


def color_docs(answers: list[int] | None = None) -> list[dict]:
    docs = [
        {"question": thing, "choices": [COLORS[(index + k) % len(COLORS)] for k in range(3)], "answer": 0}
        for index, thing in enumerate(THINGS)
    ]
    for doc, answer in zip(docs, answers or [0] * len(docs), strict=True):
        doc["answer"] = answer
    return docs


def render(tokenizer, text: str, chat: bool) -> str:
    """The prompt lm-eval builds: the user turn in the chat template with its generation prompt, or the text."""
    if not chat:
        return text
    return tokenizer.apply_chat_template(
        [{"role": "user", "content": text}], add_generation_prompt=True, tokenize=False
    )


@torch.no_grad()
def continuation_log_likelihood(model, tokenizer, context: str, continuation: str) -> float:
    """log p(continuation | context), split into tokens as lm-eval does: trailing whitespace of the context moves
    to the continuation, and the continuation's tokens are those of the whole text after the context's."""
    spaces = len(context) - len(context.rstrip())
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    whole = tokenizer(context + continuation, add_special_tokens=False)["input_ids"]
    prefix = len(tokenizer(context, add_special_tokens=False)["input_ids"])
    log_probs = torch.log_softmax(model(torch.tensor([whole])).logits[0].float(), dim=-1)
    return sum(log_probs[position - 1, whole[position]].item() for position in range(prefix, len(whole)))


def own_choice(model, tokenizer, doc: dict, chat: bool) -> int:
    context = render(tokenizer, f"{doc['question']} is", chat)
    delimiter = "" if chat else " "  # lm-eval drops the target delimiter under a chat template
    scores = [continuation_log_likelihood(model, tokenizer, context, delimiter + c) for c in doc["choices"]]
    return max(range(len(scores)), key=scores.__getitem__)


@torch.no_grad()
def own_greedy(model, tokenizer, prompt: str, chat: bool) -> str:
    """4 greedy tokens, decoded without special tokens, up to the first newline."""
    ids = torch.tensor([tokenizer(render(tokenizer, prompt, chat), add_special_tokens=False)["input_ids"]])
    output = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=4, do_sample=False)
    return tokenizer.decode(output[0, ids.shape[1] :], skip_special_tokens=True).split("\n")[0]


def float32_evaluation(tokenizer, **lm_eval) -> Evaluation:
    config = EvaluateConfig(device="cpu", dtype="float32", batch_size=4, lm_eval=lm_eval)
    return Evaluation(
        config=config,
        device=torch.device("cpu"),
        tokenizer=tokenizer,
        stop_ids=[tokenizer.eos_token_id],
        pad_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id,
    )


def test_table_and_model_index_from_a_report():
    """report.md bolds the best model per (task, metric) by the task's own direction, says which models were
    prompted through the chat template; the card's model-index holds the merged model's scores, one result per
    task (named by the task for a local dataset, by the Hub dataset and config otherwise)."""
    from huggingface_hub import ModelCard

    from pipeline.evaluation.report import markdown_table
    from pipeline.publishing.model_index import model_index

    lm_eval = {
        "tasks": ["tiny_colors", "perplexed"],
        "chat_template": {"base": False, "target": True, "merged": True},
        "results": {
            "base": {"tiny_colors": {"acc": 0.25}, "perplexed": {"word_perplexity": 30.0}},
            "target": {"tiny_colors": {"acc": 0.5}, "perplexed": {"word_perplexity": 20.0}},
            "merged": {"tiny_colors": {"acc": 0.75}, "perplexed": {"word_perplexity": 25.0}},
        },
        "higher_is_better": {"tiny_colors": {"acc": True}, "perplexed": {"word_perplexity": False}},
        "samples": {"tiny_colors": 8, "perplexed": 4},
        "num_fewshot": {"tiny_colors": 0, "perplexed": 5},
        "datasets": {
            "tiny_colors": {"path": "json", "name": None, "split": "test"},
            "perplexed": {"path": "EleutherAI/wikitext_document_level", "name": "wikitext-2-raw-v1", "split": "test"},
        },
    }
    report = {"settings": {}, "models": ["base", "target", "merged"], "sets": [], "results": {}, "lm_eval": lm_eval}
    lines = markdown_table(report).splitlines()
    assert "| merged | 25.0000 | **0.7500** |" in lines and "| target | **20.0000** | 0.5000 |" in lines
    assert lines[-1] == (
        "Documents per task: perplexed 4, tiny_colors 8. Prompted through the chat template: target, merged; "
        "as plain text: base."
    )
    card = f"---\n{yaml.safe_dump(model_index('tiny-merge', lm_eval))}---\n\n# tiny-merge\n"
    results = {r.task_name: r for r in ModelCard(card).data.eval_results}
    assert (results["tiny_colors"].dataset_type, results["tiny_colors"].metric_value) == ("tiny_colors", 0.75)
    wikitext = results["perplexed"]
    assert (wikitext.dataset_type, wikitext.dataset_config, wikitext.dataset_args) == (
        "EleutherAI/wikitext_document_level",
        "wikitext-2-raw-v1",
        {"num_few_shot": 5},
    )
    assert model_index("tiny-merge", {"tasks": []}) == {}


@pytest.mark.slow
def test_local_tasks_score_what_the_model_itself_computes(tiny_models, tmp_path):
    """Accuracy is the share of documents whose best-scored choice (by the model's own log-likelihoods) is the
    answer; exact match the share of references equal to the model's own greedy answer. The answer keys are built
    from the base's own choices and the target's own answers, so the expected scores are known and not 0: 5/8 and
    4/6. The base is prompted with plain text, the target through the chat template (the `auto` rule)."""
    tokenizer = AutoTokenizer.from_pretrained(tiny_models["target"])
    models = {
        role: AutoModelForCausalLM.from_pretrained(tiny_models[role], dtype=torch.float32) for role in tiny_models
    }
    base_choices = [own_choice(models["base"], tokenizer, doc, chat=False) for doc in color_docs()]
    answers = [choice if index < 5 else (choice + 1) % 3 for index, choice in enumerate(base_choices)]
    colors = color_docs(answers)
    target_answers = [own_greedy(models["target"], tokenizer, prompt, chat=True) for prompt in PROMPTS]
    references = [answer if index < 4 else f"{answer}~" for index, answer in enumerate(target_answers)]
    echo = [{"prompt": p, "answer": r} for p, r in zip(PROMPTS, references, strict=True)]
    tasks = write_tasks(tmp_path / "tasks", colors, echo)
    expected = {
        "base": {
            "acc": 5 / 8,
            "exact_match": sum(
                own_greedy(models["base"], tokenizer, doc["prompt"], chat=False) == doc["answer"] for doc in echo
            )
            / 6,
        },
        "target": {
            "acc": sum(own_choice(models["target"], tokenizer, doc, chat=True) == doc["answer"] for doc in colors) / 8,
            "exact_match": 4 / 6,
        },
    }
    evaluation = float32_evaluation(tokenizer, tasks=["tiny_colors", "tiny_echo"], include_path=tasks)
    specs = [ModelSpec(role, role, Path(tiny_models[role])) for role in ("base", "target")]
    _, harness = evaluate_lineage(specs, [], evaluation)
    for role in ("base", "target"):
        assert harness[role]["tiny_colors"]["scores"]["tiny_colors"]["acc"] == pytest.approx(expected[role]["acc"])
        assert harness[role]["tiny_echo"]["scores"]["tiny_echo"]["exact_match"] == pytest.approx(
            expected[role]["exact_match"]
        ), (role, target_answers)
        assert harness[role]["tiny_colors"]["samples"] == {"tiny_colors": 8}
    assert harness["target"]["tiny_echo"]["datasets"]["tiny_echo"] == {"path": "json", "name": None, "split": "test"}


def published_leaderboard(root: Path, merge_dir: Path) -> Path:
    """search/leaderboard.json as the search stage writes it, whose published trial (another weight than the merge
    written) was not chosen: the evaluate stage then scores the published merge beside the chosen one."""
    published = yaml.safe_load((merge_dir / "mergekit_config.yml").read_text())
    for model in published["models"]:
        model.setdefault("parameters", {})["weight"] = 0.5
    search = root / "search"
    search.mkdir(exist_ok=True)
    trials = [{"label": "published", "mergekit_config": published}, {"label": "trial-2", "mergekit_config": {}}]
    document = {"trials": trials, "chosen": "trial-2", "fallback_to_published": False}
    (search / "leaderboard.json").write_text(json.dumps(document))
    return search


@pytest.mark.slow
def test_stage_scores_every_model_caches_per_task_and_fills_the_card(lineage, tmp_path, monkeypatch, capsys):
    from huggingface_hub import ModelCard
    from huggingface_hub.repocard import metadata_load

    from pipeline.archive.store import verify_adapter
    from pipeline.publishing.card import Release, model_card
    from pipeline.stages.selection import archive_entry

    inputs = lineage["inputs"]
    tasks = write_tasks(tmp_path / "tasks", color_docs(), [{"prompt": p, "answer": p} for p in PROMPTS])
    settings = lineage["recipe"].model_dump(mode="json")
    settings["evaluate"].update(generate=False, lm_eval={"tasks": ["tiny_colors"], "include_path": str(tasks)})
    settings["publish"] = {"repo_id": "someone/tiny-merge", "dry_run": True}
    recipe = Recipe.model_validate(settings)
    shutil.rmtree(Path(recipe.output_dir) / "cache" / "evaluate" / "lm_eval", ignore_errors=True)
    paths = {ref: inputs.paths[ref] for ref in evaluate.depends_on(recipe, "")}
    paths[StageRef("search")] = published_leaderboard(tmp_path, inputs.path("merge"))
    runs, titles = [], []
    original_run_tasks, original_savefig = lm_eval_tasks.run_tasks, Figure.savefig

    def recorded_run_tasks(harness_model, names, config, *, chat_template):
        runs.append((list(names), chat_template))
        return original_run_tasks(harness_model, names, config, chat_template=chat_template)

    def recorded_savefig(figure, *args, **kwargs):
        titles.append([axis.get_title() for axis in figure.axes])
        return original_savefig(figure, *args, **kwargs)

    monkeypatch.setattr(lm_eval_tasks, "run_tasks", recorded_run_tasks)
    monkeypatch.setattr(Figure, "savefig", recorded_savefig)

    def run_stage(recipe: Recipe, name: str) -> dict:
        out = tmp_path / name
        out.mkdir()
        evaluate.check(recipe, "")
        evaluate.run(recipe, "", out, step_inputs(recipe, paths))
        return json.loads((out / "report.json").read_text())

    report = run_stage(recipe, "first")
    models = [
        "base",
        "target",
        "trained:reverse",
        "trained:sort",
        "adapted:reverse",
        "adapted:sort",
        "merged",
        "merged:published",
    ]
    assert report["models"] == models
    lm_eval = report["lm_eval"]
    assert lm_eval["chat_template"] == {model: model != "base" for model in models}
    assert sorted(runs) == sorted([(["tiny_colors"], model != "base") for model in models])
    accuracy = {model: lm_eval["results"][model]["tiny_colors"]["acc"] for model in models}
    assert all(0 <= value <= 1 for value in accuracy.values()) and lm_eval["samples"] == {"tiny_colors": 8}
    table = (tmp_path / "first" / "report.md").read_text().splitlines()
    header = table.index("| model | tiny_colors acc |")
    assert [line.split("|")[1].strip() for line in table[header + 2 : header + 2 + len(models)]] == models
    assert "lm-eval-harness tasks" in titles[-1], titles

    runs.clear()
    with_echo = recipe.model_copy(deep=True)
    with_echo.evaluate.lm_eval.tasks = ["tiny_colors", "tiny_echo"]
    second = run_stage(with_echo, "second")
    assert sorted(runs) == sorted([(["tiny_echo"], model != "base") for model in models]), "tiny_colors was cached"
    assert {model: second["lm_eval"]["results"][model]["tiny_colors"]["acc"] for model in models} == accuracy
    assert all("exact_match" in second["lm_eval"]["results"][model]["tiny_echo"] for model in models)

    runs.clear()
    capsys.readouterr()
    assert run_stage(with_echo, "third")["lm_eval"] == second["lm_eval"]
    assert runs == [], "every (model, task) score came from the cache"
    assert capsys.readouterr().out.count("every score cached") == len(models)

    merged = inputs.path("merge")
    adapters = json.loads((merged / "lineage.json").read_text())["adapters"]
    release = Release("someone/tiny-merge", "merged", with_echo.name, with_echo.base_model, with_echo.target_model)
    card = model_card(
        release,
        json.loads((merged / "lineage.json").read_text()),
        (merged / "mergekit_config.yml").read_text(),
        {a["name"]: verify_adapter(archive_entry(with_echo, a["name"])) for a in adapters},
        None,
        None,
        lm_eval=second["lm_eval"],
    )
    (tmp_path / "README.md").write_text(card)
    index = metadata_load(tmp_path / "README.md")["model-index"]
    assert index[0]["name"] == "tiny-merge"
    scores = {(r.task_name, r.metric_type): r.metric_value for r in ModelCard(card).data.eval_results}
    assert scores == {
        ("tiny_colors", "acc"): second["lm_eval"]["results"]["merged"]["tiny_colors"]["acc"],
        ("tiny_echo", "exact_match"): second["lm_eval"]["results"]["merged"]["tiny_echo"]["exact_match"],
    }


@pytest.mark.slow
def test_bad_lm_eval_settings_fail_before_anything_is_written(lineage, tmp_path):
    """A missing include_path fails at recipe validation, naming the key; an unknown task fails the stage's check
    (before any stage runs) with the closest known names; the vLLM backend without vLLM says how to get it."""
    tasks = write_tasks(tmp_path / "tasks", color_docs(), [{"prompt": "a", "answer": "a"}])
    settings = lineage["recipe"].model_dump(mode="json")
    settings["output_dir"] = str(tmp_path / "run")
    settings["evaluate"]["lm_eval"] = {"tasks": ["tiny_colors"], "include_path": str(tmp_path / "nowhere")}
    with pytest.raises(Exception) as missing:
        Recipe.model_validate(settings)
    message = format_validation_error(missing.value, "recipe.yaml")
    assert "evaluate.lm_eval.include_path" in message and "nowhere" in message and "not a directory" in message
    settings["evaluate"]["lm_eval"] = {"tasks": ["tiny_colours", "tiny_echo"], "include_path": str(tasks)}
    with pytest.raises(RecipeError, match=r"unknown task 'tiny_colours' \(did you mean tiny_colors"):
        evaluate.check(Recipe.model_validate(settings), "")
    assert not (tmp_path / "run").exists()
    if not lm_eval_tasks.importlib.util.find_spec("vllm"):
        tokenizer = AutoTokenizer.from_pretrained(lineage["recipe"].target_model)
        evaluation = float32_evaluation(tokenizer, tasks=["tiny_colors"], include_path=tasks, backend="vllm")
        spec = ModelSpec("target", "target", Path(lineage["recipe"].target_model))
        with pytest.raises(RuntimeError, match="pip install vllm"):
            evaluate_lineage([spec], [], evaluation)
