"""The `ctxscale` command: `ctxscale train --config F [key.path=value ...]` and friends.

Every subcommand is also a module runnable under torchrun / srun / mpirun, e.g.
`torchrun --nproc-per-node 2 -m ctxscale.launch.train --config configs/tiny.yaml`.
"""

from __future__ import annotations

import importlib
import sys

COMMANDS = {
    "train": ("ctxscale.launch.train", "train a model from a YAML config"),
    "sweep": ("ctxscale.launch.sweep", "context-length sweep: one run per length, table + plot"),
    "convert": ("ctxscale.launch.convert", "distill a softmax model into linear attention"),
    "eval": ("ctxscale.launch.evaluate", "perplexity, passkey by length, MQAR: table + plot"),
    "tokenize": ("ctxscale.launch.tokenize", "text corpus -> token file for data.kind=tokens"),
    "generate": ("ctxscale.launch.generate", "sample text from a trained model"),
}


def usage() -> str:
    lines = ["usage: ctxscale <command> [--config FILE] [key.path=value ...]", "", "commands:"]
    lines += [f"  {name:<8} {help_}" for name, (_, help_) in COMMANDS.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"ctxscale: unknown command {name!r}\n\n{usage()}", file=sys.stderr)
        return 2
    module = importlib.import_module(COMMANDS[name][0])
    return module.main(rest)


if __name__ == "__main__":
    sys.exit(main())
