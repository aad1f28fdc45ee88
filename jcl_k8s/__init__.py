"""jcl-k8s: Joint Contrastive Learning pretraining and linear evaluation on Kubernetes."""

__version__ = "0.1.0"
