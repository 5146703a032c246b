"""Translator: sequential inference from a checkpoint, batch independence, slot order, ins_max, bad input."""

import pytest
import torch

from instagan import checkpoint
from instagan.config import Config
from instagan.infer import Translator
from instagan.synthetic import make_batch
from instagan.train import TrainState, train_step


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    cfg = Config.from_dict({"model": {"ngf": 8, "ndf": 8, "n_blocks": 1}, "data": {"size": 32, "load_size": 32}})
    state = TrainState.create(cfg)
    train_step(state, make_batch("a", 2, 32), make_batch("b", 2, 32))
    return checkpoint.save(state, tmp_path_factory.mktemp("ckpt"))


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
