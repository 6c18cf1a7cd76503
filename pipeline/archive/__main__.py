"""`python -m pipeline.archive list|verify ARCHIVE_DIR`: look after the adapter archive without a recipe."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from pipeline.archive.store import ArchiveError, archived_adapters, verify_adapter


def list_adapters(archive_dir: Path) -> int:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=str(archive_dir), title_justify="left")
    for column in ("name", "kind", "base", "dataset", "created", "eval loss", "size"):
        table.add_column(column, overflow="fold")
    for name, manifest in archived_adapters(archive_dir).items():
        size = sum(f.stat().st_size for f in (archive_dir / name).iterdir() if f.is_file())
        eval_loss = manifest.get("metrics", {}).get("eval_loss")
        table.add_row(name, manifest.get("kind", ""), manifest.get("base_model", ""),
                      (manifest.get("dataset") or {}).get("path", ""), manifest.get("created", ""),
                      f"{eval_loss:.4f}" if isinstance(eval_loss, float) else "", f"{size / 2**20:.1f} MiB")
    Console(width=200).print(table)
    return 0


def verify(archive_dir: Path) -> int:
    corrupt = []
    for name in archived_adapters(archive_dir):
        try:
            verify_adapter(archive_dir / name)
            print(f"ok       {name}")
        except ArchiveError as error:
            corrupt.append(name)
            print(f"CORRUPT  {error}")
    if corrupt:
        print(f"{len(corrupt)} corrupt adapter(s): {', '.join(corrupt)}", file=sys.stderr)
    return 1 if corrupt else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipeline.archive", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    for name, help_text in (("list", "table of archived adapters"), ("verify", "check every file's sha256")):
        commands.add_parser(name, help=help_text).add_argument("archive_dir", type=Path)
    args = parser.parse_args(argv)
    if not args.archive_dir.is_dir():
        print(f"error: archive not found: {args.archive_dir}", file=sys.stderr)
        return 2
    return list_adapters(args.archive_dir) if args.command == "list" else verify(args.archive_dir)


if __name__ == "__main__":
    sys.exit(main())
