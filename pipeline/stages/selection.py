"""Which adapters a recipe merges and whether this recipe or another one archived it: resolved once per plan into an
`AdapterSet`. The planning functions of the apply, search, merge, evaluate and publish stages read it by
`adapter_set(recipe)`; the runner resolves the same value once and hands it to every step's run in `Inputs`."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from pipeline.archive.store import archived_adapters
from pipeline.merging.config import resolve_engine
from pipeline.recipe import Recipe, RecipeError
from pipeline.stages.contract import StageRef


@dataclass(frozen=True)
class Adapter:
    """One adapter a merge reads. `own`: a fine-tune of this recipe, written by its archive step (a step's output,
    so no `directory` here, and no `files`: the step's fingerprint is its identity); otherwise archived by another
    recipe or by hand at `directory`, identified by the sha256 of its files as its manifest records them, and
    trained on `base_model`."""

    name: str
    own: bool
    directory: Path | None = None
    files: Mapping[str, str] = field(default_factory=dict)
    base_model: str | None = None


@dataclass(frozen=True)
class AdapterSet:
    """The adapters a recipe's merge selects, in merge order: its own fine-tunes, then the archive's others."""

    adapters: tuple[Adapter, ...]

    @property
    def names(self) -> list[str]:
        return [adapter.name for adapter in self.adapters]

    def __getitem__(self, name: str) -> Adapter:
        found = next((adapter for adapter in self.adapters if adapter.name == name), None)
        if found is None:
            raise KeyError(f"adapter {name} is not among this plan's adapters ({', '.join(self.names) or 'none'})")
        return found

    def foreign_files(self, names: list[str]) -> dict[str, dict[str, str]]:
        """name → sha256 of each file, for the adapters among `names` another recipe archived: no step of this
        recipe fingerprints them, so a stage that reads them puts their identity into its config."""
        return {name: dict(self[name].files) for name in names if not self[name].own}

    def archive_steps(self, names: list[str]) -> list[StageRef]:
        """The archive steps of this recipe that write these adapters; those of other recipes are no step here."""
        return [StageRef("archive", name) for name in names if self[name].own]


def archive_entry(recipe: Recipe, name: str) -> Path:
    """An adapter's directory in the recipe's archive (the archive stage's output for the recipe's own fine-tunes)."""
    return Path(recipe.archive_dir) / name


def adapted_model_dir(recipe: Recipe, name: str) -> Path:
    """Where the apply stage writes an adapted model, which the mergekit engine reads."""
    return Path(recipe.output_dir) / "apply" / name


def adapted_model_names(recipe: Recipe, names: list[str]) -> dict[str, str]:
    """Each adapter's adapted model as a mergekit config names it when nothing reads it from disk (the fused engine,
    a search trial, the report's published merge): where apply would write it. One spelling for all three, since a
    config written by one is read back by another by these exact strings."""
    return {name: str(adapted_model_dir(recipe, name).resolve()) for name in names}


def is_own_finetune(recipe: Recipe, name: str) -> bool:
    return any(finetune.name == name for finetune in recipe.finetunes)


_resolved: dict[tuple, AdapterSet] = {}


def adapter_set(recipe: Recipe) -> AdapterSet:
    """The recipe's adapters, resolved once per plan: the archive is listed and its manifests read once, not by
    every stage's config, dependencies and check. Resolved again when the archive's listing changes."""
    archive = Path(recipe.archive_dir)
    listing = archive.stat().st_mtime_ns if archive.is_dir() else None
    own = tuple(finetune.name for finetune in recipe.finetunes)
    key = (str(archive.absolute()), listing, recipe.base_model, own, str(recipe.merge.adapters))
    if key not in _resolved:
        _resolved.clear()
        _resolved[key] = _resolve(recipe, own)
    return _resolved[key]


def _resolve(recipe: Recipe, own: tuple[str, ...]) -> AdapterSet:
    """With `merge.adapters: all`, the recipe's own fine-tunes (in recipe order) and then every archived adapter
    trained on the same base; with a list, those names, each of which must be one of the recipe's fine-tunes or
    already archived."""
    archived = archived_adapters(Path(recipe.archive_dir))
    if recipe.merge.adapters == "all":
        names = [*own, *(n for n, m in archived.items() if m.get("base_model") == recipe.base_model and n not in own)]
    else:
        unknown = [name for name in recipe.merge.adapters if name not in own and name not in archived]
        if unknown:
            holds = ", ".join(archived) or "nothing yet"
            raise RecipeError(
                f"merge.adapters: {unknown} are neither fine-tunes of this recipe nor in the archive "
                f"{recipe.archive_dir} (it holds: {holds})"
            )
        names = list(recipe.merge.adapters)
    return AdapterSet(
        tuple(
            Adapter(name, own=True)
            if name in own
            else Adapter(
                name,
                own=False,
                directory=archive_entry(recipe, name),
                files=archived[name]["files"],
                base_model=archived[name].get("base_model"),
            )
            for name in names
        )
    )


def selected_adapters(recipe: Recipe) -> list[str]:
    return adapter_set(recipe).names


def saves_adapted_models(recipe: Recipe) -> bool:
    """Whether the apply stage writes the adapted models: the mergekit engine reads them, `apply.save` keeps them."""
    return recipe.apply.save or resolve_engine(recipe.merge) == "mergekit"


def check_trained_on_base(recipe: Recipe, names: list[str]) -> None:
    """Refuse archived adapters (named in `merge.adapters`) that were trained on another base than the recipe's: the
    merge takes the recipe's base as the reference its task vectors are measured from, and same-shaped models (Qwen2
    and Qwen2.5) would pass every shape check. Compared as `merge.adapters: all` selects: by the base as named."""
    adapters = adapter_set(recipe)
    other = {n: adapters[n].base_model for n in names if not adapters[n].own}
    other = {name: base for name, base in other.items() if base != recipe.base_model}
    if other:
        listing = ", ".join(f"{name} (base {base})" for name, base in other.items())
        raise RecipeError(
            f"merge.adapters: {listing} were not trained on this recipe's base_model "
            f"{recipe.base_model}. Leave them out, or archive them for this base (`python -m "
            "pipeline.archive add ... --base`) if it is the same model under another name."
        )
