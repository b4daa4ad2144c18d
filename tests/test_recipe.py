"""The default model's recipe, `scripts/train_default_model.sh`, as a user runs it: one command trains both stages
on the team's real data, the model it writes has the committed model's architecture and configuration (so the
committed weights can be that recipe's), and a re-run finishes what is left without redoing what is done.

The recipe's own flags are kept; the ones after `--` win over them and shrink it to 3 steps on 2 phantoms."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import requires_shared_data
from server import ROOT

QUICK = ["--", "--phantoms", "2", "--encoder-steps", "2", "--max-steps", "3", "--val-every", "100000",
         "--val-phantoms", "0", "--val-organs", "liver"]
PATH_KEYS = {"_name_or_path", "_diffusers_version"}  # where and with which diffusers a config was saved


def recipe(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", "scripts/train_default_model.sh", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=900)


def configs(model_dir: Path) -> dict[str, dict]:
    """Every JSON config of a saved model, by relative path, without where it was saved."""
    return {str(p.relative_to(model_dir)): {k: v for k, v in json.loads(p.read_text()).items() if k not in PATH_KEYS}
            for p in sorted(model_dir.rglob("*.json"))}


def weights(model_dir: Path) -> dict[str, torch.Tensor]:
    return {f"{p.relative_to(model_dir)}:{k}": v for p in sorted(model_dir.rglob("*.safetensors"))
            for k, v in load_file(p).items()}


@requires_shared_data()
@pytest.mark.server  # the recipe script: its install check and a training process per stage, not the fast tier
def test_the_recipe_makes_a_model_configured_as_the_committed_one_and_a_rerun_finishes_only_what_is_left(
        tmp_path: Path):
    out = tmp_path / "run"
    run = recipe(str(out), *QUICK)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    stage2 = json.loads((out / "pseudo_ct" / "train_record.json").read_text())
    assert f"--init-from {out / 'base' / 'model'}" in stage2["command"]
    assert stage2["volumes"]["pseudo_ct"] > 0 and stage2["volumes"]["real"] == 1
    assert configs(out / "pseudo_ct" / "model") == configs(ROOT / "model" / "progidiff_ct")
    base_record = out / "base" / "train_record.json"
    base_written = base_record.stat().st_mtime_ns
    first = weights(out / "pseudo_ct" / "model")

    # stage 2 interrupted after its last checkpoint: no record and no model yet
    (out / "pseudo_ct" / "train_record.json").unlink()
    shutil.rmtree(out / "pseudo_ct" / "model")

    rerun = recipe(str(out), *QUICK)
    assert rerun.returncode == 0, rerun.stdout[-3000:] + rerun.stderr[-3000:]
    assert base_record.stat().st_mtime_ns == base_written  # stage 1 was done: not trained again
    stage2 = json.loads((out / "pseudo_ct" / "train_record.json").read_text())
    assert stage2["steps"] == 3 and stage2["steps_this_launch"] == 0  # continued from its checkpoint
    again = weights(out / "pseudo_ct" / "model")
    assert again.keys() == first.keys()
    assert all(torch.allclose(again[k].float(), first[k].float(), atol=1e-6) for k in first)


@requires_shared_data()
@pytest.mark.server  # the recipe script: its install check and a training process per stage, not the fast tier
def test_the_baseline_recipe_makes_a_model_configured_as_the_committed_baseline(tmp_path: Path):
    out = tmp_path / "run"
    run = recipe("--baseline", str(out), *QUICK)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert "--init-from" in json.loads((out / "pseudo_ct" / "train_record.json").read_text())["command"]
    assert configs(out / "pseudo_ct" / "model") == configs(ROOT / "model" / "baseline_ct")


def test_the_recipe_refuses_arguments_it_does_not_know():
    run = recipe("runs/never", "--max-steps", "3")
    assert run.returncode == 2
    assert "usage:" in run.stderr and "--max-steps 3" in run.stderr
