"""The `jcl-k8s` command line: one subcommand per job, each a thin wrapper.

Every subcommand turns a `ConfigError`, `DataError` or `CheckpointError` into
one line on stderr and exit status 2, before any training starts.
"""

import argparse
import gc
import importlib
import importlib.util
import logging
import sys
import traceback
from collections.abc import Callable

from jcl_k8s.errors import UserError

Handler = Callable[[argparse.Namespace], int | None]


def _add_config_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--preset", default="imagenet", help="base settings: imagenet (the paper's) or small (CPU)"
    )
    parser.add_argument(
        "--config", "-c", action="append", default=[], metavar="FILE",
        help="YAML settings merged over the preset, in order (repeatable)",
    )
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="dotted overrides")


def _pretrain(args: argparse.Namespace) -> int:
    from jcl_k8s.config import load_config
    from jcl_k8s.pretrain import pretrain

    pretrain(load_config("pretrain", args.preset, args.config, args.overrides))
    return 0


def _lincls(args: argparse.Namespace) -> int:
    from jcl_k8s.config import load_config
    from jcl_k8s.lincls import lincls

    lincls(load_config("lincls", args.preset, args.config, args.overrides))
    return 0


def _prepare_data(args: argparse.Namespace) -> int:
    from jcl_k8s.data.fashion_mnist import prepare_fashion_mnist

    counts = prepare_fashion_mnist(
        args.url, source=args.source, per_class=args.per_class, val_per_class=args.val_per_class
    )
    for split, n in counts.items():
        print(f"{split}: {n} images written under {args.url.rstrip('/')}/{split}/")
    return 0


def _demo(args: argparse.Namespace) -> int:
    from jcl_k8s.demo import run_demo

    run_demo(output_dir=args.output, quick=args.quick, epochs=args.epochs)
    return 0


def _export(args: argparse.Namespace) -> int:
    from jcl_k8s.checkpoint import export_backbone

    count = export_backbone(args.checkpoint, args.out)
    print(f"wrote {count} backbone tensors (no fc) to {args.out}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="jcl-k8s", description="JCL / MoCo v2 pretraining and linear evaluation"
    )
    parser.add_argument("--log-level", default="INFO", help="stdlib logging level")
    commands = parser.add_subparsers(dest="command", required=True)

    pretrain = commands.add_parser("pretrain", help="JCL (or MoCo v2) pretraining")
    _add_config_arguments(pretrain)
    pretrain.set_defaults(handler=_pretrain)

    lincls = commands.add_parser("lincls", help="linear classification on a frozen backbone")
    _add_config_arguments(lincls)
    lincls.set_defaults(handler=_lincls)

    prepare = commands.add_parser("prepare-data", help="write a dataset in ImageNet layout")
    prepare.add_argument("dataset", choices=["fashion-mnist"], help="which dataset")
    prepare.add_argument("url", help="destination root, any fsspec URL (s3://bucket/prefix, ...)")
    prepare.add_argument(
        "--source", default="/usr/share/datasets/fashion-mnist",
        help="directory holding the IDX files (Debian's dataset-fashion-mnist)",
    )
    prepare.add_argument("--per-class", type=int, default=None, help="train images per class")
    prepare.add_argument("--val-per-class", type=int, default=None, help="val images per class")
    prepare.set_defaults(handler=_prepare_data)

    demo = commands.add_parser("demo", help="pretrain + lincls on Fashion-MNIST via local S3")
    demo.add_argument("--output", default="runs/demo", help="local directory for the results")
    demo.add_argument("--quick", action="store_true", help="a 2-minute smoke run")
    demo.add_argument("--epochs", type=int, default=None, help="pretrain epochs")
    demo.set_defaults(handler=_demo)

    export = commands.add_parser("export", help="write the backbone as a torchvision state_dict")
    export.add_argument("checkpoint", help="checkpoint file, committed checkpoint or run URL")
    export.add_argument("out", help="destination file URL")
    export.set_defaults(handler=_export)

    for register in _extensions():
        register(commands)
    return parser


EXTENSIONS = ("jcl_k8s.k8s.cli", "jcl_k8s.observability.cli")


def _extensions() -> list[Callable[[argparse._SubParsersAction], None]]:
    """`add_commands` of the parts of the package that own subcommands of their own."""
    registrations = []
    for name in EXTENSIONS:
        if importlib.util.find_spec(name.rsplit(".", 1)[0]) is not None:
            registrations.append(importlib.import_module(name).add_commands)
    return registrations


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    from jcl_k8s.preemption import EXIT_PREEMPTED, Preempted

    code = 1
    try:
        code = args.handler(args) or 0
    except UserError as error:
        print(f"jcl-k8s {args.command}: error: {error}", file=sys.stderr)
        code = 2
    except Preempted:
        code = EXIT_PREEMPTED
    except Exception:
        traceback.print_exc()
        code = 1
    # Free the failed run (its traceback keeps the DataLoader iterator, and so its
    # worker processes, alive in a reference cycle) so the workers are shut down
    # before interpreter shutdown waits on them.
    gc.collect()
    sys.exit(code)
