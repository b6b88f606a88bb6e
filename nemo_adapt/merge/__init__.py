"""Model merging: combine fine-tuned checkpoints or adapter deltas that share one base model.

`methods/` holds one pure tensor function per merge method, registered by name with `@merge_method`
(`linear`, `task_arithmetic`, `ties`, `dare_linear`, `dare_ties`, `slerp`).
"""

from nemo_adapt.merge.methods import MergeParams, get_merge_method, list_merge_methods, merge_method

__all__ = ["MergeParams", "get_merge_method", "list_merge_methods", "merge_method"]
