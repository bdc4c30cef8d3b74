"""Data placement (hetsim.workloads.placement): shards, label skew, determinism, sampling within a shard,
the summary, the errors, and the authors' data path rule by rule on tiny data sets."""

import json

import numpy as np
import pytest

from hetsim.errors import HetsimError, SpecError
from hetsim.policies.sampling import EpochStream, WindowScores, WindowStream
from hetsim.seeding import derive, numpy_rng
from hetsim.sim import simulate
from hetsim.sim.engine import Simulation
from hetsim.workloads.placement import IID, AuthorsWindows, Dirichlet, PerKind

KINDS3 = ["cpu", "gpu", "gpu"]


class Interrupt(Exception):
    pass


def assert_disjoint_cover(shards, n):
    joined = np.concatenate(shards)
    assert len(joined) == len(set(joined.tolist())), "shards overlap"
    assert sorted(joined.tolist()) == list(range(n)), "shards do not cover every sample"


def one_line(excinfo):
    message = str(excinfo.value)
    assert "\n" not in message
    return message


# -- iid and per_kind shares: sizes, disjointness, coverage ----------------------------------------

def test_iid_shards_are_disjoint_cover_every_sample_and_differ_by_at_most_one():
    shards = IID().shards(np.zeros(10, dtype=np.int64), KINDS3, 1, np.random.default_rng(0))
    assert [len(s) for s in shards] == [4, 3, 3]  # 10 = 3 + 3 + 3, the first worker takes the one left
    assert_disjoint_cover(shards, 10)


def test_iid_is_deterministic_per_seed():
    labels = np.zeros(100, dtype=np.int64)
    a = IID().shards(labels, KINDS3, 1, numpy_rng(0, "placement"))
    b = IID().shards(labels, KINDS3, 1, numpy_rng(0, "placement"))
    c = IID().shards(labels, KINDS3, 1, numpy_rng(1, "placement"))
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert not all(np.array_equal(x, y) for x, y in zip(a, c))


def test_per_kind_shares_split_the_kinds_parts_among_their_devices():
    placement = PerKind(shares={"cpu": 0.25, "gpu": 0.75})
    # cpu: 25 of 100; gpu: 75, split 38 + 37 between its two devices
    assert placement.sizes(100, KINDS3) == [25, 38, 37]
    shards = placement.shards(np.zeros(100, dtype=np.int64), KINDS3, 1, np.random.default_rng(0))
    assert [len(s) for s in shards] == [25, 38, 37]
    assert_disjoint_cover(shards, 100)


def test_per_kind_labels_give_each_kind_only_its_classes():
    labels = np.repeat([0, 1, 2, 3], 10)  # 10 samples of each class; class 3 is listed by no kind
    shards = PerKind(labels={"cpu": [0], "gpu": [1, 2]}).shards(labels, KINDS3, 1, np.random.default_rng(0))
    hist = [np.bincount(labels[s], minlength=4).tolist() for s in shards]
    # the cpu holds all of class 0; the two gpus split classes 1 and 2 evenly (5 + 5 each); nobody holds 3
    assert hist == [[10, 0, 0, 0], [0, 5, 5, 0], [0, 5, 5, 0]]
    assert len(set(np.concatenate(shards).tolist())) == 30


# -- dirichlet ----------------------------------------------------------------------------------------

def balanced_labels(classes=10, per_class=1000):
    return np.repeat(np.arange(classes), per_class)


def test_dirichlet_with_a_large_alpha_is_near_iid():
    labels = balanced_labels()
    shards = Dirichlet(alpha=1e6).shards(labels, ["gpu"] * 5, 32, np.random.default_rng(0))
    hist = np.array([np.bincount(labels[s], minlength=10) for s in shards])
    # Dir(1e6, ..., 1e6) over 5 workers: p_c[k] = 0.2 within ~1e-4, so each worker holds 1000 / 5 = 200
    # of every class, up to the floor of the cut points (+-1)
    assert np.abs(hist - 200).max() <= 1
    assert_disjoint_cover(shards, len(labels))


def test_dirichlet_with_a_small_alpha_gives_each_class_to_about_one_worker():
    labels = balanced_labels()
    shards = Dirichlet(alpha=0.01).shards(labels, ["gpu"] * 5, 1, np.random.default_rng(0))
    hist = np.array([np.bincount(labels[s], minlength=10) for s in shards])
    # Dir(0.01 x 5) puts nearly all its mass on one coordinate: each class sits almost whole on one worker
    assert (hist.max(axis=0) >= 0.95 * 1000).all()
    # so a worker holds few classes: 10 classes over 5 workers, about 2 each, never all 10
    held = (hist >= 50).sum(axis=1)
    assert held.sum() == 10 and held.max() < 10
    assert_disjoint_cover(shards, len(labels))


def test_dirichlet_histogram_of_a_fixed_seed_follows_the_cut_rule():
    labels = np.array([0] * 6 + [1] * 9)
    shards = Dirichlet(alpha=1.0).shards(labels, ["gpu"] * 3, 1, np.random.default_rng(7))
    # the documented rule, by hand: per class, a permutation of its samples, then p ~ Dir(1, 1, 1); worker
    # k takes floor(cumsum(p)[k] n_c) - floor(cumsum(p)[k-1] n_c) of the class
    rng = np.random.default_rng(7)
    expected = np.zeros((3, 2), dtype=np.int64)
    for c, n_c in ((0, 6), (1, 9)):
        rng.permutation(n_c)
        p = rng.dirichlet([1.0, 1.0, 1.0])
        cuts = [0] + [int(np.floor(x * n_c)) for x in np.cumsum(p)[:-1]] + [n_c]
        expected[:, c] = np.diff(cuts)
    got = np.array([np.bincount(labels[s], minlength=2) for s in shards])
    assert got.tolist() == expected.tolist()


def test_dirichlet_redraws_until_every_worker_holds_a_batch():
    labels = balanced_labels(classes=4, per_class=50)
    shards = Dirichlet(alpha=0.5).shards(labels, ["gpu"] * 4, 20, np.random.default_rng(3))
    assert min(len(s) for s in shards) >= 20
    assert_disjoint_cover(shards, len(labels))


# -- streams over shards -------------------------------------------------------------------------------

def test_an_epoch_stream_over_a_shard_returns_each_shard_index_once_per_epoch():
    shard = np.array([11, 3, 7, 20, 5])
    s = EpochStream(5, np.random.default_rng(0), indices=shard)
    first, second = s.take(5), s.take(5)
    assert sorted(first.tolist()) == sorted(second.tolist()) == sorted(shard.tolist())


def run_spec(tiny_spec, *overrides):
    return tiny_spec("workload.n_train=512", *overrides)


def test_shared_placement_streams_the_whole_set_in_each_workers_own_order(tiny_spec):
    sim = Simulation(tiny_spec())
    n = sim.core.workload.n_train
    for k in range(3):
        stream = sim.core.workers[k].stream
        assert stream.indices is None and stream.n == n
        reference = EpochStream(n, np.random.default_rng(derive(0, "data", k)))  # what hetsim always did
        assert np.array_equal(stream.take(50), reference.take(50))


@pytest.mark.parametrize("data", ["{name='iid'}", "{name='dirichlet', params={alpha=0.3}}",
                                  "{name='per_kind', params={labels={cpu=[0], gpu=[1, 2]}}}"])
def test_biased_sampling_picks_within_the_workers_shard(tiny_spec, data):
    spec = run_spec(tiny_spec, f"data={data}", "sampler={name='loss_topk', params={kinds=['*'], sample_ratio=4}}")
    sim = Simulation(spec)
    sim.core.scores.values[:] = np.arange(512.0)  # the highest scores lie wherever; the pick must stay home
    for k in range(3):
        shard = set(sim.core.workers[k].stream.indices.tolist())
        for _ in range(30):
            indices, n_biased = sim.core.sample(k)
            assert n_biased == 8 and set(indices.tolist()) <= shard


def test_runs_are_deterministic_per_seed_and_epochs_count_the_whole_set(tiny_spec):
    a = simulate(run_spec(tiny_spec, "data={name='dirichlet', params={alpha=0.5}}"))
    b = simulate(run_spec(tiny_spec, "data={name='dirichlet', params={alpha=0.5}}"))
    c = simulate(run_spec(tiny_spec, "seed=1", "data={name='dirichlet', params={alpha=0.5}}"))
    assert a.summary["data"] == b.summary["data"] and a.metrics["test_acc"] == b.metrics["test_acc"]
    assert a.summary["data"]["shards"] != c.summary["data"]["shards"]
    assert a.summary["epochs"] == a.summary["samples"] / 512  # the whole training set, not a shard


# -- summary.json ----------------------------------------------------------------------------------------

def test_summary_lists_every_shards_size_and_label_histogram(tiny_spec, tmp_path):
    simulate(run_spec(tiny_spec, "data={name='per_kind', params={labels={cpu=[0], gpu=[1, 2]}}}"), tmp_path)
    data = json.loads((tmp_path / "summary.json").read_text())["data"]
    labels = Simulation(run_spec(tiny_spec)).core.workload.train_y.numpy()
    counts = np.bincount(labels, minlength=3)
    assert data["placement"] == "per_kind" and data["shards_listed"] == "all"
    assert data["shards"]["cpu0"] == {"size": int(counts[0]), "labels": [int(counts[0]), 0, 0]}
    gpu = [data["shards"][f"gpu{i}"]["labels"] for i in range(2)]
    assert np.sum(gpu, axis=0).tolist() == [0, int(counts[1]), int(counts[2])]


def test_summary_is_bounded_beyond_32_workers(tiny_spec):
    spec = tiny_spec("workload.n_train=400", "cluster.devices.1.count=39", "data={name='iid'}", "stop.max_rounds=1")
    data = simulate(spec).summary["data"]
    # 400 samples over 40 workers: 10 each
    assert data["shard_size"] == {"min": 10, "median": 10.0, "max": 10, "total": 400}
    assert data["shards_listed"] == "32 of 40, spread evenly" and len(data["shards"]) == 32
    assert "cpu0" in data["shards"] and "gpu38" in data["shards"]  # the first and the last worker


def test_time_only_runs_keep_their_time_and_say_no_shards_were_built(tiny_spec):
    shared = simulate(tiny_spec("sim.fidelity='time_only'"))
    iid = simulate(tiny_spec("sim.fidelity='time_only'", "data={name='iid'}"))
    assert iid.metrics["time_s"] == shared.metrics["time_s"] and iid.metrics["epoch"] == shared.metrics["epoch"]
    assert iid.summary["data"]["placement"] == "iid" and iid.summary["data"]["shards"] is None


# -- errors -----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("alpha", [0, -0.5])
def test_alpha_must_be_positive(tiny_spec, alpha):
    with pytest.raises(SpecError) as e:
        tiny_spec(f"data={{name='dirichlet', params={{alpha={alpha}}}}}")
    assert "data.params.alpha: expected a number > 0" in one_line(e)


def test_a_shard_smaller_than_a_batch_is_refused_on_load(tiny_spec):
    tiny_spec("data={name='iid'}", "optim.batch_size=85")  # 256 samples over 3 workers: 86, 85, 85
    with pytest.raises(SpecError) as e:
        tiny_spec("data={name='iid'}", "optim.batch_size=86")
    assert "'iid' gives worker gpu0 a shard of 85 samples, fewer than one batch (optim.batch_size = 86)" in one_line(e)


def test_disjoint_label_shards_that_cannot_hold_a_batch_each_are_refused_on_load(tiny_spec):
    with pytest.raises(SpecError) as e:  # 3 workers x 90 > 256 samples, whatever the labels
        tiny_spec("data={name='dirichlet', params={alpha=1.0}}", "optim.batch_size=90")
    assert "more than the 256 training samples" in one_line(e)


def test_a_dirichlet_shard_smaller_than_a_batch_after_every_draw_is_one_line(tiny_spec):
    spec = tiny_spec("data={name='dirichlet', params={alpha=0.001}}", "optim.batch_size=80")
    with pytest.raises(SpecError) as e:
        Simulation(spec)
    assert one_line(e).startswith("tiny: data.params.alpha: 100 draws of the Dirichlet proportions")


@pytest.mark.parametrize("data, message", [
    ("{name='per_kind', params={shares={cpu=0.5, tpu=0.5}}}",
     "data.params.shares: expected device kinds of this cluster ('cpu', 'gpu'), got 'tpu'"),
    ("{name='per_kind', params={shares={gpu=1.0}}}", "data.params.shares: expected every device kind"),
    ("{name='per_kind', params={labels={cpu=[0], tpu=[1]}}}", "got 'tpu'"),
    ("{name='authors', params={kinds=['tpu']}}", "data.params.kinds: expected device kinds of this cluster"),
    ("{name='per_kind', params={shares={cpu=0.5, gpu=0.4}}}", "data.params.shares: expected fractions that sum to 1"),
    ("{name='per_kind', params={shares={cpu=0.5}, labels={gpu=[1]}}}", "expected exactly one of `shares`"),
    ("{name='per_kind', params={labels={cpu=[0], gpu=[1, 1]}}}", "data.params.labels.gpu: expected distinct"),
    ("{name='shards'}", "data.name: expected one of ['authors', 'dirichlet', 'iid', 'per_kind', 'shared']"),
    ("{name='iid', params={alpha=1}}", "data.params.alpha: unknown key"),
])
def test_bad_placements_are_one_line_errors(tiny_spec, data, message):
    with pytest.raises(SpecError) as e:
        tiny_spec(f"data={data}")
    assert message in one_line(e)


def test_a_label_the_training_set_lacks_is_refused(tiny_spec):
    with pytest.raises(SpecError) as e:
        Simulation(tiny_spec("data={name='per_kind', params={labels={cpu=[0], gpu=[1, 7]}}}"))
    assert one_line(e).startswith("tiny: data.params.labels.gpu: expected classes of the training set (0, 1, 2), "
                                  "got 7")


# -- the authors' data path -----------------------------------------------------------------------------
# TINY: batch 8, cpu 1 step and two gpus 5 steps per round. With 512 samples a window is the reference's
# 512 // (8 x (1 + 5 + 5)) = 5 rounds; slices: cpu 5 x 1 x 8 = 40, each gpu 5 x 5 x 8 = 200.

def record_batches(sim):
    """Log every step's (round, worker, indices, per-sample losses) through the core's record."""
    log, record = [], sim.core.record

    def logging_record(k, indices, n_biased, loss_sum, losses):
        log.append((sim.core.updates + 1, k, indices.copy(), None if losses is None else losses.copy()))
        record(k, indices, n_biased, loss_sum, losses)

    sim.core.record = logging_record
    return log


def test_authors_windows_follow_the_reference_rule_and_each_slice_is_read_once(tiny_spec):
    sim = Simulation(run_spec(tiny_spec, "data={name='authors', params={biased=false}}", "stop.max_rounds=11"))
    log = record_batches(sim)
    result = sim.run()
    assert result.summary["data"]["window_rounds"] == 5
    assert result.summary["data"]["windows_dealt"] == 3  # rounds 1-5, 6-10, 11
    assert result.summary["data"]["slice_sizes"] == {"cpu0": 40, "gpu0": 200, "gpu1": 200}
    for window, rounds in ((0, range(1, 6)), (1, range(6, 11))):
        read = {k: np.concatenate([i for r, kk, i, _ in log if kk == k and r in rounds]) for k in range(3)}
        assert [len(read[k]) for k in range(3)] == [40, 200, 200]
        # the uniform arm: disjoint slices of one permutation, each read exactly once
        everyone = np.concatenate(list(read.values()))
        assert len(set(everyone.tolist())) == 440
    assert result.decisions[0]["biased_samples"] == [0, 0, 0]


def test_authors_uniform_arm_cuts_one_permutation_into_consecutive_slices():
    windows = AuthorsWindows(20, 1, [4, 6, 6], np.array([False, False, False]), 0, ["cpu0", "gpu0", "gpu1"])
    slices = windows.deal(0, np.full(20, np.inf), np.random.default_rng(5))
    perm = np.random.default_rng(5).permutation(20)  # the one draw of the window
    assert [s.tolist() for s in slices] == [perm[:4].tolist(), perm[4:10].tolist(), perm[10:16].tolist()]


def test_authors_top_k_takes_the_highest_scores_of_the_pool_and_unseen_first():
    # pool = int(2 x 10) = all 20 samples, so the top-2 is the whole set's, whatever the draw
    windows = AuthorsWindows(20, 1, [2, 3, 3], np.array([True, False, False]), 20, ["cpu0", "gpu0", "gpu1"])
    scores = np.arange(20.0)
    assert sorted(windows.deal(0, scores, np.random.default_rng(0))[0].tolist()) == [18, 19]
    scores[[3, 7]] = np.inf  # never seen: first
    slices = windows.deal(1, scores, np.random.default_rng(0))
    assert sorted(slices[0].tolist()) == [3, 7]
    # the others read consecutive blocks of one fresh permutation: disjoint among themselves
    assert len(slices[1]) == len(slices[2]) == 3 and not set(slices[1].tolist()) & set(slices[2].tolist())


def test_authors_pool_is_drawn_from_the_whole_set():
    # pool of 4 out of 20: the top-1 is the best of 4 uniform candidates, so over many windows the picks
    # spread over the set (a pool drawn from a worker's own stream could not reach every sample)
    windows = AuthorsWindows(20, 1, [1, 1], np.array([True, False]), 4, ["cpu0", "gpu0"])
    rng = np.random.default_rng(0)
    picks = [int(windows.deal(w, np.arange(20.0), rng)[0][0]) for w in range(400)]
    # by hand: the pick is the highest of 4 distinct uniform candidates, so P(pick = j) = C(j, 3) / C(20, 4):
    # never below 3; 19 whenever the pool holds it, P = 4 / 20 (80 of 400 expected); 10 with P = 120 / 4845
    assert min(picks) >= 3 and set(range(10, 20)) <= set(picks)
    assert 50 <= picks.count(19) <= 110


def test_window_scores_merge_latest_per_rank_and_min_across_ranks_at_the_reshuffle():
    s = WindowScores(4, groups=2)
    s.values[:] = [1.0, 1.0, 1.0, 1.0]  # merged at the previous reshuffle
    s.merge(np.array([0, 1]), np.array([3.0, 0.5]))  # rank A (cpu) this window
    s.merge(np.array([0]), np.array([2.0]))          # rank B (gpu) this window
    assert s.values.tolist() == [1.0, 1.0, 1.0, 1.0]  # frozen during the window
    s.close_window()
    # sample 0: both ranks overwrote their entry (3 and 2): MIN = 2, the older 1.0 is gone from both arrays
    # sample 1: rank A has 0.5, rank B still 1.0: 0.5; samples 2, 3: nobody trained them: 1.0
    assert s.values.tolist() == [2.0, 0.5, 1.0, 1.0]
    s.close_window()  # an empty window changes nothing
    assert s.values.tolist() == [2.0, 0.5, 1.0, 1.0]


def test_authors_scores_are_frozen_in_a_window_and_merged_per_rank_at_the_reshuffle(tiny_spec):
    sim = Simulation(run_spec(tiny_spec, "data={name='authors'}", "stop.max_rounds=6"))
    log = record_batches(sim)
    values = []
    pull = sim.core.pull

    def watching_pull(ks):
        pull(ks)
        values.append(sim.core.scores.values.copy())

    sim.core.pull = watching_pull
    sim.run()
    assert all(np.isinf(v).all() for v in values[:5])  # window 0: ranked by the scores of its start (none)
    # the reshuffle before round 6, by the reference rule with explicit ranks (cpu, gpu): each rank's
    # array starts at +inf and its latest loss overwrites; then MIN across the two arrays
    ranks = {"cpu": np.full(512, np.inf), "gpu": np.full(512, np.inf)}
    for r, k, indices, losses in log:
        if r <= 5:
            ranks["cpu" if k == 0 else "gpu"][indices] = losses
    assert np.array_equal(values[5], np.minimum(ranks["cpu"], ranks["gpu"]))
    assert np.isfinite(values[5]).sum() > 200


def test_authors_biased_arm_gives_the_cpu_the_top_k_of_the_reshuffle(tiny_spec):
    sim = Simulation(run_spec(tiny_spec, "data={name='authors', params={sample_ratio=2}}", "stop.max_rounds=6"))
    log = record_batches(sim)
    result = sim.run()
    assert result.decisions[0]["biased_samples"] == [8, 0, 0]
    stream = sim.core.workers[0].stream  # round 6 dealt window 1: the cpu's 40 picks of a pool of 80
    assert stream.window == 1 and stream.by_loss and stream.n == 40
    scores = sim.core.scores.values  # frozen since that reshuffle
    # the window draws, in the documented order: window 0 (pool, shuffle of the top-k, the others'
    # permutation), then window 1's pool of 80 from all 512; the top-k = its 40 highest scores
    rng = numpy_rng(0, "placement-window")
    rng.choice(512, size=80, replace=False), rng.permutation(40), rng.permutation(512)
    pool = rng.choice(512, size=80, replace=False)
    expected = sorted(pool, key=lambda i: -scores[i])[:40]
    assert sorted(stream.indices.tolist()) == sorted(int(i) for i in expected)
    assert np.isinf(scores[pool]).sum() < 40  # so the top-k also ranked seen samples by their loss
    # and the cpu reads its slice in order: round 6's batch is the slice's head
    assert np.array_equal(np.concatenate([i for r, k, i, _ in log if k == 0 and r == 6]), stream.indices[:8])


@pytest.mark.parametrize("biased", ["true", "false"])
def test_authors_resume_across_a_window_is_bit_identical(tiny_spec, tmp_path, biased):
    # windows of 5 rounds: the checkpoint of round 8 is mid-window 1; round 11 deals window 2 after the resume
    args = ("workload.n_train=512", f"data={{name='authors', params={{biased={biased}}}}}", "stop.max_rounds=12",
            "run.checkpoint_every=4")
    whole = simulate(tiny_spec(*args), tmp_path / "whole")

    def crash(row):
        if row["round"] == 9:
            raise Interrupt

    with pytest.raises(Interrupt):
        simulate(tiny_spec(*args), tmp_path / "cut", progress=crash)
    resumed = simulate(tiny_spec(*args), tmp_path / "cut", resume=True)
    assert resumed.metrics["test_acc"] == whole.metrics["test_acc"]
    assert (tmp_path / "cut" / "metrics.csv").read_bytes() == (tmp_path / "whole" / "metrics.csv").read_bytes()


def test_a_window_stream_refuses_to_read_past_its_slice():
    s = WindowStream("cpu0")
    s.set_window(2, np.array([4, 1, 3]), by_loss=True)
    assert s.take(2).tolist() == [4, 1]
    with pytest.raises(HetsimError) as e:
        s.take(2)
    assert "worker cpu0 needs 2 more samples in window 2, its slice has 1 left of 3" in one_line(e)


@pytest.mark.parametrize("overrides, message", [
    (("data={name='authors', params={sample_ratio=20}}",),
     "data.params.sample_ratio: the candidate pool, 20.0 x the 40 top-k samples of a window, exceeds the 512"),
    (("data={name='authors', params={window_rounds=6}}",), "data.params.window_rounds: expected at most 5"),
    (("data={name='authors'}", "scheduler={name='proportional'}"), "scheduler.name: data 'authors' needs 'fixed'"),
    (("data={name='authors'}", "sampler={name='loss_topk'}"), "sampler.name: data 'authors' needs 'uniform'"),
    (("data={name='authors'}", "sim.fidelity='time_only'"), "data.name: 'authors' is a data path"),
    (("data={name='authors', params={sample_ratio=0.5}}",), "data.params.sample_ratio: expected a number >= 1"),
    (("data={name='authors'}", "workload.n_train=80"), "data: 'authors' deals a window of at least one round"),
])
def test_authors_bad_settings_are_one_line_errors(tiny_spec, overrides, message):
    with pytest.raises(SpecError) as e:
        tiny_spec("workload.n_train=512", *overrides)
    assert message in one_line(e)


# -- the real backend deals the same data --------------------------------------------------------------

TWO_PROCESSES = ["cluster.devices=[{kind='cpu', count=1, step_time={dist='constant', mean_s=0.004}, threads=1}, "
                 "{kind='gpu', count=1, step_time={dist='constant', mean_s=0.002}, threads=1}]",
                 "scheduler={name='fixed', params={per_kind={cpu=2, gpu=4}}}", "stop.max_rounds=8",
                 "eval.every_rounds=2", "workload.n_train=512"]


@pytest.mark.parametrize("data", ["{name='dirichlet', params={alpha=0.5}}", "{name='authors', params={sample_ratio=2}}"])
def test_the_real_backend_streams_the_simulators_shards_and_windows(tiny_spec, tmp_path, data):
    from backends.torchmp import run

    spec = tiny_spec(*TWO_PROCESSES, f"data={data}")
    real, sim = run(spec, tmp_path / "real"), simulate(spec, tmp_path / "sim")
    assert real.summary["data"] == sim.summary["data"]
    assert [d["biased_samples"] for d in real.decisions] == [d["biased_samples"] for d in sim.decisions]
    # the same samples in the same steps: the same losses up to the all-reduce's summation order
    assert np.allclose(real.metrics["train_loss"][1:], sim.metrics["train_loss"][1:], atol=1e-5)
    assert np.allclose(real.metrics["test_acc"], sim.metrics["test_acc"], atol=1e-6, equal_nan=True)
