"""One checkpoint contract for every model, resume and eval.

- Files are read with ``torch.load(weights_only=True)``: a checkpoint cannot run code when read. One
  class beyond plain data is allowed: ``argparse.Namespace`` (ULIP's files pickle their ``args``),
  rebuilt as a bag of attributes, which runs no code.
- A state dict may sit bare, under ``"model"`` or ``"state_dict"``, with or without ``module.``.
- Keys of *frozen* top-level parts (a frozen encoder, a frozen OPT) may be absent: runner checkpoints
  leave them out. They are reported, never required. A part is absent whole or present whole: a file
  holding any of its parameters must hold all its keys (LAVIS's runner keeps a frozen part's buffers
  and the second name of a tied weight, the OPT's ``lm_head.weight``: that part counts as absent, and
  what the runner kept loads).
- Of names the model ties to one tensor, one in the file is enough.
- Keys a model declares ignorable (regexes: stage-1 heads when stage 2 starts from a stage-1 file,
  an image encoder in a BLIP-2 file) are reported and skipped.
- Parts a model declares optional for a load (what stage 2 adds to a stage-1 file) may be absent,
  whole too: a file holding any parameter of one must hold all its keys.
- Anything else missing, unexpected or mis-shaped stops with an error that lists the keys (the first
  ten of each kind, and how many more).
"""
import argparse
import logging
import os
import pickle
import re
from collections import Counter

import torch

log = logging.getLogger(__name__)


class CheckpointError(RuntimeError):
    pass


def read_checkpoint(path: str) -> dict:
    """The whole checkpoint object (a dict of plain data and tensors) from ``path``."""
    if str(path).startswith(("http://", "https://")):
        raise CheckpointError(f"{path}: a URL: lavis-point reads checkpoints from local files only (no "
                              f"downloads at run time); download it and give its path")
    if not os.path.isfile(path):
        raise CheckpointError(f"{path}: checkpoint file not found")
    try:
        with open(path, "rb") as f:
            head = f.read(512)
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read the checkpoint ({e.strerror})") from None
    if (looks_like := _not_a_checkpoint(head)) is not None:
        raise CheckpointError(f"{path}: {looks_like}")
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise CheckpointError(
            f"{path}: refused to load: it holds objects beyond tensors and plain containers, and "
            f"lavis-point only reads checkpoints with weights_only=True, so no file can run code when read "
            f"({_unpickler_reason(e)}). If you trust the file, re-save its tensors as plain data: "
            f"torch.save({{'model': state_dict}}, path)"
        ) from e
    except (RuntimeError, EOFError) as e:
        raise CheckpointError(f"{path}: not a readable torch checkpoint (truncated or corrupt?): {e}") from e
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: expected a dict, found {type(obj).__name__}")
    return obj


def is_git_lfs_pointer(head: bytes) -> bool:
    """Whether a file starting with ``head`` is a git-lfs pointer (a clone without git-lfs leaves these
    text files where the weights should be)."""
    return head.lstrip(b"\xef\xbb\xbf \t\r\n").lower().startswith(b"version https://git-lfs")


def _not_a_checkpoint(head: bytes):
    """What a file starting with ``head`` looks like when torch.save cannot have written it (it writes
    a zip archive; before torch 1.6, a pickle stream of protocol 2 or more; before 0.4, a tar
    archive), else None. Without this, an error page or a git-lfs pointer read as an unsafe pickle."""
    if head.startswith(b"PK\x03\x04") or head[257:262] == b"ustar":
        return None
    if len(head) > 1 and head[0] == 0x80 and 2 <= head[1] <= 5:
        return None
    if not head:
        return "an empty file, not a checkpoint (an interrupted download or save?)"
    start = head.lstrip(b"\xef\xbb\xbf \t\r\n").lower()
    if is_git_lfs_pointer(head):
        return ("a git-lfs pointer, not the checkpoint: run git lfs pull in its repository "
                "(or download the file itself)")
    if start.startswith((b"<!doctype html", b"<html")) or b"<html" in start:
        return "an HTML page, not a checkpoint: a failed download (an error or sign-in page?); download it again"
    if start.startswith(b"<?xml"):
        return ("an XML document, not a checkpoint: a failed download (a storage service's error reply?); "
                "download it again")
    if len(head) > 8 and head[8:9] == b"{" and int.from_bytes(head[:8], "little") < 100_000_000:
        return ("a safetensors file, not a torch checkpoint: read it with safetensors.torch.load_file and "
                "save that dict with torch.save({'model': state_dict}, path)")
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError as e:  # a character cut at the end of the 512 bytes still counts as text
        text = head[: e.start].decode("utf-8") if e.reason == "unexpected end of data" else None
    text = None if text is None else text.lstrip("\ufeff").strip()
    if text is not None and all(c.isprintable() or c in "\t\r\n" for c in text):
        return f"a text file, not a checkpoint (it starts {text.splitlines()[0][:60]!r})" if text else \
            "a file of blank lines, not a checkpoint"
    return (f"neither a zip archive (torch.save) nor a pickle stream: it starts {head[:8].hex(' ')}; "
            "a file of another format, or corrupt")


def _unpickler_reason(error) -> str:
    """The line of torch's weights-only message that names what the file asked for."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    named = [line for line in lines if "Unsupported" in line or "GLOBAL" in line]
    reason = (named or lines or [type(error).__name__])[0]
    return reason.removeprefix("WeightsUnpickler error: ").split(" was not an allowed global")[0]


def state_dict_of(obj: dict, path: str = "") -> dict:
    """The tensor mapping inside a checkpoint object, with any DDP ``module.`` prefix removed."""
    for key in ("model", "state_dict"):
        if key in obj and isinstance(obj[key], dict):
            obj = obj[key]
            break
    if not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"{path}: no state dict of tensors found (keys: {sorted(obj)[:10]})")
    return {k[len("module."):] if k.startswith("module.") else k: v for k, v in obj.items()}


def select_prefix(state_dict: dict, prefix: str) -> dict:
    """Entries under ``prefix`` with the prefix removed; the whole dict when no key has it."""
    if not any(k.startswith(prefix) for k in state_dict):
        return dict(state_dict)
    return {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}


def frozen_prefixes(model: torch.nn.Module) -> list:
    """Top-level parts that are frozen, which runner checkpoints leave out: those the model's
    ``frozen_parts()`` names where it has one (ours: what its config freezes, so freezing a model by
    hand for inference makes no trained part optional), else children whose parameters are all frozen."""
    if hasattr(model, "frozen_parts"):
        return [name + "." for name in model.frozen_parts()]
    out = []
    for name, child in model.named_children():
        params = list(child.parameters())
        if params and not any(p.requires_grad for p in params):
            out.append(name + ".")
    return out


def holds_parameters_of(state_dict: dict, model: torch.nn.Module, part: str) -> bool:
    """Whether ``state_dict`` holds any parameter of ``model``'s ``part`` (a prefix: "point_encoder.",
    "pc_projection") under the name ``named_parameters()`` gives it. What LAVIS's runner keeps of a
    frozen part does not count: its buffers (BatchNorm statistics) and the second name of a tied weight
    (the OPT's ``lm_head.weight``, tied to its input embeddings), since the runner drops parameters by
    those names."""
    return any(name.startswith(part) and name in state_dict for name, _ in model.named_parameters())


def trainable_state_dict(model: torch.nn.Module) -> dict:
    """The state dict without the frozen top-level parts (what our runner saves)."""
    skip = tuple(frozen_prefixes(model))
    return {k: v for k, v in model.state_dict().items() if not (skip and k.startswith(skip))}


def _partition(keys, accept):
    """(keys where accept(key), the other keys), each in order."""
    yes, no = [], []
    for k in keys:
        (yes if accept(k) else no).append(k)
    return yes, no


def _listed(keys, limit=10):
    """The first ``limit`` keys, then how many more and under which top-level parts: a load error stays
    readable at GPT4Point size and still names every part it concerns."""
    keys = list(keys)
    if len(keys) <= limit:
        return str(keys)
    parts = Counter(k.split(".")[0] + (".*" if "." in k.split(":")[0] else "") for k in keys)
    return (f"{keys[:limit]} and {len(keys) - limit} more (by part: "
            f"{', '.join(f'{part} {n}' for part, n in parts.items())})")


def _tied_groups(model):
    """Lists of two or more parameter names the model ties to one tensor (the Q-Former's LM decoder and
    word embeddings, the OPT's head and input embeddings)."""
    groups = {}
    for name, tensor in model.named_parameters(remove_duplicate=False):
        groups.setdefault((tensor.data_ptr(), tensor.shape), []).append(name)
    return [names for names in groups.values() if len(names) > 1]


def _tied_disagreements(model, state_dict):
    """Tied groups whose values in ``state_dict`` differ."""
    disagreeing = []
    for names in _tied_groups(model):
        values = [state_dict[n] for n in names if n in state_dict]
        if len(values) > 1 and not all(torch.equal(values[0], v) for v in values[1:]):
            disagreeing.append(names)
    return disagreeing


def load_state_dict_checked(model, state_dict, source="", optional_prefixes=(), ignore_patterns=(),
                            frozen_may_be_absent=True):
    """Load ``state_dict`` into ``model`` under the contract above; returns a summary dict.
    ``frozen_may_be_absent=False``: every key is required, frozen or not (a file made for this module)."""
    # A part that may be absent (frozen, or optional for this load) is absent whole or present whole.
    parts = list(optional_prefixes) + (frozen_prefixes(model) if frozen_may_be_absent else [])
    present, absent = _partition(dict.fromkeys(parts), lambda part: holds_parameters_of(state_dict, model, part))
    optional = tuple(absent)
    ignore = [re.compile(p) for p in ignore_patterns]
    own = model.state_dict()
    ignored, unexpected = _partition((k for k in state_dict if k not in own),
                                     lambda k: any(p.match(k) for p in ignore))
    # One name of a tied tensor loads all its names.
    held_by_alias = {k for names in _tied_groups(model) if any(n in state_dict for n in names) for k in names}
    absent_ok, missing = _partition((k for k in own if k not in state_dict and k not in held_by_alias),
                                    lambda k: bool(optional) and k.startswith(optional))
    mis_shaped = [
        f"{k}: checkpoint {tuple(v.shape)} vs model {tuple(own[k].shape)}"
        for k, v in state_dict.items()
        if k in own and v.shape != own[k].shape
    ]
    problems = []
    if missing:
        problems.append(f"missing keys ({len(missing)}): {_listed(missing)}")
        problems.extend(f"{part.rstrip('.')}: the file holds some of its weights but not all; it may be absent "
                        f"as a whole, never in part (a file cut short, or made for another config?)"
                        for part in present if any(k.startswith(part) for k in missing))
    if unexpected:
        problems.append(f"unexpected keys ({len(unexpected)}): {_listed(unexpected)}")
    if mis_shaped:
        problems.append(f"mis-shaped keys ({len(mis_shaped)}): {_listed(mis_shaped)}")
    elif disagreeing := _tied_disagreements(model, state_dict):
        problems.append(f"tied keys with different values ({len(disagreeing)}): {disagreeing} (the model holds one "
                        "tensor for each group: loading would keep one value and drop the other silently; a "
                        "Q-Former trained with its LM decoder untied loads with "
                        "model.qformer.tie_word_embeddings=false)")
    if problems:
        raise CheckpointError(f"{source}: cannot load into {type(model).__name__}:\n  " + "\n  ".join(problems))
    model.load_state_dict({k: v for k, v in state_dict.items() if k in own}, strict=False)
    summary = {
        "source": source,
        "loaded": len(state_dict) - len(ignored),
        "absent_frozen_or_optional": len(absent_ok),
        "ignored": len(ignored),
    }
    log.info(
        "%s: loaded %d tensors into %s; %d absent (frozen/optional parts: %s); %d ignored",
        source, summary["loaded"], type(model).__name__, len(absent_ok),
        sorted({k.split(".")[0] for k in absent_ok}), len(ignored),
    )
    return summary


def save_checkpoint_atomic(obj: dict, path: str) -> None:
    """Write to a temporary file beside ``path`` and rename: a kill never leaves half a file."""
    tmp = f"{path}.tmp-{os.getpid()}"
    torch.save(obj, tmp)
    os.replace(tmp, path)
