"""Did the trained tiny Wan learn? Generate the held-out check captions and read the videos back.

    python benchmarks/check_trained.py                                   # shipped weights, default size
    python benchmarks/check_trained.py --weights DIR --size default large --out-dir benchmarks/results
    python benchmarks/check_trained.py --weights DIR --require 0.8      # exit 1 below 80% agreement
    python benchmarks/check_trained.py --scenes validation --shift 5 --guidance 11 --steps 30
    python benchmarks/check_trained.py --sweep --guidance 5 8 11 14 --steps 20 30 50 --shift 3 5 7 \
        --seed-bases 5000 6000                                           # choose sampling settings

The captions are ``vdit_accel.pipelines.toy.check_scenes()``: 20 single-object captions whose (colour, shape,
direction) never occurred in training, and 4 two-object captions built from held-out combinations
(reported apart; the criterion is on the 20). Each is generated once through the standard
``WanPipeline`` call with seed ``1000 + i`` and scored by ``vdit_accel.pipelines.toy.check_video``
(colour from the frames, direction from the centroid's motion). The ground-truth clip of every
caption is scored too (the checker's own sanity: it must be 100%).

``--scenes seen`` prompts 20 single-object captions of the training distribution instead (their combinations
were seen in training; file suffix ``-seen``): where they fail as often as the check, the model has not
learned the captions at all, rather than failing to compose them.

``--scenes validation`` prompts ``vdit_accel.pipelines.toy.validation_scenes()`` instead: 20 single-object
captions from the 4 held-out combinations the check's 20 leave out. Sampling settings (guidance scale,
steps, the scheduler's shift at inference) are chosen there, with other seeds, and only then is the
check run. ``--sweep`` does the choosing: every combination of the ``--guidance``, ``--steps`` and
``--shift`` values at one size, each on every ``--seed-bases`` base (the same noise for every
setting), the validation captions unless ``--scenes check`` is given.

Writes ``check-trained-<device>-<yyyymmdd>.json`` (per size and caption: the checker's reading; the
top-level ``agreement`` is the first size's; ``-validation`` added for the validation captions) and a
contact sheet PNG (first, middle and last frame of every video) beside it; with ``--sweep``
``sweep-trained-<scenes>-<device>-<yyyymmdd>.json`` only (a row per setting: agreement per seed base,
mean, seconds, the failures; rewritten after every setting), and a table sorted by mean agreement on
stdout. GPU or CPU.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from result_files import RESULTS, run_header  # noqa: E402


def contact_sheet(videos: list[np.ndarray], path: Path, thumb: int = 128, labels: list[str] | None = None,
                  frames_per_row: int = 3):
    """``frames_per_row`` frames (first to last, evenly spaced) of each video (uint8 ``[F, H, W, 3]``), one
    row per video, as a PNG; ``labels``: a line of text above each row (e.g. the caption and the check)."""
    from PIL import Image, ImageDraw

    rows = []
    for i, v in enumerate(videos):
        frames = [v[j] for j in np.linspace(0, len(v) - 1, frames_per_row).round().astype(int)]
        h, w = v.shape[1:3]
        tw, th = thumb, max(1, round(thumb * h / w))
        row = np.concatenate([np.asarray(Image.fromarray(f).resize((tw, th))) for f in frames], 1)
        if labels is not None:
            head = Image.new("RGB", (row.shape[1], 14), "white")
            ImageDraw.Draw(head).text((2, 1), labels[i], fill="black")
            row = np.concatenate([np.asarray(head), row], 0)
        rows.append(row)
    width = max(r.shape[1] for r in rows)
    sheet = np.concatenate([np.pad(r, ((0, 2), (0, width - r.shape[1]), (0, 0)), constant_values=255) for r in rows])
    Image.fromarray(sheet).save(path)


def scene_list(scenes: str = "check", world: str = "basic") -> list[tuple]:
    """``[(ToyScene, kind)]``: the check's 20 single-object then 4 two-object scenes, or the 20
    validation scenes (kind ``"single"``), of the model's scene set ``world`` (``"basic"``, ``"rich"``)."""
    from vdit_accel.pipelines import toy

    rich = world == "rich"
    if scenes == "check":
        singles, twos = toy.rich_check_scenes() if rich else toy.check_scenes()
        return [(s, "single") for s in singles] + [(s, "two") for s in twos]
    if scenes == "validation":
        return [(s, "single") for s in (toy.rich_validation_scenes() if rich else toy.validation_scenes())]
    if scenes == "seen":
        return [(s, "single") for s in seen_scenes(world)]
    raise ValueError(f"scenes must be 'check', 'validation' or 'seen', got {scenes!r}")


def seen_scenes(world: str = "basic", n: int = 20, seed: int = 77) -> list:
    """``n`` single-object scenes of the training distribution (so their (colour, shape, direction) were seen
    in training), deterministic: beside the check's held-out combinations they tell a compositional failure
    (only the held-out ones wrong) from an unlearned one (both wrong)."""
    from vdit_accel.pipelines import toy

    sample = toy.sample_rich_scenes if world == "rich" else toy.sample_scenes
    out = [s for s in sample(20 * n, seed, split="train") if len(s.objects) == 1][:n]
    assert not any(toy.is_held_out(s.objects[0].colour, s.objects[0].shape, s.objects[0].direction) for s in out)
    return out


def set_shift(pipe, shift: float):
    """Give ``pipe`` a ``FlowMatchEulerDiscreteScheduler`` like its own but with ``shift``. WanPipeline calls
    ``scheduler.set_timesteps(steps)`` on every call, which maps the uniform sigmas through
    ``shift * s / (1 + (shift - 1) * s)`` from the config (no dynamic shifting here), so the new value
    takes effect on the next call (tested: different shifts, different videos)."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    if not isinstance(pipe.scheduler, FlowMatchEulerDiscreteScheduler) or pipe.scheduler.config.use_dynamic_shifting:
        raise ValueError(f"--shift needs a FlowMatchEulerDiscreteScheduler without dynamic shifting, "
                         f"the pipeline has {type(pipe.scheduler).__name__}")
    pipe.scheduler = FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config, shift=float(shift))


def generate(pipe, jobs: list[tuple[str, int]], size: dict, steps: int, guidance_scale: float, batch: int,
             max_sequence_length: int = 128) -> list[np.ndarray]:
    """One video per ``(caption, seed)``, uint8 ``[F, H, W, 3]``, ``batch`` captions per pipeline call (each
    with its own generator, so a video does not depend on its batch mates beyond rounding)."""
    videos = []
    for start in range(0, len(jobs), batch):
        chunk = jobs[start:start + batch]
        gens = [torch.Generator("cpu").manual_seed(seed) for _, seed in chunk]
        out = pipe(prompt=[c for c, _ in chunk], generator=gens, num_inference_steps=steps,
                   guidance_scale=guidance_scale, max_sequence_length=max_sequence_length, output_type="np",
                   **size).frames
        videos += [(np.clip(np.asarray(v), 0, 1) * 255 + 0.5).astype(np.uint8) for v in out]
    return videos


_TRUTH: dict = {}  # (caption, frames, height, width) -> the checker on the ground-truth clip


def run_check(pipe, size: dict, steps: int, guidance_scale: float, batch: int, limit: int | None = None,
              max_sequence_length: int = 128, seed_base: int = 1000, scenes: str = "check", world: str = "basic") -> dict:
    """Generate and score the check (or validation) captions; returns the rows and the agreement."""
    from vdit_accel.pipelines import toy

    items = scene_list(scenes, world)[:limit]
    videos = generate(pipe, [(s.caption, seed_base + i) for i, (s, _) in enumerate(items)], size, steps,
                      guidance_scale, batch, max_sequence_length)
    rows = []
    for i, ((scene, kind), video) in enumerate(zip(items, videos)):
        key = (scene.caption, *video.shape[:3])
        if key not in _TRUTH:
            _TRUTH[key] = toy.check_video(toy.render_frames(scene, *video.shape[:3]), scene.caption)["ok"]
        result = toy.check_video(video, scene.caption)
        rows.append({"caption": scene.caption, "kind": kind, "seed": seed_base + i, "ok": result["ok"],
                     "ground_truth_ok": _TRUTH[key], "objects": result["objects"],
                     **({"camera": result["camera"]} if "camera" in result else {})})

    def rate(kind, key="ok"):
        sel = [r[key] for r in rows if r["kind"] == kind]
        return (round(sum(sel) / len(sel), 3) if sel else None), len(sel)

    summary = {"agreement": rate("single")[0], "captions": rate("single")[1],
               "two_object_agreement": rate("two")[0], "two_object_captions": rate("two")[1],
               "ground_truth_agreement": round(float(np.mean([r["ground_truth_ok"] for r in rows])), 3),
               "parts": part_agreement(rows)}
    return {"summary": summary, "rows": rows, "videos": videos}


def part_agreement(rows: list[dict]) -> dict:
    """Which part of the captions the videos get wrong: over the rows' objects the fraction whose colour, whose
    direction, and whose colour and direction were read as captioned, and over the rows that pan the camera
    the fraction whose pan was (each ``None`` where there is nothing to count), with the counts."""
    objects = [o for r in rows for o in r["objects"]]
    cameras = [r["camera"] for r in rows if "camera" in r]

    def frac(hits: list[bool]):
        return round(sum(hits) / len(hits), 3) if hits else None

    return {"colour": frac([o["found_colour"] == o["colour"] for o in objects]),
            "direction": frac([o["found_direction"] == o["direction"] for o in objects]),
            "object": frac([o["found_colour"] == o["colour"] and o["found_direction"] == o["direction"] for o in objects]),
            "objects": len(objects), "camera": frac([c["found_camera"] == c["camera"] for c in cameras]),
            "cameras": len(cameras)}


def run_sweep(pipe, size: dict, guidance_scales, steps_list, shifts, seed_bases, batch: int, limit: int | None = None,
              max_sequence_length: int = 128, scenes: str = "validation", on_row=None, world: str = "basic") -> list[dict]:
    """Every (guidance, steps, shift) setting on the single-object captions of ``scenes``, caption ``i``
    with seed ``base + i`` for each base in ``seed_bases`` (all bases in the same batches). A row per
    setting: agreement per seed base and their mean, seconds (generation and scoring), the failures
    (``"seed caption: found colour, direction"``) and a digest of the videos (equal digests: equal
    videos). ``on_row(rows)`` is called after every setting."""
    import hashlib
    import itertools

    from vdit_accel.pipelines import toy

    items = [s for s, kind in scene_list(scenes, world) if kind == "single"][:limit]
    jobs = [(base, i, s) for base in seed_bases for i, s in enumerate(items)]
    rows = []
    for guidance_scale, steps, shift in itertools.product(guidance_scales, steps_list, shifts):
        t0 = time.perf_counter()
        set_shift(pipe, shift)
        videos = generate(pipe, [(s.caption, base + i) for base, i, s in jobs], size, steps, guidance_scale, batch,
                          max_sequence_length)
        ok = {base: [] for base in seed_bases}
        bad, digest = [], hashlib.sha1()
        for (base, i, scene), video in zip(jobs, videos):
            digest.update(video.tobytes())
            res = toy.check_video(video, scene.caption)
            ok[base].append(res["ok"])
            if not res["ok"]:
                o = res["objects"][0]
                bad.append(f"{base + i} {scene.caption}: {o['found_colour']}, {o['found_direction']}")
        agreement = {str(b): round(sum(v) / len(v), 3) for b, v in ok.items()}
        rows.append({"guidance_scale": guidance_scale, "steps": steps, "shift": shift, "agreement": agreement,
                     "mean": round(float(np.mean(list(agreement.values()))), 3),
                     "seconds": round(time.perf_counter() - t0, 1), "failures": bad, "digest": digest.hexdigest()[:12]})
        print(f"guidance {guidance_scale:g} steps {steps} shift {shift:g}: mean {rows[-1]['mean']:.3f} "
              f"{agreement} {rows[-1]['seconds']} s", flush=True)
        if on_row is not None:
            on_row(rows)
    return rows


def main(argv: list[str] | None = None) -> dict:
    from vdit_accel.pipelines.toy import trained

    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--model", default="wan-trained", choices=sorted(trained.MODELS))
    spec = trained.model_spec(pre.parse_known_args(argv)[0].model)
    d = spec.defaults
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], parents=[pre])
    ap.add_argument("--weights", type=Path, default=None, help="weights directory (default: shipped in the package)")
    ap.add_argument("--size", nargs="+", choices=("default", "large", "half"), default=["default"],
                    help="default: the model's (wan-trained 17x128x128, 1,280 tokens; wan-rich its native 65x256x448, "
                         "30,464); large: wan-trained 17x256x256 (5,120 tokens), wan-rich the native one; half: the "
                         "large size with half the frames (wan-rich 33x256x448, 16,128 tokens); several: one file "
                         "(--sweep: one size)")
    ap.add_argument("--frames", type=int, default=None, help="override the default size's frames (with --height, --width)")
    ap.add_argument("--height", type=int, default=None)
    ap.add_argument("--width", type=int, default=None)
    ap.add_argument("--scenes", choices=("check", "validation", "seen"), default=None,
                    help="check: toy.check_scenes() (the criterion); validation: toy.validation_scenes(), "
                         "for choosing settings (default: validation with --sweep, check otherwise); seen: 20 "
                         "training-distribution captions (seen_scenes: compositional failure or unlearned?)")
    ap.add_argument("--steps", type=int, nargs="+", default=None,
                    help=f"denoising steps (default {d.steps}; --sweep: 20 30 50)")
    ap.add_argument("--guidance-scale", "--guidance", dest="guidance_scale", type=float, nargs="+", default=None,
                    help=f"classifier-free guidance (default {spec.guidance_scale:g}; --sweep: 5 8 11 14)")
    ap.add_argument("--shift", type=float, nargs="+", default=None,
                    help=f"the flow-matching scheduler's shift at inference (default {spec.scheduler_shift:g}; "
                         "--sweep: 3 5 7)")
    ap.add_argument("--sweep", action="store_true",
                    help="every combination of --guidance, --steps, --shift on every --seed-bases base; one JSON")
    ap.add_argument("--device", default=None, help="cuda or cpu (default: cuda if available)")
    ap.add_argument("--batch", type=int, default=None, help="captions per pipeline call (default: 20 on cuda, 1 on cpu)")
    ap.add_argument("--limit", type=int, default=None, help="only the first N captions (quick runs)")
    ap.add_argument("--seed-base", type=int, nargs="+", default=[1000],
                    help="caption i is generated with seed seed-base + i; 1000 is the check; several: each size is "
                         "checked with each, and the mean agreement reported")
    ap.add_argument("--seed-bases", type=int, nargs="+", default=[5000, 6000],
                    help="--sweep: the seed bases every setting is run on")
    ap.add_argument("--out-dir", type=Path, default=RESULTS)
    ap.add_argument("--git-sha", default=None, help="the commit for the result header (default: the checkout's; the "
                    "device copy's own git HEAD can be stale)")
    ap.add_argument("--require", type=float, default=None,
                    help="exit with status 1 if the agreement (at every size checked) is below this")
    args = ap.parse_args(argv)
    scenes = args.scenes or ("validation" if args.sweep else "check")
    if args.sweep:
        grid = {"guidance_scale": args.guidance_scale or [5.0, 8.0, 11.0, 14.0], "steps": args.steps or [20, 30, 50],
                "shift": args.shift or [3.0, 5.0, 7.0]}
        if len(args.size) > 1:
            ap.error("--sweep runs at one size: give one --size")
        if args.require is not None:
            ap.error("--require is for the check, not --sweep")
    else:
        for name in ("steps", "guidance_scale", "shift"):
            if len(getattr(args, name) or [None]) > 1:
                ap.error(f"several --{name.replace('_', '-')} values need --sweep")
        steps = args.steps[0] if args.steps else d.steps
        guidance_scale = args.guidance_scale[0] if args.guidance_scale else spec.guidance_scale
        shift = args.shift[0] if args.shift else spec.scheduler_shift

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    batch = args.batch or (20 if device == "cuda" else 1)
    sizes = {}
    for name in dict.fromkeys(args.size):
        size = dict(spec.large) if name in ("large", "half") else dict(num_frames=d.frames, height=d.height, width=d.width)
        if name == "half":
            size["num_frames"] = (size["num_frames"] - 1) // 2 + 1
        if name == "default":
            for key, value in (("num_frames", args.frames), ("height", args.height), ("width", args.width)):
                if value is not None:
                    size[key] = value
        sizes[name] = size
    t0 = time.perf_counter()
    dtype = torch.bfloat16 if device == "cuda" and spec.name != "wan-trained" else torch.float32
    pipe = trained.build_trained_pipeline(args.weights, dtype=dtype, model=spec).to(device)
    tag, date, doc = run_header("check_trained.py", argv, device, sha=args.git_sha)
    doc.update({"model": spec.name, "weights": str(args.weights or spec.weights_dir), "scenes": scenes,
                "dtype": str(dtype).removeprefix("torch.")})
    stem_what = "check-" + spec.name.removeprefix("wan-")
    args.out_dir.mkdir(parents=True, exist_ok=True)

    if args.sweep:
        from vdit_accel.pipelines import toy

        (name, size), = sizes.items()
        items = [s for s, kind in scene_list(scenes, spec.scenes) if kind == "single"][:args.limit]
        truth = [toy.check_video(toy.render_frames(s, size["num_frames"], size["height"], size["width"]),
                                      s.caption)["ok"] for s in items]
        doc.update({"size": {"name": name, **size}, "seed_bases": args.seed_bases, "batch": batch, "grid": grid,
                    "captions": [s.caption for s in items], "ground_truth_agreement": round(float(np.mean(truth)), 3),
                    "training_shift": spec.training_shift, "rows": []})
        path = args.out_dir / f"sweep-{spec.name.removeprefix('wan-')}-{scenes}-{tag}-{date:%Y%m%d}.json"

        def write(rows):
            doc["rows"] = rows
            doc["seconds"] = round(time.perf_counter() - t0, 1)
            path.write_text(json.dumps(doc, indent=1) + "\n")

        run_sweep(pipe, size, grid["guidance_scale"], grid["steps"], grid["shift"], args.seed_bases, batch, args.limit,
                  d.max_sequence_length, scenes, on_row=write, world=spec.scenes)
        print(f"\n{'mean':>5} " + " ".join(f"{b:>5}" for b in args.seed_bases) + "  guidance steps shift  seconds")
        for r in sorted(doc["rows"], key=lambda r: (-r["mean"], r["steps"], r["seconds"])):
            print(f"{r['mean']:5.3f} " + " ".join(f"{a:5.3f}" for a in r["agreement"].values())
                  + f"  {r['guidance_scale']:8g} {r['steps']:5d} {r['shift']:5g}  {r['seconds']:7.1f}")
        print(f"ground truth {doc['ground_truth_agreement']}; wrote {path}")
        return doc

    if shift != spec.scheduler_shift:
        set_shift(pipe, shift)
    results, videos, labels = {}, [], []
    for name, size in sizes.items():
        for base in args.seed_base:
            t1 = time.perf_counter()
            res = run_check(pipe, size, steps, guidance_scale, batch, args.limit, d.max_sequence_length, base,
                            scenes, spec.scenes)
            key = name if len(args.seed_base) == 1 else f"{name}-seeds{base}"
            results[key] = {"size": size, "seed_base": base, **res["summary"],
                            "seconds": round(time.perf_counter() - t1, 1), "rows": res["rows"]}
            if base == args.seed_base[0]:
                videos += res["videos"]
                labels += [f"{'ok ' if r['ok'] else 'BAD'} {r['seed']}: {r['caption']}" for r in res["rows"]]
    first = results[next(iter(results))]
    means = {name: round(float(np.mean([r["agreement"] for r in results.values() if r["size"] == size])), 3)
             for name, size in sizes.items()}
    doc.update({"seed_base": args.seed_base, "steps": steps, "guidance_scale": guidance_scale, "shift": shift,
                "batch": batch, "agreement": first["agreement"], "mean_agreement": means, "captions": first["captions"],
                "seconds": round(time.perf_counter() - t0, 1), "results": results})
    stem = f"{stem_what}-{tag}-{date:%Y%m%d}" + (f"-{scenes}" if scenes != "check" else "")
    (args.out_dir / f"{stem}.json").write_text(json.dumps(doc, indent=1) + "\n")
    contact_sheet(videos, args.out_dir / f"{stem}.png", labels=labels, frames_per_row=3 if spec.scenes == "basic" else 5)
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
