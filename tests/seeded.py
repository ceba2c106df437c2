"""Processors whose every call takes the same draws: a test device only."""


def seeded(processor_cls, cfg):
    """``processor_cls.from_config(cfg)`` with ``cfg["seed"]`` (if any) set on it: each call then draws
    its augmentation from that seed alone, so a batch and its clouds one by one can be compared.
    ``from_config`` refuses ``seed``: in a run it would give every cloud of every epoch one transform."""
    cfg = dict(cfg)
    seed = cfg.pop("seed", None)
    processor = processor_cls.from_config(cfg)
    processor.seed = seed
    return processor
