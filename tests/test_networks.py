"""Set networks: the authors' parameter counts, permutation symmetry, batch independence, padding inertness."""

import pytest
import torch

from instagan.networks import SetDiscriminator, SetGenerator, count_parameters
from instagan.synthetic import make_batch


# Every generator option beyond the paper's recipe.
LEVERS = {"composite": True, "mask_cond": True, "upsample": "resize", "paint": "residual"}


@pytest.fixture(scope="module", params=["paper", "levers", "extend"])
def nets(request):
    """The paper's networks, and the same with every option of the quality recipe on (and with paint "extend"):
    the symmetry and independence properties must hold for all."""
    torch.manual_seed(0)
    if request.param == "paper":
        return SetGenerator(ngf=8, n_blocks=2).eval(), SetDiscriminator(ndf=8).eval()
    levers = {**LEVERS, "paint": "extend"} if request.param == "extend" else LEVERS
    return (SetGenerator(ngf=8, n_blocks=2, **levers).eval(),
            SetDiscriminator(ndf=8, inst_img=True, img_head=True, mask_head=True).eval())


def test_parameter_counts_match_the_authors():
    G, D = SetGenerator(), SetDiscriminator()
    assert count_parameters(G) == 26_815_108
    assert [count_parameters(m) for m in (G.enc_img, G.enc_mask, G.dec_img, G.dec_mask)] == [
        10_999_936, 10_993_664, 1_493_763, 3_327_745]
    assert count_parameters(D) == 9_721_729
    # Spectral norm's u/v vectors are buffers; every D conv is spectral-normalised.
    convs = [m for m in D.modules() if isinstance(m, torch.nn.Conv2d)]
    assert len(convs) == 8 and all(hasattr(c, "parametrizations") for c in convs)
    assert any("_u" in name for name, _ in D.named_buffers())


def test_weights_are_normal_002():
    G = SetGenerator(ngf=16, n_blocks=2)
    w = G.enc_img[1].weight
    assert abs(w.std().item() - 0.02) < 0.003 and abs(w.mean().item()) < 0.003
    D = SetDiscriminator(ndf=16)
    w = D.classifier[0].parametrizations.weight.original
    assert abs(w.std().item() - 0.02) < 0.003


def test_generator_invariant_and_equivariant_to_instance_order(nets):
    G, _ = nets
    batch = make_batch("a", 2, 32, ins=(3, 5))
    img, masks, valid = batch["img"], batch["masks"], batch["valid"]
    perm = torch.randperm(masks.shape[1])
    with torch.no_grad():
        y, b = G(img, masks, valid)
        y_p, b_p = G(img, masks[:, perm], valid[:, perm])
    torch.testing.assert_close(y_p, y, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(b_p, b[:, perm], rtol=1e-4, atol=1e-5)
    assert not torch.allclose(b[valid][0], b[valid][1])  # different instances get different masks


def test_discriminator_invariant_to_instance_order(nets):
    _, D = nets
    batch = make_batch("b", 2, 32, ins=(3, 5))
    perm = torch.randperm(batch["masks"].shape[1])
    with torch.no_grad():
        s = D(batch["img"], batch["masks"], batch["valid"])
        s_p = D(batch["img"], batch["masks"][:, perm], batch["valid"][:, perm])
    assert s.shape == (2, 1 + (D.img_head is not None) + (D.mask_head is not None), 2, 2)
    torch.testing.assert_close(s_p, s, rtol=1e-4, atol=1e-5)


def test_outputs_of_an_image_do_not_depend_on_the_rest_of_the_batch(nets):
    G, D = nets
    alone = make_batch("a", 1, 32, ins=(2, 2))
    others = make_batch("a", 3, 32, ins=(5, 6), start=10)
    n = others["masks"].shape[1]
    masks0 = torch.full((1, n, 32, 32), -1.0)
    masks0[:, :2] = alone["masks"]
    valid0 = torch.zeros(1, n, dtype=torch.bool)
    valid0[:, :2] = True
    img = torch.cat([alone["img"], others["img"]])
    masks, valid = torch.cat([masks0, others["masks"]]), torch.cat([valid0, others["valid"]])
    with torch.no_grad():
        y1, b1 = G(alone["img"], alone["masks"], alone["valid"])
        y, b = G(img, masks, valid)
        s1, s = D(alone["img"], alone["masks"], alone["valid"]), D(img, masks, valid)
    torch.testing.assert_close(y[:1], y1, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(b[:1, :2], b1, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(s[:1], s1, rtol=1e-4, atol=1e-5)
    # The authors' set sum over the whole batch would mix images: ours does not. Check the mixing is visible:
    # changing image 1's masks must not change image 0 but must change image 1.
    masks2 = masks.clone()
    masks2[1] = -masks2[1]
    with torch.no_grad():
        y2, _ = G(img, masks2, valid)
    torch.testing.assert_close(y2[0], y[0], rtol=1e-4, atol=1e-5)
    assert not torch.allclose(y2[1], y[1], atol=1e-4)


def test_padding_slots_change_nothing_and_come_out_empty(nets):
    G, D = nets
    batch = make_batch("a", 2, 32, ins=(2, 3))
    img, masks, valid = batch["img"], batch["masks"], batch["valid"]
    junk = torch.rand(2, 3, 32, 32) * 2 - 1  # padding with arbitrary pixel values
    masks_p = torch.cat([masks, junk], 1)
    valid_p = torch.cat([valid, torch.zeros(2, 3, dtype=torch.bool)], 1)
    with torch.no_grad():
        y, b = G(img, masks, valid)
        y_p, b_p = G(img, masks_p, valid_p)
        s, s_p = D(img, masks, valid), D(img, masks_p, valid_p)
    torch.testing.assert_close(y_p, y, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(b_p[:, :masks.shape[1]], b, rtol=1e-4, atol=1e-5)
    assert (b_p[~valid_p] == -1).all()
    torch.testing.assert_close(s_p, s, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("levers", [False, True])
def test_every_parameter_gets_a_gradient_even_without_instances(levers):
    """DDP without find_unused_parameters needs every parameter in every backward, also on a rank whose images
    have no instance left in a chunk."""
    G = SetGenerator(ngf=4, n_blocks=1, **(LEVERS if levers else {}))
    D = SetDiscriminator(ndf=4, inst_img=levers, img_head=levers)
    img = torch.rand(2, 3, 32, 32) * 2 - 1
    masks, valid = torch.full((2, 2, 32, 32), -1.0), torch.zeros(2, 2, dtype=torch.bool)
    y, b = G(img, masks, valid)
    (y.mean() + b.mean() + D(y, b, valid).mean()).backward()
    for name, p in [*G.named_parameters(), *D.named_parameters()]:
        assert p.grad is not None, name
    assert (b == -1).all()
    # Without instances the set feature is zero: the result equals an image-only translation.
    y_alone, _ = G(img, masks[:, :0], valid[:, :0])
    torch.testing.assert_close(y, y_alone)


def test_masks_of_another_size_raise():
    G = SetGenerator(ngf=4, n_blocks=1)
    with pytest.raises(ValueError, match=r"masks \(1, 2, 16, 16\) .* do not match the image \(1, 3, 32, 32\)"):
        G(torch.zeros(1, 3, 32, 32), torch.zeros(1, 2, 16, 16), torch.ones(1, 2, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"valid \(1, 3\)"):
        G(torch.zeros(1, 3, 32, 32), torch.zeros(1, 2, 32, 32), torch.ones(1, 3, dtype=torch.bool))


def test_grouped_discriminator_features_give_the_same_result_and_gradients():
    from torch.nn.utils import parametrize

    torch.manual_seed(0)
    D = SetDiscriminator(ndf=8)
    batch = make_batch("a", 2, 32, ins=(4, 5))
    grads = []
    for group in (0, 3):
        D.zero_grad()
        state = {k: v.clone() for k, v in D.state_dict().items()}
        with parametrize.cached():
            out = D(batch["img"], batch["masks"], batch["valid"], group)
            out.pow(2).mean().backward()
        grads.append((out.detach(), [p.grad.clone() for p in D.parameters()]))
        D.load_state_dict(state)  # undo the power iteration's buffer update
    torch.testing.assert_close(grads[1][0], grads[0][0])
    for g1, g0 in zip(grads[1][1], grads[0][1]):
        # fp32 sums in another order (and oneDNN kernels chosen by buffer alignment): equal to 1e-3 of the
        # tensor's scale; a group left out or counted twice would differ by the scale itself
        torch.testing.assert_close(g1, g0, rtol=1e-4, atol=max(1e-6, 1e-3 * float(g0.abs().max())))


def test_baseline_generators_and_the_image_only_discriminator():
    from instagan.config import ModelConfig
    from instagan.networks import ImageDiscriminator, build_generator

    torch.manual_seed(0)
    img = torch.rand(2, 3, 32, 32) * 2 - 1
    masks = (torch.rand(2, 3, 32, 32) > 0.5).float() * 2 - 1
    valid = torch.tensor([[True, True, False], [True, False, False]])
    G = build_generator(ModelConfig(arch="cyclegan", ngf=8, n_blocks=1))
    y, m = G(img, masks, valid)
    assert m is masks and torch.equal(G(img, -masks, valid)[0], y)  # masks are not looked at
    # CycleGAN's ResNet-9 generator
    assert count_parameters(build_generator(ModelConfig(arch="cyclegan"))) == 11_378_179
    Gs = build_generator(ModelConfig(arch="cyclegan_seg", ngf=8, n_blocks=1))
    union = masks[:, :1]
    ys, ms = Gs(img, union, valid[:, :1])
    assert ms.shape == (2, 1, 32, 32) and not torch.equal(Gs(img, -union, valid[:, :1])[0], ys)
    with pytest.raises(ValueError, match="one union mask"):
        Gs(img, masks, valid)
    D = ImageDiscriminator(8)
    torch.testing.assert_close(D(img, masks, valid), D(img, -masks, valid.flip(1)))


# ---- options beyond the paper (the quality recipe) --------------------------------------------------------------

def test_composite_keeps_every_pixel_outside_the_masks_and_paints_only_inside():
    """y = x (1 - u) + g u: where the input and the translated masks are all background, the output IS the input
    (bit for bit), and no loss sends a gradient to the painted image g there; inside, g is used and trained."""
    torch.manual_seed(0)
    G = SetGenerator(ngf=8, n_blocks=1, composite=True)
    batch = make_batch("a", 2, 32, ins=(1, 3))
    img, masks, valid = batch["img"], batch["masks"], batch["valid"]
    painted = {}

    def keep(module, inputs, out):
        if out.requires_grad:
            out.retain_grad()
            painted["g"] = out

    G.dec_img.register_forward_hook(keep)
    y, b = G(img, masks, valid)
    outside = ((masks > 0) & valid[:, :, None, None]).any(1) | ((b > 0) & valid[:, :, None, None]).any(1)
    outside = ~outside[:, None].expand_as(img)
    assert outside.any() and (~outside).any()
    assert torch.equal(y[outside], img[outside])
    (y.square().sum() + b.sum()).backward()  # any loss of the output
    g_grad = painted["g"].grad
    assert torch.equal(g_grad[outside], torch.zeros_like(g_grad[outside]))
    inside = ((masks > 0) & valid[:, :, None, None]).any(1)[:, None].expand_as(img)  # input instances: u = 1
    assert g_grad[inside].abs().sum() > 0
    torch.testing.assert_close(y[inside], painted["g"][inside].detach(), rtol=0, atol=0)
    # Without the composite the same weights give a different background: the option is what keeps it.
    G.composite = False
    with torch.no_grad():
        y_plain, _ = G(img, masks, valid)
    assert not torch.equal(y_plain[outside], img[outside])


def test_mask_conditioned_image_decoder_follows_the_translated_masks():
    """With mask_cond the image depends on the translated masks (through the decoder's inputs), not only on the
    input masks: changing the mask decoder's output alone changes the image."""
    torch.manual_seed(0)
    G = SetGenerator(ngf=8, n_blocks=1, mask_cond=True).eval()
    batch = make_batch("a", 1, 32, ins=(2, 2))
    with torch.no_grad():
        y, _ = G(batch["img"], batch["masks"], batch["valid"])
        G.dec_mask[-2].bias += 3.0  # translated masks grow everywhere; the image path's weights are untouched
        y2, _ = G(batch["img"], batch["masks"], batch["valid"])
    assert (y2 - y).abs().max() > 1e-3


def test_discriminator_with_inst_img_looks_at_the_pixels_inside_each_mask():
    torch.manual_seed(0)
    D = SetDiscriminator(ndf=8, inst_img=True).eval()
    plain = SetDiscriminator(ndf=8).eval()
    batch = make_batch("b", 2, 32, ins=(2, 3))
    img, masks, valid = batch["img"], batch["masks"], batch["valid"]
    with torch.no_grad():
        f = D.set_feature(masks, valid, img=img)
        f_other = D.set_feature(masks, valid, img=-img)  # same masks, other pixels inside them
        p, p_other = plain.set_feature(masks, valid), plain.set_feature(masks, valid)
    assert not torch.allclose(f, f_other, atol=1e-4)
    torch.testing.assert_close(p, p_other)
    with pytest.raises(ValueError, match="pass img"):
        D.set_feature(masks, valid)


def test_gated_painting_copies_the_input_where_the_gate_is_open():
    """g = a * x + (1 - a) * c: with the gate fully open the generator is exactly the identity on the image, with
    it shut it is the painted colour alone; the same weights otherwise."""
    torch.manual_seed(0)
    G = SetGenerator(ngf=8, n_blocks=1, paint="gated").eval()
    batch = make_batch("a", 2, 32, ins=(1, 3))
    img, masks, valid = batch["img"], batch["masks"], batch["valid"]
    final = G.dec_img[-2]  # the last conv: 3 colour channels and the gate
    assert final.out_channels == 4
    with torch.no_grad():
        final.bias[3] = 50.0
        y_open, _ = G(img, masks, valid)
        final.bias[3] = -50.0
        y_shut, _ = G(img, masks, valid)
    torch.testing.assert_close(y_open, img, rtol=0, atol=1e-6)
    assert (y_shut - img).abs().mean() > 0.1 and y_shut.abs().max() <= 1


def test_residual_painting_changes_the_input_by_the_decoder_output():
    """g = x + 2 d: a decoder output of 0 is exactly the identity, and the output moves with d."""
    torch.manual_seed(0)
    G = SetGenerator(ngf=8, n_blocks=1, paint="residual").eval()
    batch = make_batch("a", 2, 32, ins=(1, 3))
    img, masks, valid = batch["img"], batch["masks"], batch["valid"]
    final = G.dec_img[-2]
    with torch.no_grad():
        y, _ = G(img, masks, valid)
        assert (y - img).abs().max() > 1e-3
        final.weight.zero_()
        final.bias.fill_(0.25)  # d = tanh(0.25) everywhere
        y_shift, _ = G(img, masks, valid)
    torch.testing.assert_close(y_shift, (img + 2 * torch.tanh(torch.tensor(0.25))).clamp(-1, 1), rtol=0, atol=1e-6)
    assert y_shift.max() == 1 and y_shift.min() >= -1


def test_extend_grows_each_object_in_its_own_colour_and_keeps_every_other_pixel():
    """extend_colours: where a translated mask covers a pixel no input mask covers, the pixel takes the mean input
    colour of its instance; input-mask pixels, background and padding slots are left as they are. A generator with
    paint "extend" whose decoder outputs 0 returns exactly that image."""
    from instagan.networks import extend_colours, paint_weight

    img = torch.full((1, 3, 16, 16), -0.5)
    img[0, :, 2:6, 2:6] = torch.tensor([0.9, -0.9, 0.1])[:, None, None]  # instance 0
    img[0, :, 10:14, 10:14] = torch.tensor([-0.8, 0.7, 0.3])[:, None, None]  # instance 1
    masks = torch.full((1, 3, 16, 16), -1.0)
    masks[0, 0, 2:6, 2:6] = 1
    masks[0, 1, 10:14, 10:14] = 1
    out = torch.full((1, 3, 16, 16), -1.0)
    out[0, 0, 1:7, 1:7] = 1  # instance 0 grows by one pixel all round
    out[0, 1, 10:14, 10:14] = 1  # instance 1 keeps its shape
    out[0, 2, :, :3] = 1  # a padding slot: ignored
    valid = torch.tensor([[True, True, False]])
    base = extend_colours(img, masks, valid, out)
    grown = (out[0, 0] > 0) & (masks[0, 0] <= 0)
    assert torch.equal(base[0][:, grown], torch.tensor([0.9, -0.9, 0.1])[:, None].expand(3, int(grown.sum())))
    assert torch.equal(base[0][:, ~grown], img[0][:, ~grown])
    G = SetGenerator(ngf=4, n_blocks=1, composite=True, mask_cond=True, paint="extend")
    with torch.no_grad():
        G.dec_img.out[1].weight.zero_()
        G.dec_img.out[1].bias.zero_()
    y, b = G(img, masks, valid)
    u = paint_weight(torch.cat([masks, b], 1), torch.cat([valid, valid], 1))
    torch.testing.assert_close(y, img * (1 - u) + extend_colours(img, masks, valid, b) * u, rtol=0, atol=1e-6)


def test_sharp_paints_every_pixel_the_translated_mask_claims_in_full():
    """With `sharp` the image follows the translated masks where they are > 0, as the metrics read them: with the
    image decoder at 0, every pixel a translated mask adds (however soft, e.g. 0.2) takes its object's colour in
    full, every pixel no mask claims is the input's, and the result is a thresholded `extend_colours`. Without
    `sharp` the same weights paint a pixel at 0.2 only in part."""
    from instagan.networks import extend_colours

    torch.manual_seed(0)
    batch = make_batch("a", 2, 32, ins=(1, 3))
    img, masks, valid = batch["img"], batch["masks"], batch["valid"]
    G = SetGenerator(ngf=4, n_blocks=1, composite=True, mask_cond=True, paint="extend", sharp=True).eval()
    with torch.no_grad():
        G.dec_img.out[1].weight.zero_()
        G.dec_img.out[1].bias.zero_()
        G.dec_mask[-2].bias += 0.3  # masks grow; their new edges are soft
        y, b = G(img, masks, valid)
        G.sharp = False
        y_soft, b_soft = G(img, masks, valid)
    assert torch.equal(b, b_soft)
    v = valid[:, :, None, None]
    added = (((b > 0) & v).any(1) & ~((masks > 0) & v).any(1))
    soft = added & (((b > 0) & (b < 0.9)) & v).any(1)
    assert soft.any()
    hard = torch.where(b > 0, 1.0, -1.0)
    torch.testing.assert_close(y, extend_colours(img, masks, valid, hard) * added[:, None]
                               + img * ~added[:, None], rtol=0, atol=1e-6)
    none = ~(((b > 0) | (masks > 0)) & v).any(1)
    assert none.any() and torch.equal(y.permute(0, 2, 3, 1)[none], img.permute(0, 2, 3, 1)[none])
    gap = (y - y_soft).abs().amax(1)
    assert gap[soft].max() > 0.05


def test_mask_head_judges_each_mask_alone_and_averages_per_image():
    """D's mask head: its channel is the mean over an image's valid instances of a score of each mask alone, so
    an image's score is the same whatever other images hold, and 0 without an instance; the other heads' scores
    come first, unchanged."""
    torch.manual_seed(0)
    D = SetDiscriminator(ndf=8, mask_head=True).eval()
    plain = SetDiscriminator(ndf=8).eval()
    plain.load_state_dict({k: v for k, v in D.state_dict().items() if not k.startswith("mask_head.")})
    batch = make_batch("b", 2, 32, ins=(2, 3))
    img, masks, valid = batch["img"], batch["masks"], batch["valid"]
    with torch.no_grad():
        out = D(img, masks, valid)
        alone = [D.mask_head(masks[0, n][None, None]) for n in range(int(valid[0].sum()))]
        empty = D.mask_scores(masks, torch.zeros_like(valid))
        torch.testing.assert_close(out[:, :1], plain(img, masks, valid))
    assert out.shape[1] == 2
    torch.testing.assert_close(out[0, 1:], torch.stack(alone).mean(0)[0], rtol=1e-5, atol=1e-6)
    assert torch.equal(empty, torch.zeros_like(empty))


def test_zero_paint_init_starts_from_the_input_and_still_learns_a_change():
    """paint_init "zero" with paint "residual": the first image is the input exactly (no change to unlearn), and
    the last conv gets a gradient, so training moves it; with "normal" the first change is large."""
    b = make_batch("a", 2, 32)
    zero = SetGenerator(ngf=8, n_blocks=1, paint="residual", paint_init="zero")
    out, _ = zero(b["img"], b["masks"], b["valid"].bool())
    torch.testing.assert_close(out, b["img"], rtol=0, atol=0)
    out.square().sum().backward()
    last = [m for m in zero.dec_img.modules() if isinstance(m, torch.nn.Conv2d)][-1]
    assert last.weight.grad.abs().sum() > 0
    normal = SetGenerator(ngf=8, n_blocks=1, paint="residual")
    assert (normal(b["img"], b["masks"], b["valid"].bool())[0] - b["img"]).abs().mean() > 0.05
    with pytest.raises(ValueError, match="paint_init"):
        SetGenerator(ngf=8, n_blocks=1, paint="direct", paint_init="zero")


def test_vacate_starts_a_shrinking_object_from_the_background_and_a_growing_one_from_its_colour():
    from instagan.networks import extend_colours

    x = torch.zeros(1, 3, 32, 32)
    x[:, 0] = torch.linspace(-0.5, 0.5, 32)  # a background that varies across the image
    x[:, :, 8:24, 8:24] = -1.0  # one object, black
    m = torch.full((1, 2, 32, 32), -1.0)
    m[:, 0, 8:24, 8:24] = 1
    valid = torch.tensor([[True, False]])
    out = torch.full_like(m, -1.0)
    out[:, 0, 12:20, 4:28] = 1  # narrower and wider: pixels left and pixels grown
    base = extend_colours(x, m, valid, out, vacate=True)
    torch.testing.assert_close(base[:, :, 14, 4], x[:, :, 8, 8])  # grown: the object's colour
    torch.testing.assert_close(base[:, :, 14, 14], x[:, :, 14, 14])  # stays the object: the input
    left = base[0, :, 9, 10]  # left by the object: the local background, not black
    assert left[1:].abs().max() < 1e-6 and abs(float(left[0]) - float(x[0, 0, 4, 10])) < 0.15
    outside = torch.ones(32, 32, dtype=torch.bool)
    outside[8:24, 8:24] = False
    outside[12:20, 4:28] = False
    torch.testing.assert_close(base[0][:, outside], x[0][:, outside])  # the rest of the background is the input's
    torch.testing.assert_close(extend_colours(x, m, valid, out)[:, :, 9, 10], x[:, :, 9, 10])  # off: the object
    with pytest.raises(ValueError, match="vacate"):
        SetGenerator(ngf=8, n_blocks=1, paint="residual", vacate=True)


def test_connected_keeps_the_part_of_a_translated_mask_that_touches_its_object():
    """connected_part: a stray fragment away from the object is dropped, the part grown from the object is kept
    whole (also around a corner), a mask that does not touch its object is kept; and in the generator the image
    then paints no stray fragment (composite: the stray pixels are the input's)."""
    from instagan.networks import connected_part

    m = torch.full((1, 3, 24, 24), -1.0)
    out = torch.full_like(m, -1.0)
    m[0, 0, 4:8, 4:8] = 1
    out[0, 0, 3:10, 3:10] = 1  # grown from the object
    out[0, 0, 9:20, 9:11] = 1  # ... and on, diagonally touching then down: still connected
    out[0, 0, 18:22, 18:22] = 1  # a stray fragment
    m[0, 1, 20:23, 0:3] = 1
    out[0, 1, 2:5, 18:21] = 1  # nowhere near its object: nothing to anchor, kept
    kept = connected_part(m, out)
    want = out.clone()
    want[0, 0, 18:22, 18:22] = -1
    want[0, 0, 18:20, 9:11] = out[0, 0, 18:20, 9:11]  # the column reaches row 19, not the fragment (18+, col 18+)
    torch.testing.assert_close(kept, want)

    torch.manual_seed(0)
    G = SetGenerator(ngf=8, n_blocks=1, composite=True, paint="extend", sharp=True, connected=True)
    batch = make_batch("a", 2, 32, ins=(1, 2))
    with torch.no_grad():
        y, masks_out = G(batch["img"], batch["masks"], batch["valid"])
        follow = connected_part(batch["masks"], torch.where(masks_out > 0, 1.0, -1.0))
        u = ((torch.cat([batch["masks"], follow], 1) > 0) & torch.cat([batch["valid"]] * 2, 1)[..., None, None])
        outside = ~u.any(1, keepdim=True).expand_as(y)
        torch.testing.assert_close(y[outside], batch["img"][outside])


def test_layers_give_each_overlap_one_owner_and_repaint_an_objects_rim():
    """layer_colours: where two translated masks overlap, the pixel is the colour of the one with the higher mask
    value (not a blend); an object's input rim pixels (a mix with the old surroundings) inside its translated mask
    take its colour, its interior stays the input's, and pixels no translated mask covers are the input's."""
    from instagan.networks import extend_colours, layer_colours

    red, blue = torch.tensor([0.9, -0.9, -0.9]), torch.tensor([-0.9, -0.9, 0.9])
    x = torch.zeros(1, 3, 24, 24)
    x[0, :, 4:10, 4:10] = red[:, None, None]
    x[0, :, 4:10, 4] = (red / 2)[:, None]  # its left column: a rim mixed with the background
    x[0, :, 14:20, 14:20] = blue[:, None, None]
    m = torch.full((1, 3, 24, 24), -1.0)
    m[0, 0, 4:10, 4:10] = 1
    m[0, 1, 14:20, 14:20] = 1
    valid = torch.tensor([[True, True, False]])
    out = torch.full_like(m, -1.0)
    out[0, 0, 3:13, 3:13] = 0.9  # red grows ...
    out[0, 1, 11:20, 11:20] = 0.5  # ... and blue grows into it: 11:13 x 11:13 overlaps, red has the higher value
    out[0, 2] = 1.0  # a padding slot: ignored
    base = layer_colours(x, m, valid, out, out)
    overlap = base[0, :, 11:13, 11:13].reshape(3, -1)
    torch.testing.assert_close(overlap, red[:, None].expand_as(overlap))
    blended = extend_colours(x, m, valid, out)[0, :, 11, 11]
    assert (blended - red).abs().max() > 0.2  # what the blend did
    torch.testing.assert_close(base[0, :, 13, 13], blue)  # blue's own growth
    rim = base[0, :, 5:9, 4].reshape(3, -1)
    torch.testing.assert_close(rim, red[:, None].expand_as(rim))  # rim repainted in the interior's colour
    torch.testing.assert_close(base[0, :, 6, 6], x[0, :, 6, 6])  # interior: the input
    covered = ((out[0, :2] > 0)).any(0)
    torch.testing.assert_close(base[0][:, ~covered], x[0][:, ~covered])
    G = SetGenerator(ngf=4, n_blocks=1, composite=True, paint="extend", sharp=True, layers=True, paint_init="zero")
    with torch.no_grad():
        y, b = G(x, m, valid)
    hard = torch.where(b > 0, 1.0, -1.0)
    u = ((torch.cat([m, hard], 1) > 0) & torch.cat([valid] * 2, 1)[..., None, None]).any(1, keepdim=True)
    torch.testing.assert_close(y, torch.where(u, layer_colours(x, m, valid, hard, b), x), rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="layers"):
        SetGenerator(ngf=8, n_blocks=1, paint="residual", layers=True)
