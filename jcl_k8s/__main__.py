"""Lets `python -m jcl_k8s` and `torchrun -m jcl_k8s` run the CLI."""

from jcl_k8s.cli import main

if __name__ == "__main__":
    main()
