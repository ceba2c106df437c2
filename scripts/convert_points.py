"""Annotations + a folder of per-object clouds or meshes -> shards the training dataset memory-maps.

    python scripts/convert_points.py --annotations cap3d_train.json --clouds Cap3D_pcs_pkl \
        --out data/cap3d/shards --split train --workers 8
    python scripts/convert_points.py --annotations Cap3D_automated_Objaverse.csv --clouds clouds \
        --out data/cap3d/shards --split-fractions train=0.98,val=0.01,test=0.01

Annotations: GPT4Point JSON ([{"point", "caption"}]), Cap3D CSV (uid,caption) or JSONL. Clouds:
.pkl (restricted unpickler: no code runs), .npy, .npz, .ply, .pts/.xyz/.txt, or meshes (.obj .ply .glb
.gltf .off .stl, sampled by area with their colours). Interrupted? Run the same command again: finished
chunks are kept, except those whose objects or files changed since, which are converted again. Bad files are skipped and listed with their reason in {out}/{split}_report.json.
A cloud far from the origin for its size is stored centred, its offset in its index entry and the report.
Each shard gets a _stats.npy beside it (per-cloud centre, radius, colour range) so that training
processes each cloud in one pass.
"""
import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from lavis_point.data_io.convert import convert_split, split_by_id  # noqa: E402
from lavis_point.datasets.cap3d import locate_clouds, read_annotations  # noqa: E402


def fractions(text):
    try:
        pairs = [part.split("=") for part in text.split(",")]
        return {name.strip(): float(share) for name, share in pairs}
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected e.g. train=0.98,val=0.01,test=0.01, got '{text}'") from None


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--annotations", required=True, help=".json (GPT4Point), .csv (Cap3D) or .jsonl")
    parser.add_argument("--clouds", required=True, help="folder of per-object clouds or meshes")
    parser.add_argument("--out", required=True, help="output folder of shards")
    which = parser.add_mutually_exclusive_group()
    which.add_argument("--split", default="train", help="name of the split all annotations go to")
    which.add_argument("--split-fractions", type=fractions, help="split by a hash of each id: train=0.98,...")
    parser.add_argument("--num-points", type=int, default=8192, help="points stored per cloud")
    parser.add_argument("--shard-size", type=int, default=2048, help="clouds per shard file (and resume chunk)")
    parser.add_argument("--workers", type=int, default=os.cpu_count(), help="reader processes (0: in process)")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    try:
        return convert(args)
    except (OSError, ValueError) as e:  # bad annotations, a refused resume...: the message, not a traceback
        print(f"convert_points: {e}", file=sys.stderr)
        return 2


def convert(args):
    located, missing = locate_clouds(read_annotations(args.annotations), args.clouds)
    if args.split_fractions:
        located_by, missing_by = split_by_id(located, args.split_fractions), split_by_id(missing, args.split_fractions)
    else:
        located_by, missing_by = {args.split: located}, {args.split: missing}
    total = 0
    for split in located_by:
        report = convert_split(located_by[split], missing_by[split], args.clouds, args.out, split,
                               num_points=args.num_points, shard_size=args.shard_size, workers=args.workers,
                               progress=not args.no_progress)
        total += report["converted"]
        print(f"{split}: {report['converted']} converted, {report['bad']} bad of {report['objects']} "
              f"(list: {os.path.join(args.out, split + '_report.json')})")
        for redo in report["reconverted"][:10]:
            print(f"  chunk {redo['chunk']} converted again: {redo['why']}")
        if report["centred"]:
            print(f"  {report['centred']} stored centred: far from the origin for their size, float16 would lose "
                  "their shape (each one's offset is in its index entry and the report)")
        for bad in report["bad_files"][:10]:
            print(f"  bad: {bad['path'] or bad['id']}: {bad['reason']}")
        if report["bad"] > 10:
            print(f"  ... and {report['bad'] - 10} more in the report")
    print(json.dumps({"converted": total}))
    return 0 if total else 1


if __name__ == "__main__":
    sys.exit(main())
