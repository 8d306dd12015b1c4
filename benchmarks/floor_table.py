"""The floor bounds of bench.py tables already written, recomputed from their rows (`bench.floor_bound`).

    python benchmarks/floor_table.py results/bench_h100_floor/*.json

For each table with a `floor` row: every latent row next to its K-step row (`steps`, `stage3:steps`,
`teacher_steps`), its ratio (the paired one where there is one) and that ratio with its steps at the floor. The
floor is the table's own (the stage2 batch's; a stage3 batch's cache is a few slots smaller, which moves the
floor by well under 1%).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
from pathlib import Path

_spec = importlib.util.spec_from_file_location("bench", Path(__file__).parent / "bench.py")
bench = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench)

STEPS = {"latent_truncated_graph": "steps", "latent_adjoint": "steps",
         "stage3:latent_truncated_graph": "stage3:steps", "teacher_graph": "teacher_steps"}


def bounds(table: dict) -> list[tuple[str, float, float, float]]:
    """(row, ratio, floor bound, seconds a step measured) for each latent row of one table."""
    floor = next((r for r in table["rows"] if r["name"] == "floor"), None)
    if floor is None:
        return []
    k = table["env"]["num_latents"]
    return bench.floor_bounds(table["rows"], [(name, steps, k, floor["time_s"]) for name, steps in STEPS.items()])


def main(paths: list[str]) -> None:
    print("| table | device, commit, batch | row | ratio | with the steps at the floor | ms a step (floor) |")
    print("|---|---|---|---|---|---|")
    for path in paths:
        table = json.loads(Path(path).read_text())
        env, floor = table["env"], next((r for r in table["rows"] if r["name"] == "floor"), None)
        for name, ratio, bound, step_s in bounds(table):
            print(f"| {Path(path).stem} | {env['device']}, {env['commit']}, {env['batch']} | {name} | {ratio:.2f}x "
                  f"| {bound:.2f}x | {step_s * 1e3:.2f} ({floor['time_s'] * 1e3:.2f}) |")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="python benchmarks/floor_table.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("tables", nargs="+", help="bench.py's JSON tables")
    main(parser.parse_args(sys.argv[1:]).tables)
