"""What the demo world holds: its sources and datasets (SPECS), the full-size stand-in of the recipe's
six sources (STANDIN_SPECS) and the real datasets' file layouts the stand-in copies (LAYOUTS).

tools/demo.py draws and writes them; this module only says what there is to draw, so a reader (or a
test) can see the whole world in one screen. Sizes, counts and label spaces are documented in
docs/DESIGN.md §6.
"""
from __future__ import annotations

from dataclasses import dataclass

from .shapes import COLOR_NAMES, NOVEL, PATTERNS, UPSTREAM

# ----------------------------------------------------------------------------
# sources

@dataclass(frozen=True)
class Spec:
    name: str
    task: str
    fmt: str
    size: int                    # image width (and height, unless `height` is set)
    shapes: tuple[str, ...]      # the shapes objects are drawn from
    label: str                   # shape | pattern | colour | count
    n_train: int                 # images at scale 1
    n_val: int
    objects: tuple[int, int]     # min, max objects per image
    radius: tuple[float, float]  # object circumradius, as a fraction of the image size
    main: bool = False           # cls: one big object (the label) + small distractors
    p_empty: float = 0.0         # det: share of images with no object at all
    min_visible: float = 0.6     # share of an object that must stay visible under later ones
    first_id: int = 1            # det: COCO category id of class i = first_id + id_step * i
    id_step: int = 1
    height: int = 0              # 0: square images
    ext: str = ".png"            # ".png", or ".jpg" / ".JPEG" (JPEG; seg masks stay PNG); a layout names its own
    num_categories: int = 0      # det/seg: pad the label space to the real dataset's size with
    #                              classes that never occur (a detector's box predictor is sized by it)
    layout: str = ""             # a key of LAYOUTS: the real dataset's file layout; "": the demo's own

    @property
    def shape_hw(self) -> tuple[int, int]:
        return self.height or self.size, self.size

    @property
    def classes(self) -> tuple[str, ...]:
        drawn = {"shape": self.shapes, "pattern": PATTERNS, "colour": COLOR_NAMES,
                 "count": tuple(str(n) for n in range(self.objects[0], self.objects[1] + 1))}[self.label]
        return drawn + tuple(f"unused-{k}" for k in range(len(drawn), self.num_categories))

    @property
    def category_ids(self) -> list[int]:
        """COCO ids: non-contiguous on purpose, so readers must map them (docs/DESIGN.md §6)."""
        return [self.first_id + self.id_step * i for i in range(len(self.classes))]


SPECS = (
    Spec("shapes-cls", "cls", "imagefolder", 64, UPSTREAM, "shape", 1200, 320, (1, 3), (0.2, 0.3), main=True),
    Spec("texture-cls", "cls", "csv", 64, UPSTREAM, "pattern", 1000, 250, (1, 3), (0.08, 0.16)),
    Spec("shapes-det", "det", "coco", 128, UPSTREAM, "shape", 400, 100, (1, 5), (0.07, 0.2), p_empty=0.05,
         id_step=2),
    Spec("colors-det", "det", "coco", 128, UPSTREAM, "colour", 400, 100, (1, 5), (0.07, 0.2), p_empty=0.05,
         first_id=10, id_step=10),
    Spec("shapes-seg", "seg", "masks", 128, UPSTREAM, "shape", 400, 100, (1, 5), (0.07, 0.2)),
    Spec("novel-cls", "cls", "imagefolder", 64, NOVEL, "shape", 400, 200, (1, 3), (0.2, 0.3), main=True),
    Spec("count-cls", "cls", "imagefolder", 64, UPSTREAM + NOVEL, "count", 500, 250, (1, 5), (0.07, 0.11),
         min_visible=0.9),
    Spec("novel-det", "det", "coco", 128, NOVEL, "shape", 200, 100, (1, 5), (0.07, 0.2), p_empty=0.05,
         first_id=5, id_step=5),
    Spec("novel-seg", "seg", "masks", 128, NOVEL, "shape", 200, 100, (1, 5), (0.07, 0.2)),
)
UPSTREAM_SOURCES = tuple(s.name for s in SPECS[:5])
DOWNSTREAM_DATASETS = tuple(s.name for s in SPECS[5:])

# The full-size stand-in (`demo-data --world standin`): the six sources of configs/xlearner_r50.toml
# at their real image sizes and file types (JPEG; PNG label maps), in the real datasets' layouts
# (LAYOUTS), so that the recipe, its loader and scripts/gpu_check.sh run end to end on it with only
# data_root changed (configs/standin.sets), through the readers the real data goes through. Three
# different cls label spaces (shape, background pattern, object count) and boxes by shape and by colour, as ImageNet / Places / iNaturalist and COCO / Objects365 label the
# same visual world differently. det and seg pad their label spaces to the real datasets' sizes
# (COCO 80, Objects365 365, ADE20K 150 classes), which size the detector's box predictor and the
# seg classifier; cls class counts come from configs/standin.sets (num_classes = 1000, 365, 10000).
STANDIN_SPECS = (
    Spec("imagenet", "cls", "imagefolder", 500, UPSTREAM, "shape", 320, 64, (1, 4), (0.2, 0.3), main=True,
         height=375, layout="imagenet"),
    Spec("places365", "cls", "imagefolder", 500, UPSTREAM, "pattern", 320, 50, (1, 4), (0.08, 0.16),
         height=375, layout="places365"),
    Spec("inat2021", "cls", "imagefolder", 500, UPSTREAM, "count", 320, 50, (1, 5), (0.07, 0.11), min_visible=0.9,
         height=375, layout="inat2021"),
    Spec("coco", "det", "coco", 640, UPSTREAM, "shape", 200, 40, (2, 8), (0.05, 0.18), p_empty=0.02,
         num_categories=80, height=480, layout="coco"),
    Spec("objects365", "det", "coco", 640, UPSTREAM, "colour", 200, 40, (2, 8), (0.05, 0.18), p_empty=0.02,
         num_categories=365, height=480, layout="objects365"),
    Spec("ade20k", "seg", "ade20k", 512, UPSTREAM, "shape", 200, 40, (2, 8), (0.05, 0.2), num_categories=150,
         layout="ade20k"),
)


@dataclass(frozen=True)
class Layout:
    """A real dataset's file layout (docs/DESIGN.md §6), as far as the stand-in needs it. Paths are inside
    `folder` (under the world), format strings of {c} the class folder, {n} the 1-based image number and
    {p} its patch (100 images a patch); (train, val) pairs."""
    folder: str
    images: tuple[str, str]
    masks: tuple[str, str] = ("", "")
    anns: tuple[str, str] = ("", "")   # coco: the instances JSON; its file_name is the image path inside its
    #                                    first folder (the config's image dir)
    class_dir: str = "{label}"         # imagefolder: the class folder of label `label`, class index `k`


LAYOUTS = {
    "imagenet": Layout("imagenet", ("train/{c}/{c}_{n}.JPEG", "val/{c}/ILSVRC2012_val_{n:08d}.JPEG"),
                       class_dir="n{k:08d}"),  # WordNet ids (made up): n00000000 ...
    "places365": Layout("places365_standard", ("train/{c}/{n:08d}.jpg", "val/{c}/Places365_val_{n:08d}.jpg")),
    "inat2021": Layout("inat2021", ("train_mini/{c}/{n:08d}.jpg", "val/{c}/{n:08d}.jpg"),
                       class_dir="{k:05d}_Standin_count_{label}"),  # iNat's "<5-digit id>_<taxonomy>"
    "coco": Layout("coco", ("train2017/{n:012d}.jpg", "val2017/{n:012d}.jpg"),
                   anns=("annotations/instances_train2017.json", "annotations/instances_val2017.json")),
    "objects365": Layout("objects365", ("train/patch{p}/objects365_v2_{n:08d}.jpg",
                                        "val/patch{p}/objects365_v2_{n:08d}.jpg"),
                         anns=("annotations/zhiyuan_objv2_train.json", "annotations/zhiyuan_objv2_val.json")),
    "ade20k": Layout("ADEChallengeData2016", ("images/training/ADE_train_{n:08d}.jpg",
                                              "images/validation/ADE_val_{n:08d}.jpg"),
                     masks=("annotations/training/ADE_train_{n:08d}.png", "annotations/validation/ADE_val_{n:08d}.png")),
}
WORLDS = {"demo": SPECS, "standin": STANDIN_SPECS}
