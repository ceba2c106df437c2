"""docs/embedded_captions.png: the embedded default's trained stage 2 captioning a few test clouds,
drawn by ``lavis-point caption --render`` itself.

The clouds come from the embedded dataset's generator: two shape x colour pairs held out of training
(as in the test split) and two seen in training, each written in a different file format and named
after what it really is, so the picture shows the truth (file name) beside the caption.

    python scripts/render_readme_figure.py                      # after scripts/run_embedded_default.py
    python scripts/render_readme_figure.py --checkpoint PATH --out docs/embedded_captions.png
"""
import argparse
import os
import pickle
import sys
import tempfile

import numpy as np
import trimesh

from lavis_point.cli import main as lavis_point
from lavis_point.datasets.shapes import heldout_combinations, sample_cloud
from lavis_point.inference import default_checkpoint

# (shape, colour, size, format): the first two pairs never occur in training.
HELDOUT = sorted(heldout_combinations())
CLOUDS = [(*HELDOUT[0], "large", ".ply"), (*HELDOUT[1], "small", ".npy"),
          ("sphere", "red", "medium", ".xyz"), ("torus", "blue", "large", ".pkl")]


def write_cloud(path, cloud):
    ext = os.path.splitext(path)[1]
    if ext == ".ply":
        trimesh.PointCloud(cloud[:, :3], colors=(cloud[:, 3:] * 255).round().astype(np.uint8)).export(path)
    elif ext == ".npy":
        np.save(path, cloud)
    elif ext == ".pkl":
        with open(path, "wb") as f:
            pickle.dump(cloud, f)  # Cap3D's format; read back through the restricted unpickler
    else:
        np.savetxt(path, cloud, fmt="%.5f")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", default=default_checkpoint("point_opt"))
    parser.add_argument("--out", default=os.path.join("docs", "embedded_captions.png"))
    parser.add_argument("--seed", type=int, default=7)
    args = parser.parse_args()
    rng = np.random.default_rng(args.seed)
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with tempfile.TemporaryDirectory() as folder:
        files = []
        for shape, colour, size, ext in CLOUDS:
            held_out = (shape, colour) in HELDOUT
            name = f"{size} {colour} {shape}{' (held-out pair)' if held_out else ''}{ext}"
            files.append(os.path.join(folder, name))
            write_cloud(files[-1], sample_cloud(shape, colour, size, rng))
        return lavis_point(["caption", *files, "--checkpoint", args.checkpoint, "--render", args.out,
                            "--render-size", f"900x{280 * len(files)}", "--quiet"])


if __name__ == "__main__":
    sys.exit(main())
