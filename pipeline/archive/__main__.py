"""`python -m pipeline.archive list|verify|add|extract|combine ARCHIVE_DIR`: look after the adapter archive.

list     table of archived adapters
verify   check every file's sha256
add      import a LoRA trained elsewhere, after checking it fits the base
extract  a full fine-tune's difference from its base, as a LoRA (mergekit)
combine  several archived adapters made into one (PEFT add_weighted_adapter)
"""

from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path

from pipeline.archive.combine import DEFAULT_METHOD
from pipeline.archive.store import SEAL, ArchiveError, archived_names, read_manifest, stray_entries, verify_adapter


def list_adapters(archive_dir: Path) -> int:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=str(archive_dir), title_justify="left")
    for column in ("name", "kind", "base", "dataset", "created", "eval loss", "size"):
        table.add_column(column, overflow="fold")
    broken = []
    for name in archived_names(archive_dir):
        try:
            manifest = read_manifest(archive_dir / name)
        except ArchiveError as error:
            broken.append(str(error))
            table.add_row(name, "BROKEN", "", "", "", "", "")
            continue
        size = sum(f.stat().st_size for f in (archive_dir / name).iterdir() if f.is_file())
        eval_loss = manifest.get("metrics", {}).get("eval_loss")
        table.add_row(
            name,
            manifest.get("kind", ""),
            manifest.get("base_model", ""),
            (manifest.get("dataset") or {}).get("path", ""),
            manifest.get("created", ""),
            f"{eval_loss:.4f}" if isinstance(eval_loss, float) else "",
            f"{size / 2**20:.1f} MiB",
        )
    Console(width=200).print(table)
    for problem in broken:
        print(f"broken entry: {problem}", file=sys.stderr)
    for name in stray_entries(archive_dir):
        print(f"not an archived adapter (no manifest.json): {archive_dir / name}", file=sys.stderr)
    return 1 if broken else 0


def verify(archive_dir: Path) -> int:
    """Every entry: exactly its manifest's files with their sha256, the manifest intact; folders that are no entry
    are named too."""
    corrupt = []
    for name in archived_names(archive_dir):
        try:
            manifest = verify_adapter(archive_dir / name)
            print(f"ok       {name}" + ("" if SEAL in manifest else f" (its manifest predates {SEAL}: not sealed)"))
        except ArchiveError as error:
            corrupt.append(name)
            print(f"CORRUPT  {error}")
    strays = stray_entries(archive_dir)
    for name in strays:
        print(f"STRAY    {name}: a folder without {archive_dir / name / 'manifest.json'}; not an archived adapter")
    if corrupt or strays:
        print(
            f"{len(corrupt)} corrupt adapter(s){': ' + ', '.join(corrupt) if corrupt else ''}, {len(strays)} stray "
            "folder(s)",
            file=sys.stderr,
        )
    return 1 if corrupt or strays else 0


def _archived(result: tuple[Path, bool]) -> int:
    path, written = result
    print(
        f"archived {path.name}: {path}"
        if written
        else f"{path.name} is already archived with identical files: nothing to do ({path})"
    )
    return 0


def _write(args: argparse.Namespace) -> int:
    """A subcommand that writes one adapter: its options are named as its library function's parameters, so they
    are passed on as they are (the function is imported only when its subcommand runs: extract loads torch)."""
    module, function = args.writer.split(":")
    writer = getattr(importlib.import_module(module), function)
    return _archived(writer(**{key: value for key, value in vars(args).items() if key not in ("command", "writer")}))


def names(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def numbers(text: str) -> list[float]:
    return [float(part) for part in names(text)]


def _writer(commands, command: str, writer: str, help_text: str, description: str | None = None):
    """A subcommand that writes one adapter into the archive with `writer` ("module:function"): the archive and the
    new entry's name, then its own options, each with its parameter's name as `dest`."""
    parser = commands.add_parser(command, help=help_text, description=description)
    parser.add_argument("archive_dir", type=Path)
    parser.add_argument("--name", required=True, help="name in the archive, [a-z0-9._-]+")
    parser.set_defaults(writer=writer)
    return parser


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m pipeline.archive", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    for name, help_text in (("list", "table of archived adapters"), ("verify", "check every file's sha256")):
        commands.add_parser(name, help=help_text).add_argument("archive_dir", type=Path)
    base_help = "the base model as recipes name it (Hub id or local dir): merge selects adapters by this string"
    target_help = "the model it is meant to be applied to, recorded in the manifest"

    add = _writer(
        commands,
        "add",
        "pipeline.archive.importing:import_adapter",
        "import a PEFT LoRA trained elsewhere (safetensors only)",
    )
    add.add_argument(
        "source", metavar="path", type=Path, help="adapter directory: adapter_config.json + adapter_model.safetensors"
    )
    add.add_argument("--base", dest="base_model", metavar="BASE", required=True, help=base_help)
    add.add_argument("--target", dest="target_model", metavar="TARGET", help=target_help)

    extract = _writer(
        commands,
        "extract",
        "pipeline.archive.extract:extract_adapter",
        "a full fine-tune minus its base, as a LoRA (mergekit)",
        "mergekit reads both models tensor by tensor (neither is loaded whole). Embeddings and norms are left out by "
        "default: they would overwrite the target's.",
    )
    extract.add_argument("--model", required=True, help="the fine-tuned model (Hub id or local dir)")
    extract.add_argument("--base", dest="base_model", metavar="BASE", required=True, help=base_help)
    extract.add_argument("--rank", type=int, default=32, help="maximum LoRA rank (default 32)")
    extract.add_argument(
        "--exclude",
        dest="excludes",
        action="append",
        default=[],
        metavar="REGEX",
        help="also leave out modules matching REGEX (repeatable)",
    )
    extract.add_argument("--target", dest="target_model", metavar="TARGET", help=target_help)
    extract.add_argument("--device", choices=["cpu", "cuda"], help="default: cuda when available")
    extract.add_argument("--trust-remote-code", action="store_true")

    combine = _writer(
        commands,
        "combine",
        "pipeline.archive.combine:combine_adapters",
        "several archived adapters into one (PEFT add_weighted_adapter; default: their exact weighted sum)",
        "PEFT combines adapters inside a model: this loads the base model in its stored dtype (on a 7B base, about "
        "15 GB of RAM). Only the combined adapter is saved.",
    )
    combine.add_argument(
        "--adapters", dest="sources", metavar="ADAPTERS", required=True, type=names, help="archived names, e.g. a,b"
    )
    combine.add_argument("--weights", required=True, type=numbers, help="one per adapter, e.g. 0.6,0.4")
    combine.add_argument(
        "--method",
        default=DEFAULT_METHOD,
        help="a PEFT combination_type. cat (default): exactly the weighted sum of the updates, "
        "sum(w_i * s_i * B_i A_i), rank = the sum of the ranks; svd: that sum factored to --svd-rank; "
        "linear: PEFT's default, which adds the A and the B factors separately, "
        "(sum sqrt(w_i) B_i)(sum sqrt(w_i) s_i A_i): the weighted updates plus cross terms B_i A_j, equal ranks "
        "only; ties, dare_linear, dare_ties, magnitude_prune (+ _svd): pruned. The "
        "manifest records each module's distance from the weighted sum.",
    )
    combine.add_argument("--density", type=float, help="fraction kept by ties/dare/magnitude_prune methods")
    combine.add_argument("--svd-rank", type=int, help="rank of *svd methods (default: largest source rank)")
    combine.add_argument("--seed", type=int, default=0, help="random seed for dare methods (default 0)")
    combine.add_argument(
        "--dtype",
        choices=["auto", "float32"],
        default="auto",
        help="the base's dtype while combining, which PEFT gives the combined factors: auto (as stored; bf16 rounds "
        "them to ~3 digits) or float32 (exact, twice the memory)",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command in ("list", "verify") and not args.archive_dir.is_dir():
        print(f"error: archive not found: {args.archive_dir}", file=sys.stderr)
        return 2
    if args.command == "verify":
        return verify(args.archive_dir)
    try:
        return list_adapters(args.archive_dir) if args.command == "list" else _write(args)
    except (ValueError, FileNotFoundError) as error:  # a bad argument or path: nothing was written
        print(f"error: {error}", file=sys.stderr)
        return 2
    except ArchiveError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
