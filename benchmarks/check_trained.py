"""Did the trained tiny Wan learn? Generate the held-out check captions and read the videos back.

    python benchmarks/check_trained.py                                   # shipped weights, default size
    python benchmarks/check_trained.py --weights DIR --size default large --out-dir benchmarks/results
    python benchmarks/check_trained.py --weights DIR --require 0.8      # exit 1 below 80% agreement

The captions are ``vdit_accel.toyvideo.check_scenes()``: 20 single-object captions whose (colour, shape,
direction) never occurred in training, and 4 two-object captions built from held-out combinations
(reported apart; the criterion is on the 20). Each is generated once through the standard
``WanPipeline`` call with seed ``1000 + i`` and scored by ``vdit_accel.toyvideo.check_video``
(colour from the frames, direction from the centroid's motion). The ground-truth clip of every
caption is scored too (the checker's own sanity: it must be 100%).

Writes ``check-trained-<device>-<yyyymmdd>.json`` (per size and caption: the checker's reading; the
top-level ``agreement`` is the first size's) and a contact sheet PNG (first, middle and last frame of
every video) beside it. GPU or CPU.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

RESULTS = Path(__file__).resolve().parent / "results"


def contact_sheet(videos: list[np.ndarray], path: Path, thumb: int = 128):
    """First, middle and last frame of each video (uint8 ``[F, H, W, 3]``), one row per video, as a PNG."""
    from PIL import Image

    rows = []
    for v in videos:
        frames = [v[0], v[len(v) // 2], v[-1]]
        h, w = v.shape[1:3]
        tw, th = thumb, max(1, round(thumb * h / w))
        rows.append(np.concatenate([np.asarray(Image.fromarray(f).resize((tw, th))) for f in frames], 1))
    width = max(r.shape[1] for r in rows)
    sheet = np.concatenate([np.pad(r, ((0, 2), (0, width - r.shape[1]), (0, 0)), constant_values=255) for r in rows])
    Image.fromarray(sheet).save(path)


def run_check(pipe, size: dict, steps: int, guidance_scale: float, batch: int, limit: int | None = None,
              max_sequence_length: int = 128, seed_base: int = 1000) -> dict:
    """Generate and score the check captions; returns the rows and the agreement."""
    from vdit_accel import toyvideo

    singles, twos = toyvideo.check_scenes()
    scenes = [(s, "single") for s in singles] + [(s, "two") for s in twos]
    if limit is not None:
        scenes = scenes[:limit]
    rows, videos = [], []
    for start in range(0, len(scenes), batch):
        chunk = scenes[start:start + batch]
        gens = [torch.Generator("cpu").manual_seed(seed_base + start + j) for j in range(len(chunk))]
        out = pipe(prompt=[s.caption for s, _ in chunk], generator=gens, num_inference_steps=steps,
                   guidance_scale=guidance_scale, max_sequence_length=max_sequence_length, output_type="np",
                   **size).frames
        for j, ((scene, kind), video) in enumerate(zip(chunk, out)):
            video = (np.clip(np.asarray(video), 0, 1) * 255 + 0.5).astype(np.uint8)
            truth = toyvideo.render_frames(scene, *video.shape[:3])
            result = toyvideo.check_video(video, scene.caption)
            rows.append({"caption": scene.caption, "kind": kind, "seed": seed_base + start + j, "ok": result["ok"],
                         "ground_truth_ok": toyvideo.check_video(truth, scene.caption)["ok"],
                         "objects": result["objects"]})
            videos.append(video)

    def rate(kind, key="ok"):
        sel = [r[key] for r in rows if r["kind"] == kind]
        return (round(sum(sel) / len(sel), 3) if sel else None), len(sel)

    summary = {"agreement": rate("single")[0], "captions": rate("single")[1],
               "two_object_agreement": rate("two")[0], "two_object_captions": rate("two")[1],
               "ground_truth_agreement": round(float(np.mean([r["ground_truth_ok"] for r in rows])), 3)}
    return {"summary": summary, "rows": rows, "videos": videos}


def main(argv: list[str] | None = None) -> dict:
    from vdit_accel.pipelines import trained

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--weights", type=Path, default=None, help="weights directory (default: shipped in the package)")
    ap.add_argument("--size", nargs="+", choices=("default", "large"), default=["default"],
                    help="default: 17x128x128 (1,280 tokens); large: 17x256x256 (5,120 tokens); both: one file")
    ap.add_argument("--frames", type=int, default=None, help="override the default size's frames (with --height, --width)")
    ap.add_argument("--height", type=int, default=None)
    ap.add_argument("--width", type=int, default=None)
    ap.add_argument("--steps", type=int, default=trained.TRAINED_DEFAULTS.steps)
    ap.add_argument("--guidance-scale", type=float, default=trained.GUIDANCE_SCALE)
    ap.add_argument("--device", default=None, help="cuda or cpu (default: cuda if available)")
    ap.add_argument("--batch", type=int, default=None, help="captions per pipeline call (default: 8 on cuda, 1 on cpu)")
    ap.add_argument("--limit", type=int, default=None, help="only the first N captions (quick runs)")
    ap.add_argument("--seed-base", type=int, default=1000,
                    help="caption i is generated with seed seed-base + i; 1000 is the check, other bases (other noise, same "
                         "captions) a validation set for choosing sampling settings")
    ap.add_argument("--out-dir", type=Path, default=RESULTS)
    ap.add_argument("--require", type=float, default=None,
                    help="exit with status 1 if the agreement (at every size checked) is below this")
    args = ap.parse_args(argv)

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    d = trained.TRAINED_DEFAULTS
    sizes = {}
    for name in dict.fromkeys(args.size):
        size = dict(trained.LARGE_SIZE) if name == "large" else dict(num_frames=d.frames, height=d.height, width=d.width)
        if name == "default":
            for key, value in (("num_frames", args.frames), ("height", args.height), ("width", args.width)):
                if value is not None:
                    size[key] = value
        sizes[name] = size
    t0 = time.perf_counter()
    pipe = trained.build_trained_pipeline(args.weights).to(device)
    results, videos = {}, []
    for name, size in sizes.items():
        t1 = time.perf_counter()
        res = run_check(pipe, size, args.steps, args.guidance_scale, args.batch or (8 if device == "cuda" else 1),
                        args.limit, d.max_sequence_length, args.seed_base)
        results[name] = {"size": size, **res["summary"], "seconds": round(time.perf_counter() - t1, 1), "rows": res["rows"]}
        videos += res["videos"]
    gpu = torch.cuda.get_device_name() if device == "cuda" else "cpu"
    tag = "cpu" if device == "cpu" else gpu.lower().replace(" ", "-")
    date = datetime.date.today()
    first = results[next(iter(results))]
    doc = {"gpu": gpu, "date": date.isoformat(),
           "command": "python " + " ".join(["benchmarks/check_trained.py"] + (sys.argv[1:] if argv is None else list(argv))),
           "versions": {"torch": torch.__version__, "python": platform.python_version()},
           "weights": str(args.weights or trained.WEIGHTS_DIR), "seed_base": args.seed_base, "steps": args.steps, "guidance_scale": args.guidance_scale,
           "agreement": first["agreement"], "captions": first["captions"], "seconds": round(time.perf_counter() - t0, 1),
           "results": results}
    args.out_dir.mkdir(parents=True, exist_ok=True)
    stem = f"check-trained-{tag}-{date:%Y%m%d}"
    (args.out_dir / f"{stem}.json").write_text(json.dumps(doc, indent=1) + "\n")
    contact_sheet(videos, args.out_dir / f"{stem}.png")
    for name, r in results.items():
        print(json.dumps({"size": name, **{k: v for k, v in r.items() if k != "rows"}}))
        for row in r["rows"]:
            print(f"  {'ok ' if row['ok'] else 'BAD'} {row['caption']!r}: " + "; ".join(
                f"{x['found_colour']} {x['found_direction']} {x['displacement']}" for x in row["objects"]))
    print(f"wrote {args.out_dir / stem}.json and .png")
    if args.require is not None and any((r["agreement"] or 0.0) < args.require for r in results.values()):
        sys.exit(1)
    return doc


if __name__ == "__main__":
    main()
