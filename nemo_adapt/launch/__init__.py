"""Slurm launch: render sbatch scripts for recipes, refuse what cannot fit, submit, chain, report.

    from nemo_adapt.launch import LaunchSpec, check_fits, render_train, sbatch, wait_for_jobs, report
    cfg, plan = check_fits("recipes/llama3_70b_lora.yaml", [], nodes=1, gpus_per_node=8, gpu="h100-80gb")
    script = render_train(LaunchSpec(recipe="recipes/llama3_70b_lora.yaml", gpu="h100-80gb"))

The sbatch side (container or bare metal, rendezvous, torchrun per node, checkpoint-and-requeue on
signals) lives in slurm/lib/nemo_adapt.sh, which launch/*.sh and rendered scripts source.
`nemo-adapt launch` (cli.py) is the command line; preflight.py runs inside jobs.
"""

from nemo_adapt.launch.render import DEFAULT_CONTAINER, LaunchSpec, check_fits, dry_run_commands, render_train
from nemo_adapt.launch.slurm import JobInfo, SlurmError, job_info, report, sbatch, wait_for_jobs

__all__ = ["DEFAULT_CONTAINER", "JobInfo", "LaunchSpec", "SlurmError", "check_fits", "dry_run_commands",
           "job_info", "render_train", "report", "sbatch", "wait_for_jobs"]
