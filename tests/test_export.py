"""export: the merged tiny model written as GGUF by llama.cpp's own converter, read back with `gguf.GGUFReader`;
K-quants made by llama.cpp's own llama-quantize (the project's build); the publish folder and card carrying the
files; settings refused before anything runs. What llama.cpp does with the files: tests/test_export_verify.py.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers.models import make_adapter
from helpers.recipes import recipe_data, write_recipe
from safetensors.torch import load_file

from pipeline.archive.importing import import_adapter
from pipeline.models import gguf as gguf_export
from pipeline.recipe import Recipe
from pipeline.run import main as run_pipeline
from pipeline.stages import Inputs, StageRef, export

NAME = "export-test"


def export_recipe_data(output_dir: Path, archive: Path, tiny_models, **sections) -> dict:
    """alpha and beta from `archive` merged on CPU (apply.save off), evaluate off; `sections` add keys."""
    return recipe_data(
        tiny_models,
        output_dir,
        name=NAME,
        archive_dir=archive,
        apply={"device": "cpu", "save": False},
        merge={"adapters": ["alpha", "beta"], "device": "cpu"},
        evaluate={"enabled": False},
        **sections,
    )


@pytest.fixture(scope="module")
def exported(tmp_path_factory, tiny_models, llama_cpp_or_none):
    """Two imported adapters merged (fused), exported as bf16 and q8_0 (and checked by llama.cpp where it can be
    built), and published as a dry run: the CLI path."""
    root = tmp_path_factory.mktemp("export")
    for seed, name in enumerate(("alpha", "beta")):
        adapter = make_adapter(tiny_models["base"], root / name, seed=seed)
        import_adapter(root / "archive", adapter, name, str(tiny_models["base"]))
    data = export_recipe_data(
        root / "run",
        root / "archive",
        tiny_models,
        export={"gguf": {"outtypes": ["bf16", "q8_0"], "tokenizer_pre": "qwen2"}},
        publish={"repo_id": "someone/tiny-merge", "dry_run": True},
    )
    assert run_pipeline([str(write_recipe(root / "recipe.yaml", data)), "--from", "apply"]) == 0
    run = root / "run"
    return {
        "archive": root / "archive",
        "run": run,
        "merge": run / "merge",
        "export": run / "export",
        "llama_cpp": llama_cpp_or_none,
    }


def read_gguf(path: Path):
    from gguf import GGUFReader

    return GGUFReader(path)


def field(reader, key: str):
    return reader.fields[key].contents()


def llama_cpp_names(merged: Path) -> dict[str, str]:
    """The merged model's tensor names as llama.cpp's tensor map (gguf-py) names them."""
    import gguf

    tensors = {name: None for file in merged.glob("*.safetensors") for name in load_file(file)}
    config = json.loads((merged / "config.json").read_text())
    mapping = gguf.get_tensor_name_map(gguf.MODEL_ARCH.QWEN2, config["num_hidden_layers"])
    return {name: mapping.get_name(name, try_suffixes=(".weight", ".bias")) for name in tensors}


def test_bf16_gguf_holds_every_merged_tensor_bit_for_bit(exported):
    reader = read_gguf(exported["export"] / f"{NAME}-bf16.gguf")
    assert field(reader, "general.architecture") == "qwen2"
    assert field(reader, "general.name") == NAME
    merged = {name: t for file in exported["merge"].glob("*.safetensors") for name, t in load_file(file).items()}
    names = llama_cpp_names(exported["merge"])
    assert None not in names.values()
    by_name = {tensor.name: tensor for tensor in reader.tensors}
    assert sorted(by_name) == sorted(names.values()), "every tensor of the merged model, nothing else"
    for hf_name, gguf_name in names.items():
        tensor, expected = by_name[gguf_name], merged[hf_name]
        if tensor.tensor_type.name == "BF16":  # stored as raw bytes: compare the bits
            bits = np.asarray(tensor.data).view(np.uint16).reshape(expected.shape)
            assert np.array_equal(bits, expected.view(torch.int16).numpy().view(np.uint16)), hf_name
        else:  # norms and biases: float32, exact for bf16 values
            assert tensor.tensor_type.name == "F32", hf_name
            assert np.array_equal(np.asarray(tensor.data).reshape(expected.shape), expected.float().numpy()), hf_name
    assert by_name["token_embd.weight"].tensor_type.name == "BF16"


def test_bf16_gguf_has_the_targets_rope_chat_template_and_end_of_turn(exported, tiny_models):
    from transformers import AutoTokenizer

    reader = read_gguf(exported["export"] / f"{NAME}-bf16.gguf")
    config = json.loads((Path(tiny_models["target"]) / "config.json").read_text())
    rope_theta = config.get("rope_theta", (config.get("rope_parameters") or {}).get("rope_theta"))
    assert field(reader, "qwen2.rope.freq_base") == rope_theta
    target_tokenizer = AutoTokenizer.from_pretrained(tiny_models["target"])
    assert field(reader, "tokenizer.chat_template") == target_tokenizer.chat_template
    end_of_turn = target_tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert target_tokenizer.eos_token_id == end_of_turn
    assert field(reader, "tokenizer.ggml.eos_token_id") == end_of_turn
    assert field(reader, "tokenizer.ggml.tokens")[end_of_turn] == "<|im_end|>"
    assert field(reader, "tokenizer.ggml.pre") == "qwen2"
    assert field(reader, "tokenizer.ggml.model") == "gpt2"


def test_q8_0_is_written_and_smaller(exported):
    bf16, q8_0 = (exported["export"] / f"{NAME}-{t}.gguf" for t in ("bf16", "q8_0"))
    assert q8_0.stat().st_size < bf16.stat().st_size
    types = {tensor.name: tensor.tensor_type.name for tensor in read_gguf(q8_0).tensors}
    assert types["token_embd.weight"] == "Q8_0" and types["blk.0.attn_q.weight"] == "Q8_0"
    assert sorted(p.name for p in exported["export"].iterdir()) == [
        f"{NAME}-bf16.gguf",
        f"{NAME}-q8_0.gguf",
        "verification.json",
    ]
    state = json.loads((exported["run"] / "state" / "export.json").read_text())
    assert state["summary"]["files"]["q8_0"] == {"file": q8_0.name, "bytes": q8_0.stat().st_size}
    assert state["summary"]["tokenizer_pre"] == "qwen2" and state["summary"]["detected_tokenizer_pre"] is None


def test_publish_folder_and_card_carry_the_gguf_files(exported):
    folder = exported["run"] / "publish"
    for outtype in ("bf16", "q8_0"):
        published = folder / f"{NAME}-{outtype}.gguf"
        assert published.stat().st_ino == (exported["export"] / published.name).stat().st_ino, "a hard link"
    card = (folder / "README.md").read_text()
    assert "## GGUF" in card and f"`{NAME}-q8_0.gguf` | q8_0 |" in card
    assert "| file | type | size | llama.cpp check |" in card
    row = next(line for line in card.splitlines() if line.startswith(f"| `{NAME}-bf16.gguf` |"))
    if exported["llama_cpp"]:
        assert "prompts identical to transformers" in row and "stops at <|im_end|>" in row, row
        assert "llama.cpp (`llama-completion`, greedy) ran each file on 4 chat prompts" in card
    else:
        assert row.endswith("| – |") and "These files were not run by llama.cpp" in card
    state = json.loads((exported["run"] / "state" / "publish.json").read_text())
    assert f"{NAME}-bf16.gguf" in state["summary"]["files"]


def test_the_run_checks_each_file_with_llama_cpp_and_ends_with_what_it_found(exported, llama_cpp):
    """The random tiny model: its greedy steps are often ties (0.000 logits apart), which is told apart from a
    difference; none of the bf16 file's prompts may differ (tests/test_export_verify.py holds it to identical)."""
    state = json.loads((exported["run"] / "state" / "export.json").read_text())
    files = state["summary"]["verification"]["files"]
    assert files["bf16"]["differs"] == 0 and files["bf16"]["identical"] + files["bf16"]["near_tie"] == 4
    assert files["q8_0"]["stops_at_end_of_turn"] and files["bf16"]["stops_at_end_of_turn"]
    log = next((exported["run"] / "logs").glob("*.log")).read_text()
    assert f"[ftmerge]   note: export: {NAME}-bf16.gguf: " in log, "the per-file line reached the screen"
    assert f"[ftmerge] GGUF files, run by llama.cpp ({exported['export'] / 'verification.json'}):" in log
    assert f"  {NAME}-q8_0.gguf: {files['q8_0']['summary']}" in log
    assert "llama_model_loader" in log or "print_info" in log, "llama.cpp's own output is in the log"


def test_unrecognized_tokenizer_names_the_setting(exported, tmp_path):
    with pytest.raises(gguf_export.UnrecognizedTokenizer, match=r"export\.gguf\.tokenizer_pre"):
        gguf_export.convert_to_gguf(exported["merge"], tmp_path / "model.gguf", "bf16", model_name=NAME)
    assert list(tmp_path.iterdir()) == [], "no partial file is left"


def test_tokenizer_pre_replaces_what_the_converter_detects(exported, tmp_path, monkeypatch):
    """A recognized tokenizer (stood in for by the converter's detection answering "gpt-2") keeps its name unless
    tokenizer_pre is set; when it is, the detected name is reported beside the one written."""
    from conversion.base import TextModel

    monkeypatch.setattr(TextModel, "get_vocab_base_pre", lambda self, tokenizer: "gpt-2")
    detected = gguf_export.convert_to_gguf(exported["merge"], tmp_path / "a.gguf", "q8_0", model_name=NAME)
    assert (
        detected["tokenizer_pre"] == "gpt-2" and field(read_gguf(tmp_path / "a.gguf"), "tokenizer.ggml.pre") == "gpt-2"
    )
    replaced = gguf_export.convert_to_gguf(
        exported["merge"], tmp_path / "b.gguf", "q8_0", model_name=NAME, tokenizer_pre="qwen2"
    )
    assert replaced == {"architecture": "Qwen2ForCausalLM", "tokenizer_pre": "qwen2", "detected_tokenizer_pre": "gpt-2"}
    assert field(read_gguf(tmp_path / "b.gguf"), "tokenizer.ggml.pre") == "qwen2"


def export_recipe(exported, tiny_models, output_dir: Path, **gguf) -> Recipe:
    return Recipe.model_validate(
        export_recipe_data(output_dir, exported["archive"], tiny_models, export={"gguf": gguf})
    )


def test_k_quants_are_made_by_llama_quantize_and_a_killed_run_resumes(
    exported, tiny_models, tmp_path, monkeypatch, llama_cpp
):
    recipe = export_recipe(
        exported, tiny_models, tmp_path / "run", outtypes=["q8_0", "q4_k_m"], tokenizer_pre="qwen2", verify=False
    )
    export.check(recipe, "")
    out = tmp_path / "export.partial"
    out.mkdir()
    done = out / f"{NAME}-q8_0.gguf"  # left complete by a killed run
    done.write_bytes((exported["export"] / done.name).read_bytes())
    converted = []
    convert = gguf_export.convert_to_gguf
    monkeypatch.setattr(gguf_export, "convert_to_gguf", lambda *a, **k: converted.append(a[2]) or convert(*a, **k))
    summary = export.run(recipe, "", out, Inputs({StageRef("merge"): exported["merge"]}))
    assert converted == ["bf16"], "q8_0 was kept; bf16 is llama-quantize's input"
    assert sorted(p.name for p in out.iterdir()) == [
        f"{NAME}-q4_k_m.gguf",
        f"{NAME}-q8_0.gguf",
        "verification.json",
    ], "bf16 removed"
    assert list(summary["files"]) == ["q8_0", "q4_k_m"]
    # llama.cpp's own K-quant: 4-bit K blocks for the projections (their rows are multiples of 256 elements), with
    # the fallback types llama-quantize picks for rows that are not
    types = {tensor.name: tensor.tensor_type.name for tensor in read_gguf(out / f"{NAME}-q4_k_m.gguf").tensors}
    assert {types[f"blk.0.{name}.weight"] for name in ("ffn_gate", "ffn_up")} <= {"Q4_K", "Q5_0", "Q5_1", "Q4_0"}
    assert field(read_gguf(out / f"{NAME}-q4_k_m.gguf"), "general.file_type") == 15, "LLAMA_FTYPE_MOSTLY_Q4_K_M"
    assert summary["verification"] == {"verified": False, "reason": "export.gguf.verify is false"}
    assert export.STAGE.resumable and export.depends_on(recipe, "") == [StageRef("merge")]


@pytest.mark.parametrize(
    ("gguf", "message"),
    [
        (
            {"outtypes": ["q4_k_m"]},
            r"export\.gguf\.outtypes: q4_k_m: made by llama\.cpp's llama-quantize, which is not on PATH nor built",
        ),
        ({"outtypes": ["q4_k_m"], "llama_quantize": "/nowhere/llama-quantize"}, r"export\.gguf\.llama_quantize"),
        ({"tokenizer_pre": "qwen"}, r"export\.gguf\.tokenizer_pre: 'qwen' .*did you mean 'qwen2'"),
        ({"outtypes": ["q4_k_x"]}, r"export\.gguf\.outtypes\.0: Input should be"),
        ({"outtypes": ["q8_0", "q8_0"]}, r"export\.gguf\.outtypes: .*repeated"),
        ({"outtype": ["q8_0"]}, r"export\.gguf\.outtype: unknown key; did you mean 'outtypes'"),
    ],
)
def test_bad_export_settings_stop_the_run_before_anything_runs(
    exported, tiny_models, tmp_path, monkeypatch, capsys, gguf, message
):
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))  # no llama-quantize, nor ftmerge's build of it
    monkeypatch.setenv("FTMERGE_LLAMA_CPP_DIR", str(tmp_path / "no-llama.cpp"))
    data = export_recipe_data(tmp_path / "run", exported["archive"], tiny_models, export={"gguf": gguf})
    assert run_pipeline([str(write_recipe(tmp_path / "recipe.yaml", data)), "--from", "apply"]) == 2
    error = capsys.readouterr().err
    assert re.search(message, error), error
    assert error.count("\n  ") <= 1, f"the export settings are the only problem: {error}"
    assert not (tmp_path / "run").exists(), "nothing ran"


def test_export_is_off_without_its_block_and_publish_reads_it_for_the_merged_model(tiny_models, archive, tmp_path):
    from pipeline.stages import publish

    data = export_recipe_data(tmp_path / "run", archive, tiny_models, publish={"repo_id": "someone/x"})
    assert export.items(Recipe.model_validate(data)) == []
    recipe = Recipe.model_validate({**data, "export": {"gguf": {}}})
    assert export.items(recipe) == [""] and recipe.export.gguf.outtypes == ["q8_0"]
    assert [ref.label for ref in publish.depends_on(recipe, "")] == ["merge", "export"]
    adapters_only = Recipe.model_validate(
        {**data, "export": {"gguf": {}}, "publish": {"repo_id": "a/b", "what": "adapters"}}
    )
    assert [ref.label for ref in publish.depends_on(adapters_only, "")] == ["merge"]
