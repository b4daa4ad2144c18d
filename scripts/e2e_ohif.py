"""OHIF end to end, as an annotator does it: open the study in the OHIF that MONAI Label serves, connect the
MONAI Label panel, tick two organs in Class Prompts, Run, and see the overlay; the PACS then holds the
consensus and every proposal as DICOM-SEG, and a proposal opens in OHIF as a segmentation series, drawn in
its organs' colours over the scan. Screenshots go to --out.

    python scripts/e2e_ohif.py --server http://127.0.0.1:8000 --pacs http://127.0.0.1:8042 --out runs/e2e

Run by scripts/e2e.sh, which starts Orthanc, the server and Chromium and stops them again.
"""

from __future__ import annotations

import argparse
import json
import socket
import sys
import time
from pathlib import Path

import numpy as np
import requests
from PIL import Image

sys.path.insert(0, str(Path(__file__).parent))
from browser import Browser  # noqa: E402

ORGANS = ("liver", "spleen")
VIEWPORT_CANVASES = """[...document.querySelectorAll('canvas')].map(c => c.getBoundingClientRect())
    .filter(r => r.width > 200 && r.height > 200).map(r => [r.left, r.top, r.right, r.bottom].map(Math.round))"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def coloured_pixels(png: Path, canvases: list[list[int]]) -> int:
    """Pixels of the viewports' canvases that are clearly not grey: a CT renders grey, segment overlays in colour."""
    image = Image.open(png).convert("RGB")
    total = 0
    for box in canvases:
        rgb = np.asarray(image.crop(tuple(box))).astype(int)
        total += int(((rgb.max(axis=2) - rgb.min(axis=2)) > 60).sum())
    return total


def connect(browser: Browser, server: str) -> None:
    """Type the server's address into the panel (the field keeps it on blur, as a user's click does), Connect."""
    browser.evaluate(f"""(() => {{ const field = document.getElementById('monailabelServerURL');
        Object.getOwnPropertyDescriptor(HTMLInputElement.prototype, 'value').set.call(field, '{server}/');
        field.dispatchEvent(new FocusEvent('focusout', {{bubbles: true}})); return true; }})()""")
    time.sleep(1)
    browser.evaluate("document.getElementById('monailabelServerURL').closest('table')"
                     ".querySelector('button.actionButton').click() || true")
    browser.wait_for("[...document.querySelectorAll('.tab-label')].some(l => l.innerText === 'Class Prompts')", 60,
                     "the panel did not connect (no Class Prompts tab)")


def run_class_prompts(browser: Browser, organs: tuple[str, ...]) -> None:
    """Open Class Prompts, tick `organs` (and only them), press its Run."""
    browser.evaluate("[...document.querySelectorAll('.tab-label')].find(l => l.innerText === 'Class Prompts').click() || true")
    time.sleep(1)
    ticked = browser.evaluate(f"""(() => {{
        const tab = [...document.querySelectorAll('.tab')].find(t => t.querySelector('.tab-label').innerText === 'Class Prompts');
        const wanted = {json.dumps(list(organs))};
        const ticked = [];
        for (const row of tab.querySelectorAll('tr')) {{
            const box = row.querySelector('input[type=checkbox]');
            const name = row.lastElementChild && row.lastElementChild.innerText.trim();
            if (box && box.checked !== wanted.includes(name)) box.click();
            if (box && box.checked) ticked.push(name);
        }}
        return ticked; }})()""")
    if sorted(ticked) != sorted(organs):
        raise RuntimeError(f"Class Prompts ticked {ticked}, wanted {list(organs)}")
    browser.evaluate("""[...document.querySelectorAll('.tab')].find(t => t.querySelector('.tab-label').innerText === 'Class Prompts')
        .querySelector('button.actionButton, button').click() || true""")


def open_proposal(browser: Browser, description: str) -> None:
    """Double-click the proposal's SEG series in the study browser and accept opening it over the scan."""
    browser.wait_for(f"document.body.innerText.includes({json.dumps(description)})", 60,
                     f"the study browser does not list {description!r}")
    browser.evaluate(f"""(() => {{ const thumbnail = [...document.querySelectorAll('div')]
        .filter(d => d.innerText && d.innerText.includes({json.dumps(description)}) && d.children.length > 0)
        .sort((a, b) => a.innerText.length - b.innerText.length)[0];
        thumbnail.dispatchEvent(new MouseEvent('dblclick', {{bubbles: true}})); return true; }})()""")
    browser.wait_for("[...document.querySelectorAll('button')].some(b => b.innerText === 'Yes')", 60,
                     "OHIF did not offer to open the segmentation")
    browser.evaluate("[...document.querySelectorAll('button')].find(b => b.innerText === 'Yes').click() || true")


def seg_series(pacs: str) -> list[str]:
    series = requests.get(f"{pacs}/series", params={"expand": ""}, timeout=30).json()
    return [s["MainDicomTags"].get("SeriesDescription", "") for s in series if s["MainDicomTags"].get("Modality") == "SEG"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--server", required=True, help="MONAI Label server URL (studies = the PACS's DICOMweb)")
    parser.add_argument("--pacs", required=True, help="Orthanc's REST URL (to check the SEG series)")
    parser.add_argument("--out", type=Path, default=Path("runs/e2e"))
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)

    studies = requests.get(f"{args.pacs}/studies", params={"expand": ""}, timeout=30).json()
    study = next(s for s in studies if s["MainDicomTags"].get("StudyDescription") == "phantom_000")
    study_uid = study["MainDicomTags"]["StudyInstanceUID"]
    segs_before = len(seg_series(args.pacs))

    with Browser(free_port(), args.out / "chromium.log") as browser:
        browser.open(f"{args.server}/ohif/monai-label?StudyInstanceUIDs={study_uid}")
        browser.wait_for("!!document.getElementById('monailabelServerURL')", 120, "OHIF did not show the MONAI Label panel")
        browser.wait_for("document.body.innerText.includes('phantom_000')", 120, "OHIF did not load the study")
        time.sleep(5)  # the first images render
        browser.evaluate("[...document.querySelectorAll('button')].find(b => b.innerText === 'Confirm and Hide')?.click() || true")
        connect(browser, args.server)
        time.sleep(6)  # the "connected" notice fades
        canvases = browser.evaluate(VIEWPORT_CANVASES)
        before = browser.screenshot(args.out / "ohif-connected.png")

        start = time.time()
        run_class_prompts(browser, ORGANS)
        browser.wait_for("document.body.innerText.includes('Run Class Based Inference - Successful')", 600,
                         "the Class Prompts run did not succeed")
        seconds = time.time() - start
        time.sleep(6)  # the overlay is drawn, the "successful" notice fades
        after = browser.screenshot(args.out / "ohif-class-prompts-liver-spleen.png")

        # The annotator reloads the study to see its new SEG series, and opens proposal 1 (the tightest).
        browser.open(f"{args.server}/ohif/monai-label?StudyInstanceUIDs={study_uid}")
        open_proposal(browser, "ProGiDiff proposal 1 of")
        time.sleep(10)  # the segmentation is drawn over the scan
        loaded = browser.screenshot(args.out / "ohif-proposal-1-opened.png")
        loaded_canvases = browser.evaluate(VIEWPORT_CANVASES)

    grown = coloured_pixels(after, canvases) - coloured_pixels(before, canvases)
    proposal_pixels = coloured_pixels(loaded, loaded_canvases)
    segs = seg_series(args.pacs)
    report = {"study": study_uid, "viewport_canvases": canvases, "organs": list(ORGANS), "run_seconds": round(seconds, 1),
              "overlay_pixels": grown, "opened_proposal_pixels": proposal_pixels,
              "seg_series_new": len(segs) - segs_before, "seg_series": segs,
              "screenshots": [str(before), str(after), str(loaded)]}
    print(json.dumps(report, indent=2))
    (args.out / "e2e_ohif.json").write_text(json.dumps(report, indent=2))
    problems = []
    if grown < 500:
        problems.append(f"no overlay appeared: {grown} more coloured pixels in the viewports")
    if proposal_pixels < 500:
        problems.append(f"the opened proposal is not drawn: {proposal_pixels} coloured pixels in the viewports")
    if not any(s.startswith("ProGiDiff consensus") for s in segs) or not any(s.startswith("ProGiDiff proposal") for s in segs):
        problems.append(f"the PACS holds no consensus/proposal SEG series: {segs}")
    for problem in problems:
        print(f"FAILED: {problem}", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
