"""Tasks: what a batch means. Each task builds its data module, model, optimizer, scheduler and
criterion from the config, and turns a batch into a loss and metrics."""
