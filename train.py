"""Train with LAVIS's runner: python train.py --cfg-path projects/<stage>.yaml [--options k=v ...]
(or python -m torch.distributed.run --nproc_per_node=N train.py ...)."""
from lavis_point.cli_run import build_runner

if __name__ == "__main__":
    build_runner("lavis-point training").train()
