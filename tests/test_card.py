"""The model card and the sharing picture (onnxzip.card): written beside the merged model from the same
figures as the report, and the picture that inspect --plot draws."""

import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

import builders as B
from onnxzip.api import merge
from onnxzip.card import BAR_HEIGHT, BAR_WIDTH, LABEL_WIDTH, LEGEND_HEIGHT, MARGIN, OWN_COLOURS, ROW_GAP, SHARED_COLOUR, \
    sharing_picture
from onnxzip.options import MergeOptions
from onnxzip.plan import LayerPlan, SharingPlan


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "onnxzip.cli.main", *map(str, args)], capture_output=True, text=True)


@pytest.fixture(scope="module")
def merged(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("card")
    paths = [B.save(B.cnn_model(B.cnn_weights(s)), tmp / f"{n}.onnx") for n, s in (("a", 0), ("b", 1))]
    calib = B.calib_folder(tmp / "c", (1, 12, 12), 48)
    labels = np.random.default_rng(0).integers(0, 10, 32)
    ev = B.calib_folder(tmp / "ev", (1, 12, 12), 32, seed=3, labels=labels)
    out = tmp / "m.onnx"
    proc = _cli("merge", *paths, "--calib", calib, "-o", out, "--share", "0.5", "--layout", "gated", "--eval", f"b={ev}")
    assert proc.returncode == 0, proc.stderr
    return tmp, out, paths, calib


def test_merge_writes_a_model_card_from_the_reports_figures(merged):
    tmp, out, _, _ = merged
    card = (tmp / "m.card.md").read_text()
    assert card.startswith("# m.onnx\n") and "2 tasks (a, b)" in card
    assert "from `a.onnx` (SHA-256 `" in card and "reads `input` [N, 1, 12, 12]" in card
    assert "an int64 scalar input `task` selects a task (0 = `a`, 1 = `b`); the output `output`" in card
    for row in ("| conv1 | 6/6 | 3 | 30 |", "| conv2 | 8/8 | 4 | 112 |", "| fc1 | 24/24 | 12 | 204 |", "| fc2 | 10/10 | 0 | 0 |"):
        assert row in card
    assert "![sharing per layer: shared units first, then each task's own](m.sharing.png)" in card
    assert "2,738 parameters against 3,084 in the inputs (11.2% fewer)" in card
    b_row = next(line for line in card.splitlines() if line.startswith("| b | 48 |"))
    assert b_row.count("%") == 3  # agreement, accuracy original and merged (b has --eval)
    assert "- Command: `onnxzip merge " in card and "--layout gated" in card
    assert Image.open(tmp / "m.sharing.png").size[0] == 2 * MARGIN + LABEL_WIDTH + BAR_WIDTH


def test_inspect_plot_draws_the_pictures_of_the_merge_and_refuses_the_merged_file(merged):
    tmp, out, _, _ = merged
    proc = _cli("inspect", out, "--plot", tmp / "p.png")
    assert proc.returncode == 0, proc.stderr
    assert (tmp / "p.png").read_bytes() == (tmp / "m.sharing.png").read_bytes()
    before = out.read_bytes()
    proc = _cli("inspect", out, "--plot", out)
    assert proc.returncode == 2 and "--plot" in proc.stderr and out.read_bytes() == before


def test_no_card_writes_neither(merged, tmp_path):
    _, _, paths, calib = merged
    merge(paths, calib, tmp_path / "m.onnx", MergeOptions(share=0.5, card=False))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx"]


def test_the_picture_draws_each_tasks_shared_units_then_its_own():
    plan = SharingPlan(("a", "b"), (LayerPlan("conv1", "conv", (8, 4), ((0, 1), (1, 0))), LayerPlan("fc1", "fc", (8, 8))))
    image = sharing_picture(plan)
    x0, top = MARGIN + LABEL_WIDTH, MARGIN + LEGEND_HEIGHT
    px = lambda x, y: image.getpixel((x, y))  # noqa: E731
    y_a, y_b = top + 1, top + BAR_HEIGHT + 1
    unit = BAR_WIDTH // 8
    assert px(x0 + unit, y_a) == SHARED_COLOUR and px(x0 + 3 * unit, y_a) == OWN_COLOURS[0]  # 2 of a's 8 shared
    assert px(x0 + unit, y_b) == SHARED_COLOUR and px(x0 + 3 * unit, y_b) == OWN_COLOURS[1]  # 2 of b's 4
    assert px(x0 + 5 * unit, y_b) == (255, 255, 255)  # b's bar ends at its 4 units
    y_fc = top + 2 * BAR_HEIGHT + ROW_GAP + 1
    assert px(x0 + unit, y_fc) == OWN_COLOURS[0]  # nothing shared in fc1
