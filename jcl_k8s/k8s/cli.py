"""The Kubernetes subcommands of `jcl-k8s`: render, validate, launch, run-local, submit, status.

Each handler is a thin wrapper over its module; errors the user can fix are `UserError`s,
which the main CLI prints as one line with exit status 2.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def _add_render_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "-f", "--values", action="append", default=[], metavar="FILE",
        help="values YAML merged over the defaults, in order (repeatable)",
    )
    parser.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE",
        help="set values on the command line: a.b=1,c[0].d=x (types inferred; repeatable)",
    )
    parser.add_argument(
        "--set-string", action="append", default=[], metavar="KEY=VALUE",
        help="like --set, but every value is a string",
    )
    parser.add_argument(
        "--job", choices=["pretrain", "lincls", "all"], default="all",
        help="which job's objects to render (default: all)",
    )


def _render(args: argparse.Namespace) -> int:
    from jcl_k8s.k8s.render import render_values, to_stream, write_manifests

    objects = render_values(args.values, args.set, args.set_string, args.job)
    if args.write:
        for path in write_manifests(args.write, objects):
            print(f"wrote {path}")
    else:
        sys.stdout.write(to_stream(objects))
    return 0


def _validate(args: argparse.Namespace) -> int:
    from jcl_k8s.k8s.run_local import load_documents
    from jcl_k8s.k8s.validate import problems

    found = problems(load_documents(args.manifests), Path(args.schemas) if args.schemas else None)
    for problem in found:
        print(problem)
    if not found:
        print(f"ok: {', '.join(args.manifests)}")
    return 1 if found else 0


def _launch(args: argparse.Namespace) -> int:
    from jcl_k8s.k8s.entrypoint import launch

    return launch(args.trainer_args, args.dns_timeout)


def _run_local(args: argparse.Namespace) -> int:
    from jcl_k8s.k8s.run_local import run_local

    return run_local(
        args.manifests,
        sets=args.set,
        set_strings=args.set_string,
        train=args.train,
        preset=args.preset,
        timeout=args.timeout,
        metrics_port=args.metrics_port,
        secrets=args.secret,
        restart_delay=args.restart_delay,
    )


def _add_cluster_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--kubeconfig", default=None, help="kubeconfig file (default: $KUBECONFIG)")
    parser.add_argument("--context", default=None, help="kubeconfig context")
    parser.add_argument(
        "-n", "--namespace", default=None,
        help="namespace (default: values' namespace, else the context's, else 'default')",
    )


def _submit(args: argparse.Namespace) -> int:
    from jcl_k8s.k8s.api import Cluster, submit
    from jcl_k8s.k8s.render import render_values

    objects = [obj for _, obj in render_values(args.values, args.set, args.set_string, args.job)]
    cluster = Cluster.connect(args.kubeconfig, args.context, args.namespace)
    for line in submit(cluster, objects, dry_run=args.dry_run, force=args.force_conflicts):
        print(line)
    return 0


def _status(args: argparse.Namespace) -> int:
    from jcl_k8s.k8s.api import Cluster, job_status

    cluster = Cluster.connect(args.kubeconfig, args.context, args.namespace)
    for line in job_status(cluster, args.name):
        print(line)
    return 0


def add_commands(commands: argparse._SubParsersAction) -> None:
    """Register the Kubernetes subcommands on the main `jcl-k8s` parser."""
    render = commands.add_parser("render", help="print the Kubernetes objects for given values")
    _add_render_arguments(render)
    render.add_argument(
        "--write", metavar="DIR", default=None,
        help="write one file per object plus kustomization.yaml and values.yaml into DIR",
    )
    render.set_defaults(handler=_render)

    validate = commands.add_parser(
        "validate", help="check manifests: schemas, the operator's webhook rules, practice"
    )
    validate.add_argument(
        "manifests", nargs="+", metavar="MANIFEST", help="YAML files ('-': stdin)"
    )
    validate.add_argument(
        "--schemas", default=None, metavar="DIR",
        help="folder of CRD files (e.g. ../shared/schemas); without it, no schema checks",
    )
    validate.set_defaults(handler=_validate)

    launch = commands.add_parser(
        "launch", help="container entrypoint: wait for the rendezvous host, then torchrun"
    )
    launch.add_argument(
        "--dns-timeout", type=float, default=600.0, metavar="S",
        help="seconds to wait for the host in PET_RDZV_ENDPOINT to resolve (default 600)",
    )
    launch.add_argument(
        "trainer_args", nargs=argparse.REMAINDER, metavar="-- COMMAND",
        help="-- pretrain|lincls [--preset P] --config FILE [key=value ...]",
    )
    launch.set_defaults(handler=_launch)

    local = commands.add_parser(
        "run-local", help="run a PyTorchJob manifest here, one local process per worker"
    )
    local.add_argument(
        "manifests", nargs="+", metavar="MANIFEST",
        help="YAML holding the PyTorchJob ('-': stdin); ConfigMaps it mounts are found in these "
        "files or beside them",
    )
    local.add_argument(
        "--set", action="append", default=[], metavar="PATH=VALUE",
        help="patch the PyTorchJob: spec.pytorchReplicaSpecs.Worker.replicas=2 (repeatable)",
    )
    local.add_argument(
        "--set-string", action="append", default=[], metavar="PATH=VALUE",
        help="like --set, values as strings: spec.nprocPerNode=1",
    )
    local.add_argument(
        "--train", action="append", default=[], metavar="KEY=VALUE",
        help="trainer setting appended to the container's arguments: epochs=1 (repeatable)",
    )
    local.add_argument("--preset", default=None, help="replace the trainer's --preset")
    local.add_argument(
        "--timeout", type=float, default=3600.0, metavar="S",
        help="stop every worker and fail after this many seconds (default 3600)",
    )
    local.add_argument(
        "--metrics-port", type=int, default=0, metavar="PORT",
        help="metrics base port; worker i serves from PORT + i * nprocPerNode (default 0: off)",
    )
    local.add_argument(
        "--secret", action="append", default=[], metavar="NAME=VAR[,VAR...]",
        help="which local environment variables stand for Secret NAME's keys (default for "
        "envFrom Secrets: AWS_ACCESS_KEY_ID,AWS_SECRET_ACCESS_KEY, plus any other AWS_*)",
    )
    local.add_argument(
        "--restart-delay", type=float, default=1.0, metavar="S",
        help="seconds before restarting a failed worker (the kubelet backs off from 10 s)",
    )
    local.set_defaults(handler=_run_local)

    submit = commands.add_parser(
        "submit", help="server-side apply the rendered objects to the cluster"
    )
    _add_render_arguments(submit)
    _add_cluster_arguments(submit)
    submit.add_argument(
        "--dry-run", action="store_true", help="have the server validate without persisting"
    )
    submit.add_argument(
        "--force-conflicts", action="store_true",
        help="take over fields another field manager owns (server-side apply force)",
    )
    submit.set_defaults(handler=_submit)

    status = commands.add_parser(
        "status", help="a PyTorchJob's conditions, replicas, newest checkpoint and last step"
    )
    status.add_argument("name", help="PyTorchJob name (e.g. jcl-pretrain)")
    _add_cluster_arguments(status)
    status.set_defaults(handler=_status)
