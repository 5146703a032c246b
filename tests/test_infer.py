"""Translator: sequential inference from a checkpoint, batch independence, slot order, ins_max, bad input."""

import pytest
import torch

from instagan import checkpoint
from instagan.config import Config
from instagan.infer import Translator
from instagan.synthetic import make_batch
from instagan.train import TrainState, train_step
from tests.conftest import tiny_checkpoint


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return tiny_checkpoint(tmp_path_factory.mktemp("ckpt"), 32)


def test_loads_one_generator_and_matches_a_single_call_when_one_chunk_suffices(ckpt):
    tr = Translator.from_checkpoint(str(ckpt), "b2a", ins_per=8)
    _, payload = checkpoint.load(ckpt)
    G = tr.G
    for k, v in payload["G_ba"].items():
        torch.testing.assert_close(G.state_dict()[k], v)
    batch = make_batch("b", 2, 32, ins=(2, 4))
    out = tr.translate(batch["img"], batch["masks"], batch["valid"])
    with torch.no_grad():
        y, m = G(batch["img"], batch["masks"], batch["valid"])
    torch.testing.assert_close(out.img, y)
    torch.testing.assert_close(out.masks[batch["valid"]], m[batch["valid"]])
    assert torch.equal(out.valid, batch["valid"])


def test_sequential_chunks_feed_each_other(ckpt):
    tr1 = Translator.from_checkpoint(str(ckpt), "a2b", ins_per=1)
    tr4 = Translator.from_checkpoint(str(ckpt), "a2b", ins_per=4)
    batch = make_batch("a", 1, 32, ins=(3, 3))
    seq = tr1.translate(batch["img"], batch["masks"], batch["valid"])
    one = tr4.translate(batch["img"], batch["masks"], batch["valid"])
    assert not torch.allclose(seq.img, one.img, atol=1e-4)  # three passes through G vs one
    # By hand: y1 = G(x, a1); y2 = G(y1, a2); y3 = G(y2, a3).
    x = batch["img"]
    with torch.no_grad():
        for k in range(3):
            x, _ = tr1.G(x, batch["masks"][:, k:k + 1], batch["valid"][:, k:k + 1])
    torch.testing.assert_close(seq.img, x)


def test_an_image_translates_the_same_alone_or_beside_a_busier_one(ckpt):
    tr = Translator.from_checkpoint(str(ckpt), "a2b", ins_per=2)
    alone = make_batch("a", 1, 32, ins=(1, 1))
    busy = make_batch("a", 1, 32, ins=(6, 6), start=7)
    n = busy["masks"].shape[1]
    masks = torch.full((2, n, 32, 32), -1.0)
    masks[0, :1], masks[1] = alone["masks"], busy["masks"][0]
    valid = torch.zeros(2, n, dtype=torch.bool)
    valid[0, 0], valid[1] = True, busy["valid"][0]
    both = tr.translate(torch.cat([alone["img"], busy["img"]]), masks, valid)
    single = tr.translate(alone["img"], alone["masks"], alone["valid"])
    torch.testing.assert_close(both.img[:1], single.img)
    torch.testing.assert_close(both.masks[:1, :1], single.masks)


def test_outputs_follow_input_slot_order_and_respect_ins_max(ckpt):
    tr = Translator.from_checkpoint(str(ckpt), "a2b", ins_per=2, ins_max=3)
    batch = make_batch("a", 2, 32, ins=(5, 5))
    perm = torch.tensor([3, 0, 4, 1, 2])
    out = tr.translate(batch["img"], batch["masks"], batch["valid"])
    out_p = tr.translate(batch["img"], batch["masks"][:, perm], batch["valid"][:, perm])
    torch.testing.assert_close(out_p.img, out.img)
    torch.testing.assert_close(out_p.masks, out.masks[:, perm])
    # make_batch orders by decreasing area: the 3 largest (slots 0-2) are translated, slots 3-4 are not.
    assert out.valid.tolist() == [[True, True, True, False, False]] * 2
    assert (out.masks[:, 3:] == -1).all()


@pytest.mark.parametrize("img, masks, valid, match", [
    (torch.zeros(1, 1, 32, 32), torch.zeros(1, 1, 32, 32), torch.ones(1, 1, dtype=torch.bool), "img must be"),
    (torch.zeros(1, 3, 32, 32), torch.zeros(1, 1, 16, 16), torch.ones(1, 1, dtype=torch.bool), "do not match"),
    (torch.zeros(1, 3, 32, 32), torch.zeros(1, 2, 32, 32), torch.ones(1, 3, dtype=torch.bool), "do not match"),
    (torch.zeros(1, 3, 30, 30), torch.zeros(1, 1, 30, 30), torch.ones(1, 1, dtype=torch.bool), "multiples of 4"),
])
def test_bad_input_gets_a_clear_error(ckpt, img, masks, valid, match):
    tr = Translator.from_checkpoint(str(ckpt), "a2b")
    with pytest.raises(ValueError, match=match):
        tr.translate(img, masks, valid)


def test_bad_checkpoint_and_direction_are_reported(ckpt, tmp_path):
    with pytest.raises(ValueError, match="direction"):
        Translator.from_checkpoint(str(ckpt), "a2c")
    with pytest.raises(FileNotFoundError, match="state.pt"):
        Translator.from_checkpoint(str(tmp_path), "a2b")


# ---- numpy in, numpy out (jobs/translate.py, jobs/serve.py) -----------------------------------------------------

def _items():
    from instagan.synthetic import make_image

    return [make_image("a", i, size) for i, size in enumerate((32, 40, 52))]


def test_arrays_at_the_model_size_equal_the_tensor_path(ckpt):
    tr = Translator.from_checkpoint(str(ckpt), "a2b")
    img, masks = _items()[0]  # 32x32: the model's size, so no resize
    res = tr.translate_arrays([(img, masks)])[0]
    from instagan.synthetic import to_tensors

    x, m = to_tensors(img, masks)
    out = tr.translate(x[None], m[None], torch.ones(1, len(m), dtype=torch.bool))
    expect = out.img[0].add(1).mul(127.5).round().clamp(0, 255).to(torch.uint8).permute(1, 2, 0).numpy()
    assert (res.img == expect).all()
    assert (res.masks == (out.masks[0] > 0).numpy()).all() and res.translated.all()  # same slots, same order


@pytest.mark.parametrize("size", [None, 0])
def test_arrays_keep_each_size_and_do_not_depend_on_the_batch(ckpt, size):
    import numpy as np

    tr = Translator.from_checkpoint(str(ckpt), "a2b", ins_max=2)
    items = _items() + [(np.full((30, 22, 3), 90, np.uint8), np.zeros((0, 30, 22), bool))]
    together = tr.translate_arrays(items, size=size)
    for (img, masks), res in zip(items, together):
        assert res.img.shape == img.shape and res.img.dtype == np.uint8
        assert res.masks.shape == masks.shape and res.masks.dtype == bool
        assert res.translated.sum() == min(2, len(masks))  # past ins_max: not translated, input mask kept
        assert (res.masks[~res.translated] == masks[~res.translated]).all()
        alone = tr.translate_arrays([(img, masks)], size=size)[0]
        assert np.abs(alone.img.astype(int) - res.img.astype(int)).max() <= 1
    assert (together[-1].img == items[-1][0]).all()  # no instance: nothing to translate


def test_arrays_name_the_bad_item(ckpt):
    import numpy as np

    tr = Translator.from_checkpoint(str(ckpt), "a2b")
    good = _items()[0]
    with pytest.raises(ValueError, match="item 1: masks are 40x40 but the image is 32x32"):
        tr.translate_arrays([good, (good[0], _items()[1][1])])
    with pytest.raises(ValueError, match="item 0: image must be a uint8"):
        tr.translate_arrays([(good[0].astype(np.float32), good[1])])


@pytest.mark.parametrize("arch,mode", [("cyclegan", "none"), ("cyclegan_seg", "union")])
def test_baselines_translate_in_one_step(tmp_path, arch, mode):
    cfg = Config.from_dict({"model": {"ngf": 8, "ndf": 8, "n_blocks": 1, "arch": arch},
                            "data": {"size": 32, "load_size": 32}})
    state = TrainState.create(cfg)
    metrics = train_step(state, make_batch("a", 2, 32, ins=(3, 5)), make_batch("b", 2, 32))
    assert metrics["chunks"] == 1.0
    tr = Translator.from_checkpoint(str(checkpoint.save(state, tmp_path)), "a2b", ins_per=1)
    assert tr.mask_mode == mode
    batch = make_batch("a", 2, 32, ins=(3, 5))
    out = tr.translate(batch["img"], batch["masks"], batch["valid"])
    if mode == "none":  # the image alone is translated; the masks come back untouched
        assert torch.equal(out.masks, batch["masks"]) and torch.equal(out.valid, batch["valid"])
        other = tr.translate(batch["img"], batch["masks"].flip(-1), batch["valid"])
        torch.testing.assert_close(other.img, out.img)
    else:  # one translated union mask per image, one generator call for all instances
        assert out.masks.shape == (2, 1, 32, 32) and out.valid.all()
        with torch.no_grad():
            from instagan import masks as M

            y, _ = tr.G(batch["img"], *M.as_union(batch["masks"], batch["valid"]))
        torch.testing.assert_close(out.img, y)


@pytest.mark.slow
def test_compiled_translator_gives_the_eager_translation(ckpt):
    """Translator(compile=True): the generator's stacks compiled with static mask sets; the same translation as
    eager (fp32, 1e-4) on a batch whose second chunk holds only one of the two images (two batch shapes)."""
    import torch._inductor.config as inductor

    inductor.compile_threads = 1
    eager = Translator.from_checkpoint(str(ckpt), "a2b", ins_per=2)
    compiled = Translator.from_checkpoint(str(ckpt), "a2b", ins_per=2, compile=True)
    assert compiled.G.static_sets and not eager.G.static_sets
    batch = make_batch("a", 2, 32, ins=(1, 3), start=0)
    assert sorted(batch["valid"].sum(1).tolist()) == [1, 3]
    want = eager.translate(batch["img"], batch["masks"], batch["valid"])
    got = compiled.translate(batch["img"], batch["masks"], batch["valid"])
    torch.testing.assert_close(got.img, want.img, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(got.masks, want.masks, rtol=1e-4, atol=1e-4)
    assert torch.equal(got.valid, want.valid)
