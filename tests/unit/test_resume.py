"""Resume keeps the run it resumes: data position in consumed samples, no row skipped, and settings
that would change the run refused unless named in checkpoint.resume_changes."""

import pytest
import torch

from nemo_adapt.data.dataset import epoch_permutation
from nemo_adapt.errors import ConfigError
from nemo_adapt.training.engine import BatchPlan, StepData
from nemo_adapt.training.resume import check_settings, lr_of_schedule, resume_settings, schedule_record


class Rows:
    """A dataset whose row i is the tensor [i]: enough to see which rows a step reads."""

    def __init__(self, n: int, shuffle: bool, seed: int = 3):
        self.n, self.shuffle, self.seed = n, shuffle, seed

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        return {"row": torch.tensor([i])}

    def epoch_order(self, epoch, seed=None):
        return epoch_permutation(self.n, epoch, self.seed if seed is None else seed) if self.shuffle else \
            list(range(self.n))

    @staticmethod
    def collate(rows):
        return {"row": torch.cat([r["row"] for r in rows])}


def rows_of_step(data: StepData, consumed: int) -> list[int]:
    return [int(x) for mb in data.microbatches(consumed, 0) for x in mb["row"]]


def test_unshuffled_rows_left_over_after_the_last_batch_are_trained():
    # 5 rows, global batch 2, 3 epochs: the old sampler skipped row 4 in every epoch (12 of 15 seen).
    data = StepData(Rows(5, shuffle=False), BatchPlan(2, 1, 1), seed=0)
    steps = data.steps_for_epochs(3)
    assert steps == 8  # ceil(15 / 2)
    read = [r for k in range(steps) for r in rows_of_step(data, 2 * k)]
    assert read == [0, 1, 2, 3, 4] * 3 + [0]
    cov = data.coverage(0, 2 * steps)
    assert cov == {"rows": 5, "samples": 16, "epochs": 3.2, "rows_seen": 5, "rows_unseen": 0,
                   "min_times_seen": 3, "max_times_seen": 4}


def test_a_changed_global_batch_continues_at_the_consumed_sample():
    # 4 steps of 8 = 32 samples, then batch 16: the next steps read positions 32-47 and 48-63.
    ds = Rows(96, shuffle=True)
    before = StepData(ds, BatchPlan(8, 2, 1), seed=7)
    after = StepData(ds, BatchPlan(16, 2, 1), seed=7)
    stream = [before.row_at(p) for p in range(96)]
    assert rows_of_step(after, 32) == stream[32:48]
    assert rows_of_step(after, 48) == stream[48:64]
    assert sorted(stream) == list(range(96))
    assert after.epoch_of(64) == 0 and after.epoch_of(96) == 1


def test_a_step_across_an_epoch_boundary_reads_both_orders():
    ds = Rows(10, shuffle=True)
    data = StepData(ds, BatchPlan(4, 1, 1), seed=1)
    assert rows_of_step(data, 8) == ds.epoch_order(0, 1)[8:] + ds.epoch_order(1, 1)[:2]


def test_coverage_reports_rows_a_short_run_never_reads():
    data = StepData(Rows(96, shuffle=True), BatchPlan(8, 2, 1), seed=7)
    cov = data.coverage(0, 5 * 8)
    assert cov["rows_seen"] == 40 and cov["rows_unseen"] == 56 and cov["max_times_seen"] == 1


def test_resume_into_more_epochs_counts_the_remaining_samples():
    data = StepData(Rows(10, shuffle=False), BatchPlan(4, 1, 1), seed=0)
    assert data.steps_for_epochs(2) == 5  # 20 samples
    assert data.steps_for_epochs(2, consumed=12) == 2  # 8 left
    assert data.steps_for_epochs(2, consumed=20) == 0  # finished


def _cfg(**sections):
    import tempfile
    from pathlib import Path

    import yaml

    from nemo_adapt.config import load_recipe

    base = {"run": {"name": "r", "max_steps": 4}, "model": {"name": "tiny_llama", "checkpoint": "random:tiny_llama"},
            "data": {"train": "t.jsonl"}, "peft": {"method": "lora", "rank": 4},
            "optim": {"lr": 0.005, "schedule": "cosine"}}
    for k, v in sections.items():
        base[k] = {**base.get(k, {}), **v}
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "recipe.yaml"
        path.write_text(yaml.safe_dump(base))
        return load_recipe(path)


def test_changed_settings_are_refused_with_the_override_that_accepts_them():
    saved = resume_settings(_cfg())
    now = resume_settings(_cfg(run={"seed": 9}, train={"global_batch_size": 16}))
    with pytest.raises(ConfigError) as err:
        check_settings(saved, now, [], "runs/x/checkpoints/step_00000004")
    msg = str(err.value)
    assert "run.seed: 1234 -> 9" in msg and "train.global_batch_size: 8 -> 16" in msg
    assert "checkpoint.resume_changes=[run.seed,train.global_batch_size]" in msg
    accepted = check_settings(saved, now, ["run.seed", "train.global_batch_size"], "ck")
    assert accepted == [("run.seed", 1234, 9), ("train.global_batch_size", 8, 16)]


def test_a_longer_run_that_reshapes_the_lr_schedule_is_refused_and_a_constant_one_is_not():
    from nemo_adapt.training.engine import lr_at
    from nemo_adapt.training.resume import check_schedule

    old = _cfg()  # cosine over 4 steps
    longer = _cfg(run={"max_steps": 6})
    sched, settings = schedule_record(old, 4), resume_settings(old)
    with pytest.raises(ConfigError) as err:
        check_schedule(sched, settings, longer, 4, 6, [], "ck")
    msg = str(err.value)
    assert "run.max_steps: 4 -> 6 changes the learning-rate schedule (optim.schedule='cosine' over 4 steps becomes " \
           "6 steps)" in msg
    assert f"step 5 would get lr {lr_at(4, longer, 6):.6g} instead of {lr_at(4, old, 4):.6g}" in msg
    assert "checkpoint.resume_changes=[run.max_steps]" in msg
    assert check_schedule(sched, settings, longer, 4, 6, ["run.max_steps"], "ck") == [("run.max_steps", 4, 6)]
    constant = _cfg(optim={"schedule": "constant"})
    assert check_schedule(schedule_record(constant, 4), resume_settings(constant),
                          _cfg(run={"max_steps": 6}, optim={"schedule": "constant"}), 4, 6, [], "ck") == []
    assert check_schedule(None, None, longer, 4, 6, [], "ck") == []  # checkpoints without a schedule


def test_peft_and_optim_settings_and_data_are_compared():
    saved = resume_settings(_cfg())
    now = resume_settings(_cfg(peft={"alpha": 64}, optim={"lr": 0.001}))
    with pytest.raises(ConfigError, match=r"optim.lr: 0.005 -> 0.001.*peft.alpha: 16.0 -> 64.0"):
        check_settings(saved, now, [], "ck")
    assert len(check_settings(saved, now, ["optim", "peft"], "ck")) == 2
    with pytest.raises(ConfigError, match=r"training data \(files or data settings\): fingerprint aaa -> bbb"):
        check_settings(None, now, [], "ck", data_changed=("aaa", "bbb"))
    assert check_settings(None, now, ["data"], "ck", data_changed=("aaa", "bbb")) == [("data", "aaa", "bbb")]


def test_unknown_resume_change_names_are_refused():
    s = resume_settings(_cfg())
    with pytest.raises(ConfigError, match=r"checkpoint.resume_changes names 'run.max_step'"):
        check_settings(s, s, ["run.max_step"], "ck")


def test_checkpoints_without_settings_are_not_compared():
    assert check_settings(None, resume_settings(_cfg()), [], "ck") == []


def test_stored_schedule_gives_the_checkpoints_learning_rates():
    from nemo_adapt.training.engine import lr_at

    cfg = _cfg(optim={"warmup_steps": 1})
    sched = schedule_record(cfg, 4)
    assert [lr_of_schedule(sched, k) for k in range(4)] == [lr_at(k, cfg, 4) for k in range(4)]
    # The reported fault: extending a finished 4-step cosine run to 6 steps recomputes the schedule.
    assert lr_at(4, cfg, 6) > lr_of_schedule(sched, 3)


def test_resume_changes_must_be_a_list_of_names():
    with pytest.raises(ConfigError, match=r"checkpoint.resume_changes=.* must be a list of setting names"):
        _cfg(checkpoint={"resume_changes": [""]})


def test_a_peft_change_that_reshapes_the_adapter_is_never_offered_as_acceptable():
    saved = resume_settings(_cfg())
    now = resume_settings(_cfg(peft={"rank": 8, "alpha": 32}))
    for allowed in ([], ["peft.rank", "peft.alpha"], ["peft"]):
        with pytest.raises(ConfigError) as err:
            check_settings(saved, now, allowed, "ck")
        msg = str(err.value)
        assert "peft.rank: 4 -> 8" in msg and "peft.rank changes the adapter's tensors" in msg
        assert "resume_changes=[peft.rank" not in msg
    assert "checkpoint.resume_changes=[peft.alpha]" in str(pytest.raises(ConfigError, check_settings, saved, now, [],
                                                                         "ck").value)
    # alpha alone only rescales the update: acceptable when named
    assert check_settings(saved, resume_settings(_cfg(peft={"alpha": 32})), ["peft.alpha"], "ck") == \
        [("peft.alpha", 16.0, 32.0)]


def test_batch_and_schedule_changes_are_listed_in_one_refusal():
    from nemo_adapt.training.resume import schedule_change

    old, new = _cfg(), _cfg(run={"max_steps": 6}, train={"global_batch_size": 16})
    sched = schedule_change(schedule_record(old, 4), resume_settings(old), new, 4, 6)
    with pytest.raises(ConfigError) as err:
        check_settings(resume_settings(old), resume_settings(new), [], "ck", schedule=sched)
    msg = str(err.value)
    assert "train.global_batch_size: 8 -> 16" in msg and "run.max_steps: 4 -> 6 changes the learning-rate schedule" in msg
    assert "checkpoint.resume_changes=[train.global_batch_size,run.max_steps]" in msg
