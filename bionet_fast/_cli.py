"""Helpers shared by the command-line modules (train, evaluate, predict, export, plan): they turn
the argparse namespace into the typed options the engine takes, so no namespace travels down."""
from __future__ import annotations

import argparse

from .engine.inference import InferenceOptions


def inference_options(args: argparse.Namespace) -> InferenceOptions:
    """The typed loading options of an evaluate / predict command line."""
    return InferenceOptions(args.checkpoint, args.device, args.backend, args.task, args.sr_scale,
                            args.tile_size)
