"""TuneConfig is the one definition of the tune settings: `herd tune`'s flags and the web
job's parameters are derived from its fields, so they cannot drift from it."""

from __future__ import annotations

import argparse
import subprocess
import sys
from dataclasses import fields

from openherd.commands import tune as tune_cli
from openherd.tune.config import TuneConfig, field_default, field_type
from openherd.web import jobs

# Settings that are not training knobs: given positionally, by other flags, or by the gate.
NOT_KNOBS = {"base", "data", "out", "targets", "min_lr_ratio", "keep_checkpoints", "resume", "overwrite",
             "dtype", "run_dir", "progress", "gate", "gate_threshold", "gate_limit"}


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser()
    tune_cli.register(parser.add_subparsers())
    return parser


def test_every_training_knob_is_a_flag_with_tuneconfigs_type_and_default():
    knobs = [name for _, group in tune_cli.TUNE_FLAGS for name, _ in group]
    assert sorted(knobs) == sorted(f.name for f in fields(TuneConfig) if f.name not in NOT_KNOBS)
    args = _parser().parse_args(["tune", "base", "--data", "d.jsonl", "--out", "x"])
    for name in knobs:
        assert getattr(args, name) == field_default(name), name
    args = _parser().parse_args(["tune", "b", "--data", "d", "--out", "x", "--rank", "4", "--lr", "1e-3", "--pack"])
    assert (args.rank, args.lr, args.pack) == (4, 1e-3, True) and field_type("rank") is int


def test_the_web_jobs_parameters_are_tuneconfig_fields():
    names = {f.name for f in fields(TuneConfig)}
    assert set(jobs.TUNE_LIMITS) <= names and set(jobs.BOOL_FLAGS) <= names
    cli_flags = {"--" + name.replace("_", "-") for _, group in tune_cli.TUNE_FLAGS for name, _ in group}
    assert set(jobs.TUNE_FLAGS.values()) <= cli_flags  # every flag the job passes, `herd tune` takes
    assert jobs._number("rank", "16") == 16 and isinstance(jobs._number("lr", "0.01"), float)


def test_herd_help_does_not_import_torch():
    code = "import sys; from openherd import cli; import openherd.commands.tune; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"
