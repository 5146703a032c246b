"""Shared fixtures. `ray_local`: one local Ray instance for the whole session (starting Ray costs ~5 s)."""

import os

import pytest


@pytest.fixture(scope="session")
def ray_local():
    """4 logical CPUs on a 2-core machine: 2 Train workers x 1 CPU with num_cpus=2 hangs (Ray Data gets no CPU)."""
    for key, value in (("RAY_AUTH_MODE", "disabled"), ("RAY_USAGE_STATS_ENABLED", "0"),
                       ("RAY_DATA_DISABLE_PROGRESS_BARS", "1")):
        os.environ.setdefault(key, value)
    import ray

    from instagan.distributed.launch import ray_env

    os.environ.update(ray_env())  # what jobs/*.py's init_ray sets: 2 Parquet footer actors, not 32

    started = not ray.is_initialized()
    if started:
        ray.init(num_cpus=4, log_to_driver=False, object_store_memory=512 * 1024**2)
    yield ray
    if started:
        ray.shutdown()


def tiny_checkpoint(directory, size: int):
    """A checkpoint of a tiny InstaGAN (ngf 8, 1 block) after one training step at `size` px: seconds on a CPU."""
    from instagan import checkpoint
    from instagan.config import Config
    from instagan.synthetic import make_batch
    from instagan.train import TrainState, train_step

    cfg = Config.from_dict({"model": {"ngf": 8, "ndf": 8, "n_blocks": 1}, "data": {"size": size, "load_size": size}})
    state = TrainState.create(cfg)
    train_step(state, make_batch("a", 2, size), make_batch("b", 2, size))
    return checkpoint.save(state, directory)


@pytest.fixture(scope="session")
def small_segmenter(tmp_path_factory):
    """The small instance segmenter of domain a's ellipses trained once for the session: 200 steps of 4 images from
    scratch on one core (about 3 minutes), on a generated set of 600 images per domain. -> (data root, the
    checkpoint folder). tests/test_segment.py measures it, tests/test_translate_segment.py and tests/test_serve.py
    translate with it."""
    from data_prep.synthetic import write_synthetic
    from instagan.segment_train import SegmentConfig, train_local

    base = tmp_path_factory.mktemp("segmenter")
    root = str(base / "data")
    write_synthetic(root, n=600, size=64)
    cfg = SegmentConfig.from_dict({"data": {"root": root, "domains": "a"}, "train": {"steps": 200},
                                   "run": {"log_every": 50, "checkpoint_every": 100}})
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # 2 threads took longer (292 s vs about 176 s) beside the session's idle Ray processes
    try:
        train_local(cfg, base / "run")
    finally:
        torch.set_num_threads(threads)
    return root, base / "run" / "checkpoint_step00000200"
