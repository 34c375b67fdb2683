"""The ``unidd-fast`` command (placeholder until the pipeline lands)."""
from __future__ import annotations

import argparse


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="unidd-fast", description=__doc__)
    parser.parse_args(argv)
    return 0
