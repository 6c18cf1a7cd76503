"""export, checked by llama.cpp itself (the project's build): every GGUF file written is run by llama-completion on
chat requests from the recipe's own data and compared with transformers on the merged model; a file that computes
something else, a file llama.cpp crashes on and a tokenizer the converter would write wrong fail with the file and
the problem named; without llama.cpp the screen says "not verified". The real model's run is at the end.

The tiny model here has its output layer scaled by 30: its greedy text is the model's own, but its logits spread
like a trained model's (about 15 instead of 0.5). A random model still meets real ties (two tokens 0.01 logits
apart, where 16-bit activations may pick either): its bf16 file must have no difference beyond such a tie. The real
model's bf16 file must give transformers' text on every prompt.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from pipeline.demo.tiny import make_tiny_model
from pipeline.llama_cpp.verify import GgufVerificationFailed, read_verification
from pipeline.models import gguf as gguf_export
from pipeline.recipe import Recipe, RecipeError
from pipeline.stages import Inputs, StageRef, export, prepare

NAME = "verify-test"
REPO = Path(__file__).resolve().parents[1]
COPY_SET = REPO / "data_templates" / "demo" / "copy.messages.jsonl"
SCALE = 30.0


def scaled_output(model_dir: Path, out_dir: Path, factor: float = SCALE) -> Path:
    """`model_dir` with lm_head × factor: the same greedy text, logits `factor` times wider apart."""
    shutil.copytree(model_dir, out_dir)
    weights = out_dir / "model.safetensors"
    tensors = load_file(weights)
    tensors["lm_head.weight"] = (tensors["lm_head.weight"].float() * factor).to(torch.bfloat16)
    save_file(tensors, weights, metadata={"format": "pt"})
    return out_dir


def recipe_for(root: Path, tiny_models, finetune_sets: Path, **gguf) -> Recipe:
    return Recipe.model_validate(
        {
            "name": NAME,
            "output_dir": str(root / "run"),
            "base_model": str(tiny_models["base"]),
            "target_model": str(tiny_models["target"]),
            "finetunes": [
                {"name": "reverse", "dataset": {"path": str(finetune_sets / "reverse.alpaca.jsonl")}},
                {"name": "sort", "dataset": {"path": str(finetune_sets / "sort.messages.jsonl"), "format": "messages"}},
            ],
            "evaluate": {"retention": [{"name": "copy", "dataset": {"path": str(COPY_SET), "format": "messages"}}]},
            "export": {"gguf": {"tokenizer_pre": "qwen2", "verify_max_new_tokens": 16, **gguf}},
        }
    )


@pytest.fixture(scope="module")
def workspace(tmp_path_factory, tiny_models, finetune_sets):
    """The scaled target as "the merged model", the fine-tunes prepared by the prepare stage, and a model of
    another seed (same tokenizer) whose GGUF is a wrong file for it."""
    root = tmp_path_factory.mktemp("verify")
    merged = scaled_output(tiny_models["target"], root / "merged")
    other = scaled_output(make_tiny_model(root / "other-seed", tiny_models["target"], seed=7), root / "other")
    recipe = recipe_for(root, tiny_models, finetune_sets)
    paths = {StageRef("merge"): merged}
    for finetune in recipe.finetunes:
        out = prepare.STAGE.output_path(recipe, finetune.name)
        out.mkdir(parents=True)
        prepare.run(recipe, finetune.name, out, Inputs({}))
        paths[StageRef("prepare", finetune.name)] = out
    return {"root": root, "merged": merged, "other": other, "inputs": Inputs(paths), "finetune_sets": finetune_sets}


def run_export(workspace, tiny_models, out: Path, **gguf) -> dict:
    recipe = recipe_for(workspace["root"], tiny_models, workspace["finetune_sets"], **gguf)
    export.check(recipe, "")
    out.mkdir(parents=True)
    return export.run(recipe, "", out, workspace["inputs"])


@pytest.mark.slow
def test_every_file_is_run_by_llama_cpp_on_the_recipe_s_own_requests(
    llama_cpp, workspace, tiny_models, tmp_path, capsys
):
    summary = run_export(workspace, tiny_models, tmp_path / "export", outtypes=["bf16", "q8_0", "q4_k_m"])
    verification = summary["verification"]
    assert verification["verified"] and verification["reference"] == "transformers, float32, cpu"
    assert [p["source"] for p in verification["prompts"]] == [
        "held-out reverse",
        "held-out sort",
        "held-out reverse",
        "held-out sort",
    ], "one request from each fine-tune's held-out split in turn"
    assert list(verification["files"]) == ["bf16", "q8_0", "q4_k_m"]
    bf16 = verification["files"]["bf16"]
    assert (bf16["identical"] + bf16["near_tie"], bf16["prompts"], bf16["differs"]) == (4, 4, 0), bf16["outcomes"]
    assert bf16["identical"] >= 2, bf16["outcomes"]
    ties = [o for o in bf16["outcomes"] if o["verdict"] == "near-tie"]
    assert all(float(o["detail"].split(", ")[-1].split()[0]) < 0.05 for o in ties), "0.01 logits of about 15"
    assert all(o["tokens"] == 16 for o in bf16["outcomes"]), "the random model never says <|im_end|>: 16 tokens each"
    for result in verification["files"].values():
        assert result["stops_at_end_of_turn"] and "<|im_end|>" in result["end_of_generation_tokens"]
        assert 0 <= result["agreement"] <= 1 and result["kept"]
    screen = capsys.readouterr().out
    assert "export: checking 3 GGUF file(s) with llama.cpp against transformers (cpu, float32) on 4 prompts" in screen
    assert f"export: {NAME}-bf16.gguf: {bf16['identical']}/4 prompts identical to transformers" in screen
    assert "stops at <|im_end|> (0/4 replies ended there)" in screen
    assert f"export: {NAME}-q4_k_m.gguf: " in screen
    assert read_verification(tmp_path / "export") == verification
    assert sorted(p.name for p in (tmp_path / "export").iterdir()) == sorted(
        [f"{NAME}-bf16.gguf", f"{NAME}-q4_k_m.gguf", f"{NAME}-q8_0.gguf", "verification.json"]
    )


@pytest.mark.slow
def test_a_quantized_only_export_checks_its_16_bit_source_too(llama_cpp, workspace, tiny_models, tmp_path, capsys):
    """Only q4_k_m is asked for: its temporary bf16 source is checked (and must agree) before it is removed."""
    summary = run_export(workspace, tiny_models, tmp_path / "export", outtypes=["q4_k_m"], verify_prompts=2)
    files = summary["verification"]["files"]
    assert list(files) == ["bf16", "q4_k_m"] and not files["bf16"]["kept"] and files["bf16"]["differs"] == 0
    assert "(llama-quantize's input, not kept)" in capsys.readouterr().out
    assert not (tmp_path / "export" / "_work").exists()


def test_requests_come_from_retention_sets_then_general_ones_when_nothing_is_held_out(workspace, tiny_models, tmp_path):
    from transformers import AutoTokenizer

    recipe = recipe_for(workspace["root"], tiny_models, workspace["finetune_sets"], verify_prompts=5)
    empty = {StageRef("prepare", f.name): tmp_path / f.name for f in recipe.finetunes}  # nothing held out
    tokenizer = AutoTokenizer.from_pretrained(workspace["merged"])
    requests = export._requests(recipe, Inputs(empty), tmp_path / "work", tokenizer)
    assert [source for source, _ in requests] == ["retention copy"] * 5
    without_retention = recipe.model_copy(update={"evaluate": recipe.evaluate.model_copy(update={"retention": []})})
    requests = export._requests(without_retention, Inputs(empty), tmp_path / "work", tokenizer)
    assert [source for source, _ in requests] == ["general"] * 5
    assert requests[0][1] == [{"role": "user", "content": "What is the capital of France? Answer in one word."}]


@pytest.mark.slow
def test_a_file_that_computes_something_else_fails_naming_it_and_the_prompt(
    llama_cpp, workspace, tiny_models, tmp_path, monkeypatch
):
    """The bf16 file is written from another model than the merged one: llama.cpp's text is not transformers'."""
    convert = gguf_export.convert_to_gguf
    monkeypatch.setattr(gguf_export, "convert_to_gguf", lambda model_dir, *a, **k: convert(workspace["other"], *a, **k))
    with pytest.raises(GgufVerificationFailed) as failure:
        run_export(workspace, tiny_models, tmp_path / "export", outtypes=["bf16"], verify_prompts=2)
    message = str(failure.value)
    assert f"{NAME}-bf16.gguf: prompt 1 (" in message and "token 1: transformers" in message, message
    assert "logits behind" in message or "not among transformers' 10 best" in message
    written = read_verification(tmp_path / "export")
    assert written["files"]["bf16"]["differs"] == 2, "the outcome is kept for a look"


@pytest.mark.slow
def test_a_file_llama_cpp_aborts_on_fails_naming_it(llama_cpp, workspace, tiny_models, tmp_path, monkeypatch):
    """The bf16 file's vocabulary type rewritten to SentencePiece's (`llama`), as the converter writes it for a
    byte-level tokenizer marked byte_fallback: llama.cpp aborts loading it, as it did in issue 27."""
    import gguf
    from gguf.scripts.gguf_new_metadata import MetadataDetails, copy_with_new_metadata

    convert = gguf_export.convert_to_gguf

    def convert_with_wrong_vocabulary(model_dir, out_file, *args, **kwargs):
        written = convert(model_dir, out_file, *args, **kwargs)
        reader = gguf.GGUFReader(out_file)
        rewritten = Path(f"{out_file}.rewritten")
        writer = gguf.GGUFWriter(rewritten, arch=reader.fields["general.architecture"].contents())
        wrong = {"tokenizer.ggml.model": MetadataDetails(gguf.GGUFValueType.STRING, "llama")}
        copy_with_new_metadata(reader, writer, wrong, [])
        rewritten.replace(out_file)
        return written

    monkeypatch.setattr(gguf_export, "convert_to_gguf", convert_with_wrong_vocabulary)
    with pytest.raises(GgufVerificationFailed) as failure:
        run_export(workspace, tiny_models, tmp_path / "export", outtypes=["bf16"], verify_prompts=1)
    message = str(failure.value)
    assert f"llama.cpp was killed by SIGABRT running {NAME}-bf16.gguf" in message, message
    assert "std::out_of_range" in message and "cannot run it" in message


def test_without_llama_cpp_the_screen_says_not_verified(tiny_models, finetune_sets, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    monkeypatch.setenv("FTMERGE_LLAMA_CPP_DIR", str(tmp_path / "no-llama.cpp"))
    recipe = recipe_for(tmp_path, tiny_models, finetune_sets, outtypes=["q8_0"])
    export.check(recipe, "")  # verify: auto goes on without it
    out = tmp_path / "export"
    out.mkdir()
    summary = export.run(recipe, "", out, Inputs({StageRef("merge"): tiny_models["target"]}))
    assert not summary["verification"]["verified"]
    assert (
        f"export: {NAME}-q8_0.gguf: not verified by llama.cpp: llama.cpp's llama-completion was not found"
        in capsys.readouterr().out
    )
    assert read_verification(out) == summary["verification"]
    required = recipe_for(tmp_path, tiny_models, finetune_sets, verify=True)
    with pytest.raises(RecipeError, match=r"export\.gguf\.verify: true, but llama\.cpp's llama-completion"):
        export.check(required, "")
    with pytest.raises(RecipeError, match=r"export\.gguf\.llama_completion: /nowhere/llama-completion"):
        export.check(recipe_for(tmp_path, tiny_models, finetune_sets, llama_completion="/nowhere/llama-completion"), "")


def test_verification_reads_the_held_out_splits_and_is_part_of_the_fingerprint(tiny_models, finetune_sets, tmp_path):
    checked = recipe_for(tmp_path, tiny_models, finetune_sets)
    assert export.depends_on(checked, "") == [
        StageRef("merge"),
        StageRef("prepare", "reverse"),
        StageRef("prepare", "sort"),
    ]
    unchecked = recipe_for(tmp_path, tiny_models, finetune_sets, verify=False)
    assert export.depends_on(unchecked, "") == [StageRef("merge")]
    assert "verification" in export.config(checked, "") and "verification" not in export.config(unchecked, "")
    fewer = recipe_for(tmp_path, tiny_models, finetune_sets, verify_prompts=2)
    assert export.config(fewer, "") != export.config(checked, "")


def sentencepiece_style(tokenizer_json: dict) -> dict:
    """What transformers 5.17 rebuilds from a Llama GGUF (integrations/ggml.py's GGUFLlamaConverter): byte fallback
    on and SentencePiece's decoders, over the byte-level vocabulary."""
    tokenizer_json["model"]["byte_fallback"] = True
    tokenizer_json["decoder"] = {
        "type": "Sequence",
        "decoders": [
            {"type": "Replace", "pattern": {"String": "▁"}, "content": " "},
            {"type": "ByteFallback"},
            {"type": "Fuse"},
            {"type": "Strip", "content": " ", "start": 1, "stop": 0},
        ],
    }
    return tokenizer_json


def break_tokenizer(model_dir: Path, out_dir: Path) -> Path:
    shutil.copytree(model_dir, out_dir)
    path = out_dir / "tokenizer.json"
    path.write_text(json.dumps(sentencepiece_style(json.loads(path.read_text()))))
    return out_dir


def test_a_byte_level_tokenizer_marked_byte_fallback_is_refused_before_anything_runs(
    tiny_models, finetune_sets, tmp_path
):
    broken = break_tokenizer(tiny_models["target"], tmp_path / "target")
    recipe = recipe_for(tmp_path, {**tiny_models, "target": broken}, finetune_sets)
    with pytest.raises(RecipeError, match=r"export\.gguf: target_model's tokenizer .*byte_fallback is true") as error:
        export.check(recipe, "")
    assert "byte_to_token" in str(error.value) and '"byte_fallback": false and a ByteLevel decoder' in str(error.value)
    with pytest.raises(gguf_export.TokenizerMismatch):
        gguf_export.convert_to_gguf(broken, tmp_path / "x.gguf", "bf16", model_name=NAME, tokenizer_pre="qwen2")
    fallback_only = json.loads((tiny_models["target"] / "tokenizer.json").read_text())
    fallback_only["model"]["byte_fallback"] = True  # with its ByteLevel decoder the converter writes gpt2: fine
    (tmp_path / "fallback").mkdir()
    (tmp_path / "fallback" / "tokenizer.json").write_text(json.dumps(fallback_only))
    gguf_export.check_tokenizer(tmp_path / "fallback")


# --- the real model: SmolLM2-135M-Instruct (tests/conftest.py's smollm2_base) ---------------------------------------


def smollm2_recipe(root: Path, model: Path, **gguf) -> Recipe:
    return Recipe.model_validate(
        {
            "name": "smollm2",
            "output_dir": str(root / "run"),
            "base_model": str(model),
            "target_model": str(model),
            "export": {"gguf": {"outtypes": ["bf16", "q8_0", "q4_k_m"], "verify_max_new_tokens": 24, **gguf}},
        }
    )


@pytest.mark.slow
def test_smollm2_gguf_files_run_in_llama_cpp_as_in_transformers(llama_cpp, smollm2_base, tmp_path, capsys):
    """The real model through the stage (as the merged model): the converter recognizes its tokenizer (`smollm`),
    llama.cpp's greedy text from the bf16 file is transformers' on every prompt, the quantized files' agreement is
    reported, and every file stops at <|im_end|>."""
    recipe = smollm2_recipe(tmp_path, smollm2_base)
    export.check(recipe, "")
    out = tmp_path / "export"
    out.mkdir()
    summary = export.run(recipe, "", out, Inputs({StageRef("merge"): smollm2_base}))
    assert summary["tokenizer_pre"] == "smollm" and summary["architecture"] == "LlamaForCausalLM"
    files = summary["verification"]["files"]
    assert (files["bf16"]["identical"], files["bf16"]["prompts"]) == (4, 4), files["bf16"]["outcomes"]
    assert files["bf16"]["outcomes"][0]["stopped"], "'Paris.' and <|im_end|>, well within 24 tokens"
    for result in files.values():
        assert result["stops_at_end_of_turn"] and result["end_of_turn"] == "<|im_end|>"
    screen = capsys.readouterr().out
    for outtype in ("bf16", "q8_0", "q4_k_m"):
        line = next(line for line in screen.splitlines() if line.startswith(f"export: smollm2-{outtype}.gguf: "))
        assert f"{files[outtype]['identical']}/4 prompts identical to transformers" in line
        assert "stops at <|im_end|>" in line


@pytest.mark.slow
def test_smollm2_with_the_tokenizer_transformers_rebuilds_from_a_gguf_is_refused_or_caught(
    llama_cpp, smollm2_base, tmp_path, monkeypatch
):
    """Issue 27's broken export: byte fallback and SentencePiece decoders on SmolLM2's byte-level BPE. The check
    names it before anything runs; with the check bypassed, the converter writes a `llama` vocabulary, llama.cpp
    aborts on it, and the stage fails naming the file and the abort instead of reporting success."""
    broken = break_tokenizer(smollm2_base, tmp_path / "broken")
    recipe = smollm2_recipe(tmp_path, broken, outtypes=["bf16"], verify_prompts=1, verify_max_new_tokens=4)
    with pytest.raises(RecipeError, match=r"target_model's tokenizer .*byte_fallback is true"):
        export.check(recipe, "")
    monkeypatch.setattr(gguf_export, "check_tokenizer", lambda model_dir: None)
    out = tmp_path / "export"
    out.mkdir()
    with pytest.raises(GgufVerificationFailed, match=r"killed by SIGABRT running smollm2-bf16\.gguf") as failure:
        export.run(recipe, "", out, Inputs({StageRef("merge"): broken}))
    assert "std::out_of_range" in str(failure.value)
    assert gguf_field(out / "smollm2-bf16.gguf", "tokenizer.ggml.model") == "llama", "the converter's mistake"


def gguf_field(path: Path, key: str):
    import gguf

    return gguf.GGUFReader(path).fields[key].contents()
