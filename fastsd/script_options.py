"""Command-line options the scripts share (download_weights, pack_weights, select_variant): what a
deployment serves besides its variant. Nothing here imports torch: the publishing job has none."""

from __future__ import annotations

import argparse

from .settings import names
from .variants import Variant


def add_deployment_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--controlnet",
        default="",
        metavar="NAMES",
        help="ControlNets to serve too, comma-separated: canny, depth (as FASTSD_CONTROLNETS; default none)",
    )
    parser.add_argument(
        "--no-safety-checker",
        dest="safety_checker",
        action="store_false",
        help="leave out the two safety checkers: a private deployment, served unchecked (FASTSD_SAFETY_CHECKER=off)",
    )


def deployment(variant: Variant, args: argparse.Namespace) -> Variant:
    """The variant with the ControlNets and the safety checking that the options ask for."""
    controlnets = names("--controlnet", args.controlnet)
    return variant.with_controlnets(controlnets).with_safety_checker(args.safety_checker)
