"""InstaGAN training: the full state and one training step over a batch (all chunks, both directions).

    state = TrainState.create(Config())
    metrics = train_step(state, batch_a, batch_b)   # batches: {"img", "masks", "valid"} (instagan.masks)
    state.end_epoch()                                # lr schedule is per epoch, as in the paper

Sequential mini-batch translation (paper sec. 2.3, DESIGN.md section 2): each image's instances, largest first
and at most `ins_max`, are split into chunks of `ins_per`. Chunk m translates (y'_{m-1}, a_m) -> (y'_m, b'_m)
and takes its own generator step and discriminator step; its outputs are detached before the next chunk, so
memory depends on `ins_per`, not on the number of instances. Content losses (cycle, identity, context) use the
chunk's own input and output; the GAN loss sees y'_m with every mask translated so far (earlier ones detached).
An image with no instance left in a chunk keeps its image and gets weight 0, but the forward still runs so that
every data-parallel rank runs the same steps: pass the chunk count agreed across ranks (`chunk_count`, all-reduced
max) as `n_chunks`.

Data-parallel rules (DESIGN.md section 4): networks may be DDP-wrapped. The generator step calls the
discriminators' underlying modules and back-propagates into the generators' parameters only
(`backward(inputs=...)`), so no `requires_grad` is toggled and no discriminator gradient is computed or
all-reduced there.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from instagan import checkpoint
from instagan import losses as L
from instagan import masks as M
from instagan.config import Config
from instagan.config import amp_dtype as config_amp
from instagan.memory import lean_saved_tensors, release_free_heap, use_lean
from instagan.networks import (Segmenter, build_discriminator, build_generator, compile_layers, fast_narrow_convs,
                               setup_device, unwrap)
from instagan.pool import HistoryPool

NETS = ("G_ab", "G_ba", "D_a", "D_b")  # D_a judges domain a; the paper's G_XY = G_ab, G_YX = G_ba
# and "S", the segmenter, when loss.lambda_seg > 0


def build_networks(cfg: Config) -> dict[str, nn.Module]:
    """The four networks, seeded by cfg.train.seed so every rank starts from the same weights."""
    torch.manual_seed(cfg.train.seed)
    m = cfg.model
    nets = {"G_ab": build_generator(m), "G_ba": build_generator(m), "D_a": build_discriminator(m),
            "D_b": build_discriminator(m)}
    if cfg.loss.lambda_seg > 0:
        nets["S"] = Segmenter(m.ngf)
    return nets


def lr_factor(cfg: Config):
    """Constant lr for `epochs`, then linear decay to 0 over `epochs_decay` (the authors' 'linear' policy)."""
    t = cfg.train

    def factor(epoch: int) -> float:
        return 1.0 - max(0, epoch + 1 - t.epochs) / float(t.epochs_decay + 1)

    return factor


@dataclass
class TrainState:
    """Everything a resumed run needs: networks, optimizers, schedulers, pools, counters, config."""

    cfg: Config
    nets: dict[str, nn.Module]
    opt_g: torch.optim.Optimizer
    opt_d: torch.optim.Optimizer
    sched_g: torch.optim.lr_scheduler.LRScheduler
    sched_d: torch.optim.lr_scheduler.LRScheduler
    pools: dict[str, HistoryPool]
    opt_s: torch.optim.Optimizer | None = None  # the segmenter's (loss.lambda_seg > 0)
    step: int = 0
    epoch: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @classmethod
    def create(cls, cfg: Config, device: str | torch.device = "cpu", nets: dict[str, nn.Module] | None = None,
               rank: int = 0) -> "TrainState":
        """Fresh state. `nets` may be passed already placed/wrapped (e.g. by ray.train.torch.prepare_model)."""
        device = torch.device(device)
        setup_device(device)
        nets = nets or {k: v.to(device) for k, v in build_networks(cfg).items()}
        t = cfg.train
        if t.channels_last:
            for v in nets.values():
                v.to(memory_format=torch.channels_last)
        if not use_lean(cfg, device):  # small models: the decoders' last convs space-to-depth on CPU (same numbers)
            for v in nets.values():
                fast_narrow_convs(unwrap(v))
        if t.compile:  # static shapes: each stack compiles once per chunk shape (and dtype), in the first step
            for v in nets.values():
                compile_layers(unwrap(v), dynamic=False)
        g_params = [p for k in ("G_ab", "G_ba") for p in nets[k].parameters()]
        d_params = [p for k in ("D_a", "D_b") for p in nets[k].parameters()]
        # fused: one kernel per step and no temporary copies of the parameters (lower peak memory).
        opt_g = torch.optim.Adam(g_params, lr=t.lr_g, betas=(t.beta1, t.beta2), fused=True)
        opt_d = torch.optim.Adam(d_params, lr=t.lr_d, betas=(t.beta1, t.beta2), fused=True)
        sched_g = torch.optim.lr_scheduler.LambdaLR(opt_g, lr_factor(cfg))
        sched_d = torch.optim.lr_scheduler.LambdaLR(opt_d, lr_factor(cfg))
        # Pools hold fakes of a domain: pool "a" feeds D_a with G_ba's outputs. Seeds differ per rank.
        pools = {d: HistoryPool(t.pool_size, seed=t.seed * 1000 + 2 * rank + i) for i, d in enumerate("ab")}
        opt_s = (torch.optim.Adam(nets["S"].parameters(), lr=t.lr_s, betas=(t.beta1, t.beta2), fused=True)
                 if "S" in nets else None)
        return cls(cfg, nets, opt_g, opt_d, sched_g, sched_d, pools, opt_s, device=device)

    @classmethod
    def from_checkpoint(cls, directory, device: str | torch.device = "cpu") -> "TrainState":
        """The state saved in an instagan.checkpoint directory: it takes the same next step."""
        cfg, payload = checkpoint.load(directory, device)
        state = cls.create(cfg, device)
        state.load_state_dict(payload)
        return state

    def end_epoch(self) -> None:
        self.epoch += 1
        self.sched_g.step()
        self.sched_d.step()

    def lr(self) -> dict[str, float]:
        return {"lr/G": self.opt_g.param_groups[0]["lr"], "lr/D": self.opt_d.param_groups[0]["lr"]}

    def state_dict(self) -> dict:
        return {
            **{k: unwrap(v).state_dict() for k, v in self.nets.items()},
            "opt_g": self.opt_g.state_dict(), "opt_d": self.opt_d.state_dict(),
            "sched_g": self.sched_g.state_dict(), "sched_d": self.sched_d.state_dict(),
            "pool_a": self.pools["a"].state_dict(), "pool_b": self.pools["b"].state_dict(),
            "step": self.step, "epoch": self.epoch,
            **({"opt_s": self.opt_s.state_dict()} if self.opt_s else {}),
        }

    def load_state_dict(self, state: dict) -> None:
        for k in self.nets:
            unwrap(self.nets[k]).load_state_dict(state[k])
        if self.opt_s:
            self.opt_s.load_state_dict(state["opt_s"])
        self.opt_g.load_state_dict(state["opt_g"])
        self.opt_d.load_state_dict(state["opt_d"])
        self.sched_g.load_state_dict(state["sched_g"])
        self.sched_d.load_state_dict(state["sched_d"])
        self.pools["a"].load_state_dict(state["pool_a"], self.device)
        self.pools["b"].load_state_dict(state["pool_b"], self.device)
        self.step, self.epoch = int(state["step"]), int(state["epoch"])


def prepare_batch(batch: dict[str, Tensor], ins_max: int, device: torch.device,
                  union: bool = False) -> dict[str, Tensor]:
    """Order instances by decreasing area, keep the `ins_max` largest, move to `device`. union: then merge them
    into one instance (the CycleGAN baselines, which translate in one step)."""
    masks, valid, _ = M.sort_by_area(batch["masks"], batch["valid"].bool())
    masks, valid = M.limit(masks, valid, ins_max)
    if union:
        masks, valid = M.as_union(masks, valid)
    return {"img": batch["img"].to(device, non_blocking=True), "masks": masks.to(device, non_blocking=True),
            "valid": valid.to(device, non_blocking=True)}


def chunk_count(batch_a: dict[str, Tensor], batch_b: dict[str, Tensor], ins_max: int, ins_per: int) -> int:
    """Chunks this rank needs for the step (the largest image of either domain decides). Data-parallel callers
    all-reduce the max of this over ranks and pass it to `train_step` as `n_chunks`."""
    return max(M.num_chunks(b["valid"][:, :ins_max], ins_per) for b in (batch_a, batch_b))


@dataclass
class Direction:
    """One translation direction's state across the chunks of a step (a -> b uses G_ab, judged by D_b)."""

    real: dict[str, Tensor]  # the real batch of the source domain (sorted, limited)
    x: Tensor  # current image y'_{m-1} (the real image at m = 0), detached
    fake_masks: list[Tensor] = field(default_factory=list)  # translated masks of earlier chunks, detached
    fake_valid: list[Tensor] = field(default_factory=list)


def _identity_loss(F: nn.Module, d: Direction, masks: Tensor, valid: Tensor, active: Tensor) -> Tensor:
    """|F(x, a) - (x, a)|: the generator into x's domain should leave x alone. -> weighted mean ()."""
    idt_img, idt_masks = F(d.x, masks, valid)
    return L.weighted_mean(L.masked_l1(idt_img, idt_masks, valid, d.x, masks), active)


def seg_consistency(S: nn.Module, img: Tensor, masks: Tensor, valid: Tensor, out_masks: Tensor) -> Tensor:
    """Does the segmenter S find the translated masks in the translated image? Binary cross-entropy between
    S(img) and the union of the translated masks (a fixed target: the image must follow the masks, not the
    masks the image), averaged over the pixels the chunk may change (the union of its input and translated
    masks, where the generator paints). (B, 3, H, W), (B, N, H, W), (B, N), (B, N, H, W) -> (B,)."""
    target = M.union(out_masks.detach().float(), valid)
    where = M.union(torch.cat([masks, out_masks.detach()], 1).float(), torch.cat([valid, valid], 1))
    bce = nn.functional.binary_cross_entropy_with_logits(S(img).float(), target, reduction="none")
    return (bce * where).flatten(1).sum(1) / where.flatten(1).sum(1).clamp(min=1)


def _segmenter_step(state: "TrainState", a: dict[str, Tensor], b: dict[str, Tensor], autocast) -> Tensor:
    """One step of the segmenter on the real images of both domains against the union of their masks."""
    S = state.nets["S"]
    img = torch.cat([a["img"], b["img"]])
    target = torch.cat([M.union(a["masks"].float(), a["valid"]), M.union(b["masks"].float(), b["valid"])])
    with autocast:
        loss = nn.functional.binary_cross_entropy_with_logits(S(img).float(), target)
    loss.backward()
    state.opt_s.step()
    state.opt_s.zero_grad(set_to_none=True)
    return loss.detach()


def _translation_losses(G: nn.Module, F: nn.Module, D: nn.Module, d: Direction, masks: Tensor, valid: Tensor,
                        active: Tensor, S: nn.Module | None = None, keep: bool = False,
                        free_change: bool = False) -> tuple[dict[str, Tensor], tuple[Tensor, Tensor]]:
    """GAN, cycle and context losses of direction x -> y for one chunk (and with S the segmentation consistency):
    G translates, F translates back, D and S (underlying modules; no gradient reaches their parameters) judge y'
    (D with every mask translated so far).

    Returns (weighted-mean terms, (y', b'_m))."""
    fake_img, fake_masks = G(d.x, masks, valid)
    rec_img, rec_masks = F(fake_img, fake_masks, valid)
    inst_img = getattr(D, "inst_img", False)  # D's instance branch sees the image: y' needs their gradient
    if d.fake_masks:
        with torch.set_grad_enabled(inst_img):  # earlier chunks' masks are detached: no graph for masks alone
            feat_prev = D.set_feature(torch.cat(d.fake_masks, 1), torch.cat(d.fake_valid, 1), img=fake_img)
    else:
        feat_prev = 0
    score = D.classify(fake_img, feat_prev + D.set_feature(fake_masks, valid, img=fake_img))
    if getattr(D, "mask_head", None) is not None:  # each of this chunk's masks judged alone, as D.forward does
        score = torch.cat([score, D.mask_scores(fake_masks, valid).to(score.dtype)], 1)
    weight = M.context_weight(masks, valid, fake_masks, valid)
    per = {
        "gan": L.lsgan(score, 1.0),
        "cyc": L.masked_l1(rec_img, rec_masks, valid, d.x, masks,
                           1 - M.shape_change(masks, valid, fake_masks.detach()) if free_change else None),
        "ctx": L.context(d.x, fake_img, weight),
    }
    if S is not None:
        per["seg"] = seg_consistency(S, fake_img, masks, valid, fake_masks)
    if keep:  # the image follows the masks: the weight is a fixed target, as in seg_consistency
        per["keep"] = L.context(d.x, fake_img, M.keep_weight(masks, valid, fake_masks.detach()))
    return {k: L.weighted_mean(v, active) for k, v in per.items()}, (fake_img, fake_masks)


@contextlib.contextmanager
def no_sync(modules: list[nn.Module]):
    """Inside, DDP-wrapped modules accumulate gradients locally; the next backward outside all-reduces them."""
    with contextlib.ExitStack() as stack:
        for m in modules:
            if hasattr(m, "no_sync"):
                stack.enter_context(m.no_sync())
        yield


@dataclass
class Precision:
    """How a step's passes run: autocast (dtype or none), lean saved tensors and heap trims (instagan.memory)."""

    autocast: torch.autocast
    lean: bool  # lean_saved_tensors around every pass; discriminators in groups of `ins_per` masks per image
    trim: bool  # release free heap pages before each chunk's peak (lean on the CPU)

    @classmethod
    def of(cls, cfg: Config, device: torch.device, amp_dtype: torch.dtype | None) -> "Precision":
        # Lean: no autocast weight cache, which would keep a low-precision copy of every weight until the pass
        # ends, while lean_saved_tensors lets each copy go as soon as its conv has run.
        lean = use_lean(cfg, device)
        autocast = torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None, cache_enabled=not lean)
        return cls(autocast, lean, lean and device.type == "cpu")

    @contextlib.contextmanager
    def passes(self):
        with self.autocast, (lean_saved_tensors() if self.lean else contextlib.nullcontext()):
            yield


def _generator_pass(nets: dict[str, nn.Module], lam, k: str, kind: str, d: Direction, masks: Tensor,
                    valid: Tensor, active: Tensor, S: nn.Module | None):
    """One of a chunk's four generator passes: direction k ("ab" or "ba"), the identity pass or the translation
    pass. -> (weighted loss, {metric key: term}, (y', b'_m) of a translation pass or None)."""
    G, F = (nets["G_ab"], nets["G_ba"]) if k == "ab" else (nets["G_ba"], nets["G_ab"])
    D = unwrap(nets["D_b"] if k == "ab" else nets["D_a"])
    if kind == "idt":
        idt = _identity_loss(F, d, masks, valid, active)
        return lam.lambda_idt * idt, {f"loss/idt_{k[::-1]}": idt}, None
    terms, out = _translation_losses(G, F, D, d, masks, valid, active, S, keep=lam.lambda_keep > 0,
                                     free_change=lam.cyc_free_change)
    loss = lam.lambda_gan * terms["gan"] + lam.lambda_cyc * terms["cyc"] + lam.lambda_ctx * terms["ctx"]
    named = {f"loss/G_gan_{k}": terms["gan"], f"loss/cyc_{k[0]}": terms["cyc"], f"loss/ctx_{k}": terms["ctx"]}
    if S is not None:
        loss = loss + lam.lambda_seg * terms["seg"]
        named[f"loss/seg_{k}"] = terms["seg"]
    if "keep" in terms:
        loss = loss + lam.lambda_keep * terms["keep"]
        named[f"loss/keep_{k}"] = terms["keep"]
    return loss, named, out


def generator_step(state: TrainState, dirs: dict[str, Direction], chunk: dict[str, tuple[Tensor, Tensor]],
                   active: dict[str, Tensor], prec: Precision, S: nn.Module | None = None):
    """Both generators' step for one chunk, the discriminators frozen by construction (gradients flow into G's
    parameters only). chunk[k]: this chunk's (masks, valid) of direction k; active[k]: (B,) images with an
    instance in it. -> (total loss, metrics, {k: (y', b'_m)}), all detached.

    Each of the four passes is back-propagated as soon as it is built, so at most one direction's
    translate-and-reconstruct graph is alive; DDP all-reduces once, at the last backward."""
    nets, lam = state.nets, state.cfg.loss
    g_params = [p for k in ("G_ab", "G_ba") for p in nets[k].parameters()]
    passes = [("ab", "idt"), ("ab", "main"), ("ba", "idt"), ("ba", "main")]
    total, metrics, outs = None, {}, {}

    def run(k: str, kind: str) -> None:
        nonlocal total
        with prec.passes():
            loss, terms, out = _generator_pass(nets, lam, k, kind, dirs[k], *chunk[k], active[k], S)
        # Keep only detached values: a live graph output would hold the branch that backward(inputs=...) skips
        # (D's spectral-norm weights) in memory for the rest of the step.
        metrics.update({key: v.detach() for key, v in terms.items()})
        if out is not None:
            outs[k] = tuple(v.detach() for v in out)
        loss.backward(inputs=g_params)
        total = loss.detach() if total is None else total + loss.detach()

    with no_sync([nets["G_ab"], nets["G_ba"]]):
        for k, kind in passes[:-1]:
            run(k, kind)
    if prec.trim:  # the step's peak: a full pass with both generators' gradients allocated
        release_free_heap()
    run(*passes[-1])
    state.opt_g.step()
    state.opt_g.zero_grad(set_to_none=True)
    metrics["loss/G"] = total
    return total, metrics, outs


def discriminator_step(state: TrainState, dirs: dict[str, Direction], active: dict[str, Tensor], prec: Precision,
                       ins_per: int) -> tuple[Tensor, dict[str, Tensor]]:
    """Both discriminators' step for one chunk: D_b judges real b against pooled fakes of G_ab (y' with every mask
    translated so far), D_a likewise; one backward each. -> (D_a + D_b loss, metrics), detached.
    Spectral-norm weights are computed once per D (cached), so checkpointed groups recompute exactly."""
    metrics = {}
    for k, name in (("ab", "D_b"), ("ba", "D_a")):
        d, real = dirs[k], dirs[k[::-1]].real
        fake = state.pools[name[-1]].query(d.x, torch.cat(d.fake_masks, 1), torch.cat(d.fake_valid, 1), active[k])
        with parametrize.cached():
            with prec.passes():
                loss = _discriminator_loss(state.nets[name], real, fake, active[k],
                                           group=len(d.x) * ins_per if prec.lean else 0)
            loss.backward()
        metrics[f"loss/{name}"] = loss.detach()
    state.opt_d.step()
    state.opt_d.zero_grad(set_to_none=True)
    return metrics["loss/D_a"] + metrics["loss/D_b"], metrics


def _discriminator_loss(D: nn.Module, real: dict[str, Tensor], fake: tuple[Tensor, Tensor, Tensor],
                        active: Tensor, group: int) -> Tensor:
    """0.5 * (lsgan(D(real), 1) + lsgan(D(fake), 0)); the real term counts when any fake in the batch is active
    (as the authors skip D's step for a direction with no instance left). D sees all of real's instances and
    every fake mask so far; `group` bounds its activation memory (SetDiscriminator.set_feature)."""
    pred_real = D(real["img"], real["masks"], real["valid"], group)
    pred_fake = D(*fake, group)
    any_active = active.any().to(pred_real.dtype)
    return 0.5 * (L.lsgan(pred_real, 1.0).mean() * any_active + L.weighted_mean(L.lsgan(pred_fake, 0.0), active))


def train_step(state: TrainState, batch_a: dict[str, Tensor], batch_b: dict[str, Tensor],
               n_chunks: int | None = None, amp_dtype: torch.dtype | None = None) -> dict[str, float]:
    """One training step over a batch of each domain: every chunk's generator and discriminator steps.

    batch_x: {"img": (B, 3, H, W), "masks": (B, N, H, W), "valid": (B, N)} (any instance order; sorted here).
    n_chunks: chunk steps to run (default: what this batch needs); data-parallel ranks must pass the same value.
    amp_dtype: autocast dtype (default: cfg.train.amp).
    Returns flat metrics averaged over chunks (`loss/G_gan_ab`, `loss/D_b`, ...).
    """
    cfg, dev = state.cfg, state.device
    t = cfg.train
    amp_dtype = amp_dtype or config_amp(t.amp, dev)
    union = cfg.model.arch != "instagan"
    a, b = prepare_batch(batch_a, t.ins_max, dev, union), prepare_batch(batch_b, t.ins_max, dev, union)
    # The baselines translate all instances (their union) in one step, whatever count the ranks agreed on.
    n_chunks = 1 if union else n_chunks or chunk_count(a, b, t.ins_max, t.ins_per)
    ins_per = 1 if union else t.ins_per
    dirs = {"ab": Direction(a, a["img"]), "ba": Direction(b, b["img"])}
    prec = Precision.of(cfg, dev, amp_dtype)
    sums: dict[str, Tensor] = {}
    S = unwrap(state.nets["S"]) if "S" in state.nets else None
    if S is not None:  # the segmenter learns from the real images first, then judges this step's translations
        sums["loss/S"] = _segmenter_step(state, a, b, prec.autocast) * n_chunks  # once per step, not per chunk

    for m in range(n_chunks):
        chunk = {k: M.chunk(d.real["masks"], d.real["valid"], m, ins_per) for k, d in dirs.items()}
        active = {k: v.any(1) for k, (_, v) in chunk.items()}
        _, metrics, outs = generator_step(state, dirs, chunk, active, prec, S)
        for k, d in dirs.items():  # hand-off: y'_m where the image had an instance in this chunk, else the image
            d.x = torch.where(active[k][:, None, None, None], outs[k][0].to(d.x.dtype), d.x)
            d.fake_masks.append(outs[k][1].to(d.x.dtype))
            d.fake_valid.append(chunk[k][1])
        if prec.trim:
            release_free_heap()
        metrics.update(discriminator_step(state, dirs, active, prec, ins_per)[1])
        for key, v in metrics.items():
            sums[key] = sums.get(key, 0) + v.float()

    state.step += 1
    keys = sorted(sums)
    values = torch.stack([sums[k] for k in keys]).div(n_chunks).tolist()  # one host sync per step
    return {**dict(zip(keys, values)), "chunks": float(n_chunks)}
