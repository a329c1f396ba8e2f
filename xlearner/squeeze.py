"""The squeeze stage: distil the expanded model into one standard-size backbone.

After expansion there are T task-specific branches plus reconciliation layers:
T times the cost of a ResNet. Squeeze condenses them into ONE backbone of the
same architecture as a branch (docs/DESIGN.md §1), which is what users take away.

For each source s, on its batch x_s, the student pays three losses:
    L_task  the source's own loss through the student's head for its task;
    L_feat  mean over the distilled (branch b, stage l) of D(A_{b,l}(f^l(x_s)), N_{b,l}(g_b^l(x_s))):
            f the student, g_b teacher branch b with its RL inputs, A_{b,l} a 1x1 adapter,
            N_{b,l} the teacher's per-channel standardisation (`teacher_norm`), D the
            `distill_loss`; the branches are b = task(s) ("own") or every branch ("all");
    L_kd    temperature KD of the heads' outputs: "own", the source's own cls logits;
            "all", every cls source's logits and every seg source's per-pixel
            distribution, on every image whatever its task;
    L = sum_s w_s (lambda_task L_task + lambda_feat L_feat + lambda_kd L_kd)     (Distiller.total_loss)

"all" follows Representation Consolidation, UNIC and AM-RADIO (docs/DESIGN.md
§1.3): every teacher on every image, one adapter per teacher, standardised
targets. Detection is distilled through features only: its outputs are
proposals and boxes, not a distribution per image that KD can match.

The student (SqueezedModel, below) is one plain backbone, the adapters and the
standardisation (distillation only) and task heads (`heads`: copies of the
teacher's, the teacher's frozen, or fresh); backbone.backbone_state_dict exports its
backbone as a plain torchvision state_dict (docs/DESIGN.md §5). The teacher is
frozen (eval mode, no grad). It is deliberately NOT a submodule of the
`Distiller`: DDP then neither broadcasts its buffers nor looks for its
gradients, and checkpoints hold only the student. The squeeze continues the
teacher's data stream (its loader starts where the teacher's stopped), so it
never replays the teacher's batches. The loop is the expansion engine's.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import data, engine

from .run import dist
from .backbone import (backbone_state_dict, build_backbone, channels_last, compile_stages, load_torchvision_state_dict,
                       n_params, read_state_dict)
from .run.checkpoint import CheckpointError, latest_checkpoint, load_checkpoint, save_atomic, sha256_file, strip_prefixes
from .config import (DISTILL_LOSSES, Config, ConfigError, ModelConfig, Registry, SourceConfig, SqueezeConfig,
                     branches_share_start)
from .configfile import config_from_dict
from .data import build_train_datasets, images_per_step
from .evaluate import make_evaluator
from .expand import XLearnerModel, load_model
from .heads import MultiSourceModel
from .run.rng import seed_everything
from .run.rundir import locked


def feature_loss_l2(s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Squared distance of channel-wise L2-normalised maps, summed over channels: 2 - 2 cos, in [0, 4]."""
    return (F.normalize(s.float(), dim=1) - F.normalize(t.float(), dim=1)).pow(2).sum(1).mean()


def feature_loss_cka(s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """1 - linear CKA between the two maps, treating every pixel of the batch as a sample."""
    x = s.float().permute(0, 2, 3, 1).reshape(-1, s.shape[1])
    y = t.float().permute(0, 2, 3, 1).reshape(-1, t.shape[1])
    x, y = x - x.mean(0), y - y.mean(0)
    cross = (y.T @ x).pow(2).sum()
    return 1 - cross / ((x.T @ x).norm() * (y.T @ y).norm() + 1e-8)


def feature_loss_cos_smoothl1(s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """AM-RADIO's feature loss: cosine distance per pixel (direction) + smooth L1 per value (scale), both means."""
    s, t = s.float(), t.float()
    return (1 - F.cosine_similarity(s, t, dim=1)).mean() + F.smooth_l1_loss(s, t)


FEATURE_LOSSES = Registry("squeeze.distill_loss", DISTILL_LOSSES, l2=feature_loss_l2, cka=feature_loss_cka,
                          cos_smoothl1=feature_loss_cos_smoothl1)


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float, multi_label: bool) -> torch.Tensor:
    """Hinton KD over the rows of [N, K] logits; T^2 keeps the gradient scale independent of the temperature."""
    s, t = student_logits.float() / temperature, teacher_logits.float() / temperature
    if multi_label:  # independent binary distributions per class
        return F.binary_cross_entropy_with_logits(s, torch.sigmoid(t)) * temperature**2
    return F.kl_div(F.log_softmax(s, 1), F.log_softmax(t, 1), log_target=True, reduction="batchmean") * temperature**2


def pixels(logits: torch.Tensor) -> torch.Tensor:
    """[B, K, H, W] -> [B*H*W, K]: a seg head's per-pixel distributions as rows, for kd_loss."""
    return logits.permute(0, 2, 3, 1).reshape(-1, logits.shape[1])


def teacher_features(teacher: XLearnerModel, images: torch.Tensor, branches: list[str]) -> dict[str, dict]:
    """{b: {layer: g_b(images)}}: each teacher branch with its RL inputs (call under no_grad, teacher in eval)."""
    if teacher.mcfg.shared_backbone:
        feats = teacher.backbone(images)
        return {b: feats for b in branches}
    if len(branches) == 1:
        return {branches[0]: teacher.backbone(images, branches[0])}
    return teacher.backbone.forward_all(images)


# ----------------------------------------------------------------------------
# the student

class Standardize(nn.Module):
    """N_{b,l}: per-channel (x - mean) / std of one teacher feature map; identity until `set` is called."""

    def __init__(self, channels: int):
        super().__init__()
        self.register_buffer("mean", torch.zeros(channels))
        self.register_buffer("std", torch.ones(channels))

    def set(self, mean: torch.Tensor, std: torch.Tensor) -> None:
        self.mean.copy_(mean)
        self.std.copy_(std)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean.view(1, -1, 1, 1).to(x.dtype)) / self.std.view(1, -1, 1, 1).to(x.dtype)


class SqueezedModel(MultiSourceModel):
    """The squeeze-stage student: one Backbone, adapters A and standardisations N per (branch, stage), task heads.

    adapters[b][f"layer{l}"] maps the student's stage-l feature into teacher
    branch b's (standardised) space. It starts as N_{b,l} itself (the identity
    when nothing is standardised; `bias` only then), so a student equal to branch
    b starts at zero distillation loss for b, instead of first having to undo a
    random projection. Neither A nor N is exported (backbone.backbone_state_dict)."""

    def __init__(self, mcfg: ModelConfig, sources: list[SourceConfig], num_classes: dict[str, int],
                 distill_stages=(2, 3, 4), adapter_bias: bool = False):
        backbone = build_backbone(mcfg.arch, "", mcfg.frozen_bn)  # weights come from the teacher or a checkpoint
        super().__init__(mcfg, sources, num_classes, backbone.channels)
        self.backbone = backbone
        self.distill_stages = [int(l) for l in distill_stages]
        bad = [l for l in self.distill_stages if l not in (1, 2, 3, 4)]
        if bad:
            raise ValueError(f"squeeze.distill_stages: stages are 1..4 (layer1..layer4), got {bad}")
        layers = {f"layer{l}": backbone.channels[f"layer{l}"] for l in self.distill_stages}
        self.adapters = nn.ModuleDict({t: nn.ModuleDict({k: nn.Conv2d(c, c, 1, bias=adapter_bias)
                                                         for k, c in layers.items()}) for t in self.tasks})
        self.norms = nn.ModuleDict({t: nn.ModuleDict({k: Standardize(c) for k, c in layers.items()})
                                    for t in self.tasks})
        self.reset_adapters()
        channels_last(self, mcfg.channels_last)

    @torch.no_grad()
    def reset_adapters(self) -> None:
        """A_{b,l} := N_{b,l} (weight diag(1/std), bias -mean/std; the identity for N = identity)."""
        for t, convs in self.adapters.items():
            for k, conv in convs.items():
                norm = self.norms[t][k]
                conv.weight.copy_(torch.diag(1 / norm.std).view(*conv.weight.shape))
                if conv.bias is not None:
                    conv.bias.copy_(-norm.mean / norm.std)

    def features(self, x: torch.Tensor, task: str | None = None) -> dict[str, torch.Tensor]:
        return self.backbone(x)  # one backbone for every task

    def exported_backbone(self, branch: str | None) -> nn.Module:
        if branch:
            raise ValueError("a squeezed model has a single backbone; branch applies to expanded checkpoints only")
        return self.backbone

    def report(self, init: str = "", heads: str = "copy") -> str:
        """Build-time report: the one backbone, the adapters (discarded after squeeze), the heads."""
        lines = [f"SqueezedModel: one {self.mcfg.arch}" + (f", init {init}" if init else "") + f", heads {heads}",
                 f"  backbone: {n_params(self.backbone)} params",
                 f"  adapters: {n_params(self.adapters)} params (distillation only, not exported)"]
        lines += self._head_report()
        lines.append(f"  total: {n_params(self)} params")
        return "\n".join(lines)

    @classmethod
    def from_expanded(cls, teacher: XLearnerModel, student_init: str = "",
                      sq: SqueezeConfig | None = None) -> "SqueezedModel":
        """A student for `teacher`: heads per `sq.heads`, backbone per `student_init` (`init_student_backbone`)."""
        teacher = getattr(teacher, "module", teacher)  # accept a DDP-wrapped teacher
        sq = sq or SqueezeConfig()
        model = cls(teacher.mcfg, teacher.source_list, teacher.num_classes, sq.distill_stages,
                    adapter_bias=sq.teacher_norm == "standardize")
        if sq.heads != "fresh":
            model.heads.load_state_dict(teacher.heads.state_dict())
        model.heads.requires_grad_(sq.heads != "frozen")
        init_student_backbone(model.backbone, teacher, student_init or resolve_student_init("", teacher))
        device = next(teacher.parameters()).device
        return model.to(device)


def load_student(ckpt: dict) -> SqueezedModel:
    """The SqueezedModel of a squeeze run checkpoint, its weights loaded, in eval mode (weights.model_from_checkpoint
    checks the checkpoint's keys and kind)."""
    cfg = config_from_dict(ckpt["config"])
    stages = ckpt["meta"].get("distill_stages", cfg.squeeze.distill_stages)
    state = strip_prefixes(ckpt["model"])  # adapters carry a bias when the teacher's features were standardised
    bias = any(k.startswith("adapters.") and k.endswith(".bias") for k in state)
    model = SqueezedModel(dataclasses.replace(cfg.model, pretrained=""), cfg.sources, ckpt["meta"]["num_classes"],
                          stages, bias)
    model.load_state_dict(state)
    return model.eval()


def resolve_student_init(student_init: str, teacher: XLearnerModel) -> str:
    """`squeeze.student_init` with its default: "" is `task:<first task>`, a copy of the first branch."""
    return student_init or f"task:{teacher.tasks[0]}"


def init_student_backbone(backbone: nn.Module, teacher: XLearnerModel, init: str) -> None:
    """Load the student's starting weights: task:<name> (that branch), mean (of the branches), scratch, or a file."""
    if teacher.mcfg.shared_backbone:
        branches = {t: teacher.backbone for t in teacher.tasks}
    else:
        branches = dict(teacher.backbone.branches.items())
    if init.startswith("task:"):
        name = init[len("task:"):]
        if name not in branches:
            raise ValueError(f"squeeze.student_init={init!r}: no branch {name!r}; branches are {list(branches)}")
        backbone.load_state_dict(branches[name].state_dict())
    elif init == "mean":
        if not branches_share_start(teacher.mcfg):  # unrelated networks: no common starting point to average around
            raise ConfigError("squeeze.student_init = 'mean': the teacher's branches started from independent random "
                              "weights (its model.branch_init is 'independent' and model.pretrained is empty), so "
                              "their average is meaningless; use task:<name>")
        sds = [b.state_dict() for b in branches.values()]
        # floats (weights, BN statistics): w_1 + mean_b (w_b - w_1), the mean, written so that branches that are
        # still identical give exactly w_1; the integer BN step counter takes the max
        backbone.load_state_dict({k: sds[0][k] + torch.stack([sd[k] - sds[0][k] for sd in sds]).mean(0)
                                  if sds[0][k].is_floating_point() else torch.stack([sd[k] for sd in sds]).max(0).values
                                  for k in sds[0]})
    elif init == "scratch":
        pass
    elif Path(init).is_file():
        load_torchvision_state_dict(backbone, read_state_dict(init), init)
    else:
        raise ValueError(f"squeeze.student_init={init!r}: expected task:<name>, mean, scratch, "
                         f"or the path of a torchvision-format state_dict")


class Distiller(nn.Module):
    """Student + adapters trained against a frozen teacher; forward(batch_by_source) -> {source: {term: loss}}."""

    def __init__(self, student: SqueezedModel, teacher: XLearnerModel, sources: list[SourceConfig], sq: SqueezeConfig):
        super().__init__()
        self.student = student
        teacher.eval().requires_grad_(False)
        object.__setattr__(self, "teacher", teacher)  # not registered: see the module docstring
        self.sources, self.sq = sources, sq
        self.weight = {s.name: s.weight for s in sources}
        self.feature_loss = FEATURE_LOSSES[sq.distill_loss]

    def _apply(self, fn, *args, **kwargs):
        # .to(device) must move the unregistered teacher too.
        object.__setattr__(self, "teacher", self.teacher._apply(fn, *args, **kwargs))
        return super()._apply(fn, *args, **kwargs)

    def train(self, mode: bool = True):
        super().train(mode)
        self.teacher.eval()  # the teacher's BN statistics never move
        if self.sq.heads == "frozen":  # nor do those of the frozen heads (train mode stays for det's sampling)
            for m in self.student.heads.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    m.eval()
        return self

    def branches(self, task: str) -> list[str]:
        """The teacher branches distilled on a task-`task` image."""
        return list(self.teacher.tasks) if self.sq.distill_targets == "all" else [task]

    def feat_losses(self, s_feats: dict, t_feats: dict) -> dict[str, torch.Tensor]:
        """{b: mean over stages l of D(A_{b,l}(f^l), N_{b,l}(g_b^l))} for the branches in t_feats."""
        a, n = self.student.adapters, self.student.norms
        return {b: torch.stack([self.feature_loss(a[b][k](s_feats[k]), n[b][k](t[k]))
                                for k in a[b]]).mean() for b, t in t_feats.items()}

    def kd_losses(self, src: SourceConfig, out, t_feats: dict) -> list[torch.Tensor]:
        """KD of the heads' outputs on this batch: its own cls logits ("own"), or every cls and seg head ("all")."""
        heads, t_heads, T = self.student.heads, self.teacher.heads, self.sq.kd_temperature
        others = self.sources if self.sq.distill_targets == "all" else [src] if src.task == "cls" else []
        terms = []
        for o in others:
            if o.task == "cls":
                s_logits = out.outputs if o.name == src.name else heads["cls"].logits(out.feats, o.name)
                terms.append(kd_loss(s_logits, t_heads["cls"].logits(t_feats["cls"], o.name), T, o.multi_label))
            elif o.task == "seg":  # per pixel, at the decoder's resolution
                s_logits = heads["seg"].predictors[o.name](heads["seg"].decoder(out.feats))
                t_logits = t_heads["seg"].predictors[o.name](t_heads["seg"].decoder(t_feats["seg"]))
                terms.append(kd_loss(pixels(s_logits), pixels(t_logits), T, False))
        return terms

    def forward(self, batch_by_source: dict) -> dict[str, dict[str, torch.Tensor]]:
        losses = {}
        for src in self.sources:
            out = self.student.forward_source(batch_by_source[src.name], src.name)
            with torch.no_grad():  # the teacher sees exactly the student's input tensor
                t_feats = teacher_features(self.teacher, out.images, self.branches(src.task))
            kd = self.kd_losses(src, out, t_feats)
            losses[src.name] = {"task": out.loss,
                                "feat": torch.stack(list(self.feat_losses(out.feats, t_feats).values())).mean(),
                                "kd": torch.stack(kd).mean() if kd else out.loss.new_zeros(())}
        return losses

    def total_loss(self, losses: dict[str, dict[str, torch.Tensor]]) -> torch.Tensor:
        """L = sum_s w_s (lambda_task L_task + lambda_feat L_feat + lambda_kd L_kd)."""
        sq, w = self.sq, self.weight
        return sum(w[s] * (sq.lambda_task * L["task"] + sq.lambda_feat * L["feat"] + sq.lambda_kd * L["kd"])
                   for s, L in losses.items())


@torch.no_grad()
def estimate_teacher_norm(distiller: Distiller, loader, steps: int, device: torch.device) -> None:
    """N_{b,l}: each distilled teacher branch's per-channel mean and std over `steps` batches of every source
    (the images it is distilled on), summed over ranks; then the adapters restart as N (SqueezedModel)."""
    student, teacher = distiller.student, distiller.teacher
    sums: dict = {}  # (b, layer) -> [count, sum, sum of squares], float64
    for _ in range(steps):
        batch = data.move_to(next(loader), device)
        for src in distiller.sources:
            images, _ = teacher.heads[src.task].prepare(batch[src.name], src.name)
            for b, feats in teacher_features(teacher, images, distiller.branches(src.task)).items():
                for k in student.adapters[b]:
                    x = feats[k].double().transpose(0, 1).flatten(1)  # [C, N*H*W]
                    acc = sums.setdefault((b, k), [x.new_zeros(()), x.new_zeros(len(x)), x.new_zeros(len(x))])
                    acc[0] += x.shape[1]
                    acc[1] += x.sum(1)
                    acc[2] += x.pow(2).sum(1)
    for (b, k), acc in sorted(sums.items()):
        n, s1, s2 = (dist.all_reduce_sum_tensor(v) for v in acc)
        mean = s1 / n
        # a floor of 0.01 on the std: a channel that is (almost) always zero must not blow up when it fires
        student.norms[b][k].set(mean.float(), (s2 / n - mean.pow(2)).clamp_min(0).add(1e-4).sqrt().float())
    student.reset_adapters()


def load_teacher(path: str | Path, cfg: Config) -> tuple[XLearnerModel, dict]:
    """Load an expand checkpoint, check that it can teach the squeeze config's sources; (teacher, checkpoint)."""
    ckpt = load_checkpoint(path)
    meta = ckpt.get("meta", {})
    if meta.get("kind") != "expanded":
        raise CheckpointError(f"{path}: not an expand checkpoint (meta.kind = {meta.get('kind')!r}); "
                              "pass RUN/checkpoint.pt of an `expand` run as --teacher")
    tcfg = config_from_dict(ckpt["config"])
    teacher_sources = {s.name: s for s in tcfg.sources}
    for s in cfg.sources:
        if s.name not in teacher_sources:
            raise CheckpointError(f"{path}: the teacher was not trained on source '{s.name}' "
                                  f"(its sources: {sorted(teacher_sources)}); its head cannot be copied")
        t = teacher_sources[s.name]
        if t.task != s.task:
            raise CheckpointError(f"{path}: source '{s.name}' is task '{t.task}' in the teacher but '{s.task}' here")
        if s.num_classes and s.num_classes != meta["num_classes"][s.name]:
            raise CheckpointError(f"{path}: source '{s.name}' has {meta['num_classes'][s.name]} classes in the "
                                  f"teacher but num_classes = {s.num_classes} here")
    extra = sorted(set(teacher_sources) - {s.name for s in cfg.sources})
    if extra:  # the student copies every teacher head; each needs its source's batches (DDP, no unused params)
        raise CheckpointError(f"{path}: the teacher has sources {extra} that the squeeze config lacks; "
                              "squeeze uses the same [[sources]] as the expand run")
    return load_model(ckpt), ckpt


def build(cfg: Config, teacher_path: str | Path, device: torch.device):
    """(distiller, student, teacher, loader, meta) of a squeeze run, before any training step.

    The loader continues the teacher's stream: it starts at the teacher loader's last position, so the
    squeeze never replays the batches (and augmentations) the teacher was trained on."""
    sq = cfg.squeeze
    teacher, tckpt = load_teacher(teacher_path, cfg)
    tmeta = tckpt["meta"]
    datasets, num_classes = build_train_datasets(cfg.sources)
    for name, k in num_classes.items():
        if k != tmeta["num_classes"][name]:
            raise CheckpointError(f"{teacher_path}: source '{name}' has {tmeta['num_classes'][name]} classes in the "
                                  f"teacher but {k} in the data")
    init = resolve_student_init(sq.student_init, teacher)
    student = SqueezedModel.from_expanded(teacher, init, sq)
    distiller = Distiller(student, teacher, cfg.sources, sq).to(device)
    if cfg.model.compile:  # the student's stages and the frozen teacher's (not a submodule of the distiller)
        compile_stages(student)
        compile_stages(teacher)

    def loader(seed: int):
        return data.MultiSourceLoader(cfg.sources, datasets, rank=dist.get_rank(),
                                      world_size=dist.get_world_size(), seed=seed, workers=sq.workers)
    train_loader = loader(sq.seed)
    train_loader.load_state_dict(tckpt["loader"])
    if sq.teacher_norm == "standardize" and latest_checkpoint(sq.out) is None:  # a resumed run has them
        stats_loader = loader(sq.seed + 1)  # its own stream: the training stream stays the teacher's continuation
        estimate_teacher_norm(distiller, stats_loader, sq.norm_steps, device)
        stats_loader.close()
    meta = {"kind": "squeezed", "num_classes": num_classes, "arch": teacher.mcfg.arch, "teacher": str(teacher_path),
            "teacher_sha256": sha256_file(teacher_path),  # its identity for a resume (rundir.RESUME_KEYS)
            "distill_stages": list(sq.distill_stages),
            "student_init": init, "tasks": list(teacher.tasks)}
    return distiller, student, teacher, train_loader, meta


@locked("squeeze")  # OUT/.lock for the life of the run
def run(cfg: Config, teacher_path: str | Path) -> Path:
    """Run (or resume) the squeeze stage; returns the path of the exported backbone."""
    device = dist.init_distributed()
    sq = cfg.squeeze
    seed_everything(sq.seed)
    distiller, student, teacher, loader, meta = build(cfg, teacher_path, device)
    out = Path(sq.out)

    # The teacher's val metrics, once, so the student can be judged against them.
    teacher_file = out / "teacher_metrics.json"
    if teacher_file.exists():
        teacher_metrics = json.loads(teacher_file.read_text())
    else:
        teacher_metrics = make_evaluator(teacher, cfg.sources, device, sq.amp, sq.workers)(0)
        if dist.is_main_process():
            out.mkdir(parents=True, exist_ok=True)
            teacher_file.write_text(json.dumps(teacher_metrics, indent=2))
    student_eval = make_evaluator(student, cfg.sources, device, sq.amp, sq.workers)
    last = {}

    def evaluate(step: int) -> dict:
        last["step"], last["metrics"] = step, student_eval(step)
        return last["metrics"]

    engine.train(engine.Run(
        model=distiller, loader=loader, tc=sq, config=cfg, device=device, meta=meta, ckpt_module=student,
        evaluate=evaluate, images_per_step=images_per_step(cfg.sources),
        report=student.report(meta["student_init"], sq.heads), stage="squeeze"))

    backbone_path = out / "backbone.pth"
    if dist.is_main_process():
        save_atomic(backbone_state_dict(student), backbone_path)
        table = {"step": last.get("step"), "student": last.get("metrics", {}), "teacher": teacher_metrics}
        (out / "metrics.json").write_text(json.dumps(table, indent=2))
        dist.log(format_side_by_side(table["student"], teacher_metrics))
        dist.log(f"[squeeze] exported the student backbone to {backbone_path}")
    dist.barrier()
    return backbone_path


def format_side_by_side(student: dict, teacher: dict) -> str:
    lines = ["| source | metric | teacher | student | student/teacher |", "|---|---|---|---|---|"]
    for name, tm in teacher.items():
        for k, tv in tm.items():
            sv = student.get(name, {}).get(k)
            if isinstance(tv, float) and isinstance(sv, float):
                ratio = f"{sv / tv:.2f}" if tv else "n/a"
                lines.append(f"| {name} | {k} | {tv:.2f} | {sv:.2f} | {ratio} |")
    return "\n".join(lines)
