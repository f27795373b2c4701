"""Label schemes ("tasks") shared by every reader, model preset and report.

Every dataset source maps its images to one *finding* from :data:`FINDINGS`
(``covid19``, ``viral``, ``bacterial``, ``normal`` or the unspecified
``pneumonia`` of flat-labelled sets). A task turns findings into the class
indices a model is trained on; the same task names are used by
``python -m covidx.data --task``, ``python -m covidx.train --task`` and every
model preset:

==========  ==========================================  =======================
task        classes (index order)                       used by
==========  ==========================================  =======================
``stage1``  bacterial, normal, viral                    Cascade-SEME stage 1
                                                        (COVID-19 counts as
                                                        viral, as in the paper)
``stage2``  covid19, viral                              Cascade-SEME stage 2
``3class``  covid19, pneumonia, normal                  concatenated ensemble
``4class``  covid19, bacterial, viral, normal           SE-DPN, MAG-SD
``lungs``   background, lung                            lung U-Net
``lesions`` background, lesion                          FC-DenseNet103
==========  ==========================================  =======================
"""

from __future__ import annotations

from dataclasses import dataclass, field

FINDINGS = ("covid19", "viral", "bacterial", "normal", "pneumonia")


@dataclass(frozen=True)
class Task:
    """A label scheme: ordered class names and the finding -> class map."""

    name: str
    classes: tuple[str, ...]
    mapping: dict = field(default_factory=dict)
    kind: str = "classification"  # or "segmentation"
    mask_column: str | None = None  # table column holding the target mask
    description: str = ""

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def image_classes(self) -> tuple[str, ...] | None:
        """The classes a whole image is labelled with; ``None`` for segmentation (its classes are per pixel:
        no image is a 'background' image, and split tables should not say one is missing)."""
        return self.classes if self.kind == "classification" else None

    def label_of(self, finding: str) -> str | None:
        """Class name for a finding, or ``None`` when the task excludes it."""
        return self.mapping.get(finding)

    def index_of(self, finding: str) -> int | None:
        label = self.label_of(finding)
        return None if label is None else self.classes.index(label)


TASKS: dict[str, Task] = {
    "stage1": Task(
        "stage1",
        ("bacterial", "normal", "viral"),
        {"bacterial": "bacterial", "normal": "normal", "viral": "viral", "covid19": "viral"},
        description="Cascade-SEME stage 1: normal / bacterial / viral (COVID-19 is viral)",
    ),
    "stage2": Task(
        "stage2",
        ("covid19", "viral"),
        {"covid19": "covid19", "viral": "viral"},
        description="Cascade-SEME stage 2: COVID-19 vs other viral pneumonia",
    ),
    "3class": Task(
        "3class",
        ("covid19", "pneumonia", "normal"),
        {
            "covid19": "covid19",
            "viral": "pneumonia",
            "bacterial": "pneumonia",
            "pneumonia": "pneumonia",
            "normal": "normal",
        },
        description="Ensemble: COVID-19 / other pneumonia / normal",
    ),
    "4class": Task(
        "4class",
        ("covid19", "bacterial", "viral", "normal"),
        {"covid19": "covid19", "bacterial": "bacterial", "viral": "viral", "normal": "normal"},
        description="SE-DPN and MAG-SD: COVID-19 / bacterial / viral / normal",
    ),
    "lungs": Task(
        "lungs",
        ("background", "lung"),
        {f: "lung" for f in FINDINGS},
        kind="segmentation",
        mask_column="mask_path",
        description="Lung-field segmentation (image/mask pairs)",
    ),
    "lesions": Task(
        "lesions",
        ("background", "lesion"),
        {"covid19": "lesion", "viral": "lesion", "bacterial": "lesion", "pneumonia": "lesion"},
        kind="segmentation",
        mask_column="lesion_path",
        description="Lesion segmentation of COVID-19 / pneumonia images",
    ),
}


# Class index of "lung" in the ``lungs`` task: what a lung segmenter's argmax means (Regional Learning).
LUNG_INDEX = TASKS["lungs"].classes.index("lung")
# The Cascade-SEME tasks (Lv et al. 2021, §4): stage 1's, stage 2's and the cascade's final classes.
STAGE1_CLASSES = TASKS["stage1"].classes
STAGE2_CLASSES = TASKS["stage2"].classes
CASCADE_CLASSES = ("bacterial", "normal", "viral", "covid19")


def get_task(name: str) -> Task:
    try:
        return TASKS[name]
    except KeyError:
        raise ValueError(f"unknown task {name!r}; choose one of {', '.join(TASKS)}") from None
