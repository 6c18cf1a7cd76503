"""The folder that is uploaded, exactly as the Hub repo will hold it: the merged model at the top level and/or each
adapter under `adapters/<name>/`, plus the model card. The merged model's weights are hard links where the
filesystem allows it, so a dry run or a kept copy of a 15 GB model costs no disk space; adapters are small and
copied, so nothing done to the folder can reach the append-only archive."""

from __future__ import annotations

import os
import shutil
from collections.abc import Sequence
from pathlib import Path

from pipeline.archive.store import ADAPTER_FILES

CARD = "README.md"
EVALUATION_CHART = "evaluation.png"


def link_or_copy(source: Path, destination: Path, *, link: bool = False) -> None:
    destination.parent.mkdir(parents=True, exist_ok=True)
    if link:
        try:
            os.link(source, destination)
            return
        except OSError:  # another filesystem, or links not supported: copy
            pass
    shutil.copyfile(source, destination)


def assemble_folder(
    out_dir: Path,
    merged_dir: Path | None,
    adapter_dirs: dict[str, Path],
    evaluation_chart: Path | None = None,
    gguf_files: Sequence[Path] = (),
) -> None:
    """Fill `out_dir` with the merged model's files (its README.md is replaced by the publish card, hidden files are
    never published), its GGUF files beside them (linked, like the weights), and each archived adapter's config and
    weights (not its manifest: it holds local paths)."""
    out_dir = Path(out_dir)
    if merged_dir is not None:
        for file in sorted(Path(merged_dir).iterdir()):
            if file.is_file() and file.name != CARD and not file.name.startswith("."):
                link_or_copy(file, out_dir / file.name, link=file.suffix == ".safetensors")
    for file in gguf_files:
        link_or_copy(Path(file), out_dir / Path(file).name, link=True)
    for name, adapter in adapter_dirs.items():
        for file_name in ADAPTER_FILES:
            link_or_copy(Path(adapter) / file_name, out_dir / "adapters" / name / file_name)
    if evaluation_chart is not None and evaluation_chart.is_file():
        link_or_copy(evaluation_chart, out_dir / EVALUATION_CHART)


def published_files(out_dir: Path) -> list[str]:
    """Every file the upload sends, relative to the folder (hidden files are excluded from the upload too)."""
    out_dir = Path(out_dir)
    return sorted(
        str(p.relative_to(out_dir))
        for p in out_dir.rglob("*")
        if p.is_file() and not any(part.startswith(".") for part in p.relative_to(out_dir).parts)
    )
