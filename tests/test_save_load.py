import multiprocessing
import os
import random
import time

import pytest
import torch

from conftest import assert_same_proposals, tiny_config, wake_control_branch
from progidiff import lora
from progidiff.io_utils import atomic_file, published_folders, recover_directories
from progidiff.model import ProGiDiffModel
from progidiff.pipeline import ProGiDiffPipeline
from publish_forever import MARKED, main as publish_forever


def test_round_trip_gives_identical_proposals(small_model, minilm, tmp_path):
    wake_control_branch(small_model)
    small_model.config.organs = ["liver", "spleen"]
    small_model.save_pretrained(tmp_path / "model")
    loaded = ProGiDiffModel.from_pretrained(tmp_path / "model")
    assert loaded.config == small_model.config
    images = torch.randn(2, 1, 32, 32, generator=torch.Generator().manual_seed(0)) * 300
    before = ProGiDiffPipeline(small_model, minilm, show_progress=False)(images, ["liver"], 2, 3, seed=4)
    after = ProGiDiffPipeline.from_pretrained(tmp_path / "model", show_progress=False)(images, ["liver"], 2, 3, seed=4)
    assert_same_proposals(before.probabilities, after.probabilities)
    assert (tmp_path / "model" / "controlnet" / "diffusion_pytorch_model.safetensors").is_file()
    assert (tmp_path / "model" / "unet" / "diffusion_pytorch_model.safetensors").is_file()


def test_failed_save_keeps_the_previous_model(small_model, tmp_path, monkeypatch):
    small_model.save_pretrained(tmp_path / "model")
    reference = ProGiDiffModel.from_pretrained(tmp_path / "model").state_dict()

    def crash(*args, **kwargs):
        raise OSError("disk full")

    wake_control_branch(small_model)
    monkeypatch.setattr(small_model.unet, "save_pretrained", crash)
    with pytest.raises(OSError, match="disk full"):
        small_model.save_pretrained(tmp_path / "model")
    survivor = ProGiDiffModel.from_pretrained(tmp_path / "model").state_dict()
    assert all(torch.equal(reference[k], survivor[k]) for k in reference)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]  # no temporary folders left behind


def test_published_models_and_files_get_the_modes_of_any_other_file(small_model, tmp_path):
    """Temp files and folders are private (0600/0700); what they publish must be readable like any file."""
    umask = os.umask(0o022)
    os.umask(umask)
    small_model.save_pretrained(tmp_path / "model")
    with atomic_file(tmp_path / "label.nii.gz") as tmp:
        tmp.write_bytes(b"label")
    weights = tmp_path / "model" / "unet" / "diffusion_pytorch_model.safetensors"
    assert (tmp_path / "model").stat().st_mode & 0o777 == 0o777 & ~umask
    assert weights.stat().st_mode & 0o777 == 0o666 & ~umask
    assert (tmp_path / "label.nii.gz").stat().st_mode & 0o777 == 0o666 & ~umask


def test_loading_a_non_model_folder_says_what_is_missing(tmp_path):
    with pytest.raises(FileNotFoundError, match="progidiff_config.json"):
        ProGiDiffModel.from_pretrained(tmp_path)


def test_a_publish_killed_between_renames_is_recovered(small_model, tmp_path):
    small_model.save_pretrained(tmp_path / "model")
    (tmp_path / "model").rename(tmp_path / ".model.old")  # the state right after the first rename
    assert ProGiDiffModel.from_pretrained(tmp_path / "model").config == small_model.config


def _marker_versions(model: ProGiDiffModel) -> set[float]:
    state = model.state_dict()
    return {float(state[name].unique().item()) for name in MARKED}


@pytest.mark.server  # a loop of real processes killed at random: tens of seconds, not the fast tier
def test_sigkill_during_publishes_always_leaves_one_complete_version(tmp_path):
    """A real process publishing model and adapter in a loop is SIGKILLed at random moments; after each kill
    (and the start-up recovery the server does) both load, and the model is one version, never a mix.
    The publishers fork from a forkserver that imported their dependencies once (a fresh interpreter per kill
    costs ~20 s)."""
    context = multiprocessing.get_context("forkserver")
    # What the publisher imports that takes long (installed, so importable before the forkserver has the tests'
    # sys.path; the publisher's own module is imported in each child, cheaply).
    context.set_forkserver_preload(["progidiff.lora", "progidiff.model"])
    rng = random.Random(0)
    left_mid_write = 0
    for _ in range(4):
        ready = context.Event()
        process = context.Process(target=publish_forever, args=(tmp_path, ready.set))
        process.start()
        assert ready.wait(timeout=300), "the publisher did not write its first version"
        time.sleep(rng.uniform(0.3, 1.5))
        process.kill()  # SIGKILL
        process.join()
        left_mid_write += any(p.name.startswith((".model.", ".mr.")) for p in tmp_path.rglob(".*"))

        recover_directories(tmp_path / "adapters")  # what the server does at start-up
        model = ProGiDiffModel.from_pretrained(tmp_path / "model")
        versions = _marker_versions(model)
        assert len(versions) == 1 and min(versions) >= 1, f"a mix of versions {versions}"
        assert [f.name for f in published_folders(tmp_path / "adapters", lora.ADAPTER_CONFIG)] == ["mr"]
        fresh = ProGiDiffModel.from_config(tiny_config())
        lora.load_adapter(fresh, tmp_path / "adapters" / "mr", "mr")
        adapter_values = {float(p.unique().item()) for n, p in fresh.named_parameters() if "lora_B" in n}
        assert len(adapter_values) == 1 and min(adapter_values) >= 1
    assert left_mid_write, "no kill landed in the middle of a publish: the test did not exercise the fault"


def test_adapter_listing_skips_the_folders_a_publish_works_in(tmp_path):
    for name in ("mr", ".mr.new-abc", ".mr.old"):
        (tmp_path / name).mkdir()
        (tmp_path / name / lora.ADAPTER_CONFIG).write_text("{}")
    assert published_folders(tmp_path, lora.ADAPTER_CONFIG) == [tmp_path / "mr"]
    (tmp_path / "mr").rename(tmp_path / "gone")
    (tmp_path / "gone" / lora.ADAPTER_CONFIG).unlink()
    recover_directories(tmp_path)  # "mr" was renamed aside and never replaced: the old one comes back
    assert published_folders(tmp_path, lora.ADAPTER_CONFIG) == [tmp_path / "mr"]
