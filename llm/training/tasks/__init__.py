"""Tasks: what a batch means. Each task builds its data module, model, optimizer, scheduler and
criterion from the config, and turns a batch into a loss and metrics.

Importing the package registers the built-in tasks (`llm.registry.TASKS`, each module's `@register_task`), so the
registry is the one list of tasks wherever it is read: the train CLI, and the run reader
(`llm.artifacts.runs`), which asks a run's task whether it trains a decoder (`TrainingTask.model_kind`).
"""

from llm.training.tasks import (  # noqa: F401  (registers them)
    classification_task,
    dpo_task,
    lm_task,
    regression_task,
    sft_task,
)
