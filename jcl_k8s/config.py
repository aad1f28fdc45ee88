"""Typed configuration for every command, its presets and its loading.

Each command's settings are a dataclass tree; a run's configuration is the
chosen preset, then YAML files in order, then `dotted.key=value` overrides,
merged and type-checked by OmegaConf. An unknown key or a value of the wrong
type is a `ConfigError` naming it, raised before any work starts.
"""

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import yaml
from omegaconf import MISSING, DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from jcl_k8s.errors import UserError


class ConfigError(UserError):
    """A configuration that cannot be used, with the setting to fix."""


@dataclass
class DataConfig:
    url: str = MISSING
    """Dataset root in ImageNet layout (ROOT/train/<class>/<file>), any fsspec URL."""
    image_size: int = 224
    """Side of the square crops fed to the network."""
    num_workers: int = 8
    """DataLoader worker processes per training process."""
    cache_bytes: bool = False
    """Read every encoded image once at start and keep the bytes in memory (small data only)."""
    trace_ids: bool = False
    """Write the sample ids of every step to RUN/traces/ (to audit the data order)."""
    min_crop_scale: float = 0.2
    """Smallest area share of RandomResizedCrop in the pretraining augmentation (MoCo v2: 0.2)."""


@dataclass
class ModelConfig:
    arch: str = "resnet50"
    """Any torchvision ResNet constructor name: resnet18, resnet50, ..."""
    stem: str = "imagenet"
    """'imagenet' (7x7/2 conv + max-pool) or 'small' (3x3/1 conv, no pool) for tiny images."""
    dim: int = 128
    """Output size of the projection head."""
    mlp: bool = True
    """MoCo v2 MLP head (Linear-ReLU-Linear) instead of a single Linear."""


@dataclass
class MetricsConfig:
    port: int = 9400
    """Prometheus exporter base port; each process serves base_port + local_rank; 0 = off."""
    job: str = ""
    """Value of the `job` label; '' takes $JCL_JOB_NAME, else the output URL's last part."""


@dataclass
class CheckpointConfig:
    every_steps: int = 0
    """Save every this many global steps (0 = off)."""
    every_minutes: float = 30.0
    """Save when this many minutes have passed since the last save (0 = off)."""
    at_epoch_end: bool = True
    """Save at the end of every epoch."""
    keep_last: int = 3
    """Committed checkpoints kept; older ones are deleted after a newer commit."""
    keep_every_epochs: int = 0
    """Also keep the end-of-epoch checkpoint of every Nth epoch for good (0 = none)."""
    grace_seconds: float = 25.0
    """Time a preemption save may take (torchrun SIGKILLs workers 30 s after SIGTERM by
    default); any save slower than this is logged as a warning."""


@dataclass
class PretrainConfig:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    output_url: str = MISSING
    """Where the run writes its config, checkpoints and metrics log (any fsspec URL)."""
    resume: str = "auto"
    """'auto': continue from the newest committed checkpoint under output_url, if any;
    'never': start afresh; or the URL of a checkpoint to start from."""
    epochs: int = 200
    """Passes over the training split."""
    batch_size: int = 256
    """Global batch over all processes; each process takes batch_size / world_size."""
    lr: float = 0.03
    """SGD learning rate for a global batch of 256, scaled linearly with batch_size."""
    momentum: float = 0.9
    """SGD momentum."""
    weight_decay: float = 1e-4
    """SGD weight decay."""
    warmup_epochs: float = 0.0
    """Linear lr warm-up length before the cosine schedule."""
    tau: float = 0.2
    """Softmax temperature."""
    jcl_lambda: float = 2.0
    """JCL strength lambda, ramped as lambda * (epoch + 1) / epochs."""
    k_crops: int = 5
    """Augmented views per image: one query and k_crops - 1 positive keys (2 = MoCo v2)."""
    jcl: bool = True
    """False gives MoCo v2 proper: lambda is 0 and k_crops must be 2."""
    queue_size: int = 65536
    """Negative keys K in the FIFO queue."""
    key_momentum: float = 0.999
    """EMA momentum m of the key encoder."""
    seed: int = 0
    """Seed of the data order, the augmentations and the initial weights."""
    log_every: int = 10
    """Steps between two log lines (rank 0) and two metrics-log records."""
    shuffle_bn_groups: int = 2
    """With one process: key batches are split into this many shuffled BN groups."""


@dataclass
class LinclsConfig:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    pretrained: str = ""
    """Checkpoint file or pretrain run URL (newest committed checkpoint); '' = random backbone."""
    resume: str = "auto"
    """'auto': continue from this run's newest committed epoch, if any; 'never': start afresh."""
    wait_for_pretrained: float = 0.0
    """Seconds to wait for the pretrain run's final checkpoint to appear (0 = do not wait)."""
    output_url: str = MISSING
    """Where the run writes its config, results and metrics log."""
    epochs: int = 100
    """Passes over the training split."""
    batch_size: int = 256
    """Global batch over all processes."""
    lr: float = 30.0
    """SGD learning rate for a global batch of 256, scaled linearly with batch_size."""
    momentum: float = 0.9
    """SGD momentum."""
    weight_decay: float = 0.0
    """SGD weight decay."""
    lr_milestones: list[int] = field(default_factory=lambda: [60, 80])
    """Epochs at which the lr is multiplied by 0.1."""
    cached_features: bool = False
    """Extract frozen features once (no augmentation) and train the classifier on them."""
    standardize: bool = False
    """With cached_features: scale each feature to zero mean, unit variance on train."""
    seed: int = 0
    """Seed of the data order and the classifier's initial weights."""
    log_every: int = 10
    """Steps between two log lines (rank 0)."""


PRESETS: dict[str, dict[str, dict[str, Any]]] = {
    "pretrain": {
        # The paper's ImageNet run (ResNet-50, 200 epochs): the dataclass defaults.
        "imagenet": {},
        # A CPU-sized run on small images, used by the demo.
        "small": {
            "data": {"image_size": 32, "num_workers": 1, "cache_bytes": True},
            "model": {"arch": "resnet18"},
            "epochs": 40,
            "batch_size": 64,
            "lr": 0.06,
            "weight_decay": 5e-4,
            "k_crops": 3,
            "jcl_lambda": 2.0,
            "queue_size": 4096,
            "key_momentum": 0.99,
            "log_every": 10,
        },
    },
    "lincls": {
        "imagenet": {},
        "small": {
            "data": {"image_size": 32, "num_workers": 1, "cache_bytes": True},
            "model": {"arch": "resnet18"},
            "epochs": 30,
            "batch_size": 256,
            "lr": 0.5,
            "lr_milestones": [20, 25],
            "cached_features": True,
            "standardize": True,
        },
    },
}

SCHEMAS = {"pretrain": PretrainConfig, "lincls": LinclsConfig}


def load_config(
    command: str,
    preset: str = "imagenet",
    files: list[str] | None = None,
    overrides: list[str] | None = None,
) -> DictConfig:
    """Merge preset, YAML files and `key=value` overrides into a checked config."""
    if preset not in PRESETS[command]:
        raise ConfigError(f"unknown preset {preset!r}; choose one of {sorted(PRESETS[command])}")
    try:
        config = OmegaConf.structured(SCHEMAS[command])
        config = OmegaConf.merge(config, PRESETS[command][preset])
        for path in files or []:
            config = OmegaConf.merge(config, _read_yaml(path))
        for item in overrides or []:
            if "=" not in item:
                raise ConfigError(f"override {item!r} is not of the form key=value")
            try:
                config = OmegaConf.merge(config, OmegaConf.from_dotlist([item]))
            except OmegaConfBaseException as error:
                key = item.split("=", 1)[0]
                if "is not a subclass of" in str(error):
                    raise ConfigError(
                        f"setting {key} is a group of settings; set its keys, e.g. {key}.<name>=..."
                    ) from None
                raise
        missing = sorted(OmegaConf.missing_keys(config))
    except OmegaConfBaseException as error:
        raise ConfigError(_explain(error)) from None
    if missing:
        raise ConfigError(f"setting {missing[0]} is required (pass {missing[0]}=...)")
    _validate(command, config)
    return config


def _read_yaml(path: str) -> DictConfig:
    try:
        loaded = OmegaConf.load(path)
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist") from None
    except yaml.YAMLError as error:
        where = getattr(error, "problem_mark", None)
        line = f" at line {where.line + 1}" if where else ""
        raise ConfigError(f"config file {path} is not valid YAML{line}") from None
    if not isinstance(loaded, DictConfig):
        raise ConfigError(f"config file {path} must hold a mapping of settings")
    return loaded


def _explain(error: OmegaConfBaseException) -> str:
    key = getattr(error, "full_key", None)
    message = str(error).splitlines()[0]
    if "not in struct" in message or "Key '" in message and "not in" in message:
        return f"unknown setting {key}"
    if "is not a subclass of" in message:
        group = message.split("is not a subclass of ", 1)[1].split(".", 1)[0]
        return f"a value was given for the group {group}; set its keys instead (e.g. data.url=...)"
    if key:
        return f"setting {key}: {message}"
    return message


def _validate(command: str, config: DictConfig) -> None:
    if config.model.stem not in ("imagenet", "small"):
        raise ConfigError(f"model.stem must be 'imagenet' or 'small', got {config.model.stem!r}")
    if config.data.image_size < 8:
        raise ConfigError(f"data.image_size must be at least 8, got {config.data.image_size}")
    if config.batch_size < 1:
        raise ConfigError(f"batch_size must be at least 1, got {config.batch_size}")
    if config.epochs < 1:
        raise ConfigError(f"epochs must be at least 1, got {config.epochs}")
    if command == "pretrain":
        if config.k_crops < 2:
            raise ConfigError(
                f"k_crops must be at least 2 (one query and at least one key), got {config.k_crops}"
            )
        if not config.jcl and config.k_crops != 2:
            raise ConfigError(
                f"jcl=false is MoCo v2, which uses exactly 2 crops: set k_crops=2 "
                f"(got {config.k_crops})"
            )
        if config.queue_size < 1:
            raise ConfigError(f"queue_size must be at least 1, got {config.queue_size}")
        if config.tau <= 0:
            raise ConfigError(f"tau must be positive, got {config.tau}")
        if config.checkpoint.keep_last < 1:
            raise ConfigError(
                f"checkpoint.keep_last must be at least 1, got {config.checkpoint.keep_last}"
            )


def to_yaml(config: DictConfig) -> str:
    """The merged config as YAML, as written beside every run."""
    return OmegaConf.to_yaml(config)


def reference(command: str) -> list[tuple[str, str, str]]:
    """(dotted key, default, one-line doc) of every setting of `command`, read from
    the dataclasses' field docstrings; README's configuration tables are this."""
    import ast
    import inspect

    docs: dict[str, dict[str, str]] = {}
    tree = ast.parse(inspect.getsource(inspect.getmodule(reference)))
    for node in tree.body:
        if isinstance(node, ast.ClassDef):
            fields, body = {}, node.body
            for first, second in zip(body, body[1:], strict=False):
                if (isinstance(first, ast.AnnAssign) and isinstance(second, ast.Expr)
                        and isinstance(second.value, ast.Constant)):
                    fields[first.target.id] = " ".join(second.value.value.split())
            docs[node.name] = fields

    rows = []

    def walk(schema: type, prefix: str) -> None:
        for item in dataclasses.fields(schema):
            if dataclasses.is_dataclass(item.type):
                walk(item.type, f"{prefix}{item.name}.")
                continue
            if item.default is not dataclasses.MISSING:
                default = item.default
            else:
                default = item.default_factory()
            shown = "(required)" if default == MISSING else repr(default)
            rows.append((prefix + item.name, shown, docs[schema.__name__].get(item.name, "")))

    walk(SCHEMAS[command], "")
    return rows


if __name__ == "__main__":
    import sys

    for command in sys.argv[1:] or list(SCHEMAS):
        print(f"| `{command}` setting | default | meaning |\n|---|---|---|")
        for key, default, doc in reference(command):
            print(f"| `{key}` | `{default}` | {doc} |")
        print()
