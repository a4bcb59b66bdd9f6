"""The slow tier's list for modules that do not mark their slow tests themselves (used by conftest.py)."""

from __future__ import annotations

from pathlib import Path

# Slow tests (multi-process jobs, whole runs through real processes) in modules whose own `@pytest.mark.slow` has
# not been written yet: marked here by file and test function name ("*": the whole module). Every name must exist
# (tests/test_suite_tiers.py checks), so a renamed test cannot drop out of the slow tier unnoticed.
SLOW_TESTS: dict[str, tuple[str, ...]] = {
    "training/test_scale_out.py": ("*",),  # every test launches two-process jobs (spawn, torchrun)
    "training/test_train_cli.py": (
        "test_two_gloo_processes_match_one_process",
        "test_config_error_under_torchrun_is_printed_once",
        "test_regression_validation_loss_decreases",
        "test_classification_task_learns",
        "test_guide_moe_command_trains_and_writes_the_run_dir",
    ),
    "training/core/test_distributed.py": ("test_two_processes_lockstep_failure_claims_and_fsdp_round_trip",),
    "training/core/test_fault_tolerance.py": (
        "test_sigterm_to_a_real_process_saves_and_exits_cleanly",
        "test_kill_9_during_a_save_leaves_a_resumable_run",
    ),
    "models/test_moe.py": (
        "test_ddp_step_with_starved_expert_keeps_ranks_in_sync",
        # torch.compile (inductor) takes 10-30 s per case on a CPU
        "test_padded_layer_compiles_as_one_graph_with_dynamic_shapes",
        "test_compiled_fallback_matches_eager_forward_and_grad",
        "test_engine_compiles_moe_with_the_fallback_forced",
    ),
}
TESTS_DIR = Path(__file__).resolve().parent
