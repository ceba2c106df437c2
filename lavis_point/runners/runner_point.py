"""``runner_point``: LAVIS's RunnerBase with the smallest overrides that let it run on a CPU, in one
process or under torchrun, and keep checkpoints safe. Select it with ``run.runner: runner_point``.

Why each override (LAVIS 1.0.2, measured on CPU):
- ``model``: RunnerBase builds DDP with ``device_ids=[gpu]``; on CPU DDP must get none.
- ``create_loaders``: RunnerBase wraps loaders in ``PrefetchLoader``, which makes a CUDA stream.
- ``train``: RunnerBase calls ``dist.barrier()`` unguarded each epoch (fails in one process), and
  saves only after validation or per epoch; ours also saves ``checkpoint_last.pth`` every epoch (after
  validation, which draws random numbers too) for resume, with every rank's random state (rng_state.py),
  so a resumed run continues exactly where the uninterrupted one would be (same batches, augmentation,
  negatives; tests/test_kill_resume.py, tests/test_resume_validation.py), and with the best validation
  score so far: RunnerBase's resume starts it at 0, so any later epoch replaced the best checkpoint.
  The final test reloads ``checkpoint_best.pth`` only where this run saved one (or carried it over on
  resume); RunnerBase reloads it whenever there is a validation split and failed after the whole
  training when none was chosen (no split named 'val', agg_metrics never above 0).
- ``create_loaders``: a resumed run's first epoch is ``start_epoch``; LAVIS's IterLoader counts from 0,
  so a DistributedSampler would replay epoch 0's order. And no 2 s pause at each epoch change
  (``EpochLoader``).
- checkpoints: written atomically, without frozen parts (unless ``run.save_frozen_parts``), read
  with ``weights_only=True``, and loaded under the contract of ``lavis_point.models.checkpoint``
  (frozen parts may be absent).
- ``create_loaders``: ``run.batch_group_by`` (annotation fields, or a list of such groupings) and
  ``run.batch_groups_per_batch`` build training batches from a few groups of alike items
  (grouped_batches.py).
- ``optimizer``: RunnerBase's AdamW groups with the fused kernel (5x faster update on CPU).
- On CPU, freed host memory is kept for reuse (host_memory.py; ``run.keep_freed_memory: false`` turns
  it off): 10% of a CPU training step went to faulting in the tensors the previous step freed.
- ``setup_output_dir``: ``register_path`` refuses to overwrite, so a second run in one process failed.
On a GPU everything else is RunnerBase's.
"""
import datetime
import logging
import os
import shutil
import time
from pathlib import Path

import torch
import torch.distributed as dist
from lavis.common.dist_utils import get_rank, get_world_size, is_dist_avail_and_initialized, is_main_process
from lavis.common.registry import registry
from lavis.datasets.datasets.dataloader_utils import IterLoader, PrefetchLoader
from lavis.runners.runner_base import RunnerBase
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader, DistributedSampler

from lavis_point.datasets.batched_concat import with_batched_reads
from lavis_point.models.checkpoint import (
    CheckpointError,
    load_state_dict_checked,
    read_checkpoint,
    save_checkpoint_atomic,
    state_dict_of,
    trainable_state_dict,
)
from lavis_point.runners import rng_state
from lavis_point.runners.grouped_batches import GroupedBatchSampler, group_ids_of
from lavis_point.runners.host_memory import keep_freed_memory


# LAVIS's lr schedulers that warm up during epoch 0 only (lavis/common/optims.py)
LAVIS_EPOCH0_WARMUP = ("linear_warmup_cosine_lr", "linear_warmup_step_lr")


class EpochLoader(IterLoader):
    """LAVIS's IterLoader (endless; a new pass, and ``set_epoch`` on a distributed sampler, at each
    epoch change) without the 2 s ``time.sleep`` it adds at every epoch change, 12 s of the main job.
    Its comment names a possible deadlock, but none is waiting to happen: torch shuts a pass's workers
    down (joined) before that pass raises StopIteration, so the next pass's workers never overlap them."""

    def __next__(self):
        try:
            return next(self.iter_loader)
        except StopIteration:
            self._epoch += 1
            if self._use_distributed and hasattr(self._dataloader.sampler, "set_epoch"):
                self._dataloader.sampler.set_epoch(self._epoch)
            self.iter_loader = iter(self._dataloader)
            return next(self.iter_loader)


def barrier():
    if is_dist_avail_and_initialized():
        dist.barrier()


def from_main_process(value):
    """The main process's ``value`` on every rank."""
    if not is_dist_avail_and_initialized():
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


@registry.register_runner("runner_point")
class RunnerPoint(RunnerBase):
    def __init__(self, cfg, task, model, datasets, job_id):
        super().__init__(cfg, task, model, datasets, job_id)
        if self.device.type == "cpu" and cfg.run_cfg.get("keep_freed_memory", True):
            keep_freed_memory()

    @property
    def model(self):
        if self._model.device != self.device:
            self._model = self._model.to(self.device)
        if self._wrapped_model is None:
            if self.use_distributed:
                ids = [self.config.run_cfg.gpu] if self.device.type == "cuda" else None
                self._wrapped_model = DDP(self._model, device_ids=ids)
            else:
                self._wrapped_model = self._model
        return self._wrapped_model

    @property
    def optimizer(self):
        """RunnerBase's AdamW (its parameter groups, lr, decay, betas), fused: on CPU its per-tensor
        loop took 0.67 s of a bench_train_step step, the fused kernel 0.13 s."""
        if self._optimizer is None:
            groups = [{k: v for k, v in g.items() if k not in ("fused", "foreach")}
                      for g in super().optimizer.param_groups]
            self._optimizer = torch.optim.AdamW(groups, fused=True)
        return self._optimizer

    def setup_output_dir(self):
        output_dir = Path(registry.get_path("library_root")) / self.config.run_cfg.output_dir / self.job_id
        result_dir = output_dir / "result"
        result_dir.mkdir(parents=True, exist_ok=True)
        registry.mapping["paths"]["result_dir"] = str(result_dir)
        registry.mapping["paths"]["output_dir"] = str(output_dir)
        self.result_dir, self.output_dir = result_dir, output_dir

    def create_loaders(self, datasets, num_workers, batch_sizes, is_trains, collate_fns, dataset_ratios=None):
        loaders = []
        for dataset, batch_size, is_train, collate_fn in zip(datasets, batch_sizes, is_trains, collate_fns):
            if isinstance(dataset, (list, tuple)):
                raise NotImplementedError("runner_point takes map-style datasets only")
            world = (get_world_size(), get_rank()) if self.use_distributed else (1, 0)
            seed = int(self.config.run_cfg.get("seed", 0))
            group_by = self.config.run_cfg.get("batch_group_by") if is_train else None
            batching = dict(batch_size=batch_size, shuffle=is_train, drop_last=is_train)
            if group_by:
                # fields, or a list of groupings (each fields or one field) that share the epoch's items
                groupings = [group_by] if all(isinstance(f, str) for f in group_by) else group_by
                ids = [group_ids_of(dataset, [f] if isinstance(f, str) else list(f)) for f in groupings]
                batching = dict(batch_sampler=GroupedBatchSampler(
                    ids, batch_size,
                    int(self.config.run_cfg.get("batch_groups_per_batch", 4)),
                    num_replicas=world[0], rank=world[1], seed=seed, epoch=self.start_epoch))
            elif self.use_distributed and (is_train or self.use_dist_eval_sampler):
                sampler = DistributedSampler(dataset, shuffle=is_train, num_replicas=world[0], rank=world[1],
                                             seed=seed)
                sampler.set_epoch(self.start_epoch)
                batching.update(sampler=sampler, shuffle=False)
            loader = DataLoader(with_batched_reads(dataset), num_workers=num_workers,
                                pin_memory=self.device.type == "cuda", collate_fn=collate_fn, **batching)
            if self.device.type == "cuda":
                loader = PrefetchLoader(loader)
            if is_train:
                loader = EpochLoader(loader, use_distributed=self.use_distributed)
                loader._epoch = self.start_epoch  # it calls sampler.set_epoch(_epoch + 1) on the next pass
            loaders.append(loader)
        return loaders

    def train(self):
        start_time = time.time()
        best_agg_metric, best_epoch = 0, 0
        self.best_saved = False  # checkpoint_best.pth written (or copied on resume) in this run's folder
        self.log_config()
        if not self.evaluate_only and getattr(self._model, "frozen_without_weights", list)():
            raise CheckpointError(
                "model.point_encoder is frozen and no file gave it weights: training would leave it random. Set "
                "model.point_encoder.checkpoint (the GPT4Point-size YAMLs read $LAVIS_POINT_ENCODER), start from "
                "a model.pretrained file that holds it, or train it (model.freeze_encoder: false)")
        if self.valid_splits and "val" not in self.valid_splits and not self.evaluate_only:
            logging.warning("run.valid_splits %s has no split named 'val': as in LAVIS, no checkpoint_best.pth "
                            "is chosen, and the final test uses the model of the last epoch",
                            list(self.valid_splits))
        if not self.evaluate_only and self.resume_ckpt_path is not None:
            best_agg_metric, best_epoch = self._load_checkpoint(self.resume_ckpt_path)
        # after the resume: the loaders start at the resumed epoch
        warmup, schedule = int(self.config.run_cfg.get("warmup_steps", 0)), self.config.run_cfg.get("lr_sched")
        if not self.evaluate_only and schedule in LAVIS_EPOCH0_WARMUP and warmup > (steps := len(self.train_loader)):
            raise ValueError(
                f"run.warmup_steps ({warmup}) exceeds the {steps} steps of an epoch (this run's data, batch size "
                f"and number of processes): LAVIS's {schedule} warms up during the first epoch only, so the rate "
                f"would stop short of run.init_lr and jump to it at the second. Set run.warmup_steps to at most {steps}")
        cur_epoch = self.start_epoch
        for cur_epoch in range(self.start_epoch, self.max_epoch):
            if not self.evaluate_only:
                logging.info("Start training")
                self.log_stats(split_name="train", stats=self.train_epoch(cur_epoch))
                cache = getattr(self.unwrap_dist_model(self.model), "token_cache", None)
                if cache is not None and cache.capacity:
                    logging.info("Point token cache: %s", cache.summary())
            for split_name in self.valid_splits:
                logging.info("Evaluating on %s.", split_name)
                val_log = self.eval_epoch(split_name=split_name, cur_epoch=cur_epoch)
                if val_log is not None and is_main_process():
                    if val_log["agg_metrics"] > best_agg_metric and split_name == "val":
                        best_epoch, best_agg_metric = cur_epoch, val_log["agg_metrics"]
                        self._save_checkpoint(cur_epoch, name="best")
                        self.best_saved = True
                    val_log.update({"best_epoch": best_epoch})
                    self.log_stats(val_log, split_name)
            if self.evaluate_only:
                break
            # after validation: it draws from the random streams (its loader's seed, negatives), so the
            # state saved here is the one the next epoch starts from
            self._save_checkpoint(cur_epoch, name="last", rng=rng_state.capture_all_ranks(),
                                  best=(best_agg_metric, best_epoch))
            barrier()
        self.evaluate(cur_epoch=self._test_epoch(cur_epoch), skip_reload=self.evaluate_only)
        logging.info("Training time %s", datetime.timedelta(seconds=int(time.time() - start_time)))

    def _test_epoch(self, last_epoch):
        """``"best"`` where this run saved (or carried over) a best checkpoint, as LAVIS tests; else the
        last epoch: LAVIS reloads checkpoint_best.pth whenever there are validation splits, and failed
        after the whole training when none was chosen (no split named 'val', or its agg_metrics never
        rose above 0, as with run.report_metric false), or tested a stale one left in the folder."""
        if not self.valid_splits or self.evaluate_only:
            return last_epoch
        if from_main_process(self.best_saved):  # only the main process saves it
            return "best"
        if self.test_splits:
            logging.warning("no checkpoint_best.pth from this run in %s (it is chosen on the split named 'val' "
                            "when its agg_metrics rises above 0): testing the model of the last epoch (%d)",
                            self.output_dir, last_epoch)
        return last_epoch

    def _save_checkpoint(self, cur_epoch, is_best=False, name=None, rng=None, best=None):
        """``rng``: every rank's random state, ``best``: (best agg_metrics, its epoch) so far
        (``checkpoint_last`` only: resume continues from them)."""
        if not is_main_process():
            return
        name = name or ("best" if is_best else str(cur_epoch))
        model = self.unwrap_dist_model(self.model)
        # run.save_frozen_parts: a small frozen encoder is kept, so the file stands on its own
        save_obj = {
            "model": (model.state_dict() if self.config.run_cfg.get("save_frozen_parts")
                      else trainable_state_dict(model)),
            "optimizer": self.optimizer.state_dict(),
            "config": self.config.to_dict(),
            "scaler": self.scaler.state_dict() if self.scaler else None,
            "epoch": cur_epoch,
        }
        if rng is not None:
            save_obj["rng"] = rng
        if best is not None:
            save_obj["best_agg_metric"], save_obj["best_epoch"] = float(best[0]), int(best[1])
        path = os.path.join(self.output_dir, f"checkpoint_{name}.pth")
        logging.info("Saving checkpoint at epoch %s to %s.", cur_epoch, path)
        save_checkpoint_atomic(save_obj, path)

    def _reload_best_model(self, model):
        path = os.path.join(self.output_dir, "checkpoint_best.pth")
        logging.info("Loading checkpoint from %s.", path)
        load_state_dict_checked(model, state_dict_of(read_checkpoint(path), path), source=path)
        return model

    def _load_checkpoint(self, url_or_filename):
        checkpoint = read_checkpoint(url_or_filename)
        start_from_weights = ("to start from its weights, set model.pretrained (or model.finetuned) instead of "
                              "run.resume_ckpt_path")
        lacking = [key for key in ("model", "optimizer", "epoch") if key not in checkpoint]
        if lacking:
            raise CheckpointError(f"{url_or_filename}: not a runner checkpoint (no {', '.join(lacking)}): "
                                  f"run.resume_ckpt_path continues the run that wrote it; {start_from_weights}")
        model = self.unwrap_dist_model(self.model)
        load_state_dict_checked(model, state_dict_of(checkpoint, url_or_filename), source=url_or_filename)
        changed = (f"{url_or_filename}: its optimizer state does not fit this run: the trainable parameters "
                   f"changed (a model.freeze_* setting, or the model itself) since the run that wrote it")
        try:
            self.optimizer.load_state_dict(checkpoint["optimizer"])
        except (ValueError, KeyError) as e:
            raise CheckpointError(f"{changed} ({e}); {start_from_weights}") from e
        # torch pairs saved states with parameters by position: as many parameters per group, but other
        # ones, loads without complaint and fails at the first step
        misfit = [f"{tuple(v.shape)} for {tuple(p.shape)}" for group in self.optimizer.param_groups
                  for p in group["params"] for v in self.optimizer.state.get(p, {}).values()
                  if torch.is_tensor(v) and v.ndim and v.shape != p.shape]
        if misfit:
            raise CheckpointError(f"{changed} (state of shape {misfit[0]}); {start_from_weights}")
        if self.scaler and checkpoint.get("scaler"):
            self.scaler.load_state_dict(checkpoint["scaler"])
        self.start_epoch = checkpoint["epoch"] + 1
        self._restore_rng(checkpoint.get("rng"), url_or_filename)
        logging.info("Resume checkpoint from %s", url_or_filename)
        return self._restore_best(checkpoint, url_or_filename)

    def _restore_best(self, checkpoint, path):
        """(best agg_metrics, its epoch) of the interrupted run, so that a worse epoch after the resume
        does not replace its ``checkpoint_best.pth``; that file is copied beside this run's checkpoints
        (the final test reloads it from there). Without the score or the file: (0, 0), as LAVIS starts."""
        if "best_agg_metric" not in checkpoint:
            if self.valid_splits:
                logging.warning("%s: no best validation score saved: the first validated epoch after the "
                                "resume becomes checkpoint_best.pth", path)
            return 0, 0
        best = checkpoint["best_agg_metric"], checkpoint["best_epoch"]
        source, target = Path(path).with_name("checkpoint_best.pth"), Path(self.output_dir) / "checkpoint_best.pth"
        if best[0] == 0 or not is_main_process():
            return best  # only the main process keeps the best, as in RunnerBase
        if not source.is_file():
            logging.warning("%s: best agg_metrics %s (epoch %d) saved, but %s is missing: the first validated "
                            "epoch after the resume becomes checkpoint_best.pth", path, best[0], best[1], source)
            return 0, 0
        self.best_saved = True
        if source.resolve() == target.resolve():  # resumed into the same folder
            return best
        shutil.copyfile(source, f"{target}.tmp-{os.getpid()}")
        os.replace(f"{target}.tmp-{os.getpid()}", target)
        return best

    @staticmethod
    def _restore_rng(states, path):
        if not states:
            logging.warning("%s: no random state saved: the resumed run's data order and augmentation "
                            "start from the seed, not where the interrupted run stopped", path)
        elif len(states) != get_world_size():
            logging.warning("%s: random state of %d processes, resuming with %d: random streams start "
                            "from the seed", path, len(states), get_world_size())
        else:
            rng_state.restore(states[get_rank()])
