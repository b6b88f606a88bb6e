"""`nemo-adapt run` with a fault injected into its third training step (one rank of a torchrun job).

Prints one JSON line: the exit code `main` returned, whether the process group still exists, and the exit codes
the run's logger was closed with. Used by test_run_cleanup.py. (Guarded by __main__: a checkpoint starts a
`spawn` process, which imports this file again.)
"""

import json
import sys


def main() -> int:
    import torch.distributed as dist

    from nemo_adapt.cli import main as cli
    from nemo_adapt.logging import run_logger
    from nemo_adapt.training import engine

    calls = {"steps": 0, "closed": []}
    train_step, close = engine.train_step, run_logger.RunLogger.close

    def faulty_step(*args, **kwargs):
        calls["steps"] += 1
        if calls["steps"] == 3:
            raise RuntimeError("injected fault: a NaN in the all-reduce\n(second line of the message)")
        return train_step(*args, **kwargs)

    def recording_close(self, exit_code=0):
        calls["closed"].append(exit_code)
        return close(self, exit_code)

    engine.train_step = faulty_step
    run_logger.RunLogger.close = recording_close
    code = cli(["run", *sys.argv[1:]])
    print(json.dumps({"code": code, "process_group": dist.is_initialized(), "closed": calls["closed"],
                      "steps": calls["steps"]}), flush=True)
    return code


if __name__ == "__main__":
    sys.exit(main())
