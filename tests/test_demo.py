"""The main job (python -m fastema demo): trains, prints raw vs EMA validation loss, and writes a
PNG with the validation curves of both weights and the raw and smoothed training loss."""
import subprocess
import sys

import numpy as np
import pytest


def _pixels_near(img, rgb, tol=0.08):
    return int((np.abs(img[..., :3] - np.array(rgb) / 255.0).max(axis=-1) < tol).sum())


def test_demo_prints_both_losses_and_draws_both_curves(tmp_path):
    image = pytest.importorskip("matplotlib.image")
    out = tmp_path / "demo.png"
    r = subprocess.run([sys.executable, "-m", "fastema", "demo", "--steps", "400", "--out", str(out)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "raw weights:" in r.stdout and "EMA weights (decay" in r.stdout
    assert r.stdout.strip().splitlines()[-1] == f"plot: {out}"
    data = out.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    img = image.imread(out)
    assert img.shape[0] > 300 and img.shape[1] > 800
    assert _pixels_near(img, (31, 119, 180)) > 500            # EMA validation curve (tab:blue)
    assert _pixels_near(img, (127, 127, 127)) > 300           # raw validation curve (tab:gray)
    assert _pixels_near(img, (255, 127, 14)) > 500            # Smoother's training-loss EMA (tab:orange)
