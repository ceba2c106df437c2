"""lavis-point: point-cloud/language models for LAVIS. Importing this package registers, in LAVIS's
registry, the models ``point_bert``, ``point_qformer`` and ``point_opt``, the dataset builders, the
processors ``point_train`` / ``point_eval``, the tasks and the ``runner_point`` runner."""
import warnings

with warnings.catch_warnings():
    # LAVIS's imports (torch.jit.script, fairscale's cuda.amp decorators) warn of deprecations users
    # cannot act on; every command would open with them.
    warnings.simplefilter("ignore", FutureWarning)
    import lavis  # noqa: F401  (LAVIS first: it sets up its registry and library root)
import lavis.common.optims  # noqa: F401  (registers LAVIS's lr schedulers, as its train.py does)
import lavis.runners  # noqa: F401  (registers runner_base / runner_iter)

from lavis_point import datasets, models, processors, runners, tasks  # noqa: F401,E402
from lavis.models import ModelZoo, model_zoo  # noqa: E402

# LAVIS lists its registry in ``model_zoo`` when it is imported, before our models registered.
model_zoo.model_zoo = ModelZoo().model_zoo

__version__ = "0.1.0"
