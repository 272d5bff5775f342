"""The benchmarks' one entry point: ``python scripts/bench.py COMMAND [options]``.

Each command is a script in this folder, run with the options that follow it
(``bench.py uci --help`` shows them); see scripts/README.md.

    python scripts/bench.py uci --datasets elevators --splits 0 1 2 --methods gpadjoint-default
    python scripts/bench.py report
"""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

COMMANDS = {
    "uci": ("bench_uci", "gpadjoint methods and GPyTorch on the UCI splits -> results/uci/"),
    "epoch": ("bench_epoch", "per-epoch cost and time to quality from the uci records"),
    "optimum": ("bench_optimum", "each method's gap to the exact optimum -> results/optimum.csv"),
    "exact": ("exact_optimum", "the float64 maximum-likelihood reference fit of a split"),
    "point": ("exact_point", "the exact loss and test scores at given points"),
    "pass": ("bench_pass", "seconds per kernel pass, each variant -> results/bench_pass.csv"),
    "mixed": ("mixed_endpoints", "mixed against full precision at fitted end points"),
    "bad-inputs": ("bad_input_table", "the bad-input messages -> results/bad_inputs.md"),
    "report": (None, "optimum.csv, then every table and figure in results/ (make_table)"),
}


def _run(module: str, argv: list[str]) -> int:
    if not (HERE / f"{module}.py").exists():
        raise SystemExit(f"error: scripts/{module}.py is not in this checkout")
    return importlib.import_module(module).main(argv) or 0


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] not in COMMANDS and argv[0] not in ("-h", "--help"):
        print(f"error: unknown command {argv[0]!r}", file=sys.stderr)
    if not argv or argv[0] not in COMMANDS:
        width = max(map(len, COMMANDS))
        listing = "\n".join(f"  {c:<{width}}  {what}" for c, (_, what) in COMMANDS.items())
        print(f"usage: python scripts/bench.py COMMAND [options]\n\ncommands:\n{listing}",
              file=sys.stderr if argv and argv[0] not in ("-h", "--help") else sys.stdout)
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    command, rest = argv[0], argv[1:]
    if command == "report":  # optimum.csv first: make_table renders it
        return _run("bench_optimum", []) or _run("make_table", rest)
    return _run(COMMANDS[command][0], rest)


if __name__ == "__main__":
    sys.exit(main())
