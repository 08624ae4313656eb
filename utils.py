# ruff: noqa: I001 (the imports follow the layers, lowest first, as a map)
"""The BlockDrop scripts' shared code, by concern; the modules live in ``core/``, this file maps them.

The original's public API keeps its place here: ``get_model``, ``get_dataset``, ``get_transforms``,
``load_weights_to_flatresnet``, ``load_checkpoint``, ``performance_stats``.
"""

# Bad input: one line on stderr and exit code 2; argument types of the flags.
from core.cli import (
    MAX_BATCH,
    MAX_COUNT,
    SEED_MAX,
    ArgumentParser,
    HelpFormatter,
    UserError,
    batch_size,
    bounded_int,
    check_fits,
    check_output_dir,
    dpi,
    drop_probability,
    finite_float,
    fraction,
    non_negative_float,
    non_negative_int,
    path,
    positive_float,
    positive_int,
    probability,
    run,
    seed,
)

# Checkpoint files: safe reading, atomic writing, weights into the flat networks.
from core.checkpoints import (
    check_model,
    checkpoint_path,
    epoch_number,
    load_agent,
    load_agent_state,
    load_checkpoint,
    load_file,
    load_weights_to_flatresnet,
    number,
    save_checkpoint,
    strip_prefix,
    weights,
)

# The model table, base weights and the networks of a run.
from core.models import (
    ARCHITECTURES,
    DATASETS,
    MODELS,
    PRETRAINED_DIR,
    RELEASED_BASE_FILES,
    DatasetSpec,
    ModelSpec,
    build_model,
    find_pretrained,
    get_model,
    load_pretrained_agent,
    load_pretrained_rnet,
    model_spec,
    models_for_run,
    torchvision_twin,
)

# Your own image folders: their classes and normalisation, recorded in the run's checkpoints.
from core.folders import FOLDER_KEY, FolderData, folder_classes, folder_data, image_stats, recorded_folder_data

# Datasets and transforms.
from core.data import (
    FASHION_MNIST_CLASSES,
    FASHION_MNIST_DIR,
    IdxImages,
    get_data,
    get_dataset,
    get_dummy_dataset,
    get_transforms,
)

# Deterministic loading and sampling, shared out over processes.
from core.loading import epoch_generator, global_batches, make_loader, progress

# Flags, device and precision, seeds, NaN guards.
from core.runtime import (
    Runtime,
    add_amp_flag,
    add_policy_training_flags,
    add_run_flags,
    add_schedule_flags,
    check_finite,
    check_finite_weights,
    get_device,
    make_parser,
    model_name,
    runtime,
    set_seed,
    setup_run,
)

# The REINFORCE core: policies, reward, curriculum, statistics, evaluation.
from core.reinforce import (
    DIVERGED,
    SATURATED,
    EpochPolicies,
    Stats,
    baseline_policy,
    curriculum_blocks,
    curriculum_mask,
    evaluate,
    get_reward,
    greedy_policy,
    performance_stats,
    sample_policy,
    sampled_batches,
)

# FLOPs and test.py's profile.
from core.flops import Profile, block_flops, count_flops, policy_flops, profile

# Resuming a run: last.t7, the flags that fix its numbers, the random states.
from core.resume import restore, rng_state, set_rng_state, state_digest

# A training run: its epochs, run log, reports and checkpoints; learning-rate steps.
from core.training import TrainingRun, adjust_learning_rate, stats_line

# A trained model as one module for inference: images in, logits and policies out.
from core.inference import BlockDrop, class_names, image_transform, load_blockdrop

__all__ = [
    # core.cli
    "MAX_BATCH", "MAX_COUNT", "SEED_MAX", "ArgumentParser", "HelpFormatter", "UserError", "batch_size", "bounded_int", "check_fits", "check_output_dir", "dpi",
    "drop_probability", "finite_float", "fraction", "non_negative_float", "non_negative_int", "path", "positive_float",
    "positive_int", "probability", "run", "seed",
    # core.checkpoints
    "check_model", "checkpoint_path", "epoch_number", "load_agent", "load_agent_state", "load_checkpoint", "load_file",
    "load_weights_to_flatresnet", "number", "save_checkpoint", "strip_prefix", "weights",
    # core.models
    "ARCHITECTURES", "DATASETS", "MODELS", "PRETRAINED_DIR", "RELEASED_BASE_FILES", "DatasetSpec", "ModelSpec",
    "build_model", "find_pretrained", "get_model", "load_pretrained_agent", "load_pretrained_rnet", "model_spec", "models_for_run",
    "torchvision_twin",
    # core.folders
    "FOLDER_KEY", "FolderData", "folder_classes", "folder_data", "image_stats", "recorded_folder_data",
    # core.data
    "FASHION_MNIST_CLASSES", "FASHION_MNIST_DIR", "IdxImages", "get_data", "get_dataset", "get_dummy_dataset",
    "get_transforms",
    # core.loading
    "epoch_generator", "global_batches", "make_loader", "progress",
    # core.runtime
    "Runtime", "add_amp_flag", "add_policy_training_flags", "add_run_flags", "add_schedule_flags", "check_finite",
    "check_finite_weights", "get_device", "make_parser", "model_name", "runtime", "set_seed", "setup_run",
    # core.reinforce
    "DIVERGED", "SATURATED", "EpochPolicies", "Stats", "baseline_policy", "curriculum_blocks", "curriculum_mask", "evaluate", "get_reward",
    "greedy_policy", "performance_stats", "sample_policy", "sampled_batches",
    # core.flops
    "Profile", "block_flops", "count_flops", "policy_flops", "profile",
    # core.resume
    "restore", "rng_state", "set_rng_state", "state_digest",
    # core.training
    "TrainingRun", "adjust_learning_rate", "stats_line",
    # core.inference
    "BlockDrop", "class_names", "image_transform", "load_blockdrop",
]  # fmt: skip
