"""Fuzz benchmark: several hundred hostile or careless requests against a real server, and what became of them.

Families: infer `params` (not JSON, wrong types, out of range, MONAI Label's own keys), image ids and paths
(traversal, encodings, absolute paths, viewers' names), crafted files sent as an infer upload, an image
upload and a label (decompression bombs and lying headers, truncated, random bytes, 2D/4D, NaN, implausible
voxels), labels that are no label maps, scoring / active-learning / training options, unknown things, and
concurrent valid infers beside all that; then kills during writes (label saves and image removals from two
clients, the server SIGKILLed at a random moment, restarted, held to what it acknowledged). Prints and saves
counts: answers 4xx with a message, 5xx, hangs (no answer in 60 s), server crashes, data lost (fingerprint of
every image and label that was there before; acknowledged saves or removals a restart lost), junk accepted
(2xx for a request that should have been refused), peak RSS of the server's process tree.

    .venv/bin/python bench/fuzz.py --out bench/results/fuzz.json

It starts its own server (the default model, a temporary copy of the sample studies, `max_memory_gb` 4) on
loopback, and stops it. Bounded: one pass over the generated cases, 4 client threads.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import io
import json
import random
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import nibabel as nib
import numpy as np
import psutil
import requests

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
from server import Server, WritesUntilKilled, copy_studies  # noqa: E402  (the tests' real-server launcher)

SAMPLE = ROOT / "sample-datasets" / "ct"
HANG_SECONDS = 60
Case = tuple[str, str, str, dict, str]  # family, method, path, requests kwargs, expectation: "refused" | "any"


def nifti(data: np.ndarray, affine: np.ndarray | None = None) -> bytes:
    return gzip.compress(nib.Nifti1Image(data, np.diag([3.0, 3.0, 3.0, 1.0]) if affine is None else affine).to_bytes())


def lying_nifti(shape: tuple[int, ...], zooms: tuple[float, ...] = (1.0, 1.0, 1.0), dtype=np.int16) -> bytes:
    header = nib.Nifti1Header()
    header.set_data_dtype(dtype)
    header.set_data_shape(shape)
    header.set_zooms(zooms[: len(shape)])
    header["vox_offset"] = 352
    return gzip.compress(header.binaryblock + b"\0" * 4 + b"\0" * 4096)


def crafted_files(rng: random.Random) -> dict[str, bytes]:
    """Files no server should read to the end (or at all)."""
    image = (SAMPLE / "phantom_000.nii.gz").read_bytes()
    nan = np.full((40, 40, 10), 40.0, np.float32)
    nan[3, 3, 3] = np.nan
    return {
        "bomb_1e9": lying_nifti((1000, 1000, 1000)),
        "bomb_1e10": lying_nifti((3000, 3000, 1200)),
        "bomb_93_bytes": lying_nifti((1000, 1000, 1000))[:93],
        "voxels_30mm": lying_nifti((100, 100, 50), (30.0, 30.0, 30.0)),
        "voxels_0.001mm": lying_nifti((100, 100, 50), (0.001, 0.001, 0.001)),
        "truncated": image[: len(image) // 3],
        "random_bytes": bytes(rng.getrandbits(8) for _ in range(2048)),
        "empty": b"",
        "gzip_of_text": gzip.compress(b"hello, not an image"),
        "flat_2d": nifti(np.zeros((64, 64), np.int16)),
        "four_d": nifti(np.zeros((16, 16, 8, 3), np.int16)),
        "nan_voxels": nifti(nan),
        "inf_voxels": nifti(np.full((40, 40, 10), np.inf, np.float32)),
    }


def bad_labels() -> dict[str, bytes]:
    image = nib.load(SAMPLE / "phantom_002.nii.gz")
    liver = np.zeros(image.shape, np.float32)
    liver[40:60, 40:60, 10:20] = 1
    shifted = image.affine.copy()
    shifted[2, 3] += 500
    return {"fractional": nifti(liver * 0.5, image.affine), "negative": nifti(-liver, image.affine),
            "above_255": nifti(liver * 300, image.affine), "all_nan": nifti(np.full(image.shape, np.nan, np.float32), image.affine),
            "unknown_value": nifti(liver * 99, image.affine), "grid_500mm_off": nifti(liver.astype(np.uint8), shifted),
            "wrong_shape": nifti(np.zeros((10, 10, 10), np.uint8))}


def junk_values(rng: random.Random) -> list:
    return [None, "", "many", -1, 0, 10**9, 2.5, True, [], [1, 2], {}, {"a": 1}, "1" * 400, "\x00", "🫀", -10**20,
            float("1e308"), rng.random()]


def infer(params, image: str = "phantom_000", raw: bool = False, output: str = "json") -> tuple[str, str, dict]:
    field = params if raw else json.dumps(params)
    return "POST", "/infer/progidiff", {"params": {"image": image, "output": output}, "files": {"params": (None, field)}}


def cases(rng: random.Random) -> list[Case]:
    out: list[Case] = []
    # params that are not a JSON object
    for raw in ["not json", "[1, 2]", "null", "7", '"liver"', "[" * 900 + "]" * 900, "1" * 5000, "{", "{}}"]:
        out.append(("params", *infer(raw, raw=True), "refused"))
    # every key with junk values
    keys = ["prompt", "num_proposals", "steps", "seed", "proposal", "modality", "label_prompt", "label_values",
            "proposal_layers", "result_extension", "result_dtype", "result_compress", "logging", "skip_writer"]
    for key in keys:
        for value in junk_values(rng):
            out.append(("params", *infer({"prompt": "liver", "num_proposals": 2, "steps": 1, key: value}), "any"))
    # prompts
    for prompt in ["brain tumour", "x" * 5000, "liver\x00; rm -rf /", "", "   ", "all organs " * 60, "livr, splen",
                   "<script>alert(1)</script>", "liver" + "\u202e", "%s%s%s"]:
        out.append(("params", *infer({"prompt": prompt, "num_proposals": 2, "steps": 1}), "refused"))
    # ids and paths
    for image in ["no_such_image", "../../etc/passwd", "..%2F..%2Fetc%2Fpasswd", "%2e%2e/%2e%2e/etc/passwd", "/etc/passwd",
                  "/tmp", "/proc/self/environ", "a" * 500, "phantom_000/../../x", "\\..\\..\\windows", "5: CT ABDOMEN",
                  "phantom_000.nii.gz", " phantom_000", "file:///etc/passwd"]:
        out.append(("ids", *infer({"prompt": "liver"}, image), "refused"))
    # crafted files: as an infer upload, an image upload, a label upload
    for name, content in crafted_files(rng).items():
        out.append(("files", "POST", "/infer/progidiff", {"params": {"output": "json"}, "files": {
            "file": (f"{name}.nii.gz", content), "params": (None, json.dumps({"prompt": "liver", "steps": 1}))}}, "refused"))
        out.append(("files", "PUT", "/datastore/", {"params": {"image": f"fuzz_{name}"},
                                                    "files": {"file": (f"{name}.nii.gz", io.BytesIO(content))}}, "refused"))
        out.append(("files", "PUT", "/datastore/label", {"params": {"image": "phantom_002", "tag": "final"},
                                                          "files": {"label": (f"{name}.nii.gz", io.BytesIO(content))}}, "refused"))
    for name, content in bad_labels().items():
        out.append(("labels", "PUT", "/datastore/label", {"params": {"image": "phantom_002", "tag": "final"},
                                                           "files": {"label": (f"{name}.nii.gz", io.BytesIO(content))}}, "refused"))
    for tag in ["../../evil", "", "a" * 300, "final/../x", "fi nal"]:
        out.append(("labels", "PUT", "/datastore/label", {"params": {"image": "phantom_002", "tag": tag}, "files": {
            "label": ("l.nii.gz", io.BytesIO((SAMPLE / "labels" / "final" / "phantom_000.nii.gz").read_bytes()))}}, "refused"))
    # scoring, active learning, training
    for body in [{"steps": 1000}, {"num_proposals": 1}, {"num_proposals": 10**6}, {"organs": "brain"}, {"organs": [1]},
                 {"slice_stride": 0}, {"slice_stride": "every"}, {"seed": -1}]:
        out.append(("tasks", "POST", "/scoring/proposal_uncertainty", {"json": body}, "refused"))
        out.append(("tasks", "POST", "/activelearning/proposal_disagreement", {"json": body}, "refused"))
    for body in [{"max_epochs": -1}, {"max_epochs": "x"}, {"learning_rate": "abc"}, {"train_batch_size": 0},
                 {"val_split": 7}]:
        out.append(("tasks", "POST", "/train/progidiff", {"json": body}, "refused"))
    # unknown things
    for method, path, kwargs in [("POST", "/infer/no_such_model", {"params": {"image": "phantom_000"}, "files": {"params": (None, "{}")}}),
                                 ("DELETE", "/datastore/", {"params": {"id": "no_such_image"}}),
                                 ("DELETE", "/datastore/label", {"params": {"id": "phantom_002", "tag": "nope"}}),
                                 ("POST", "/scoring/nope", {"json": {}}), ("POST", "/activelearning/nope", {"json": {}}),
                                 ("GET", "/datastore/label", {"params": {"label": "no_such", "tag": "final"}})]:
        out.append(("unknown", method, path, kwargs, "refused"))
    # valid work beside it all
    for i in range(12):
        organ = ["liver", "spleen", "left kidney", "aorta"][i % 4]
        out.append(("valid", *infer({"prompt": organ, "num_proposals": 2, "steps": 1, "seed": i},
                                    ["phantom_000", "phantom_001", "phantom_002"][i % 3]), "any"))
    rng.shuffle(out)
    return out


def fingerprint(studies: Path) -> dict[str, str]:
    """SHA-256 of every image and label file that was there before (the fuzz's own `fuzz_*` uploads aside)."""
    return {str(p.relative_to(studies)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(studies.rglob("*.nii*")) if not p.name.startswith("fuzz_")}


class PeakRss(threading.Thread):
    def __init__(self, pid: int):
        super().__init__(daemon=True)
        self.process, self.peak, self.running = psutil.Process(pid), 0, True

    def run(self) -> None:
        while self.running:
            try:
                total = sum(p.memory_info().rss for p in [self.process, *self.process.children(recursive=True)])
                self.peak = max(self.peak, total)
            except psutil.Error:
                pass
            time.sleep(0.2)


def send(url: str, case: Case) -> dict:
    family, method, path, kwargs, expect = case
    start = time.time()
    try:
        response = requests.request(method, url + path, timeout=HANG_SECONDS, **kwargs)
        status, body = response.status_code, response.text[:300]
    except requests.Timeout:
        status, body = "hang", ""
    except requests.RequestException as error:
        status, body = type(error).__name__, ""
    detail = ""
    if isinstance(status, int) and 400 <= status < 500:
        try:
            detail = str(response.json().get("detail", ""))
        except ValueError:
            detail = ""
    return {"family": family, "method": method, "path": path, "expect": expect, "status": status,
            "detail": detail[:200], "body": body if not (isinstance(status, int) and status < 500) else body,
            "seconds": round(time.time() - start, 2), "case": describe(kwargs)}


def describe(kwargs: dict) -> str:
    """The case in a line: its query and its JSON body or `params` field."""
    field = kwargs.get("files", {}).get("params", (None, ""))[1] if "files" in kwargs else ""
    return f"{json.dumps(kwargs.get('params'))} {json.dumps(kwargs.get('json')) if 'json' in kwargs else field}"[:240]


def kills_during_writes(studies: Path, conf: dict, work: Path, rounds: int, rng: random.Random) -> dict:
    """Rounds of label saves and removals cut by a SIGKILL; each restart is held to what was acknowledged."""
    final = SAMPLE / "labels" / "final" / "phantom_000.nii.gz"
    reference = nib.load(final)
    labels = [final.read_bytes(), nifti(np.zeros(reference.shape, np.uint8), reference.affine)]
    saved = removed = 0
    lost: list[str] = []
    for r in range(rounds):
        extras = [f"kill_{r}_{k}" for k in range(2)]
        for extra in extras:
            (studies / f"{extra}.nii.gz").write_bytes((SAMPLE / "phantom_001.nii.gz").read_bytes())
        with Server(studies, conf, work) as server:
            writes = WritesUntilKilled(server, "phantom_000", labels, extras)
            writes.run(kill_after=rng.uniform(1.0, 6.0))
        with Server(studies, conf, work) as restarted:
            lost += writes.lost_after_restart(restarted)
        saved, removed = saved + len(writes.saved), removed + len(writes.removed)
    return {"rounds": rounds, "acknowledged_saves": saved, "acknowledged_removals": removed, "lost": lost}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--max-memory-gb", type=float, default=4.0)
    parser.add_argument("--kill-rounds", type=int, default=3, help="server kills during writes, after the requests")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "fuzz.json")
    args = parser.parse_args()
    rng = random.Random(args.seed)
    items = cases(rng)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        studies = copy_studies(SAMPLE, work / "studies")
        conf = {"model_path": str(ROOT / "model" / "progidiff_ct"), "train_dir": str(work / "runs"),
                "max_memory_gb": str(args.max_memory_gb)}
        with Server(studies, conf, work) as server:
            before = fingerprint(studies)
            rss = PeakRss(server.process.pid)
            rss.start()
            started = time.time()
            with ThreadPoolExecutor(max_workers=args.workers) as pool:
                results = list(pool.map(lambda case: send(server.url, case), items))
            requests.delete(f"{server.url}/train/", timeout=60)  # a training run the fuzz started, if any
            crashed = server.process.poll() is not None
            alive = not crashed and requests.get(f"{server.url}/info/", timeout=30).status_code == 200
            rss.running = False
            after = fingerprint(studies)
        kills = kills_during_writes(studies, conf, work, args.kill_rounds, rng)
    lost = sorted(k for k, v in before.items() if after.get(k) != v) + kills["lost"]
    answered = [r for r in results if isinstance(r["status"], int)]
    report = {
        "cases": len(results), "wall_seconds": round(time.time() - started, 1), "workers": args.workers,
        "max_memory_gb": args.max_memory_gb,
        "status_4xx_with_message": sum(400 <= r["status"] < 500 and bool(r["detail"]) for r in answered),
        "status_4xx_without_message": sum(400 <= r["status"] < 500 and not r["detail"] for r in answered),
        "status_5xx": sum(r["status"] >= 500 for r in answered),
        "hangs": sum(r["status"] == "hang" for r in results),
        "connection_errors": sum(not isinstance(r["status"], int) and r["status"] != "hang" for r in results),
        "crashes": int(crashed), "server_alive_after": alive,
        "junk_accepted": sum(r["expect"] == "refused" and isinstance(r["status"], int) and r["status"] < 300 for r in results),
        "data_lost": lost, "peak_rss_gb": round(rss.peak / 2**30, 2),
        "kills_during_writes": {k: v for k, v in kills.items() if k != "lost"},
        "by_family": {f: {"cases": sum(r["family"] == f for r in results),
                          "5xx": sum(r["family"] == f and isinstance(r["status"], int) and r["status"] >= 500 for r in results)}
                      for f in sorted({r["family"] for r in results})},
        "problems": [r for r in results if not isinstance(r["status"], int) or r["status"] >= 500
                     or (r["expect"] == "refused" and r["status"] < 300)
                     or (400 <= r["status"] < 500 and not r["detail"])],
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps({k: v for k, v in report.items() if k != "problems"}, indent=2))
    for problem in report["problems"][:40]:
        print(f"  {problem['family']:8s} {problem['method']} {problem['path']} {problem['case']} -> {problem['status']} "
              f"{problem['detail'] or problem['body'][:120]}")


if __name__ == "__main__":
    main()
