"""The observability subcommands of `jcl-k8s`: `report`.

`add_commands` is called by `jcl_k8s.cli` with its subparsers; the work is in
`jcl_k8s.report`. This module only parses arguments and prints.
"""

from __future__ import annotations

import argparse


def add_commands(subparsers: argparse._SubParsersAction) -> None:
    """Registers `report RUN_URL [--lincls URL] [--out PATH]`."""
    report = subparsers.add_parser(
        "report", help="plot a run's metrics log to a PNG and print a summary (no Grafana needed)",
        description="Reads RUN_URL/metrics.jsonl (a pretrain or lincls run, any fsspec URL), "
        "writes loss, lr, throughput and data-wait curves (and lincls accuracy) to a PNG "
        "and prints a short summary.",
    )
    report.add_argument("run_url", metavar="RUN_URL", help="run directory: path, file://, s3://")
    report.add_argument("--lincls", metavar="URL", default=None,
                        help="a lincls run whose curves and accuracy are added")
    report.add_argument("--out", metavar="PATH", default=None,
                        help="where the PNG goes, any fsspec URL (default RUN_URL/report.png)")
    report.set_defaults(handler=run_report)


def run_report(args: argparse.Namespace) -> int:
    from jcl_k8s.report import report

    out, summaries = report(args.run_url, lincls_url=args.lincls, out=args.out)
    for summary in summaries:
        print(summary.line())
    print(f"report: {out}")
    return 0
