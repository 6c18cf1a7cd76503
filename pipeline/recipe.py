"""The recipe schema: one YAML file says what to run; every key is checked here before any stage starts.

Unknown keys are errors with a "did you mean" hint, and every error names the key path and the file, so a typo in
a 72B recipe fails in a second instead of after hours of training.
"""

from __future__ import annotations

import copy
import difflib
import os
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, field_validator, model_validator

from pipeline.models.gguf import CONVERTER_OUTTYPES, QUANTIZE_OUTTYPES

NAME_PATTERN = r"^[a-z0-9][a-z0-9._-]*$"
# Nodes a recipe's YAML may expand to once its aliases are followed. The largest real recipe (a MoE with prompts for
# eight experts) is a few thousand; a "billion laughs" document of 9 levels of 9 aliases is 387 million.
MAX_YAML_NODES = 100_000
# Values renamed in this release: (key path, old value) → new value, accepted with a hint on the screen.
RENAMED_VALUES = {(("search", "fallback"), "seed"): "published"}
# A fine-tune's outputs are written beside `<name>.partial` and `<name>.old`: a name ending so would be overwritten.
RESERVED_SUFFIXES = (".partial", ".old")
EMBEDDING_MODULES = ("embed_tokens", "lm_head", "wte", "embed_in", "embed_out")


class RecipeError(ValueError):
    """A recipe that cannot run; the message names the file and the key."""


RESULT_NEUTRAL = "result_neutral"


def neutral(default: Any, **constraints: Any) -> Any:
    """A setting that changes how a stage runs (device, memory, parallelism, checkpoint and log cadence, where shared
    state lives), never what it writes. Declared here, once, and kept out of every fingerprint by `result_settings`:
    changing one must not redo hours of work."""
    return Field(default, json_schema_extra={RESULT_NEUTRAL: True}, **constraints)


def result_settings(value: Any) -> Any:
    """A recipe block as plain data without its result-neutral settings, at every depth: what fingerprints hash."""
    if isinstance(value, BaseModel):
        return {
            name: result_settings(getattr(value, name))
            for name, field in type(value).model_fields.items()
            if not (field.json_schema_extra or {}).get(RESULT_NEUTRAL)
        }
    if isinstance(value, (list, tuple)):
        return [result_settings(item) for item in value]
    if isinstance(value, dict):
        return {key: result_settings(item) for key, item in value.items()}
    return str(value) if isinstance(value, Path) else value


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class LoraConfig(Strict):
    r: int = Field(64, gt=0)
    alpha: float = Field(64, gt=0)
    dropout: float = Field(0.0, ge=0, lt=1)
    use_rslora: bool = False
    target_modules: list[str] = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

    @field_validator("target_modules")
    @classmethod
    def _no_embeddings(cls, modules: list[str]) -> list[str]:
        named = [m for m in modules if any(e in m for e in EMBEDDING_MODULES)]
        if named:
            raise ValueError(
                f"{named} cannot be trained: the adapter is applied to the target, which has its own embeddings; "
                "training or resizing them would overwrite the target's. Keep LoRA on the projection layers."
            )
        if not modules:
            raise ValueError("at least one module is needed")
        return modules


class TrainConfig(Strict):
    backend: Literal["unsloth", "transformers", "auto"] = "unsloth"
    max_seq_length: int = Field(8192, gt=0)
    load_in_4bit: bool = True
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = "auto"
    lora: LoraConfig = LoraConfig()
    epochs: float = Field(1, gt=0)
    max_steps: int | None = Field(None, gt=0)
    learning_rate: float = Field(2.0e-4, gt=0)
    lr_scheduler: str = "linear"
    weight_decay: float = Field(0.01, ge=0)
    batch_size: int = Field(2, gt=0)
    gradient_accumulation_steps: int = Field(4, gt=0)
    warmup_steps: int = Field(10, ge=0)
    optim: str = "adamw_8bit"
    packing: bool = False
    train_on_responses_only: bool = True
    gradient_checkpointing: bool = True
    save_steps: int = neutral(200, gt=0)
    save_total_limit: int = neutral(2, gt=0)
    eval_steps: int | None = Field(None, gt=0)
    logging_steps: int = neutral(10, gt=0)
    seed: int = 3407


class DatasetConfig(Strict):
    path: str
    split: str = "train"
    format: Literal["alpaca", "sharegpt", "messages", "text"] = "alpaca"
    columns: dict[str, str] = {}
    system_prompt: str | None = None
    max_samples: int | None = Field(None, gt=0)
    eval_size: float = Field(0.01, ge=0)
    overlength: Literal["drop", "truncate"] = "drop"
    max_reject_fraction: float = Field(0.05, ge=0, le=1)


class ReplayConfig(Strict):
    """Self-distilled replay: prompts of `dataset` answered greedily by the BASE model in the recipe's chat template,
    mixed into the fine-tune's training rows, so the LoRA learns to change what its data asks for and to leave the
    rest as the base answers it (it then also leaves the target's answers alone). The prompts are each row's
    conversation up to its last user turn, in any format but text (replies in the data are not used). Answers are
    cached by content (base, prompts, template, settings) under <output_dir>/cache/replay/."""

    dataset: DatasetConfig
    fraction: float = Field(0.4, gt=0, lt=1)  # of the training rows (the held-out split gets none)
    max_new_tokens: int = Field(256, gt=0)  # an answer not finished by then is left out (and counted)
    batch_size: int = neutral(16, gt=0)  # prompts generated at once
    device: Literal["auto", "cpu", "cuda"] = neutral("auto")  # auto: the GPU when there is one
    # auto: bf16 where the GPU has it natively, else fp16; float32 on CPU (bf16 matmuls are slow there)
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = "auto"
    load_in_4bit: bool = False  # NF4 weights (CUDA + bitsandbytes): a 7B base in 16 bits does not fit a T4


class FinetuneConfig(Strict):
    name: str = Field(pattern=NAME_PATTERN)
    dataset: DatasetConfig
    train: dict[str, Any] = {}
    replay: ReplayConfig | None = None

    @field_validator("name")
    @classmethod
    def _not_reserved(cls, name: str) -> str:
        if name.endswith(RESERVED_SUFFIXES):
            raise ValueError(
                f"{name!r} ends with {' or '.join(RESERVED_SUFFIXES)}, which name the temporary and "
                "previous copies of another fine-tune's outputs; choose another name"
            )
        return name


class ApplyConfig(Strict):
    # auto: each tensor in the target's stored dtype; another value re-rounds every tensor, untouched ones too
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = "auto"
    save: bool = neutral(True)
    device: Literal["auto", "cpu", "cuda"] = neutral("auto")


class MergeModelOverride(Strict):
    weight: float | None = None
    density: float | None = Field(None, gt=0, le=1)
    parameters: dict[str, Any] = {}


class SliceSource(Strict):
    """One source of an output slice: `model` is base, target or an adapter's name (its adapted model)."""

    model: str
    layer_range: tuple[int, int]
    parameters: dict[str, Any] = {}  # over the merge's weight/density defaults where the method takes them

    @field_validator("layer_range")
    @classmethod
    def _is_range(cls, layers: tuple[int, int]) -> tuple[int, int]:
        if not 0 <= layers[0] < layers[1]:
            raise ValueError(f"{list(layers)} is not a layer range: needs 0 <= start < end (end excluded)")
        return layers


class MergeSlice(Strict):
    """mergekit's output slice: the same layer count from every source, merged with `merge.method`."""

    sources: list[SliceSource] = Field(min_length=1)
    parameters: dict[str, Any] = {}


class TokenizerBlock(Strict):
    """mergekit's `tokenizer:` block. `source` and a token's `source` name base, target or an adapter (or give a
    model directory); `source` may also be union. `tokens` maps a token to mergekit's TokenEmbeddingConfig."""

    source: str = "union"
    tokens: dict[str, dict[str, Any]] = {}
    pad_to_multiple_of: int | None = Field(None, gt=0)


class MoeExpert(Strict):
    positive_prompts: list[str] | None = None  # None: sampled from the expert's fine-tune's prepared train split
    negative_prompts: list[str] = []


class MoeConfig(Strict):
    """A mixture of experts by mergekit-moe: the target's attention, embeddings and norms, one routed expert (MLP)
    per adapted model (and the target's with `merge.include_target`); a Qwen2 target gives Qwen2-MoE, whose shared
    expert is the target's MLP; Llama and Mistral give Mixtral."""

    gate_mode: Literal["hidden", "cheap_embed", "random"] = "hidden"
    experts_per_token: int = Field(2, ge=1)
    prompts_per_expert: int = Field(16, gt=0)
    prompt_tokens: int = Field(256, gt=0)  # a sampled prompt is cut to this many tokens
    seed: int = 0
    experts: dict[str, MoeExpert] = {}  # by adapter name, or `target`
    shared_expert: MoeExpert = MoeExpert()  # Qwen2-MoE only; default prompts: every routed expert's


# The published "LoRA + TIES" recipe's method parameters. With MergeConfig's defaults (ties over the base, every weight
# and density 1, bfloat16) they are that recipe's merge: the search's `published` baseline is built from them.
PUBLISHED_PARAMETERS = {"normalize": True, "int8_mask": True}


class MergeConfig(Strict):
    method: str = "ties"
    adapters: Literal["all"] | list[str] = "all"
    # base: the published merge over the base model; target: relative to the target, T + the adapters' merged deltas
    base_model: Literal["base", "target"] = "base"
    include_target: bool = True
    weight: float = 1.0
    density: float = Field(1.0, gt=0, le=1)  # the fraction of each delta kept (1: all of it)
    models: dict[str, MergeModelOverride] = {}
    # None: the published {normalize: true, int8_mask: true}, kept where the method takes them (linear takes neither)
    parameters: dict[str, Any] | None = None
    tokenizer_source: str | None = None  # mergekit's older form of `tokenizer: {source: ...}`
    tokenizer: TokenizerBlock | None = None
    slices: list[MergeSlice] | None = Field(None, min_length=1)
    moe: MoeConfig | None = None
    dtype: Literal["bfloat16", "float16", "float32"] = "bfloat16"
    engine: Literal["auto", "fused", "mergekit"] = "auto"
    device: Literal["auto", "cpu", "cuda"] = neutral("auto")
    low_cpu_memory: bool = neutral(False)
    # GiB the fused merge's row blocks (every input's block and the kernel's temporaries) may hold at once, on the
    # merge device: divided among the inputs, so memory stays flat however many adapters are merged.
    memory_budget: float = neutral(1.0, gt=0)

    @model_validator(mode="after")
    def _one_form_each(self) -> MergeConfig:
        if self.tokenizer_source and self.tokenizer is not None:
            raise ValueError(
                "merge.tokenizer_source and merge.tokenizer: give one; tokenizer_source: X is tokenizer: {source: X}"
            )
        if self.slices and self.moe is not None:
            raise ValueError("merge.slices and merge.moe: a merge is a layer-slice merge or a mixture of experts")
        return self


class SearchSpaceConfig(Strict):
    """The bounds of a merge search. The published and the sum's choices are always added to the categorical ones."""

    methods: list[str] = Field(["ties", "task_arithmetic"], min_length=1)
    base_model: list[Literal["base", "target"]] = Field(["base", "target"], min_length=1)
    weight: tuple[float, float] = (0.2, 1.5)
    density: tuple[float, float] = (0.3, 1.0)
    target_weight: tuple[float, float] = (0.2, 1.5)
    normalize: list[bool] = Field([True, False], min_length=1)

    @field_validator("weight", "density", "target_weight")
    @classmethod
    def _is_range(cls, bounds: tuple[float, float], info) -> tuple[float, float]:
        low, high = bounds
        if not 0 <= low <= high:
            raise ValueError(f"[{low}, {high}] is not a range: needs 0 <= low <= high")
        if info.field_name == "density" and (low <= 0 or high > 1):
            raise ValueError(f"[{low}, {high}]: a density is a fraction in (0, 1]")
        return bounds


class SearchConfig(Strict):
    """A retention-gated search over merge configurations, run between archive and merge when the recipe has a
    `search:` block."""

    trials: int = Field(24, ge=2)
    sampler: Literal["tpe", "cmaes", "random"] = "tpe"
    seed: int = 0
    max_samples: int = Field(32, gt=0)
    metric: Literal["auto", "exact_match", "loss"] = "auto"
    retention: list[str] | None = None
    retention_tolerance: float = Field(0.05, ge=0, lt=1)
    objective: Literal["mean", "worst"] = "mean"  # worst: the least-learned fine-tune decides
    fallback: Literal["published"] | None = None  # merge the published configuration when no trial passes
    workers: int = neutral(1, ge=1)
    # An Optuna database URL that workers on several machines share (postgresql://…); `${NAME}` is read from the
    # environment when the study is opened, e.g. `${FTMERGE_SEARCH_STORAGE}`. None: SQLite in the output.
    storage: str | None = neutral(None)
    heartbeat_interval: int = neutral(30, gt=0)  # seconds; a trial on a database records a heartbeat this often
    grace_period: int = neutral(120, gt=0)  # seconds without one before another worker fails it and queues it again
    cache_gb: float = neutral(4.0, ge=0)
    space: SearchSpaceConfig = SearchSpaceConfig()

    @model_validator(mode="after")
    def _grace_outlasts_a_heartbeat(self) -> SearchConfig:
        if self.grace_period <= self.heartbeat_interval:
            raise ValueError(
                f"search.grace_period ({self.grace_period}s) must be longer than search.heartbeat_interval "
                f"({self.heartbeat_interval}s), or every running trial looks dead between two heartbeats"
            )
        return self


class RetentionSet(Strict):
    """A dataset standing for what the target already knew; rendered like a fine-tune's data."""

    name: str = Field(pattern=NAME_PATTERN)
    dataset: DatasetConfig


class LmEvalConfig(Strict):
    """lm-evaluation-harness tasks every model of the lineage is scored on (the `lm-eval` extra)."""

    tasks: list[str] = []
    include_path: Path | None = None  # a directory of task YAMLs (a team's own benchmarks), beside lm-eval's own
    limit: int | None = Field(None, gt=0)  # documents per task
    num_fewshot: int | None = Field(None, ge=0)
    batch_size: int | None = Field(None, gt=0)  # None: evaluate.batch_size
    # auto: through the chat template for the instruct models (target, trained, adapted, merged), plain text for the
    # base, which was never trained on the template's turns; true or false: the same for every model
    apply_chat_template: Literal["auto"] | bool = "auto"
    backend: Literal["hf", "vllm"] = "hf"  # vllm: lm-eval's vLLM backend (GPU), the model loaded from its directory

    @field_validator("include_path")
    @classmethod
    def _is_directory(cls, path: Path | None) -> Path | None:
        if path is None:
            return None
        path = Path(os.path.expanduser(path))
        if not path.is_dir():
            raise ValueError(f"{str(path)!r} is not a directory; give the directory holding the task YAML files")
        return path


class EvaluateConfig(Strict):
    enabled: bool = True
    # trained: each adapter on the model it was trained on (base + LoRA), the yardstick of its transfer to the target
    models: list[Literal["base", "target", "trained", "adapted", "merged"]] = [
        "base",
        "target",
        "trained",
        "adapted",
        "merged",
    ]
    retention: list[RetentionSet] = []
    max_samples: int | None = Field(200, gt=0)
    batch_size: int = Field(8, gt=0)  # rows per batch when generating and for lm-eval
    batch_tokens: int = Field(16384, gt=0)  # padded tokens per loss batch: memory follows tokens, not rows
    device: Literal["auto", "cpu", "cuda"] = "auto"
    # auto: bf16 where the GPU has it natively, else fp16 (T4, V100); bf16 on CPU
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = "auto"
    load_in_4bit: bool = False  # NF4 weights (CUDA + bitsandbytes): a 7B in 16 bits does not fit a T4
    generate: bool = False
    max_new_tokens: int = Field(32, gt=0)
    lm_eval: LmEvalConfig = LmEvalConfig()

    def scoring_settings(self) -> dict:
        """What changes one model's score on one set: the key of cached scores. The other keys choose which models
        and sets are scored, not how."""
        return self.model_dump(include=SCORING_KEYS)


SCORING_KEYS = {"device", "dtype", "load_in_4bit", "generate", "max_new_tokens", "batch_size", "batch_tokens"}


class PublishConfig(Strict):
    repo_id: str | None = None
    private: bool = True
    what: Literal["merged", "adapters", "both"] = "merged"
    dry_run: bool = False


class GgufExportConfig(Strict):
    """GGUF files of the merged model for llama.cpp: bf16, f16 and q8_0 by llama.cpp's converter, the other
    quantizations (q4_k_m, ...) by llama.cpp's llama-quantize from a 16-bit GGUF."""

    outtypes: list[Literal[CONVERTER_OUTTYPES + QUANTIZE_OUTTYPES]] = Field(["q8_0"], min_length=1)
    # Written instead of the pre-tokenizer llama.cpp detects; needed when it recognizes none (e.g. qwen2, llama-bpe)
    tokenizer_pre: str | None = None
    # llama.cpp's programs: a path (or a command on PATH); default: on PATH, else the build `make setup` makes
    llama_quantize: str | None = None
    llama_completion: str | None = None
    # Run every file with llama.cpp and compare its greedy text with transformers on the merged model. auto: when
    # llama-completion is found (the screen says "not verified" when it is not); true: required
    verify: bool | Literal["auto"] = "auto"
    verify_prompts: int = Field(4, gt=0)  # requests from the held-out splits, else the retention sets, else general
    verify_max_new_tokens: int = Field(24, gt=0)

    @field_validator("outtypes")
    @classmethod
    def _unique(cls, outtypes: list[str]) -> list[str]:
        repeated = sorted({t for t in outtypes if outtypes.count(t) > 1})
        if repeated:
            raise ValueError(f"{repeated} repeated: each outtype is one file")
        return outtypes


class ExportConfig(Strict):
    gguf: GgufExportConfig | None = None


class Recipe(Strict):
    name: str = Field(pattern=NAME_PATTERN)
    output_dir: Path | None = None
    base_model: str
    target_model: str
    chat_template: str = "target"
    archive_dir: Path | None = None
    trust_remote_code: bool = False
    finetunes: list[FinetuneConfig] = []
    train: TrainConfig = TrainConfig()
    apply: ApplyConfig = ApplyConfig()
    search: SearchConfig | None = None
    merge: MergeConfig = MergeConfig()
    evaluate: EvaluateConfig = EvaluateConfig()
    export: ExportConfig = ExportConfig()
    publish: PublishConfig = PublishConfig()
    _renamed: list[str] = PrivateAttr(default_factory=list)

    @field_validator("output_dir", "archive_dir", "base_model", "target_model", mode="before")
    @classmethod
    def _not_empty(cls, value: Any) -> Any:
        """An empty path is not "the current directory": a run would write state/, logs/ and outputs there."""
        if isinstance(value, str) and not value.strip():
            raise ValueError("empty; give a directory or model (omit output_dir and archive_dir for their defaults)")
        return value

    @field_validator("output_dir", "archive_dir", "base_model", "target_model")
    @classmethod
    def _expand_home(cls, value: Path | str | None) -> Path | str | None:
        """`~/runs/x` is the home directory, as for dataset paths, not a directory named `~` in the current one."""
        return None if value is None else type(value)(os.path.expanduser(value))

    @model_validator(mode="after")
    def _defaults_and_checks(self) -> Recipe:
        if self.output_dir is None:
            self.output_dir = Path("runs") / self.name
        if self.archive_dir is None:
            self.archive_dir = Path(self.output_dir) / "adapters"
        names = [f.name for f in self.finetunes]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(f"finetunes: names must be unique, repeated: {duplicates}")
        problems = []
        for index, finetune in enumerate(self.finetunes):
            try:
                self.train_config(finetune.name)
            except ValidationError as error:
                problems += [
                    f"finetunes.{index}.train.{key}: {message}"
                    for key, message in (_problem(item, TrainConfig) for item in error.errors())
                ]
        if problems:
            raise ValueError("\n  ".join(problems))
        return self

    def train_config(self, finetune: str) -> TrainConfig:
        """The effective train block of one fine-tune: the recipe's `train`, deep-updated by its overrides."""
        overrides = next(f.train for f in self.finetunes if f.name == finetune)
        return TrainConfig.model_validate(_deep_update(self.train.model_dump(), overrides))

    def finetune(self, name: str) -> FinetuneConfig:
        return next(f for f in self.finetunes if f.name == name)


def _deep_update(base: dict, overrides: dict) -> dict:
    merged = copy.deepcopy(base)
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _deep_update(merged[key], value)
        else:
            merged[key] = value
    return merged


def _known_keys(model: type[BaseModel], location: tuple) -> list[str]:
    """The keys the schema accepts at a location, for the "did you mean" hint."""
    for part in location:
        if isinstance(part, int):
            continue
        field = model.model_fields.get(part)
        if field is None:
            return []
        annotation = field.annotation
        candidates = [annotation, *getattr(annotation, "__args__", ())]
        nested = [c for c in candidates if isinstance(c, type) and issubclass(c, BaseModel)]
        nested += [
            a
            for c in candidates
            for a in getattr(c, "__args__", ())
            if isinstance(a, type) and issubclass(a, BaseModel)
        ]
        if not nested:
            return []
        model = nested[0]
    return list(model.model_fields)


def _problem(item: dict, schema: type[BaseModel]) -> tuple[str, str]:
    """(key path, message) of one pydantic error, an unknown key with its "did you mean" hint from `schema`."""
    location = tuple(item["loc"])
    message = item["msg"].removeprefix("Value error, ")
    if item["type"] == "extra_forbidden":
        known = _known_keys(schema, location[:-1])
        close = difflib.get_close_matches(str(location[-1]), known, n=1)
        hint = f"; did you mean '{close[0]}'?" if close else (f"; known keys: {', '.join(known)}" if known else "")
        message = f"unknown key{hint}"
    return ".".join(str(p) for p in location), message


def format_validation_error(error: ValidationError, source: str) -> str:
    # checks across keys (Recipe's model validator) name their keys in the message, one problem per line
    lines = "\n".join(
        f"  {key}: {message}" if key else f"  {message}"
        for key, message in (_problem(item, Recipe) for item in error.errors())
    ).splitlines()
    return "\n".join([f"{source}: invalid recipe ({len(lines)} problem{'s' * (len(lines) > 1)})", *lines])


def safe_yaml(text: str, where: str) -> Any:
    """YAML as plain data (`safe_load`: no Python objects), refused when its aliases would expand it past
    MAX_YAML_NODES nodes or refer to themselves, before anything walks the expanded structure. `where` names the
    source in errors (a file, or `--set KEY=VALUE`)."""
    try:
        loader = yaml.SafeLoader(text)
        try:
            node = loader.get_single_node()
            if node is not None:
                _check_expansion(node, where)
            return None if node is None else loader.construct_document(node)
        finally:
            loader.dispose()
    except yaml.YAMLError as error:
        raise RecipeError(f"{where}: not valid YAML: {_yaml_problem(error)}") from None
    except RecursionError:
        raise RecipeError(f"{where}: nested too deeply to be a recipe") from None


def _yaml_problem(error: yaml.YAMLError) -> str:
    """One line: what is wrong and where (line, column), without PyYAML's echo of the document."""
    mark = getattr(error, "problem_mark", None)
    problem = getattr(error, "problem", None) or str(error).splitlines()[0]
    context = getattr(error, "context", None)
    where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
    return where + (f"{context}: {problem}" if context else problem)


def _check_expansion(root: yaml.Node, where: str) -> None:
    """Count the nodes the document expands to, each shared (aliased) node once per use, without expanding it."""
    sizes: dict[int, int] = {}
    open_nodes: set[int] = set()

    def size(node: yaml.Node) -> int:
        key = id(node)
        if key in sizes:
            return sizes[key]
        if key in open_nodes:
            raise RecipeError(f"{where}: a YAML alias refers to the node that contains it; a recipe cannot")
        open_nodes.add(key)
        if isinstance(node, yaml.SequenceNode):
            total = 1 + sum(size(child) for child in node.value)
        elif isinstance(node, yaml.MappingNode):
            total = 1 + sum(size(key_node) + size(value) for key_node, value in node.value)
        else:
            total = 1
        open_nodes.discard(key)
        if total > MAX_YAML_NODES:
            raise RecipeError(
                f"{where}: its aliases expand it to more than {MAX_YAML_NODES:,} values, far past any recipe; "
                "refused (a YAML alias bomb, or aliases used where a value was meant)"
            )
        sizes[key] = total
        return total

    size(root)


def parse_override(text: str) -> tuple[list[str | int], Any]:
    """`train.max_steps=10` → (['train', 'max_steps'], 10); the value is parsed as YAML, list indices as ints."""
    key, sep, value = text.partition("=")
    if not sep or not key or not re.fullmatch(r"[A-Za-z0-9_.-]+", key):
        raise RecipeError(f"--set {text!r}: expected KEY=VALUE with a dotted key, e.g. train.max_steps=10")
    path = [int(p) if p.isdigit() else p for p in key.split(".")]
    return path, safe_yaml(value, f"--set {key}") if value else None


def apply_override(data: dict, path: list[str | int], value: Any) -> None:
    node: Any = data
    for depth, part in enumerate(path[:-1]):
        here = ".".join(str(p) for p in path[: depth + 1])
        if isinstance(part, int):
            if not isinstance(node, list) or part >= len(node):
                raise RecipeError(f"--set {'.'.join(map(str, path))}: {here} is not an existing list index")
            node = node[part]
        else:
            if not isinstance(node, dict):
                raise RecipeError(f"--set {'.'.join(map(str, path))}: {here} is not a mapping")
            if node.get(part) is None:
                node[part] = {}
            node = node[part]
    last = path[-1]
    if isinstance(last, int):
        if not isinstance(node, list) or last >= len(node):
            raise RecipeError(f"--set {'.'.join(map(str, path))}: not an existing list index")
    elif not isinstance(node, dict):
        raise RecipeError(f"--set {'.'.join(map(str, path))}: parent is not a mapping")
    node[last] = value


def load_recipe(path: str | Path, overrides: list[str] = ()) -> Recipe:
    """Read, override and validate a recipe. Raises RecipeError naming the file and every bad key."""
    path = Path(path)
    if not path.is_file():
        raise RecipeError(f"recipe not found: {path}" + (" (a directory)" if path.is_dir() else ""))
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        raise RecipeError(
            f"{path}: not UTF-8 text (byte 0x{error.object[error.start]:02x} at offset {error.start}); save the "
            "recipe as UTF-8"
        ) from None
    data = safe_yaml(text, str(path))
    if not isinstance(data, dict):
        raise RecipeError(f"{path}: a recipe is a YAML mapping (name:, base_model:, ...), got {type(data).__name__}")
    for override in overrides:
        apply_override(data, *parse_override(override))
    renamed = _rename_values(data)
    try:
        recipe = Recipe.model_validate(data)
    except ValidationError as error:
        raise RecipeError(format_validation_error(error, str(path))) from None
    recipe._renamed = renamed
    return recipe


def _rename_values(data: dict) -> list[str]:
    """Old spellings of renamed values, replaced by the new ones; returns a hint per replacement."""
    hints = []
    for (keys, old), new in RENAMED_VALUES.items():
        node = data
        for key in keys[:-1]:
            node = node.get(key) if isinstance(node, dict) else None
        if isinstance(node, dict) and node.get(keys[-1]) == old:
            node[keys[-1]] = new
            hints.append(f"{'.'.join(keys)}: {old!r} is now spelled {new!r}; accepted as {new!r} this time")
    return hints


def recipe_renames(recipe: Recipe) -> list[str]:
    """The hints `load_recipe` gave for renamed values in this recipe."""
    return list(recipe._renamed)
