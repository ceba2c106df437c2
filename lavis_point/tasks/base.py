"""What every lavis-point task shares, and why it differs from LAVIS's BaseTask.

LAVIS 1.0.2's training loop assumes CUDA: its metric logger all-reduces on a "cuda" tensor and it
wraps steps in ``torch.cuda.amp.autocast``; its ``evaluation`` moves batches to CUDA unless told
otherwise. Our loop is the same loop (lr schedule per step, gradient accumulation, AMP with a scaler)
written for any device; on a GPU it behaves as LAVIS's does.

Batches carry ``"skipped"``: the bad samples met while loading them (datasets/bad_samples.py). Both
loops pop it, count, and log the total over all ranks at the end of the epoch; the train stats
(``log.txt``) carry it as ``skipped_samples``.
"""
import logging

import torch
import torch.distributed as dist
from lavis.common.dist_utils import is_dist_avail_and_initialized
from lavis.common.logger import MetricLogger, SmoothedValue
from lavis.datasets.data_utils import prepare_sample
from lavis.tasks.base_task import BaseTask

from lavis_point.tasks.eval_io import all_gather_objects


def model_device(model):
    return next(model.parameters()).device


def collective_device():
    """Where tensors must lie for this process group's collectives (one rule for every task): nccl
    takes CUDA tensors only, on this process's GPU (cli_run.init_distributed sets it from the local
    rank); gloo, CPU ones."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def synchronize_meters(metric_logger):
    """Average the meters' totals over ranks."""
    if not is_dist_avail_and_initialized():
        return
    device = collective_device()
    for meter in metric_logger.meters.values():
        t = torch.tensor([meter.count, meter.total], dtype=torch.float64, device=device)
        dist.all_reduce(t)
        meter.count, meter.total = int(t[0].item()), t[1].item()


def report_skipped(failures, when, distinct=False):
    """Log how many samples were skipped over all ranks (and this rank's first reasons); returns the total.
    ``distinct``: count each failure once (evaluation, where a DistributedSampler pads the last ranks
    with the first items again, so two ranks can meet the same bad item; messages name the item)."""
    if distinct:
        total = len(set().union(*all_gather_objects(set(failures))))
    else:
        total = len(failures)
        if is_dist_avail_and_initialized():
            t = torch.tensor([total], dtype=torch.int64, device=collective_device())
            dist.all_reduce(t)
            total = int(t.item())
    if total:
        logging.warning("%s: skipped %d bad samples over all ranks (each logged when met); first here: %s",
                        when, total, failures[:5])
    return total


class PointBaseTask(BaseTask):
    skipped_in_evaluation = 0  # bad samples the last evaluation dropped, over all ranks (for metrics)

    def evaluation(self, model, data_loader, cuda_enabled=None):
        """LAVIS's loop on any device; bad samples are dropped, counted and reported."""
        device = model_device(model)
        metric_logger = MetricLogger(delimiter="  ")
        results, failures = [], []
        for samples in metric_logger.log_every(data_loader, 10, "Evaluation"):
            failures.extend(samples.pop("skipped", ()))
            if not samples:  # every item of this batch was bad
                continue
            samples = prepare_sample(samples, cuda_enabled=device.type == "cuda")
            results.extend(self.valid_step(model=model, samples=samples))
        self.skipped_in_evaluation = report_skipped(failures, "evaluation", distinct=True)
        if is_dist_avail_and_initialized():
            dist.barrier()
        return results

    def _train_inner_loop(self, epoch, iters_per_epoch, model, data_loader, optimizer, lr_scheduler,
                          scaler=None, start_iters=None, log_freq=50, cuda_enabled=False, accum_grad_iters=1):
        device = model_device(model)
        data_iter = data_loader if hasattr(data_loader, "__next__") else iter(data_loader)
        metric_logger = MetricLogger(delimiter="  ")
        metric_logger.add_meter("lr", SmoothedValue(window_size=1, fmt="{value:.6f}"))
        metric_logger.add_meter("loss", SmoothedValue(window_size=1, fmt="{value:.6f}"))
        inner_epoch = epoch if start_iters is None else start_iters // iters_per_epoch
        header = f"Train: data epoch: [{epoch}]"
        failures = []
        for i in metric_logger.log_every(range(iters_per_epoch), log_freq, header):
            samples = next(data_iter)
            failures.extend(samples.pop("skipped", ()))
            samples = prepare_sample(samples, cuda_enabled=device.type == "cuda")
            samples.update({"epoch": inner_epoch, "num_iters_per_epoch": iters_per_epoch, "iters": i})
            lr_scheduler.step(cur_epoch=inner_epoch, cur_step=i)
            with torch.autocast(device_type=device.type, enabled=scaler is not None):
                output = model(samples)
            loss = output["loss"]
            (scaler.scale(loss) if scaler is not None else loss).backward()
            if (i + 1) % accum_grad_iters == 0:
                if scaler is not None:
                    scaler.step(optimizer)
                    scaler.update()
                else:
                    optimizer.step()
                optimizer.zero_grad()
            metric_logger.update(loss=loss.item(), **{k: v.item() for k, v in output.items() if k != "loss"})
            metric_logger.update(lr=optimizer.param_groups[0]["lr"])
        synchronize_meters(metric_logger)
        logging.info("Averaged stats: " + str(metric_logger.global_avg()))
        stats = {k: "{:.4f}".format(meter.global_avg) for k, meter in metric_logger.meters.items()}
        stats["skipped_samples"] = report_skipped(failures, f"train epoch {epoch}")
        return stats
