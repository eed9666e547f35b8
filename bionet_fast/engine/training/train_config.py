"""The typed options of one training run: what the Trainer and the data builders take instead of
the argparse namespace. :mod:`bionet_fast.train` parses the command line (flags > --config file >
a resumed run's train_args.json > the synthetic or paper defaults) and converts it here.

Adding a training flag: one ``add_argument`` line in train.py and one field line below (same name
as the flag's dest). :meth:`TrainConfig.from_namespace` refuses a namespace holding a flag without
a field, naming it, so a new flag cannot be dropped silently.
"""
from __future__ import annotations

import argparse
from dataclasses import asdict, dataclass, fields
from typing import Optional

from ...data.training import DataConfig

# Parse-time options that are not options of the run itself (never saved to train_args.json).
PARSE_ONLY = ("config",)
NOT_SAVED = ("resume", "config", "overwrite", "synthetic")


@dataclass
class TrainConfig:
    """Every option of a training run, resolved (no None where a default exists).
    Field names are the dests of the train flags; train_args.json is ``to_json()``."""

    # model
    arch: str = "bionet"
    t: int = 3
    multiplier: float = 0.25
    depth: int = 3
    backward_skips: Optional[int] = None
    integrate: bool = False
    padding_mode: str = "zeros"
    in_channels: int = 3
    classes: int = 1
    bn_momentum: float = 0.01
    task: str = "segmentation"
    target: str = "mask"  # "contour": background / interior / boundary from instance labels
    sr_scale: int = 2
    checkpoint_iters: bool = False
    # data
    train_data: Optional[str] = None
    valid_data: Optional[str] = None
    data_format: str = "auto"
    train_mpp: Optional[float] = None  # um/px of the training images (--train-mpp, else from their files)
    image_size: Optional[int] = 64
    no_augment: bool = False
    workers: int = 0
    n_train: Optional[int] = 512
    n_val: Optional[int] = 48
    # optimisation
    epochs: int = 10
    steps: int = 80
    batch_size: int = 8
    lr: float = 0.01
    lr_decay: float = 3e-5
    precise_bn: int = 256
    seed: int = 0
    # fine-tuning
    initial_checkpoint: Optional[str] = None
    model_ema: bool = False
    model_ema_decay: float = 0.999
    grad_accum_steps: int = 1
    clip_grad: Optional[float] = None
    # speed and hardware
    device: str = "auto"
    amp: bool = False
    amp_dtype: str = "bfloat16"
    channels_last: bool = False
    compile: bool = False
    cuda_graph: bool = False
    backend: str = "auto"
    memory_budget: Optional[str] = None  # "8GiB" or "auto": engine/planner.plan_training picks the checkpointing
    auto_batch: bool = False  # --batch-size auto: the largest batch whose plan fits --memory-budget
    sync_bn: bool = False
    tile_size: Optional[int] = None
    threads: Optional[int] = None
    # output
    out: str = "runs/bionet-t3"
    resume: Optional[str] = None
    overwrite: bool = False
    save_every_steps: int = 0
    save_every_minutes: float = 10.0
    quiet: bool = False
    synthetic: bool = True
    # test hooks (hidden flags)
    debug_nan_at_step: Optional[int] = None
    debug_exit_at_step: Optional[int] = None
    debug_kill_at_step: Optional[int] = None  # SIGKILL itself after this global step (fault injection)

    @classmethod
    def from_namespace(cls, ns: argparse.Namespace) -> "TrainConfig":
        """The config of a parsed (and resolved) train command line."""
        names = {f.name for f in fields(cls)}
        given = {k: v for k, v in vars(ns).items() if k not in PARSE_ONLY}
        missing = sorted(set(given) - names)
        if missing:
            raise TypeError(f"train flag(s) {missing} have no TrainConfig field: add one line per flag to "
                            "bionet_fast/engine/train_config.py")
        return cls(**given)

    def to_json(self) -> dict:
        """What train_args.json holds: every option except the parse-time ones and test hooks."""
        return {k: v for k, v in asdict(self).items() if k not in NOT_SAVED and not k.startswith("debug")}

    @property
    def size_multiple(self) -> int:
        """Image sides must be multiples of this (2**(depth+1) for BiO-Net, 32 for BiO-LinkNet)."""
        return 32 if self.arch == "biolinknet" else 2 ** (self.depth + 1)

    @property
    def data(self) -> DataConfig:
        """The options of the data layer (build_data)."""
        return DataConfig(train_data=self.train_data, valid_data=self.valid_data, data_format=self.data_format,
                          image_size=self.image_size, in_channels=self.in_channels, task=self.task,
                          sr_scale=self.sr_scale, size_multiple=self.size_multiple, seed=self.seed,
                          n_train=self.n_train, n_val=self.n_val,
                          target=self.target if self.task == "segmentation" else "mask",
                          classes=self.classes if self.task == "segmentation" else 1)
