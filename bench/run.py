"""Benchmark: speed and accuracy of 3D multi-proposal inference, next to the deterministic baseline.

    .venv/bin/python bench/run.py                    # the goal table on this machine's CPU (~12 min on 2 cores)
    .venv/bin/python bench/run.py --device cuda      # the same on a GPU (bf16, larger slice batches)
    .venv/bin/python bench/run.py --details --all-organs   # and the sections below

The goal table (`goal` in the JSON, printed first): what a user waits for, from reading the file to the maps
back on its grid, for liver and for every organ (N = 5) on `abdomen_3mm` (122×101×112) and on a 512×512×300
CT at ~1 mm made from it, with the app's previous default (5 steps, independent noise per proposal, MONAI's
inverse for the way back) and today's (1 step, shared noise, separable way back) measured in the same run,
their ratio, peak memory, and the mean consensus Dice of both on held-out real CT (`ct_a` z 10-17).

Sections with `--details` (each a key of the JSON, each a panel of the PNG, each a printed table):
- levers:   ms per sample-step of one batched forward pass under each speed lever;
- batching: one batched call (slices × proposals) vs a loop of one call per slice and proposal, same slices;
- volumes:  wall time and peak memory per whole CT volume (load, screen, sample, back to the file's
            geometry), N = 1, 5, 10 for one organ at 3 mm and N = 5 resampled to 1.5 mm; N = 5 for every
            organ of the vocabulary with `--all-organs` (3 mm) or `--full` (3 mm and 1.5 mm);
- steps:    sampling steps 50/20/10/5 (and the other precision at 10) vs Dice on held-out real CT;
- accuracy: consensus / best-of-N / mean Dice and HD95 per organ of the default model beside the baseline
            (`model/baseline_ct`), on held-out real CT (`ct_a` z 10-17) and on a fresh phantom.
Real-CT sections need `--data` (default ../shared/data); without it they are skipped with a note.
Writes `bench/results/run_<device>.json` and `.png`.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import nibabel as nib  # noqa: E402
import numpy as np  # noqa: E402
import psutil  # noqa: E402
import torch  # noqa: E402
from monai import transforms as mt  # noqa: E402

from progidiff.evaluate import score_proposals  # noqa: E402
from progidiff.labels import load_class_map, to_schema  # noqa: E402
from progidiff.logs import configure_cli_logging  # noqa: E402
from progidiff.phantoms import write_sample_set  # noqa: E402
from progidiff.pipeline import ProGiDiffPipeline  # noqa: E402
from progidiff.predict import Predictor, load_volume  # noqa: E402
from progidiff.outputs import maps_in_input_geometry  # noqa: E402
from progidiff.volume import DEFAULT_SCREEN_THRESHOLD, axial_slices, segment_volume  # noqa: E402

from held_out import HELD_OUT  # noqa: E402  bench/held_out.py, beside this script

ROOT = Path(__file__).resolve().parents[1]
ORGANS = ["liver", "spleen", "kidney_left", "kidney_right", "aorta"]


# ---- measuring -----------------------------------------------------------------------------------
class Peak:
    """Peak memory while a block runs: GPU memory allocated by torch on CUDA, else the process's RSS
    (sampled every 10 ms; `mb` is the peak, `grew_mb` the growth over the start)."""

    def __init__(self, device: torch.device):
        self.device, self.mb, self.grew_mb = device, 0.0, 0.0

    @contextmanager
    def watch(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            start = torch.cuda.memory_allocated()
            yield self
            torch.cuda.synchronize()
            peak = torch.cuda.max_memory_allocated()
        else:
            process, done = psutil.Process(), threading.Event()
            start = process.memory_info().rss
            highest = [start]

            def sample():
                while not done.wait(0.01):
                    highest[0] = max(highest[0], process.memory_info().rss)

            sampler = threading.Thread(target=sample, daemon=True)
            sampler.start()
            try:
                yield self
            finally:
                done.set()
                sampler.join()
            peak = max(highest[0], process.memory_info().rss)
        self.mb, self.grew_mb = peak / 2**20, (peak - start) / 2**20


PRECISION_NAMES = {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}  # autocast dtype → name


def other_precisions(pipeline: ProGiDiffPipeline) -> list[torch.dtype | None]:
    """The precision the pipeline does not use, to measure beside it: fp32 on a GPU; on a CPU bf16 where the
    CPU computes it natively (AVX512-BF16 or AMX), else none (emulated bf16 is many times slower)."""
    if pipeline.autocast is not None:
        return [None]
    if pipeline.device.type == "cpu" and not (torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()):
        return []
    return [torch.bfloat16]


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def seconds(fn: Callable[[], object], device: torch.device, repeats: int = 1, warm_up: bool = True) -> float:
    """Mean wall time of `fn` (after one warm-up call of it unless `warm_up` is False)."""
    if warm_up:
        fn()
    synchronize(device)
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    synchronize(device)
    return (time.perf_counter() - start) / repeats


def machine(device: torch.device) -> dict:
    info = {"date": datetime.date.today().isoformat(), "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
            "cpu": platform.processor() or platform.machine(), "cpu_count": psutil.cpu_count(), "device": str(device)}
    try:
        info["cpu"] = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if "model name" in line)
    except (OSError, StopIteration):
        pass
    info["cpu_native_bf16"] = torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


# ---- data --------------------------------------------------------------------------------------
def held_out_ct(data: Path, spacing: float) -> tuple[torch.Tensor, np.ndarray, tuple[float, ...]]:
    """ct_a's held-out slices in the model frame: (image [X, Y, Z], schema label, voxel spacing)."""
    label_path = data / "ct_a" / "label.nii.gz"
    loaded = load_volume(data / "ct_a" / "image.nii.gz", spacing, label=label_path)
    label = to_schema(np.asarray(loaded.data["label"][0]).astype(np.int64), load_class_map("total", label_path))
    return loaded.image[0, :, :, HELD_OUT].as_tensor(), label[:, :, HELD_OUT], loaded.voxel_spacing


def resampled_copy(path: Path, spacing_mm: float, out: Path) -> Path:
    """`path` resampled to `spacing_mm` isotropic with MONAI (the finer-slice volume of the speed cases)."""
    data = mt.Compose([mt.LoadImaged("image"), mt.EnsureChannelFirstd("image"),
                       mt.Spacingd("image", pixdim=(spacing_mm,) * 3, mode="bilinear")])({"image": str(path)})
    image = data["image"]
    nib.save(nib.Nifti1Image(np.asarray(image[0], dtype=np.int16), np.asarray(image.affine)), out)
    return out


def resized_copy(path: Path, shape: tuple[int, int, int], out: Path) -> Path:
    """`path` resampled onto a grid of `shape` covering the same extent (the large-CT speed case)."""
    image = nib.load(path)
    data = mt.Compose([mt.LoadImaged("image"), mt.EnsureChannelFirstd("image"),
                       mt.Resized("image", shape, mode="trilinear")])({"image": str(path)})
    affine = image.affine.copy()
    affine[:3, :3] = affine[:3, :3] * (np.array(image.shape[:3]) / np.array(shape))
    nib.save(nib.Nifti1Image(np.asarray(data["image"][0]).astype(np.int16), affine), out)
    return out


# ---- the goal table ------------------------------------------------------------------------------
@dataclass(frozen=True)
class Setting:
    name: str
    steps: int
    noise: str
    separable: bool


PREVIOUS = Setting("previous default", steps=5, noise="independent", separable=False)
NOW = Setting("now", steps=1, noise="shared", separable=True)
TARGETS = {  # seconds on 2 CPU cores / on a GPU, from the speed issue
    "abdomen_3mm, liver": (15, 1), "abdomen_3mm, every organ": (60, 5),
    "512×512×300, liver": (30, 1), "512×512×300, every organ": (120, 5),
}
LARGE_PEAK_GB = 4.0  # the 512×512×300 cases on the CPU


def goal(model_dir: Path, device: torch.device, slice_batch: int, volume: Path, large: Path,
         held_out: tuple | None, previous_everything: bool, save: Callable[[str], None], result: dict) -> None:
    """Fill `result["goal"]` case by case, both settings, saving as it goes."""
    result["goal"] = {"cases": {}, "dice": {}}
    peak = Peak(device)
    for setting in (NOW, PREVIOUS):
        pipeline = ProGiDiffPipeline.from_pretrained(model_dir, device=device, show_progress=False,
                                                     proposal_noise=setting.noise)
        vocabulary = list(pipeline.model.config.organs)
        cases = {"abdomen_3mm, liver": (volume, ["liver"]), "abdomen_3mm, every organ": (volume, vocabulary),
                 "512×512×300, liver": (large, ["liver"]), "512×512×300, every organ": (large, vocabulary)}
        for name, (path, organs) in cases.items():
            if setting is PREVIOUS and name == "512×512×300, every organ" and not previous_everything:
                continue
            print(f"{setting.name}: {name} ...", flush=True)
            measured = volume_case(pipeline, path, organs, 5, setting.steps, slice_batch, peak, setting.separable)
            result["goal"]["cases"].setdefault(name, {})[setting.name] = measured
            save(f"{setting.name}: {name}")
        if held_out is not None:
            image, label, spacing = held_out
            proposals = segment_volume(pipeline, image, ORGANS, 5, setting.steps, 0, slice_batch=slice_batch,
                                       screen_threshold=DEFAULT_SCREEN_THRESHOLD)
            result["goal"]["dice"][setting.name] = {o: s["dice_consensus"]
                                                    for o, s in score_proposals(proposals, label, spacing).items()}
            save(f"{setting.name}: Dice")


def goal_report(result: dict, gpu: bool) -> str:
    rows = []
    for name, measured in result["goal"]["cases"].items():
        now, before = measured.get(NOW.name), measured.get(PREVIOUS.name)
        target = TARGETS[name][1 if gpu else 0]
        peak = f"{now['peak_mb'] / 1024:.2f}" if now else "–"
        met = "yes" if now and now["seconds"] <= target else "no"
        if now and not gpu and name.startswith("512") and now["peak_mb"] / 1024 > LARGE_PEAK_GB:
            met += f" (peak over {LARGE_PEAK_GB:g} GiB)"
        rows.append([name, f"{before['seconds']:.1f}" if before else "not run", f"{now['seconds']:.1f}" if now else "–",
                     f"{before['seconds'] / now['seconds']:.1f}×" if before and now else "–", f"≤ {target}", met,
                     peak, f"{now['read_s']:.1f} / {now['sample_s']:.1f} / {now['output_s']:.1f}" if now else "–"])
    parts = [table(["case (N = 5)", f"{PREVIOUS.name} s", f"{NOW.name} s", "speed-up", "target s", "met",
                    "peak GiB (now)", "read / sample / way back s (now)"], rows)]
    dice = result["goal"]["dice"]
    if dice:
        organs = list(next(iter(dice.values())))
        mean = {k: float(np.mean(list(v.values()))) for k, v in dice.items()}
        rows = [[o, *(f"{dice[k][o]:.4f}" for k in dice), f"{100 * (dice[NOW.name][o] - dice[PREVIOUS.name][o]):+.2f}"]
                for o in organs if PREVIOUS.name in dice and NOW.name in dice]
        rows.append(["mean", *(f"{mean[k]:.4f}" for k in dice),
                     f"{100 * (mean[NOW.name] - mean[PREVIOUS.name]):+.2f}" if len(dice) == 2 else "–"])
        parts.append(table(["ct_a held-out z 10-17, consensus Dice (N = 5)", *dice, "Δ points"], rows))
    return "\n\n".join(parts)


# ---- sections ----------------------------------------------------------------------------------
def levers(pipeline: ProGiDiffPipeline, slices: torch.Tensor, n: int, compile_model: bool) -> list[dict]:
    """ms per sample-step of one forward pass over slices × n proposals (one organ), lever by lever."""
    model, device = pipeline.model, pipeline.device
    batch = slices.shape[0] * n
    condition = pipeline.prepare_condition(slices).repeat(n, 1, 1, 1)
    text = pipeline.encode_prompt(["liver"]).repeat(batch, 1, 1)
    noisy = torch.randn(batch, model.mask_channels, model.working_size, model.working_size, device=device)
    t = torch.full((batch,), 500, device=device)
    organ = torch.zeros(batch, dtype=torch.long, device=device)

    def forward(dtype: torch.dtype | None, cached: bool = True) -> Callable[[], object]:
        """One forward pass at `dtype` (None: fp32), the slices' features computed before (cached) or inside."""
        with torch.inference_mode(), torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            features = model.scan_encoder.features(condition[: slices.shape[0]]).repeat(n, 1, 1, 1)

        def run():
            with torch.inference_mode(), torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
                if cached:
                    return model(noisy, t, text, None, organ, features=features)
                return model(noisy, t, text, condition, organ)
        return run

    default = pipeline.autocast
    name = PRECISION_NAMES
    rows = [("scan encoder every step (before)", forward(default, cached=False)),
            (f"scan encoder once per slice ({name[default]})", forward(default))]
    rows += [(f"once per slice, {name[other]}", forward(other)) for other in other_precisions(pipeline)]
    results = []
    for label, fn in rows:
        results.append({"lever": label, "batch": batch, "ms_per_sample_step": seconds(fn, device, 3) / batch * 1e3})
    model.to(memory_format=torch.channels_last)
    results.append({"lever": f"once per slice, {name[default]}, channels_last", "batch": batch,
                    "ms_per_sample_step": seconds(forward(default), device, 3) / batch * 1e3})
    model.to(memory_format=torch.contiguous_format)
    if compile_model:
        original = model.unet.forward, model.controlnet.forward
        model.unet.forward, model.controlnet.forward = torch.compile(model.unet.forward), torch.compile(model.controlnet.forward)
        start = time.perf_counter()
        forward(default)()
        warm = time.perf_counter() - start
        results.append({"lever": f"once per slice, {name[default]}, torch.compile", "batch": batch, "compile_s": warm,
                        "ms_per_sample_step": seconds(forward(default), device, 3) / batch * 1e3})
        model.unet.forward, model.controlnet.forward = original
    return results


def batching(pipeline: ProGiDiffPipeline, slices: torch.Tensor, n: int, steps: int) -> dict:
    """The same slices × proposals sampled in one call vs one call per (slice, proposal)."""
    indices = list(range(slices.shape[0]))
    pipeline(slices[:1], ["liver"], 1, 1, 0)  # warm-up, small: the calls below are long
    batched = seconds(lambda: pipeline(slices, ["liver"], n, steps, 0), pipeline.device,
                      warm_up=False)

    def loop():
        for i in indices:
            for k in range(n):
                pipeline(slices[i : i + 1], ["liver"], 1, steps, k)

    looped = seconds(loop, pipeline.device, warm_up=False)
    return {"slices": len(indices), "proposals": n, "steps": steps, "batched_s": batched, "loop_s": looped,
            "speedup": looped / batched}


def volume_case(pipeline: ProGiDiffPipeline, path: Path, organs: list[str], n: int, steps: int, slice_batch: int,
                peak: Peak, separable: bool = True) -> dict:
    """What a user waits for: read and resample, screen and sample, consensus, proposals and maps back in the
    file's geometry."""
    start = time.perf_counter()
    with peak.watch():
        loaded = load_volume(path, pipeline.model.config.spacing_mm)
        read = time.perf_counter() - start
        proposals = segment_volume(pipeline, loaded.image[0], organs, n, steps, 0, slice_batch=slice_batch,
                                   screen_threshold=DEFAULT_SCREEN_THRESHOLD)
        sampled = time.perf_counter() - start - read
        maps = maps_in_input_geometry(proposals, loaded.image, loaded.transform, separable_if_possible=separable)
        synchronize(pipeline.device)
    total = time.perf_counter() - start
    z = loaded.image.shape[-1]
    return {"volume": path.name, "shape": [int(v) for v in loaded.data["image"].meta["spatial_shape"]], "model_slices": z,
            "organs": len(organs), "proposals": n, "steps": steps, "seconds": total, "read_s": read,
            "sample_s": sampled, "output_s": total - read - sampled, "peak_mb": peak.mb, "peak_growth_mb": peak.grew_mb,
            "slice_organs_sampled": int((proposals.probabilities[0].flatten(1, 2).amax(1) > 0).sum()),
            "slice_organs": z * len(organs), "foreground_voxels": int((maps.consensus > 0).sum())}


def steps_vs_dice(pipeline: ProGiDiffPipeline, image: torch.Tensor, label: np.ndarray, spacing, n: int,
                  step_counts: list[int], slice_batch: int) -> list[dict]:
    rows = []
    precisions = [(s, pipeline.autocast) for s in step_counts] + [(10, other) for other in other_precisions(pipeline)]
    default = pipeline.autocast
    for steps, dtype in precisions:
        pipeline.autocast = dtype
        start = time.perf_counter()
        proposals = segment_volume(pipeline, image, ORGANS, n, steps, 0, slice_batch=slice_batch,
                                   screen_threshold=DEFAULT_SCREEN_THRESHOLD)
        elapsed = time.perf_counter() - start
        scores = score_proposals(proposals, label, spacing)
        rows.append({"steps": steps, "precision": PRECISION_NAMES[dtype],
                     "seconds": elapsed, "organs": scores,
                     "mean_dice_consensus": float(np.mean([s["dice_consensus"] for s in scores.values()])),
                     "mean_dice_best": float(np.mean([s["dice_best"] for s in scores.values()]))})
    pipeline.autocast = default
    return rows


def accuracy(model_dir: Path, baseline_dir: Path, cases: list[tuple[str, torch.Tensor, np.ndarray, tuple]], n: int,
             steps: int, device: str, slice_batch: int) -> list[dict]:
    rows = []
    for kind, folder in (("ProGiDiff", model_dir), ("baseline", baseline_dir)):
        predictor = Predictor(folder, device=device, screen_threshold=DEFAULT_SCREEN_THRESHOLD, slice_batch=slice_batch)
        for name, image, label, spacing in cases:
            start = time.perf_counter()
            proposals = predictor.segment(image, ORGANS, n, steps, 0)
            elapsed = time.perf_counter() - start
            rows.append({"case": name, "model": kind, "seconds": elapsed,
                         "organs": score_proposals(proposals, label, spacing)})
    return rows


# ---- report ------------------------------------------------------------------------------------
def table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def report(result: dict) -> str:
    parts = [f"machine: {json.dumps(result['machine'])}"]
    parts.append(table(["lever", "batch", "ms / sample-step"],
                       [[r["lever"], r["batch"], f"{r['ms_per_sample_step']:.2f}"] for r in result["levers"]]))
    b = result["batching"]
    parts.append(table(["slices × proposals", "steps", "batched s", "per-proposal loop s", "speed-up"],
                       [[f"{b['slices']} × {b['proposals']}", b["steps"], f"{b['batched_s']:.2f}", f"{b['loop_s']:.2f}",
                         f"{b['speedup']:.1f}×"]]))
    parts.append(table(["volume", "model slices", "organs", "N", "s", "read / sample / output s", "peak MB",
                        "slice-organs sampled"],
                       [[v["volume"], v["model_slices"], v["organs"], v["proposals"], f"{v['seconds']:.1f}",
                         f"{v['read_s']:.1f} / {v['sample_s']:.1f} / {v['output_s']:.1f}", f"{v['peak_mb']:.0f}",
                         f"{v['slice_organs_sampled']} of {v['slice_organs']}"] for v in result["volumes"]]))
    if result.get("steps"):
        parts.append(table(["steps", "precision", "s", "mean Dice consensus", "mean Dice best-of-N"],
                           [[r["steps"], r["precision"], f"{r['seconds']:.1f}", f"{r['mean_dice_consensus']:.4f}",
                             f"{r['mean_dice_best']:.4f}"] for r in result["steps"]]))
    rows = []
    for r in result.get("accuracy", []):
        for organ, s in r["organs"].items():
            rows.append([r["case"], r["model"], organ, f"{s['dice_consensus']:.3f}", f"{s['dice_best']:.3f}",
                         f"{s['dice_mean']:.3f}", s["hd95_consensus"] if s["hd95_consensus"] is not None else "–"])
    if rows:
        parts.append(table(["case", "model", "organ", "Dice consensus", "Dice best-of-N", "Dice mean", "HD95 mm"], rows))
    return "\n\n".join(parts)


def plot(result: dict, out: Path) -> None:
    fig, axes = plt.subplots(2, 2, figsize=(13, 9))
    ax = axes[0, 0]
    ax.barh([r["lever"] for r in result["levers"]], [r["ms_per_sample_step"] for r in result["levers"]])
    ax.set_xlabel("ms per sample-step")
    ax.set_title("speed levers (one forward pass)")
    ax = axes[0, 1]
    labels = [f"{v['volume'][:14]} {v['organs']} org N={v['proposals']}" for v in result["volumes"]]
    ax.barh(labels, [v["seconds"] for v in result["volumes"]])
    ax.set_xlabel("seconds per volume")
    ax.set_title(f"whole volumes ({result['machine']['device']})")
    ax = axes[1, 0]
    fp = [r for r in result.get("steps", []) if r["precision"] == result["steps"][0]["precision"]]
    if fp:
        ax.plot([r["steps"] for r in fp], [r["mean_dice_consensus"] for r in fp], "o-", label="consensus")
        ax.plot([r["steps"] for r in fp], [r["mean_dice_best"] for r in fp], "s--", label="best-of-N")
        ax.set_xscale("log")
        ax.set_xticks([r["steps"] for r in fp], [str(r["steps"]) for r in fp])
        middle = float(np.mean([r["mean_dice_consensus"] for r in fp]))
        ax.set_ylim(middle - 0.02, middle + 0.02)  # ± 2 Dice points: the 1-point criterion is visible
        ax.legend()
    ax.set_xlabel("sampling steps")
    ax.set_ylabel("mean Dice (held-out real CT)")
    ax.set_title("steps vs Dice")
    ax = axes[1, 1]
    accuracy_rows = result.get("accuracy", [])
    for i, r in enumerate(accuracy_rows):
        organs = list(r["organs"])
        x = np.arange(len(organs)) + i * 0.8 / max(1, len(accuracy_rows))
        ax.bar(x, [r["organs"][o]["dice_consensus"] for o in organs], width=0.8 / max(1, len(accuracy_rows)),
               label=f"{r['model']}: {r['case'][:22]}")
        ax.set_xticks(np.arange(len(organs)) + 0.3, organs, rotation=20)
    ax.set_ylim(0, 1)
    ax.set_ylabel("consensus Dice")
    ax.legend(fontsize=7)
    ax.set_title("accuracy beside the baseline")
    fig.tight_layout()
    fig.savefig(out, dpi=90)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, default=ROOT / "model" / "progidiff_ct")
    p.add_argument("--baseline", type=Path, default=ROOT / "model" / "baseline_ct")
    p.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument("--slice-batch", type=int, default=0, help="slices per sampling call (0: 8 on CPU, 64 on a GPU)")
    p.add_argument("--details", action="store_true", help="also the levers, batching, steps, accuracy and volume "
                   "sections below the goal table (~11 min more on 2 CPU cores)")
    p.add_argument("--previous-everything", action="store_true", help="also every organ of the 512×512×300 case "
                   "with the previous default (tens of minutes on a CPU)")
    p.add_argument("--steps", type=int, default=1, help="sampling steps of the detail sections (the app's default)")
    p.add_argument("--step-counts", default="50,20,10,5")
    p.add_argument("--step-proposals", type=int, default=2, help="proposals in the steps-vs-Dice section")
    p.add_argument("--all-organs", action="store_true", help="also every organ of the vocabulary at 3 mm "
                   "(13 min on 2 CPU cores)")
    p.add_argument("--full", action="store_true", help="every organ at 3 mm and at 1.5 mm (long on a CPU)")
    p.add_argument("--compile", action="store_true", help="also measure torch.compile (minutes of compiling)")
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    configure_cli_logging()

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    slice_batch = args.slice_batch or (64 if device.type == "cuda" else 8)
    out = args.out or ROOT / "bench" / "results" / f"run_{device.type}.json"
    start = time.perf_counter()
    pipeline = ProGiDiffPipeline.from_pretrained(args.model, device=device, show_progress=False)
    command = "bench/run.py " + " ".join(sys.argv[1:] if argv is None else argv)
    result: dict = {"machine": machine(device), "command": command, "slice_batch": slice_batch, "notes": []}
    has_data = (args.data / "ct_a").is_dir() and (args.data / "ct_unlabelled").is_dir()
    if has_data:
        image, label, spacing = held_out_ct(args.data, pipeline.model.config.spacing_mm)
        slices = axial_slices(image, pipeline.model.config.context_slices)
    else:
        result["notes"].append(f"{args.data} not found: the real-CT sections were skipped; volumes are phantoms")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        write_sample_set(tmp, count=1, seed=9000, mr_count=0)
        phantom_path = tmp / "ct" / "phantom_9000.nii.gz"
        phantom = load_volume(phantom_path, pipeline.model.config.spacing_mm,
                              label=tmp / "ct" / "labels" / "final" / "phantom_9000.nii.gz")
        phantom_case = ("fresh phantom seed 9000", phantom.image[0].as_tensor(),
                        np.asarray(phantom.data["label"][0]).astype(np.int64), phantom.voxel_spacing)
        if not has_data:
            slices = axial_slices(phantom_case[1], pipeline.model.config.context_slices)[10:18]
        sections_start = time.perf_counter()

        def save(section: str) -> None:
            """Write what is measured so far (a long run that is stopped keeps its finished sections)."""
            print(f"  {section} done at {time.perf_counter() - sections_start:.0f} s", flush=True)
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(json.dumps(result, indent=2))

        volume = args.data / "ct_unlabelled" / "abdomen_3mm.nii.gz" if has_data else phantom_path
        large = resized_copy(volume, (512, 512, 300), tmp / "abdomen_512x512x300.nii.gz")
        goal(args.model, device, slice_batch, volume, large, (image, label, spacing) if has_data else None,
             args.previous_everything, save, result)
        print(goal_report(result, device.type == "cuda"), flush=True)
        if not args.details:
            result["seconds"] = time.perf_counter() - start
            out.write_text(json.dumps(result, indent=2))
            print(f"\n{result['seconds']:.0f} s in all; {out}")
            return result

        print("levers ...", flush=True)
        result["levers"] = levers(pipeline, slices, 5, args.compile)
        save("levers")
        print("batching ...", flush=True)
        result["batching"] = batching(pipeline, slices, 5, args.steps)
        save("batching")
        if has_data:
            print("steps vs Dice ...", flush=True)
            counts = [int(s) for s in args.step_counts.split(",")]
            result["steps"] = steps_vs_dice(pipeline, image, label, spacing, args.step_proposals, counts, slice_batch)
            save("steps")
        print("accuracy ...", flush=True)
        cases = ([("ct_a held-out z 10-17 (real CT)", image, label, spacing)] if has_data else []) + [phantom_case]
        result["accuracy"] = accuracy(args.model, args.baseline, cases, 5, args.steps, args.device, slice_batch)
        save("accuracy")

        fine = resampled_copy(volume, 1.5, tmp / "abdomen_1p5mm.nii.gz")
        vocabulary = list(pipeline.model.config.organs)
        cases = [(volume, ["liver"], 1), (volume, ["liver"], 5), (volume, ["liver"], 10), (fine, ["liver"], 5)]
        cases += [(volume, vocabulary, 5)] if args.all_organs or args.full else []
        cases += [(fine, vocabulary, 5)] if args.full else []
        peak = Peak(device)
        result["volumes"] = []
        for path, organs, n in cases:
            print(f"volume {path.name}: {len(organs)} organ(s), N={n} ...", flush=True)
            result["volumes"].append(volume_case(pipeline, path, organs, n, args.steps, slice_batch, peak))
            save(f"volume {path.name} {len(organs)} organ(s) N={n}")
    result["seconds"] = time.perf_counter() - start
    out.write_text(json.dumps(result, indent=2))
    plot(result, out.with_suffix(".png"))
    print(goal_report(result, device.type == "cuda") + "\n\n" + report(result))
    print(f"\n{result['seconds']:.0f} s in all; {out} and {out.with_suffix('.png')}")
    return result


if __name__ == "__main__":
    main()
