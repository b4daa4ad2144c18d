"""`python -m progidiff.batch`: segment every study of a folder (an archive exported to disk), resumable, on one
or several devices.

    python -m progidiff.batch --model model/progidiff_ct --images /data/studies --out /data/results \\
        --prompt "liver, spleen" --devices cuda:0,cuda:1

A study is a NIfTI/NRRD file or a DICOM series folder directly inside `--images`.  Each gets `<out>/<study>/`
as `progidiff.segment` writes it (consensus, proposals, uncertainty, montages, and `summary.json` last, so a
folder with a summary is complete).  Resumable: a study whose summary was made by the same model (a hash of
its files) with the same options is skipped (`--force` redoes it), so a stopped or killed run picks up where
it stopped.  `--devices`: one worker process per entry, each with its own model copy, the studies dealt
round-robin (they need no communication): `cuda:0,cuda:1` shares them over two GPUs, `cpu,cpu` runs two CPU
workers with half the cores each.  One log line per study; a study that cannot be read is reported in
`<out>/batch.json` and the run goes on.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import multiprocessing as mp
import time
from pathlib import Path

import torch

from .io_utils import atomic_file
from .logs import configure_cli_logging
from .prompts import UnknownPromptError, parse_prompt
from .segment import add_sampling_options, predictor_for, segment_study

logger = logging.getLogger("progidiff.batch")

IMAGE_SUFFIXES = (".nii", ".nii.gz", ".nrrd", ".seg.nrrd", ".mha")
SUMMARY = "summary.json"


def find_studies(folder: Path) -> dict[str, Path]:
    """Study name → path: image files and series folders directly in `folder`, in name order."""
    studies = {}
    for path in sorted(folder.iterdir()):
        name = path.name
        if path.is_dir() and any(p.is_file() for p in path.iterdir()):
            studies[name] = path
        elif path.is_file() and name.endswith(IMAGE_SUFFIXES):
            studies[name.split(".")[0]] = path
    return studies


def model_fingerprint(model_dir: Path) -> str:
    """A hash of every file of the model folder: another model or a re-trained one is another fingerprint."""
    digest = hashlib.sha256()
    for path in sorted(p for p in model_dir.rglob("*") if p.is_file()):
        digest.update(str(path.relative_to(model_dir)).encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


def signature(args: argparse.Namespace) -> dict:
    """What a study's results depend on: the model and every sampling option."""
    return {"model_fingerprint": model_fingerprint(args.model), "prompt": args.prompt, "proposals": args.proposals,
            "steps": args.steps, "seed": args.seed, "scheduler": args.scheduler, "spread": args.spread,
            "screen_threshold": args.screen_threshold}


def is_done(out: Path, wanted: dict) -> bool:
    try:
        made = json.loads((out / SUMMARY).read_text()).get("batch", {})
    except (OSError, ValueError):
        return False
    return all(made.get(key) == value for key, value in wanted.items())


def work(device: str, threads: int, studies: list[tuple[str, str]], args: argparse.Namespace, wanted: dict,
         total: int) -> list[dict]:
    """One worker: its own model copy on `device`, its share of the studies, one record per study."""
    configure_cli_logging()
    if device == "cpu":
        torch.set_num_threads(threads)
    predictor = predictor_for(args, device)
    records = []
    for position, (name, path) in studies:
        started = time.time()
        try:
            summary = segment_study(predictor, args, Path(path), args.out / name, extra={"batch": wanted})
            records.append({"study": name, "status": "done", "device": device, "seconds": summary["seconds"]})
        except (ValueError, OSError) as error:  # the study's fault (unreadable, not one series): say so, go on
            records.append({"study": name, "status": "failed", "device": device, "error": str(error)})
        logger.info("%d/%d %s => %s: %s (%.1f s)", position, total, name, device, records[-1]["status"],
                    time.time() - started)
    return records


def run(args: argparse.Namespace) -> dict:
    studies = find_studies(args.images)
    wanted = signature(args)
    todo = [(name, str(path)) for name, path in studies.items() if args.force or not is_done(args.out / name, wanted)]
    skipped = [name for name in studies if name not in dict(todo)]
    devices = [d.strip() for d in args.devices.split(",") if d.strip()]
    logger.info("batch: %d studies, %d already done with this model and these options, %d to do on %s",
                len(studies), len(skipped), len(todo), ", ".join(devices))
    numbered = list(enumerate(todo, start=len(skipped) + 1))
    shares = [numbered[i::len(devices)] for i in range(len(devices))]
    cpu_workers = max(1, sum(d == "cpu" for d in devices))
    threads = max(1, (args.threads or torch.get_num_threads()) // cpu_workers)
    jobs = [(device, threads, share, args, wanted, len(studies)) for device, share in zip(devices, shares) if share]
    started = time.time()
    if len(jobs) <= 1:
        records = [r for job in jobs for r in work(*job)]
    else:
        with mp.get_context("spawn").Pool(len(jobs)) as pool:
            records = [r for share in pool.starmap(work, jobs) for r in share]
    records += [{"study": name, "status": "skipped"} for name in skipped]
    report = {"signature": wanted, "devices": devices, "seconds": round(time.time() - started, 1),
              "studies": sorted(records, key=lambda r: r["study"])}
    args.out.mkdir(parents=True, exist_ok=True)
    with atomic_file(args.out / "batch.json", suffix=".json") as tmp:
        Path(tmp).write_text(json.dumps(report, indent=2))
    counts = {s: sum(r["status"] == s for r in records) for s in ("done", "skipped", "failed")}
    logger.info("batch finished in %.1f s: %s", report["seconds"], counts)
    return report


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_sampling_options(p)
    p.add_argument("--prompt", required=True)
    p.add_argument("--images", type=Path, required=True, help="folder of NIfTI/NRRD files and DICOM series folders")
    p.add_argument("--out", type=Path, required=True, help="one result folder per study, and batch.json")
    p.add_argument("--devices", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="comma list, one worker each: cpu, cuda, cuda:1 (default: cuda when present, else cpu)")
    p.add_argument("--threads", type=int, default=0, help="CPU threads shared by the CPU workers (0: torch default)")
    p.add_argument("--force", action="store_true", help="redo studies already done with this model and options")
    return p


def main(argv: list[str] | None = None) -> dict:
    configure_cli_logging()
    args = build_parser().parse_args(argv)
    if not args.images.is_dir():
        raise SystemExit(f"--images {args.images} is not a folder")
    try:
        parse_prompt(args.prompt)
    except UnknownPromptError as error:
        raise SystemExit(str(error)) from error
    report = run(args)
    print(json.dumps({s: sum(r["status"] == s for r in report["studies"]) for s in ("done", "skipped", "failed")}))
    return report


if __name__ == "__main__":
    main()
