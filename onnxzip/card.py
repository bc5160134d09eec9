"""The model card of a merged model (Markdown, written next to it) and the picture of its sharing per
layer (PNG), which `onnxzip inspect --plot` also draws.

The card is rendered from the report document (api.report_json), so it says nothing the report does
not hold: tasks, their inputs and outputs, sharing per layer, parameters and bytes, agreement and
accuracy before and after, the int8 copy, and how the merge was made.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Mapping, Sequence

from PIL import Image, ImageDraw

from .format import GATED, GATED_OUTPUT, TASK_INPUT
from .plan import SharingPlan
from .save import write_bytes_atomically

# The sharing picture: pixels per unit of the widest layer's bar, bar height, margins, the label column.
BAR_WIDTH, BAR_HEIGHT, ROW_GAP, MARGIN, LABEL_WIDTH, LEGEND_HEIGHT = 360, 9, 10, 12, 110, 22
SHARED_COLOUR, OWN_COLOURS = (31, 119, 180), ((255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189),
                                              (140, 86, 75), (227, 119, 194))
TEXT, BACKGROUND = (0, 0, 0), (255, 255, 255)


def card_path(output: Path) -> Path:
    """Where a merge writes the model card of ``output``: NAME.card.md beside it."""
    return output.with_name(f"{output.stem}.card.md")


def picture_path(output: Path) -> Path:
    """Where a merge writes the sharing picture of ``output``: NAME.sharing.png beside it."""
    return output.with_name(f"{output.stem}.sharing.png")


def sharing_picture(plan: SharingPlan) -> Image.Image:
    """Per layer one bar per task, as wide as the task's units: its shared units first (one colour for
    every task), then its own (a colour per task); the layer's name on the left."""
    widest = max(max(lp.units) for lp in plan.layers) or 1
    per_layer = len(plan.tasks) * BAR_HEIGHT + ROW_GAP
    height = 2 * MARGIN + LEGEND_HEIGHT + per_layer * len(plan.layers)
    image = Image.new("RGB", (2 * MARGIN + LABEL_WIDTH + BAR_WIDTH, height), BACKGROUND)
    draw = ImageDraw.Draw(image)
    _legend(draw, plan.tasks)
    top = MARGIN + LEGEND_HEIGHT
    for lp in plan.layers:
        draw.text((MARGIN, top), f"{lp.name} {lp.n_shared}/{max(lp.units)}", fill=TEXT)
        for t, units in enumerate(lp.units):
            y, shared = top + t * BAR_HEIGHT, lp.n_shared if t in lp.members else 0
            x0 = MARGIN + LABEL_WIDTH
            x1 = x0 + round(BAR_WIDTH * shared / widest)
            x2 = x0 + round(BAR_WIDTH * units / widest)
            if x1 > x0:
                draw.rectangle((x0, y, x1 - 1, y + BAR_HEIGHT - 2), fill=SHARED_COLOUR)
            if x2 > x1:
                draw.rectangle((x1, y, x2 - 1, y + BAR_HEIGHT - 2), fill=OWN_COLOURS[t % len(OWN_COLOURS)])
        top += per_layer
    return image


def write_picture(plan: SharingPlan, path: Path) -> None:
    """The sharing picture of ``plan`` as a PNG at ``path`` (all or nothing)."""
    data = io.BytesIO()
    sharing_picture(plan).save(data, format="PNG")
    write_bytes_atomically(data.getvalue(), path)


def _legend(draw: ImageDraw.ImageDraw, tasks: Sequence[str]) -> None:
    x = MARGIN
    for label, colour in [("shared", SHARED_COLOUR)] + [(t, OWN_COLOURS[i % len(OWN_COLOURS)]) for i, t in enumerate(tasks)]:
        draw.rectangle((x, MARGIN, x + BAR_HEIGHT, MARGIN + BAR_HEIGHT), fill=colour)
        draw.text((x + BAR_HEIGHT + 4, MARGIN - 1), label, fill=TEXT)
        x += BAR_HEIGHT + 12 + 7 * len(label)


def _percent(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.2f}%"


def _inputs(report: Mapping) -> list[str]:
    lines = []
    for task, model in report["models"].items():
        shape = "[" + ", ".join("N" if d is None else str(d) for d in model.get("input", {}).get("shape", [])) + "]"
        words = model.get("input", {}).get("from_merged", "")
        lines.append(f"- `{task}`: from `{model['file']}` (SHA-256 `{model['sha256']}`), {model['params']:,} parameters; "
                     f"reads `{model.get('input', {}).get('name', '?')}` {shape}"
                     + (f", from the merged input: {words}" if words else ""))
    image = report["options"].get("image") or {}
    plain = {"resize": None, "mean": [0.0], "std": [1.0]}
    steps = [f"{k} {list(image[k])}" for k in plain if image.get(k) is not None and list(image[k] or []) not in ([], plain[k])]
    lines.append("- Preprocessing of the calibration data: " + (", ".join(steps) if steps else "none (as stored)")
                 + f"; image layout {image.get('layout', 'NCHW')}.")
    return lines + [f"- {line}" for line in report.get("inputs", [])]


def _outputs(report: Mapping) -> list[str]:
    tasks = list(report["models"])
    if report["options"]["layout"] == GATED:
        return [f"Layout gated: an int64 scalar input `{TASK_INPUT}` selects a task "
                f"({', '.join(f'{i} = `{t}`' for i, t in enumerate(tasks))}); the output `{GATED_OUTPUT}` is that "
                "task's."]
    return ["Layout multi: one output per task, named after it: " + ", ".join(f"`{t}`" for t in tasks) + "."]


def _layers(report: Mapping) -> list[str]:
    tasks = list(report["models"])
    rows = [f"| layer | units {'/'.join(tasks)} | shared | parameters saved |", "|---|---|---|---|"]
    rows += [f"| {l['name']} | {'/'.join(map(str, l['units']))} | {l['shared']} | {l['params_saved']:,} |"
             for l in report["layers"]]
    return rows


def _checks(report: Mapping) -> list[str]:
    rows = ["| task | samples | top-1 agreement with the original | relative output error | accuracy original | "
            "accuracy merged |", "|---|---|---|---|---|---|"]
    rows += [f"| {c['task']} | {c['samples']} | {_percent(c['top1_agreement'])} | {c['rel_output_error']:.3g} | "
             f"{_percent(c['accuracy_original'])} | {_percent(c['accuracy_merged'])} |" for c in report["checks"]]
    q = report.get("quantized")
    if q:
        rows += ["", f"int8 copy `{Path(q['output']).name}` ({q['mode']}, ONNX Runtime): {q['bytes_int8']:,} bytes "
                 f"against {q['bytes_float']:,}.", "",
                 "| task | samples | top-1 agreement with the float model | accuracy float | accuracy int8 |",
                 "|---|---|---|---|---|"]
        rows += [f"| {t['task']} | {t['samples']} | {_percent(t['agreement'])} | {_percent(t['accuracy_float'])} | "
                 f"{_percent(t['accuracy_int8'])} |" for t in q["tasks"]]
    return rows


def render(report: Mapping, picture: str | None) -> str:
    """The model card (Markdown) of a merge from its report document (api.report_json); ``picture`` is the
    sharing picture's file name beside it (None: no picture)."""
    name = Path(report["output"]).name
    inputs, merged = sum(report["params_inputs"]), report["params_merged"]
    saved = 100 * (1 - merged / inputs) if inputs else 0.0
    command = " ".join(report["command"]) if report.get("command") else "(the Python API)"
    lines = [f"# {name}", "",
             f"A multi-task model of {len(report['models'])} tasks ({', '.join(report['models'])}) merged by onnxzip "
             f"{report['onnxzip']} (Multi-Task Zipping): units of the tasks' layers are shared, each shared block "
             "stored and computed once.", "", "## Tasks and inputs", "", *_inputs(report), "",
             "## Outputs", "", *_outputs(report), "", "## Sharing per layer", "", *_layers(report), ""]
    if picture:
        lines += [f"![sharing per layer: shared units first, then each task's own]({picture})", ""]
    if report.get("alignment"):
        lines += [f"Layers after the aligned ones are each task's own: {report['alignment']}.", ""]
    lines += ["## Size", "", f"{merged:,} parameters against {inputs:,} in the inputs ({saved:.1f}% fewer); "
              f"{report['bytes_merged']:,} bytes against {sum(report['bytes_inputs']):,}.", "",
              "## Agreement and accuracy", "",
              "Each task of the written model against its original on calibration samples (accuracy on the "
              "`--eval` data where given).", "", *_checks(report), "",
              "## How it was made", "", f"- Command: `{command}`", f"- Device: {report['device']}; "
              f"{sum(report['seconds'].values()):.1f} s in all.",
              f"- Options: cost {report['options']['cost']}, share {report['options']['share']}, "
              f"correction {'on' if report['options']['correct'] else 'off'}, layout {report['options']['layout']}"
              + (", retrained after each zipped layer" if report.get("retraining") else "") + ".",
              "- The report JSON (`--report`) has every figure; `onnxzip inspect` reads the file's own metadata.", ""]
    return "\n".join(lines)
