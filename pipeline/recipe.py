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
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from pipeline.models.gguf import CONVERTER_OUTTYPES, QUANTIZE_OUTTYPES

NAME_PATTERN = r"^[a-z0-9][a-z0-9._-]*$"
# A fine-tune's outputs are written beside `<name>.partial` and `<name>.old`: a name ending so would be overwritten.
RESERVED_SUFFIXES = (".partial", ".old")
EMBEDDING_MODULES = ("embed_tokens", "lm_head", "wte", "embed_in", "embed_out")


class RecipeError(ValueError):
    """A recipe that cannot run; the message names the file and the key."""


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
    save_steps: int = Field(200, gt=0)
    save_total_limit: int = Field(2, gt=0)
    eval_steps: int | None = Field(None, gt=0)
    logging_steps: int = Field(10, gt=0)
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


class FinetuneConfig(Strict):
    name: str = Field(pattern=NAME_PATTERN)
    dataset: DatasetConfig
    train: dict[str, Any] = {}

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
    save: bool = True
    device: Literal["auto", "cpu", "cuda"] = "auto"


class MergeModelOverride(Strict):
    weight: float | None = None
    density: float | None = None
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


class MergeConfig(Strict):
    method: str = "ties"
    adapters: Literal["all"] | list[str] = "all"
    # base: the seed's merge over the base model; target: relative to the target, T + the adapters' merged deltas
    base_model: Literal["base", "target"] = "base"
    include_target: bool = True
    weight: float = 1.0
    density: float = 1.0
    models: dict[str, MergeModelOverride] = {}
    # None: the seed's {normalize: true, int8_mask: true}, kept where the method takes them (linear takes neither)
    parameters: dict[str, Any] | None = None
    tokenizer_source: str | None = None  # mergekit's older form of `tokenizer: {source: ...}`
    tokenizer: TokenizerBlock | None = None
    slices: list[MergeSlice] | None = Field(None, min_length=1)
    moe: MoeConfig | None = None
    dtype: Literal["bfloat16", "float16", "float32"] = "bfloat16"
    engine: Literal["auto", "fused", "mergekit"] = "auto"
    device: Literal["auto", "cpu", "cuda"] = "auto"
    low_cpu_memory: bool = False
    # GiB the fused merge's row blocks (every input's block and the kernel's temporaries) may hold at once, on the
    # merge device: divided among the inputs, so memory stays flat however many adapters are merged.
    memory_budget: float = Field(1.0, gt=0)

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
    """The bounds of a merge search. The seed's and the sum's choices are always added to the categorical ones."""

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
    fallback: Literal["seed"] | None = None
    workers: int = Field(1, ge=1)
    storage: str | None = None
    cache_gb: float = Field(4.0, ge=0)
    space: SearchSpaceConfig = SearchSpaceConfig()


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
    # auto: through the chat template for the instruct models (target, adapted, merged), plain text for the base,
    # which was never trained on the template's turns; true or false: the same for every model
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
    models: list[Literal["base", "target", "adapted", "merged"]] = ["base", "target", "adapted", "merged"]
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


def parse_override(text: str) -> tuple[list[str | int], Any]:
    """`train.max_steps=10` → (['train', 'max_steps'], 10); the value is parsed as YAML, list indices as ints."""
    key, sep, value = text.partition("=")
    if not sep or not key or not re.fullmatch(r"[A-Za-z0-9_.-]+", key):
        raise RecipeError(f"--set {text!r}: expected KEY=VALUE with a dotted key, e.g. train.max_steps=10")
    path = [int(p) if p.isdigit() else p for p in key.split(".")]
    return path, yaml.safe_load(value) if value else None


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
        raise RecipeError(f"recipe not found: {path}")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as error:
        raise RecipeError(f"{path}: not valid YAML: {error}") from None
    if not isinstance(data, dict):
        raise RecipeError(f"{path}: a recipe is a YAML mapping (name:, base_model:, ...), got {type(data).__name__}")
    for text in overrides:
        apply_override(data, *parse_override(text))
    try:
        return Recipe.model_validate(data)
    except ValidationError as error:
        raise RecipeError(format_validation_error(error, str(path))) from None
