"""Data parallel training and sharded inference (CPU, gloo, 2 worker processes) equal one process.

Training: 2 processes splitting each global batch must end with the weights of 1 process with the
same batch over the same data order (DPO, RPO with K = 4, the 4-bit LoRA reward model). Inference: the
reference log-probs, reward scores and samples do not depend on the number of processes.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import psutil
import pytest
import torch
from helpers import base_params, checkpoint_step
from transformers import GPT2Config, GPT2LMHeadModel

from rpo_pipeline.distributed import WorkerError
from rpo_pipeline.jobs import (
    DpoJob,
    GenerateJob,
    ResponseLogpsJob,
    RewardModelJob,
    RewardsJob,
    RpoJob,
    Split,
    fit,
    infer,
    merge_shards,
)
from rpo_pipeline.params import DpoParams, RewardModelParams, RpoParams, SamplingConfig
from rpo_pipeline.policy import PreferencePair, ResponseGroup
from rpo_pipeline.reward_model import RewardModel, RewardModelConfig, RewardPair
from rpo_pipeline.training import shard

VOCAB, PAD = 64, 0


@pytest.fixture(scope="module")
def lm_dir(tmp_path_factory) -> str:
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("lm") / "gpt2"
    # no dropout: each rank draws its own dropout masks, so with dropout N processes match one
    # process in distribution only (DPO and RPO turn it off anyway: disable_dropout)
    GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_positions=64, n_embd=32, n_layer=2, n_head=2,
                               eos_token_id=1, bos_token_id=1, resid_pdrop=0.0, embd_pdrop=0.0,
                               attn_pdrop=0.0)).save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def dropout_lm_dir(tmp_path_factory) -> str:
    """GPT-2's default dropout (0.1): models trained on it must turn dropout off to match."""
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("lm_dropout") / "gpt2"
    GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_positions=64, n_embd=32, n_layer=2, n_head=2,
                               eos_token_id=1, bos_token_id=1)).save_pretrained(path)
    return str(path)


def _seq(g: torch.Generator, lo: int = 6, hi: int = 20) -> list[int]:
    return torch.randint(2, VOCAB, (int(torch.randint(lo, hi, (1,), generator=g)),), generator=g).tolist()


def _pairs(n: int, seed: int) -> Split:
    g = torch.Generator().manual_seed(seed)
    items = []
    for _ in range(n):
        w, lo = _seq(g), _seq(g)
        items.append(PreferencePair(w, 3, lo, 3, -float(len(w)) * 3.5, -float(len(lo)) * 3.6))
    return Split(items, [max(len(i.chosen_input_ids), len(i.rejected_input_ids)) for i in items])


def _groups(n: int, k: int, seed: int) -> Split:
    g = torch.Generator().manual_seed(seed)
    items = []
    for _ in range(n):
        seqs = [_seq(g) for _ in range(k)]
        items.append(ResponseGroup(seqs, [3] * k, [-3.5 * len(s) for s in seqs],
                                   torch.randn(k, generator=g).tolist()))
    return Split(items, [max(len(s) for s in i.input_ids) for i in items])


def _max_diff(a: torch.nn.Module, b: torch.nn.Module) -> float:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    return max((sa[k].float() - sb[k].float()).abs().max().item() for k in sa)


def _moved(before: torch.nn.Module, after: torch.nn.Module) -> float:
    return _max_diff(before, after)


def _policy_pair(method: str, lm_dir: str, train: Split, val: Split, val_pairs: Split | None,
                 batch: int, steps: int = 6, **extra):
    """Policies trained by 1 and by 2 processes with the same (global) batch, and their results."""
    out = []
    for procs in (1, 2):
        params = base_params(method, {"train.steps": steps, "train.batch_size": batch,
                                      "train.warmup_steps": 1, "train.log_every": 2,
                                      "train.eval_every": 3, "train.progress": False,
                                      "train.checkpoint_every": 0,
                                      "train.num_processes": procs, "device": "cpu", **extra})
        job = (DpoJob(model_path=lm_dir, params=DpoParams.parse(params), train=train, val=val)
               if method == "dpo" else
               RpoJob(model_path=lm_dir, params=RpoParams.parse(params), train=train, val=val,
                      val_pairs=val_pairs))
        out.append(fit(job, procs, "gloo", "cpu",
                       lambda: GPT2LMHeadModel.from_pretrained(lm_dir),
                       GPT2LMHeadModel.from_pretrained))
    return out


def test_shard_splits_a_global_batch_and_weights_its_parts():
    batch = list(range(9))
    parts = [shard(batch, r, 2) for r in range(2)]
    assert [p for p, _ in parts] == [[0, 1, 2, 3], [4, 5, 6, 7, 8]]
    assert sum(w for _, w in parts) / 2 == pytest.approx(1.0)  # DDP mean of w_r = Σ n_r/n = 1
    assert shard([7], 0, 2) == ([7], 0.0)  # an empty part: one item that weighs nothing
    assert shard([7], 1, 2) == ([7], 2.0)
    assert shard(batch, 0, 1) == (batch, 1.0)


def test_dpo_on_two_processes_equals_one_process(lm_dir, processes):
    (m1, r1, _), (m2, r2, _) = _policy_pair("dpo", lm_dir, _pairs(45, 0), _pairs(10, 1), None, 8)
    assert _moved(GPT2LMHeadModel.from_pretrained(lm_dir), m1) > 1e-3  # it trained
    assert _max_diff(m1, m2) < 1e-5
    for k in ("loss", "rewards/accuracies", "grad_norm", "eval_rewards/margins",
              "eval_rewards/accuracies"):
        np.testing.assert_allclose(r2.history[k], r1.history[k], rtol=1e-5, atol=1e-6, err_msg=k)
    np.testing.assert_allclose(r2.history["eval_loss"], r1.history["eval_loss"], rtol=1e-5)
    assert r1.log_steps == r2.log_steps == [2, 4, 6]


def test_rpo_with_four_responses_on_two_processes_equals_one_process(lm_dir, processes):
    (m1, r1, _), (m2, r2, _) = _policy_pair("rpo", lm_dir, _groups(21, 4, 2), _groups(6, 4, 3),
                                            _pairs(8, 4), 6)
    assert _moved(GPT2LMHeadModel.from_pretrained(lm_dir), m1) > 1e-3
    assert _max_diff(m1, m2) < 1e-5
    for k in ("loss", "eval_rewards/margins", "eval_rewards/accuracies"):
        np.testing.assert_allclose(r2.history[k], r1.history[k], rtol=1e-5, atol=1e-6, err_msg=k)


def test_lora_policy_on_two_processes_equals_one_process(lm_dir, processes):
    (m1, _, _), (m2, _, _) = _policy_pair("dpo", lm_dir, _pairs(24, 5), _pairs(4, 6), None, 8,
                                          steps=4, **{"lora.enabled": True})
    assert _max_diff(m1, m2) < 1e-5


def test_4bit_lora_reward_model_on_two_processes_equals_one_process(dropout_lm_dir, processes):
    g = torch.Generator().manual_seed(7)
    pairs = [RewardPair(_seq(g), _seq(g)) for _ in range(40)]
    train = Split(pairs, [max(len(p.chosen_input_ids), len(p.rejected_input_ids)) for p in pairs])
    val = Split(pairs[:10], train.lengths[:10])
    # the backbone has dropout 0.1: disable_dropout is what makes 2 processes equal 1
    config = RewardModelConfig(backbone_path=dropout_lm_dir, load_in_4bit=True, lora_r=4,
                               lora_alpha=8)
    out = []
    for procs in (1, 2):
        params = base_params("reward_model", {"train.steps": 5, "train.batch_size": 8,
                                              "train.progress": False, "train.log_every": 1,
                                              "train.num_processes": procs, "device": "cpu",
                                              "disable_dropout": True})
        job = RewardModelJob(config=config, params=RewardModelParams.parse(params), train=train,
                             evals={"val": val})
        out.append(fit(job, procs, "gloo", "cpu",
                       lambda: RewardModel.for_training(config, seed=0), RewardModel.from_pretrained))
    (m1, r1, e1), (m2, r2, e2) = out
    assert any(m.p > 0 for m in RewardModel.for_training(config, seed=0).modules()
               if isinstance(m, torch.nn.Dropout))  # it had dropout to turn off
    # the head's bias cancels in r_c - r_r: its gradient is 0 up to rounding (~1e-9), which Adam
    # scales to steps of up to lr either way, so it is compared within lr x steps
    lora = {k: v for k, v in m1.state_dict().items() if "lora_" in k or k == "head.weight"}
    s2 = m2.state_dict()
    assert len(lora) == 17 and max((v - s2[k]).abs().max().item() for k, v in lora.items()) < 1e-5
    assert (m1.head.bias - m2.head.bias).abs().max().item() <= 5 * 1e-3
    np.testing.assert_allclose(r2.history["loss"], r1.history["loss"], rtol=1e-5)
    assert max(v.abs().max().item() for k, v in lora.items() if "lora_B" in k) > 1e-4  # B starts at 0
    assert e2["val_accuracy"] == pytest.approx(e1["val_accuracy"])
    assert e2["val_loss"] == pytest.approx(e1["val_loss"], abs=1e-5)


def test_sharded_inference_equals_one_process(lm_dir, tmp_path, processes):
    g = torch.Generator().manual_seed(9)
    seqs = [_seq(g, 4, 30) for _ in range(37)]
    starts = [2] * len(seqs)
    job = ResponseLogpsJob(model_path=lm_dir, device="cpu", precision="fp32", input_ids=seqs,
                           response_starts=starts, batch_size=5, progress=False)
    one, two = infer(job, 1, "gloo"), infer(job, 2, "gloo")
    assert np.abs(one[0]).min() > 0 and np.array_equal(one[1], two[1])
    np.testing.assert_allclose(two[0], one[0], rtol=0, atol=1e-6)

    cfg = SamplingConfig(**base_params("evaluation")["sampling"] | {"batch_size": 3, "n_samples": 2,
                                                                    "max_new_tokens": 6})
    gen = GenerateJob(model_path=lm_dir, device="cpu", precision="fp32", prompts=[s[:5] for s in seqs[:11]],
                      cfg=cfg, eos_id=1, pad_id=PAD, greedy=False, progress=False, desc="generate")
    s1, s2 = infer(gen, 1, "gloo"), infer(gen, 2, "gloo")
    assert s1[0] == s2[0]  # the same samples whatever the sharding
    np.testing.assert_allclose(np.array(s2[1]), np.array(s1[1]), atol=1e-5)

    rm_dir = tmp_path / "rm"
    RewardModel.for_training(RewardModelConfig(backbone_path=lm_dir, lora_r=4, lora_alpha=8)
                             ).save_pretrained(str(rm_dir))
    rewards = RewardsJob(model_path=str(rm_dir), device="cpu", precision="fp32", sequences=seqs,
                         response_starts=starts, batch_size=4)
    r1, r2 = infer(rewards, 1, "gloo"), infer(rewards, 2, "gloo")
    np.testing.assert_allclose(r2, r1, rtol=0, atol=1e-6)


def test_merge_shards_takes_each_entry_from_the_rank_that_computed_it():
    a = (np.array([1.5, 0.0, 0.0]), [[[3]], [], [[4, 5]]], [0.0, 2.0, 0.0])
    b = (np.array([0.0, -2.0, 0.0]), [[], [[1, 2]], []], [1.0, 0.0, 0.0])
    got = merge_shards([a, b])
    assert got[0].tolist() == [1.5, -2.0, 0.0]
    assert got[1] == [[[3]], [[1, 2]], [[4, 5]]]
    assert got[2] == [1.0, 2.0, 0.0]


SCALE_WORKER = str(Path(__file__).with_name("scale_worker.py"))



def test_sigkill_of_one_worker_fails_the_run_naming_it_and_resume_matches_uninterrupted(tmp_path, processes):
    steps = 24
    straight = tmp_path / "straight"
    done = subprocess.run([sys.executable, SCALE_WORKER, str(straight), str(steps), "0"],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]

    killed = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, SCALE_WORKER, str(killed), str(steps), "0"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while checkpoint_step(killed) < 6 and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    workers = [c for c in psutil.Process(proc.pid).children(recursive=True)
               if "spawn_main" in " ".join(c.cmdline())]
    assert len(workers) == 2 and proc.poll() is None, "the run ended before the kill"
    victim = workers[-1]
    victim.send_signal(signal.SIGKILL)
    t0 = time.time()
    _, err = proc.communicate(timeout=120)
    at = checkpoint_step(killed)
    assert proc.returncode != 0 and time.time() - t0 < 120  # fails, within a bounded time
    assert "WorkerError" in err and "killed by signal 9 (SIGKILL)" in err, err[-2000:]
    assert 0 < at < steps and not (killed / "final.pt").exists()

    resumed = subprocess.run([sys.executable, SCALE_WORKER, str(killed), str(steps), "1"],
                             capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    a, b = torch.load(straight / "final.pt"), torch.load(killed / "final.pt")
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a), "resumed weights differ"


def test_resume_with_another_number_of_processes_is_refused(tmp_path, processes):
    out = tmp_path / "run"
    assert subprocess.run([sys.executable, SCALE_WORKER, str(out), "4", "0"],
                          capture_output=True, timeout=600).returncode == 0
    model = GPT2LMHeadModel.from_pretrained(out / "lm")
    params = base_params("dpo", {"train.steps": 6, "train.checkpoint_every": 2, "train.resume": True,
                                 "train.progress": False, "device": "cpu"})
    job = DpoJob(model_path=str(out / "lm"), params=DpoParams.parse(params), train=_pairs(8, 0),
                 val=Split([], []), checkpoint_dir=str(out / "ckpt"))
    with pytest.raises(ValueError, match="written by 2 processes; resume with num_processes: 2"):
        fit(job, 1, "gloo", "cpu", lambda: model, GPT2LMHeadModel.from_pretrained)


def test_fsdp_on_cpu_is_refused_rather_than_run_as_ddp(lm_dir, processes):
    """accelerate applies FSDP only on accelerators; on CPU it quietly wraps the model in DDP, so
    ``strategy: fsdp`` there would be a lie: the run fails naming the key instead."""
    with pytest.raises(WorkerError, match=r"train.strategy = 'fsdp' needs GPUs.*use strategy: ddp"):
        _policy_pair("dpo", lm_dir, _pairs(12, 0), _pairs(4, 1), None, 4, steps=1,
                     **{"train.strategy": "fsdp"})


def _dpo_job(lm_dir: str, ckpt: Path, train: Split, **overrides) -> DpoJob:
    params = base_params("dpo", {"train.steps": 4, "train.batch_size": 4, "train.warmup_steps": 1,
                                 "train.eval_every": 0, "train.progress": False, "train.checkpoint_every": 2,
                                 "device": "cpu", **overrides})
    return DpoJob(model_path=lm_dir, params=DpoParams.parse(params), train=train, val=Split([], []),
                  checkpoint_dir=str(ckpt))


def test_resume_continues_only_the_run_that_wrote_the_checkpoint(lm_dir, tmp_path):
    """A checkpoint records what produced it (start model, data, every parameter that changes the
    result): resuming after a β change, or on other data, is refused naming what differs; the same
    run resumes (here: from its last checkpoint at step 4, nothing left to do)."""
    ckpt, data = tmp_path / "ckpt", _pairs(8, 0)
    model, first, _ = _dpo_job(lm_dir, ckpt, data).run()
    assert first.steps == 4 and (ckpt / "last").is_dir()
    with pytest.raises(ValueError, match=r"comes from another run.*params\.beta: 0\.05 -> 0\.2") as e:
        _dpo_job(lm_dir, ckpt, data, **{"beta": 0.2, "train.resume": True}).run()
    assert "train_data" not in str(e.value) and "start_model" not in str(e.value)
    with pytest.raises(ValueError, match=r"differs in train_data: "):
        _dpo_job(lm_dir, ckpt, _pairs(8, 1), **{"train.resume": True}).run()
    again, resumed, _ = _dpo_job(lm_dir, ckpt, data, **{"train.resume": True, "train.progress": True}).run()
    assert resumed.steps == 4 and resumed.history["loss"] == first.history["loss"]
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), again.state_dict().values(),
                                                 strict=True))


def test_typed_jobs_round_trip_through_the_worker_entry_point(lm_dir, tmp_path):
    """A job pickled for the workers comes back as its own type with validated parameters, and
    ``worker`` dispatches on that type: a training job leaves the model and result that
    ``job.run`` gives in the process; an inference job leaves this rank's shard; anything else is
    refused naming what it is."""
    import pickle

    from rpo_pipeline.jobs import read_fitted, run_inference, worker, write_job

    job = _dpo_job(lm_dir, tmp_path / "unused", _pairs(8, 0), **{"train.steps": 2, "train.checkpoint_every": 0})
    back = pickle.loads(pickle.dumps(job))
    assert type(back) is DpoJob and isinstance(back.params, DpoParams) and back.params == job.params
    (tmp_path / "fit").mkdir()
    write_job(job, tmp_path / "fit")
    worker(str(tmp_path / "fit"))
    model, result, _ = read_fitted(tmp_path / "fit", GPT2LMHeadModel.from_pretrained)
    here, here_result, _ = job.run()
    assert result.history["loss"] == pytest.approx(here_result.history["loss"], rel=1e-6)
    assert max((a - b).abs().max().item() for a, b in zip(model.state_dict().values(),
                                                          here.state_dict().values(), strict=True)) < 1e-6

    g = torch.Generator().manual_seed(3)
    infer_job = ResponseLogpsJob(model_path=lm_dir, device="cpu", precision="fp32",
                                 input_ids=[_seq(g) for _ in range(5)], response_starts=[2] * 5,
                                 batch_size=2, progress=False)
    (tmp_path / "infer").mkdir()
    write_job(infer_job, tmp_path / "infer")
    worker(str(tmp_path / "infer"))
    shard = pickle.loads((tmp_path / "infer" / "shard_0.pkl").read_bytes())
    np.testing.assert_array_equal(shard[0], run_inference(infer_job)[0])

    (tmp_path / "bad").mkdir()
    write_job({"kind": "dpo"}, tmp_path / "bad")
    with pytest.raises(TypeError, match="holds a dict, not a job"):
        worker(str(tmp_path / "bad"))


def test_torchrun_runs_a_written_job_through_the_module_entry_point(lm_dir, tmp_path, processes):
    """`torchrun --nproc-per-node=2 -m rpo_pipeline.jobs DIR` (the cluster path: the job written to
    a shared folder, the process group from torchrun's environment) trains what the same job
    trains in this process."""
    import shutil

    from rpo_pipeline.jobs import read_fitted, write_job

    job = _dpo_job(lm_dir, tmp_path / "unused", _pairs(8, 0), **{"train.steps": 2, "train.checkpoint_every": 0})
    write_job(job, tmp_path)
    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent)) or "torchrun"
    done = processes.run([torchrun, "--nnodes=1", "--nproc-per-node=2", "--rdzv-backend=c10d",
                          "--rdzv-endpoint=127.0.0.1:0", "-m", "rpo_pipeline.jobs", str(tmp_path)],
                         capture_output=True, text=True, timeout=300,
                         env={**processes.env, "GLOO_SOCKET_IFNAME": "lo", "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    model, result, _ = read_fitted(tmp_path, GPT2LMHeadModel.from_pretrained)
    here, here_result, _ = job.run()
    np.testing.assert_allclose(result.history["loss"], here_result.history["loss"], rtol=1e-5)
    assert max((a - b).abs().max().item() for a, b in zip(model.state_dict().values(),
                                                          here.state_dict().values(), strict=True)) < 1e-5
