"""``lavis-point``: caption, question, classify and compare point-cloud and mesh files.

    lavis-point caption chair.ply table.obj          # FILE: caption, one line each
    lavis-point ask chair.ply "what colour is it?"
    lavis-point classify *.npy --labels cube,sphere,cone
    lavis-point similarity chair.ply "a red chair" --json
    lavis-point caption chair.ply --render chair.png --render-size 900x320

caption / ask use stage 2 (``point_opt``), classify / similarity stage 1 (``point_qformer``). One bad
file is reported on stderr (and in ``--json``) and the others still answer; the exit status is 1
when any file failed, 2 when nothing could run (no weights, bad options).
"""
import argparse
import json
import logging
import os
import sys

import torch
from tqdm import tqdm

from lavis_point.data_io import CLOUD_EXTS, CloudReadError
from lavis_point.inference import (
    DEFAULT_TEMPLATES,
    QA_PROMPT,
    RUN_DIR_ENV,
    MissingWeightsError,
    answer_questions,
    build_point_model,
    classify_points,
    load_points,
    min_points_for,
    model_config,
    one_line,
    point_text_scores,
    resolve_checkpoint,
)
from lavis_point.models.checkpoint import CheckpointError

STAGE_OF = {"caption": "point_opt", "ask": "point_opt", "classify": "point_qformer", "similarity": "point_qformer"}


class UsageError(Exception):
    """Nothing can run: bad options, no weights. Exit status 2."""


def positive_int(text):
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {text}")
    return value


def build_parser():
    parser = argparse.ArgumentParser(
        prog="lavis-point", description="Caption, question, classify and compare point clouds and meshes "
        f"({' '.join(CLOUD_EXTS)}).")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    caption = commands.add_parser("caption", help="describe each cloud in a sentence (stage 2)")
    caption.add_argument("files", nargs="+", metavar="FILE")
    _add_generation(caption, max_length=30)

    ask = commands.add_parser("ask", help="answer a question about each cloud (stage 2)")
    ask.add_argument("files", nargs="+", metavar="FILE")
    ask.add_argument("question", metavar="QUESTION")
    ask.add_argument("--prompt-template", default=QA_PROMPT,
                     help="how the question is put to the model, {} = the question (default: %(default)r)")
    _add_generation(ask, max_length=10)

    classify = commands.add_parser("classify", help="zero-shot: the most similar of some labels (stage 1)")
    classify.add_argument("files", nargs="+", metavar="FILE")
    labels = classify.add_mutually_exclusive_group(required=True)
    labels.add_argument("--labels", help="comma-separated labels: cube,sphere,cone")
    labels.add_argument("--labels-file", help="a text file with one label per line")
    classify.add_argument("--template", action="append", dest="templates", metavar="TEMPLATE",
                          help="a prompt for each label, {} = the label; repeat for several "
                          f"(default: {', '.join(repr(t) for t in DEFAULT_TEMPLATES)})")
    classify.add_argument("--top-k", type=positive_int, default=3, help="labels shown per file in text output")

    similarity = commands.add_parser("similarity", help="cosine similarity of each cloud to a text (stage 1)")
    similarity.add_argument("files", nargs="+", metavar="FILE")
    similarity.add_argument("text", metavar="TEXT")

    for sub in (caption, ask, classify, similarity):
        _add_common(sub)
    return parser


def _add_generation(parser, max_length):
    group = parser.add_argument_group("generation")
    group.add_argument("--num-beams", type=positive_int, default=5)
    group.add_argument("--max-length", type=positive_int, default=max_length, help="most generated tokens")
    group.add_argument("--min-length", type=int, default=1, help="fewest generated tokens")


def _add_common(parser):
    model = parser.add_argument_group("model")
    model.add_argument("--checkpoint", help="weights to load (default: the embedded default's trained "
                       f"checkpoint under ${RUN_DIR_ENV} or output/embedded)")
    model.add_argument("--model-type", help="a model type of this stage's model (default: the embedded default's)")
    model.add_argument("--cfg", help="a YAML with model: (and preprocess:) sections, e.g. a LAVIS run YAML")
    model.add_argument("--options", nargs="+", default=[], metavar="KEY=VALUE",
                       help="config overrides, e.g. model.prompt='a 3D point cloud of '")
    model.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    io = parser.add_argument_group("input and output")
    io.add_argument("--mesh-points", type=positive_int, default=8192, help="points sampled from each mesh")
    io.add_argument("--min-points", type=int, help="fewer points is an error (default: the encoder's group count)")
    io.add_argument("--batch-size", type=positive_int, default=8)
    io.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    io.add_argument("--render", metavar="PNG", help="draw each cloud from three viewpoints, titled with its answer")
    io.add_argument("--render-size", default=None, metavar="WxH", help="pixels (default: 900 x 320 per cloud)")
    io.add_argument("--quiet", action="store_true", help="no progress bar")


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        return run(args)
    except (UsageError, MissingWeightsError, CheckpointError, ValueError) as e:
        print(f"lavis-point: error: {e}", file=sys.stderr)
        return 2


def run(args) -> int:
    from lavis_point.cli.render import parse_size, render_clouds  # matplotlib only when drawing

    render_size = parse_size(args.render_size) if args.render_size else None
    command = _command(args)
    _check_device(args.device)
    cfg = model_config(STAGE_OF[args.command], args.model_type, args.cfg, args.options)
    checkpoint = resolve_checkpoint(cfg, args.checkpoint, args.cfg)
    model, processor = _build(cfg, checkpoint, args.device)
    min_points = args.min_points if args.min_points is not None else min_points_for(model)

    files = args.files
    results, drawn = [None] * len(files), []
    progress = tqdm(total=len(files), unit="file", disable=args.quiet or len(files) < 2 or None, file=sys.stderr)
    for start in range(0, len(files), args.batch_size):
        read, tensors = [], []  # positions in files, (num_points, 6) tensors
        for i in range(start, min(start + args.batch_size, len(files))):
            try:
                tensors.append(load_points(files[i], processor, min_points, args.mesh_points))
                read.append(i)
            except CloudReadError as e:
                results[i] = {"file": files[i], "error": e.reason}
                print(f"lavis-point: {e}", file=sys.stderr)
        if read:
            answers = command(model, torch.stack(tensors).to(args.device))  # points (B, num_points, 6)
            for i, tensor, answer in zip(read, tensors, answers):
                results[i] = {"file": files[i], **answer}
                drawn.append((tensor, files[i], answer))
        progress.update(min(args.batch_size, len(files) - start))
    progress.close()

    report = {"command": args.command, "model": {"arch": cfg.model.arch, "model_type": cfg.model.model_type,
                                                 "checkpoint": checkpoint or cfg.model.get("finetuned")
                                                 or cfg.model.get("pretrained")},
              "results": results}
    render_failed = False
    if args.render:
        if drawn:
            titles = [_title(path, answer, len(drawn)) for _, path, answer in drawn]
            try:
                render_clouds([t for t, _, _ in drawn], titles, args.render, render_size)
                report["render"] = args.render
            except (OSError, ValueError) as e:  # the answers are still printed below
                print(f"lavis-point: cannot render to {args.render}: {e}", file=sys.stderr)
                render_failed = True
        else:
            print(f"lavis-point: nothing to render to {args.render}: no file was read", file=sys.stderr)
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        for r in results:
            if "error" not in r:
                print(f"{r['file']}: {_text(r, args)}")
    return 1 if render_failed or any("error" in r for r in results) else 0


def _check_device(name):
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UsageError(f"--device {name}: not a device (e.g. cpu, cuda, cuda:1)") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UsageError(f"--device {name}: no GPU is visible (torch.cuda.is_available() is false); "
                             "use --device cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise UsageError(f"--device {name}: there is no GPU {device.index} ({torch.cuda.device_count()} visible)")


def _build(cfg, checkpoint, device):
    """build_point_model, whose failures to find or place a part (an OPT neither on the hub nor in a
    local folder, a device out of memory) are usage errors: nothing can run."""
    try:
        return build_point_model(cfg, checkpoint, device)
    except (CheckpointError, MissingWeightsError):
        raise
    except (OSError, torch.cuda.OutOfMemoryError) as e:  # other errors are bugs: their traceback shows
        message = one_line(e)
        opt = cfg.model.get("opt_model")
        if opt and str(opt) in message:
            message += (f" (model.opt_model is {str(opt)!r}: a hub name needs the hub or its cache; "
                        "a local folder, --options model.opt_model=PATH, needs the model's files)")
        raise UsageError(f"cannot build {cfg.model.arch} {cfg.model.model_type}: {message}") from e


def _check_template(flag, template, slot):
    """``template`` takes the ``slot`` (question, label) at its one ``{}``; UsageError otherwise."""
    if template.count("{}") != 1:
        raise UsageError(f"{flag} needs exactly one {{}} for the {slot}, got {template!r}")
    try:
        template.format(slot)
    except (IndexError, KeyError, ValueError) as e:
        raise UsageError(f"{flag} {template!r}: cannot fill its {{}} ({type(e).__name__}: {e}); "
                         f"{{}} is the only field it may hold; write a literal brace as {{{{ or }}}}") from None


def _command(args):
    """The model call for this subcommand: (model, points (B, N, 6)) -> one dict per cloud."""
    if args.command == "caption":
        return lambda model, points: [
            {"caption": c} for c in model.generate({"point": points}, num_beams=args.num_beams,
                                                   max_length=args.max_length, min_length=args.min_length)]
    if args.command == "ask":
        _check_template("--prompt-template", args.prompt_template, "question")
        return lambda model, points: [
            {"question": args.question, "answer": a}
            for a in answer_questions(model, points, [args.question] * len(points), prompt=args.prompt_template,
                                      num_beams=args.num_beams, max_len=args.max_length, min_len=args.min_length)]
    if args.command == "similarity":
        return lambda model, points: [{"text": args.text, "similarity": round(float(s), 4)}
                                      for s in point_text_scores(model, points, [args.text])[:, 0]]
    labels = _labels(args)
    templates = args.templates or list(DEFAULT_TEMPLATES)
    for template in templates:
        _check_template("--template", template, "label")

    def classify(model, points):
        probabilities = classify_points(model, points, labels, templates)  # (B, C)
        return [{"label": labels[int(p.argmax())],
                 "probabilities": {label: round(float(v), 4) for label, v in zip(labels, p)}} for p in probabilities]
    return classify


def _labels(args):
    if args.labels_file:
        if not os.path.isfile(args.labels_file):
            raise UsageError(f"{args.labels_file}: label file not found")
        try:
            with open(args.labels_file, "rb") as f:  # decoded whole: the error's byte is the file's
                text = f.read().decode("utf-8")
        except UnicodeDecodeError as e:
            raise UsageError(f"{args.labels_file}: not UTF-8 text (byte {e.start}: {e.reason})") from None
        except OSError as e:
            raise UsageError(f"{args.labels_file}: cannot read the label file ({e.strerror})") from None
        labels = [line.strip() for line in text.splitlines() if line.strip() and not line.startswith("#")]
        where = args.labels_file
    else:
        labels, where = [label.strip() for label in args.labels.split(",") if label.strip()], "--labels"
    if len(labels) < 2:
        raise UsageError(f"{where}: classify needs at least two labels, got {labels}")
    if len(set(labels)) != len(labels):
        raise UsageError(f"{where}: a label is repeated: {labels}")
    return labels


def _text(result, args):
    if "caption" in result:
        return result["caption"]
    if "answer" in result:
        return result["answer"]
    if "similarity" in result:
        return f"{result['similarity']:.4f}"
    ranked = sorted(result["probabilities"].items(), key=lambda kv: -kv[1])[: max(1, args.top_k)]
    return ", ".join(f"{label} ({p:.2f})" for label, p in ranked)


def _title(path, answer, count):
    if "caption" in answer:
        text = answer["caption"]
    elif "answer" in answer:
        text = f"{answer['question']} {answer['answer']}"
    elif "similarity" in answer:
        text = f"similarity to '{answer['text']}': {answer['similarity']:.3f}"
    else:
        text = f"{answer['label']} ({answer['probabilities'][answer['label']]:.2f})"
    return text if count == 1 else f"{os.path.basename(path)}: {text}"


if __name__ == "__main__":
    sys.exit(main())
