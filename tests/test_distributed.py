"""Distributed training on CPU processes with the gloo backend: from the CLI (`torchrun --nproc-per-node 2 -m
progidiff.train`: the loss curve follows one process's at the same global batch, rank 0 alone writes the model, a
second launch resumes from the checkpoint) and the app's trainer spawned as MONAI Label spawns it for `multi_gpu`."""

from __future__ import annotations

import json
import subprocess
import sys
import weakref
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist

import progidiff.train
from conftest import save_awake_tiny_model
from progidiff.data import SliceDataset, load_volume_pair
from progidiff.model import ProGiDiffModel
from progidiff.pipeline import prompt_encoder_for
from progidiff.training import DiffusionTrainer, TrainConfig, leave_process_group

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "sample-datasets" / "ct"


def train(out: Path, model: Path, processes: int, steps: int) -> tuple[dict, str]:
    args = ["--out", str(out), "--init-from", str(model), "--image-size", "32", "--organs", "liver,spleen",
            "--volume", str(SAMPLE / "phantom_000.nii.gz"), str(SAMPLE / "labels" / "final" / "phantom_000.nii.gz"),
            "schema", "--hold-out", "24:28", "--val-phantoms", "0", "--max-steps", str(steps), "--batch-size", "8",
            "--learning-rate", "2e-3", "--val-every", "0", "--val-proposals", "1", "--val-steps", "1",
            "--val-organs", "liver", "--threads", "1"]
    if processes == 1:  # the reference: the same entry point in this process (a fresh interpreter costs ~20 s here)
        threads = torch.get_num_threads()
        try:
            progidiff.train.main(args)
        finally:
            torch.set_num_threads(threads)  # --threads 1 set it for this whole process
        return json.loads((out / "train_record.json").read_text()), ""
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(processes),
                "-m", "progidiff.train"]
    done = subprocess.run(launcher + args, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    return json.loads((out / "train_record.json").read_text()), done.stderr + done.stdout


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    return save_awake_tiny_model(tmp_path_factory.mktemp("ddp") / "model")


@pytest.mark.server  # two training processes, each importing MONAI: a minute, not the fast tier
def test_two_gloo_processes_follow_one_process_at_the_same_global_batch_and_write_once(model, tmp_path):
    one, _ = train(tmp_path / "one", model, 1, 40)
    two, log = train(tmp_path / "two", model, 2, 40)
    assert (one["processes"], two["processes"]) == (1, 2)
    assert len(one["losses"]) == len(two["losses"]) == 40
    first, last = (np.mean(r["losses"][:5]) for r in (one, two)), [np.mean(r["losses"][-10:]) for r in (one, two)]
    assert all(end < 0.8 * start for start, end in zip(first, last))  # both learn
    assert last[1] == pytest.approx(last[0], rel=0.3)  # and as fast: other samples, same global batch
    assert log.count("model saved to") == 1 and "on 2 processes (rank 1)" in log  # rank 1 trained, rank 0 wrote
    assert (tmp_path / "two" / "model" / "progidiff_config.json").is_file()

    resumed, log = train(tmp_path / "two", model, 2, 50)
    assert "resumed from" in log and resumed["steps"] == 50 and len(resumed["losses"]) == 10


@pytest.mark.server  # two training processes, each importing MONAI: a minute, not the fast tier
def test_the_app_trainer_under_monai_labels_multi_gpu_spawn_trains_on_two_ranks_and_rank_0_alone_reports(tmp_path):
    """What MONAI Label does with `multi_gpu` on a machine with two GPUs (BasicTrainTask.__call__): spawn
    `main_worker` twice, each calling `train(rank, 2, request, datalist)`; here on CPUs, gloo between them."""
    sys.path.insert(0, str(ROOT / "apps" / "progidiff"))
    from lib.configs.progidiff import AppSettings
    from lib.trainers.progidiff import ProGiDiffTrain
    from monailabel.tasks.train.basic_train import main_worker

    model_dir = save_awake_tiny_model(tmp_path / "model")
    settings = AppSettings.from_conf({"model_path": str(model_dir), "device": "cpu"}, model_dir)
    task = ProGiDiffTrain(model_dir, tmp_path / "runs", settings)
    labels = SAMPLE / "labels" / "final"
    datalist = [{"image": str(SAMPLE / f"{n}.nii.gz"), "label": str(labels / f"{n}.nii.gz"), "class_map": None, "id": n}
                for n in ("phantom_000", "phantom_001")]
    request = {**task._config, "max_epochs": 2, "train_batch_size": 4, "val_proposals": 1, "val_steps": 1,
               "learning_rate": 1e-3, "val_split": 0.5, "name": "two_ranks", "run_id": "20261129_000000",
               "device": "cpu", "multi_gpu": True, "gpus": "all"}
    torch.multiprocessing.spawn(main_worker, nprocs=2, args=(2, request, datalist, task))

    stats = json.loads(Path(task._stats_path).read_text())
    assert stats["processes"] == 2 and [h["epoch"] for h in stats["history"]] == [1, 2]
    assert len(list(Path(stats["tensorboard"]).glob("events.out.tfevents.*"))) == 1  # rank 0 alone logs
    assert Path(stats["candidate"], "progidiff_config.json").is_file()
    ProGiDiffModel.from_pretrained(model_dir)  # whatever was published is a whole model


def test_cpu_training_threads_follow_the_conf_or_split_the_cores_between_ranks(tmp_path):
    sys.path.insert(0, str(ROOT / "apps" / "progidiff"))
    from lib.configs.progidiff import AppSettings
    from lib.trainers.progidiff import ProGiDiffTrain

    def task(conf: dict[str, str]) -> ProGiDiffTrain:
        return ProGiDiffTrain(tmp_path, tmp_path / "runs", AppSettings.from_conf(conf, tmp_path))

    cores = torch.get_num_threads()
    assert task({}).cpu_threads(1) == 0  # one process: torch's default
    assert task({}).cpu_threads(2) == max(1, cores // 2)  # ranks share the cores, as under torchrun
    assert task({"train_threads": "1"}).cpu_threads(1) == task({"train_threads": "1"}).cpu_threads(2) == 1
    with pytest.raises(ValueError, match="train_threads"):
        task({"train_threads": "-2"})


def _train_two_steps_then_leave(rank: int, model_dir: Path, out: Path) -> None:
    """One of two gloo ranks: a real trainer (DistributedDataParallel) trains two steps and goes out of use."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{out / 'rendezvous'}", rank=rank, world_size=2)
    model = ProGiDiffModel.from_pretrained(model_dir)
    volume = load_volume_pair(SAMPLE / "phantom_000.nii.gz", SAMPLE / "labels" / "final" / "phantom_000.nii.gz",
                              spacing=model.config.spacing_mm)
    slices = SliceDataset([([volume], 1.0)], model.config.image_size, ["liver"], seed=0,
                          context_slices=model.config.context_slices)
    config = TrainConfig(max_steps=2, batch_size=4, val_every=0, checkpoint_every=0)
    trainer = DiffusionTrainer(model, prompt_encoder_for(model), slices, [], config, out / f"rank{rank}")
    trainer.fit()
    wrapper = weakref.ref(trainer.loss_of_batch)
    del trainer
    leave_process_group()
    # DDP holds the group; still alive here, it would be torn down at interpreter exit, which can abort the process
    # (SIGABRT) when the other rank is still running: 4 of 40 runs of two bare ranks without the collection.
    assert wrapper() is None, "the trainer's DistributedDataParallel outlived leave_process_group"
    assert not dist.is_initialized()


def test_leaving_the_process_group_frees_what_holds_it(model, tmp_path):
    torch.multiprocessing.spawn(_train_two_steps_then_leave, nprocs=2, args=(model, tmp_path))
