"""Keep a `lmadapt compare` grid's results in the repository, and put them back.

    python bench/compare_cells.py export runs/cmp docs/compare_sst2.json --command "..."
    python bench/compare_cells.py restore docs/compare_sst2.json runs/cmp

`export` writes one JSON file: the grid's shared options (OUT/compare.json) and, per finished
cell, its folder, wall time and result.json (not its weights). Several OUT folders may go into one
file: their cells' folders are then prefixed with each OUT's name, and `grids` holds each one's
options (restore them into the folder above, e.g. `restore docs/compare_e2e.json runs`).

`restore` writes them back as cell folders (result.json + cell.json, and compare.json when OUT has
none), so that `lmadapt report OUT` rebuilds the tables and the same `lmadapt compare ... --out OUT`
command with more seeds or shots skips the restored cells and runs only the new ones. It refuses a
folder that already holds a different result and an OUT whose compare.json disagrees.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from lmadapt.atomic import read_json_file, write_json  # noqa: E402
from lmadapt.compare import Cell  # noqa: E402
from lmadapt.report import _nested  # noqa: E402 -- the same rule the report uses for PET members

FIX = "rerun that cell (delete its folder) or restore into a new folder"


def export(outs: list[Path], dest: Path, command: str) -> int:
    cells, grids = [], {}
    for out in outs:
        saved = None
        if (out / "compare.json").exists():
            saved = read_json_file(out / "compare.json", "rerun the grid's command to rewrite it")
        elif not any(out.rglob("result.json")):
            raise SystemExit(f"{out}: neither compare.json nor any result.json (not a `lmadapt compare --out` folder)")
        grids[out.name] = saved
        prefix = f"{out.name}/" if len(outs) > 1 else ""
        for path in sorted(out.rglob("result.json")):
            folder = path.parent
            if _nested(folder, out):
                continue  # PET's member runs live inside their cell
            cell = read_json_file(folder / "cell.json", FIX) if (folder / "cell.json").exists() else {}
            cells.append({"folder": prefix + str(folder.relative_to(out)),
                          "wall_seconds": cell.get("wall_seconds"), "result": read_json_file(path, FIX)})
    if not cells:
        raise SystemExit(f"no finished cells (result.json) under {', '.join(map(str, outs))}")
    head = {"options": grids[outs[0].name]} if len(outs) == 1 else {"grids": grids}
    write_json(dest, {"command": command, **head, "cells": cells})
    print(f"{len(cells)} cells -> {dest}")
    return len(cells)


def _put_options(folder: Path, options, src: Path) -> None:
    if options is None:
        return
    if (folder / "compare.json").exists():
        if read_json_file(folder / "compare.json", FIX) != options:
            raise SystemExit(f"{folder}/compare.json holds other options than {src}: restore into a new folder")
    else:
        write_json(folder / "compare.json", options)


def restore(src: Path, out: Path) -> int:
    data = read_json_file(src, "export it again from the grid's folder")
    if not isinstance(data, dict) or not isinstance(data.get("cells"), list):
        raise SystemExit(f"{src}: field 'cells' is missing (not a file written by `export`)")
    # one grid: its options are OUT/compare.json; several: OUT/NAME/compare.json each (older files
    # hold none: the cells are restored, and the next compare into that folder records its options)
    _put_options(out, data.get("options"), src)
    for name, options in (data.get("grids") or {}).items():
        _put_options(out / name, options, src)
    n = 0
    for i, c in enumerate(data["cells"]):
        try:
            folder, r = out / c["folder"], c["result"]
            shots = r.get("shots")
            cell = Cell(r["task"], r["method"], shots if isinstance(shots, int) else None, r["seed"]).to_dict()
        except (KeyError, TypeError) as e:
            raise SystemExit(f"{src}: cells[{i}]: field {e} is missing") from None
        if (folder / "result.json").exists():
            if read_json_file(folder / "result.json", FIX) != r:
                raise SystemExit(f"{folder}/result.json differs from {src}'s cells[{i}]: not overwritten")
            continue
        write_json(folder / "result.json", r)
        write_json(folder / "cell.json", {"cell": cell, "wall_seconds": c.get("wall_seconds")})
        n += 1
    print(f"{n} cells restored into {out} ({len(data['cells']) - n} were there already)")
    return n


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="verb", required=True)
    e = sub.add_parser("export", help="grid folder(s) -> one JSON file")
    e.add_argument("outs", nargs="+", type=Path, help="the compare --out folder(s), then the JSON file to write")
    e.add_argument("--command", default="", help="the command that ran the grid (kept in the file)")
    r = sub.add_parser("restore", help="JSON file -> grid folder")
    r.add_argument("src", type=Path)
    r.add_argument("out", type=Path)
    a = p.parse_args(argv)
    if a.verb == "export":
        if len(a.outs) < 2:
            p.error("export needs at least one grid folder and the JSON file to write")
        export(a.outs[:-1], a.outs[-1], a.command)
    else:
        restore(a.src, a.out)


if __name__ == "__main__":
    main()
