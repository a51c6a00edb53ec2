"""Per-rank entry: `python -m scaleforge.pretrain RUN.yaml --out DIR [--set key=value ...]`.

torchrun (`orchestrate train --nproc N`) and srun (one task per rank) start this module once per
rank. The `__main__` guard matters: megatron's asynchronous checkpoint writer starts a `spawn`
process that re-imports the main module, and without the guard that child would train again.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from scaleforge import _warnings
from scaleforge.errors import ScaleforgeError

# At import, not in main(): the checkpoint writer megatron spawns re-imports this module (as
# __mp_main__) and warns in that process too.
_warnings.install()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m scaleforge.pretrain", description=__doc__)
    parser.add_argument("spec", metavar="RUN.yaml")
    parser.add_argument("--out", metavar="DIR", required=True)
    parser.add_argument("--set", dest="overrides", action="append", default=[],
                        metavar="KEY=VALUE")
    args = parser.parse_args(argv)
    try:
        from scaleforge.pretrain.cli import resolve
        from scaleforge.pretrain.loop import train

        spec, _ = resolve(args.spec, args.overrides, None)
        return train(spec, Path(args.out))
    except ScaleforgeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code


if __name__ == "__main__":
    sys.exit(main())
