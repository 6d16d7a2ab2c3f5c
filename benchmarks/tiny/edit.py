"""Measure tiny's edit model: do held-out edit instructions come out right, and is the output more than a copy.

    OMP_NUM_THREADS=1 python benchmarks/tiny/edit.py [--edits 50] [--steps 50] [--true-cfg-scale SCALE]
        [--weights DIR] [--out benchmarks/tiny/edit.json]

`--edits` of `edit_data.held_out_edits(0)` from the `--first` (edits of scenes neither tiny nor its edit model
ever trained on), each input rendered with a seed no training used, edited by the shipped
QwenImageEditPipelineTiny at the reference steps with true CFG (negative prompt " ", which still sees the input
image; by default at the scale the model's config names as its reference, `reference_true_cfg_scale`), judged by
`edit_data.edit_check`: the asked attribute reads as asked and the other two as in the input. Also: the share of
outputs that read exactly as their input (a model that copies its input would score 100% there), the mean
pixel distance of each output to its input and to the procedural target, the checker on the procedural targets
themselves (its own ceiling), and CPU seconds per edit on one thread. Writes JSON and a grid image
(input | output | procedural target, one row per edit, the first 12).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from qwendoctor.models import quiet_libraries  # noqa: E402
from qwendoctor.tiny import edit_data  # noqa: E402
from qwendoctor.tiny.edit import load_tiny_edit_pipeline, read_config, revision, shipped_dir  # noqa: E402

SIZE = 128
# Render seeds of the form [BENCH_SEED, index]: edit_train uses [seed, 4, n] for its pool and [seed, 5, n] for its
# progress checks, so no input here was rendered in training.
BENCH_SEED = 1000
VERDICTS = ("made", "kept", "pass", "copied", "size_kept", "shape_kept")


def to_uint8(image: np.ndarray) -> np.ndarray:
    return (np.clip(image, 0, 1) * 255).round().astype(np.uint8)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--edits", type=int, default=50)
    parser.add_argument("--first", type=int, default=0, help="start at this held-out edit (a slice no choice was "
                        "made on: the reference scale was picked on the first 50, training's progress checks read "
                        "the last 30)")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--true-cfg-scale", type=float, default=None, help="default: the scale the model is "
                        "run at, its config's reference_true_cfg_scale (4.0, diffusers' default, if it has none)")
    parser.add_argument("--weights", type=Path, default=None, help="an edit_train output (default: shipped)")
    parser.add_argument("--out", type=Path, default=Path(__file__).with_name("edit.json"))
    parser.add_argument("--grid", type=Path, default=None, help="default: --out with .png")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    quiet_libraries()
    directory = args.weights or shipped_dir()
    if args.true_cfg_scale is None:
        args.true_cfg_scale = read_config(directory).get("reference_true_cfg_scale", 4.0)
    pipe = load_tiny_edit_pipeline("cpu", "float32", directory)
    edits = edit_data.held_out_edits(0)[args.first:args.first + args.edits]
    rows, grid_rows, seconds = [], [], []
    for index, edit in enumerate(edits, start=args.first):
        source, target = edit_data.render_pair(edit, [BENCH_SEED, index], SIZE)
        start = time.perf_counter()
        output = to_uint8(pipe(image=Image.fromarray(source), prompt=edit.instruction, negative_prompt=" ",
                               true_cfg_scale=args.true_cfg_scale, num_inference_steps=args.steps,
                               output_type="np", generator=torch.Generator().manual_seed(index)).images[0])
        seconds.append(time.perf_counter() - start)
        verdict = edit_data.edit_check(source, edit.target, output, edit.instruction)
        ceiling = edit_data.edit_check(source, edit.target, target, edit.instruction)["pass"]
        rows.append({"input": edit.source.prompt, "instruction": edit.instruction, "kind": edit.kind,
                     **verdict, "target_passes": ceiling,
                     "mean_abs_to_input": float(np.abs(output.astype(float) - source).mean()),
                     "mean_abs_to_target": float(np.abs(output.astype(float) - target).mean())})
        if len(grid_rows) < 12:
            grid_rows.append(np.concatenate([source, output, target], axis=1))
        print(f"{index:3d} {'PASS' if verdict['pass'] else 'fail'} made={verdict['made']} kept={verdict['kept']} "
              f"copied={verdict['copied']} | {edit.source.prompt} | {edit.instruction}", flush=True)

    def share(key, subset=rows):
        return round(float(np.mean([row[key] for row in subset])), 4) if subset else None

    result = {
        "what": "tiny edit model: held-out edit instructions judged by edit_data.edit_check",
        "command": "OMP_NUM_THREADS=1 python benchmarks/tiny/edit.py " + " ".join(argv if argv is not None
                                                                                   else sys.argv[1:]),
        "date": datetime.date.today().isoformat(),
        "revision": revision(directory),
        "training": read_config(directory).get("training"),
        "edits": len(rows), "first": args.first, "steps": args.steps, "true_cfg_scale": args.true_cfg_scale,
        "negative_prompt": " ",
        "pass_rate": share("pass"),
        **{f"{key}_rate": share(key) for key in VERDICTS if key != "pass"},
        "by_kind": {kind: {"edits": sum(row["kind"] == kind for row in rows),
                           **{key: share(key, [row for row in rows if row["kind"] == kind])
                              for key in ("pass", "made", "kept", "copied")}} for kind in edit_data.KINDS},
        "checker_on_procedural_targets": share("target_passes"),
        "mean_abs_to_input": round(float(np.mean([row["mean_abs_to_input"] for row in rows])), 2),
        "mean_abs_to_target": round(float(np.mean([row["mean_abs_to_target"] for row in rows])), 2),
        "seconds_per_edit": round(float(np.median(seconds)), 3),
        "cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "rows": rows,
    }
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    Image.fromarray(np.concatenate(grid_rows, axis=0)).save(args.grid or args.out.with_suffix(".png"))
    print(f"pass {result['pass_rate']:.0%} (made {result['made_rate']:.0%}, kept {result['kept_rate']:.0%}), "
          f"copied {result['copied_rate']:.0%}, {result['seconds_per_edit']} s/edit; wrote {args.out}")


if __name__ == "__main__":
    main()
