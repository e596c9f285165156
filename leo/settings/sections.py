"""One pydantic model per section of ``params.yaml``: types, ranges, choices, unknown keys.

Every model forbids unknown keys and is strict (a string is not a number, a bool is not an
int). Sections whose values are the fields of a config class of the package
(``pretrain.<dataset>``: :class:`~leo.backbone.pretrain.PretrainConfig`;
``metatrain.common`` / ``metatrain.runs.<run>``: :class:`~leo.core.config.LEOConfig`;
``compare.maml`` / ``compare.maml_runs.<run>``: :class:`~leo.comparison.maml.MAMLConfig`) are
held as mappings here and validated by building that class (:mod:`leo.settings.params`), so
each field is declared once, beside the code that uses it.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from leo.utils.validation import Count, Device, PosInt, Positive, Sha256

DATASETS = ("omniglot", "miniImageNet", "tieredImageNet", "cifar-fs", "fc100")
Dataset = Literal["omniglot", "miniImageNet", "tieredImageNet", "cifar-fs", "fc100"]
Name = Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")]  # runs, imports: paths too
Mapping = dict[str, Any]
Endpoint = Annotated[str, Field(pattern=r"^(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9_.-]+):[0-9]{1,5}$")]


class Section(BaseModel):
    """A section of ``params.yaml``: unknown keys refused, strict types, read-only."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    def for_dataset(self, dataset: str) -> Any:
        """The entry of this section for ``base.dataset`` (``cifar-fs`` is held in the field
        ``cifar_fs``, aliased to the key ``cifar-fs``)."""
        return getattr(self, dataset.replace("-", "_"))


# ----------------------------------------------------------------------------- base
class Base(Section):
    """``base``: what every stage reads."""

    seed: Count = 0
    dataset: Dataset = "omniglot"
    cpu_threads: Count = 1  # intra-op CPU threads of every stage (0: torch's default)


# ----------------------------------------------------------------------------- download
class FileEntry(Section):
    """One raw file: from ``path``, else the data directory, else ``url``; sha256 checked."""

    name: str
    sha256: Sha256 | None = None
    url: Annotated[str, Field(pattern=r"^https?://\S+$")] | None = None
    path: str | None = None

    @field_validator("name")
    @classmethod
    def _plain_name(cls, name: str) -> str:
        if name in ("", ".", "..", "SOURCE.json") or "/" in name or "\\" in name:
            raise ValueError("must be a plain file name")
        return name


class DatasetFiles(Section):
    """``download.<dataset>``: where its files are and what they hash to."""

    subdir: str | None = None  # folder of the data directory holding them (default: dataset)
    files: list[FileEntry] = []

    @model_validator(mode="after")
    def _unique_names(self) -> DatasetFiles:
        names = [f.name for f in self.files]
        for i, name in enumerate(names):
            if name in names[:i]:
                raise ValueError(f"files[{i}].name: {name!r} is listed twice")
        return self


class Download(Section):
    """``download``: fetching the raw dataset."""

    partial_dir: str = "data/.partial"
    timeout_s: Positive = 60.0
    retries: Count = 3
    omniglot: DatasetFiles = DatasetFiles()
    miniImageNet: DatasetFiles = DatasetFiles()
    tieredImageNet: DatasetFiles = DatasetFiles()
    cifar_fs: DatasetFiles = Field(DatasetFiles(), alias="cifar-fs")
    fc100: DatasetFiles = DatasetFiles()


# ----------------------------------------------------------------------------- prepare
class ImageOptions(Section):
    """``prepare.<dataset>``: how images are decoded and which classes go where."""

    split_file: str | None = None  # versioned class split (Omniglot)
    image_size: PosInt | Annotated[list[PosInt], Field(min_length=2, max_length=2)]
    channels: Literal[1, 3]

    @property
    def size(self) -> tuple[int, int]:
        """``(H, W)``."""
        size = self.image_size
        return (size, size) if isinstance(size, int) else (size[0], size[1])


class Prepare(Section):
    """``prepare``: decoding, resizing and splitting the raw images."""

    min_classes_per_split: PosInt = 5
    min_images_per_class: PosInt = 20
    workers: Count = 0  # decoding threads; 0 = one per CPU core
    omniglot: ImageOptions = ImageOptions(image_size=[28, 28], channels=1)
    miniImageNet: ImageOptions = ImageOptions(image_size=[80, 80], channels=3)
    tieredImageNet: ImageOptions = ImageOptions(image_size=[80, 80], channels=3)
    cifar_fs: ImageOptions = Field(
        ImageOptions(split_file="leo/data/splits/cifar_fs.json", image_size=[32, 32], channels=3),
        alias="cifar-fs",
    )
    fc100: ImageOptions = ImageOptions(
        split_file="leo/data/splits/fc100.json", image_size=[32, 32], channels=3
    )


# ----------------------------------------------------------------------------- pretrain
class Pretrain(Section):
    """``pretrain``: the WRN's supervised pre-training; one PretrainConfig preset per dataset."""

    device: Device = "auto"
    heldout_fraction: Annotated[float, Field(gt=0.0, lt=1.0)] = 0.1
    eval_batch_size: PosInt = 512
    # Data parallelism (docs/distributed.md): torchrun processes per machine and machines.
    processes_per_node: PosInt = 1
    nodes: PosInt = 1
    sync_batchnorm: bool = True
    rdzv_endpoint: Endpoint = "localhost:29500"  # node 0's host:port when nodes > 1
    rdzv_timeout_s: Positive = 300.0
    omniglot: Mapping = {}
    miniImageNet: Mapping = {}
    tieredImageNet: Mapping = {}
    cifar_fs: Mapping = Field({}, alias="cifar-fs")
    fc100: Mapping = {}

    @field_validator("rdzv_endpoint")
    @classmethod
    def _port(cls, endpoint: str) -> str:
        if not 1 <= int(endpoint.rsplit(":", 1)[1]) <= 65535:
            raise ValueError("port must be in 1-65535")
        return endpoint


class Embed(Section):
    """``embed``: the frozen backbone over every split."""

    device: Device = "auto"
    batch_size: PosInt = 512
    processes: PosInt = 1  # torchrun processes on this machine, one per GPU


class Embeddings(Section):
    """``embeddings``: which embeddings LEO meta-trains on and the metrics of their source."""

    dir: str = "data/embeddings"
    metrics: str = "reports/pretrain/metrics.json"


class PublishedImport(Section):
    """``published.imports.<name>``: one import of the published LEO embeddings."""

    root: str
    dataset: Literal["miniImageNet", "tieredImageNet"]
    view: Literal["center", "multiview"] = "center"
    train_on_val: bool = False
    sha256: dict[Literal["train", "val", "test"], Sha256]

    @model_validator(mode="after")
    def _complete(self) -> PublishedImport:
        missing = [s for s in ("train", "val", "test") if s not in self.sha256]
        if missing:
            raise ValueError(f"sha256.{missing[0]}: missing key")
        if self.dataset == "tieredImageNet" and self.view != "center":
            raise ValueError(f"view: tieredImageNet has only 'center' (got {self.view!r})")
        return self


class Published(Section):
    """``published``: imports of the published embeddings, by name."""

    imports: dict[Name, PublishedImport] = {}


# ----------------------------------------------------------------------------- LEO
class Metatrain(Section):
    """``metatrain``: LEOConfig fields for every run (``common``) and per run (``runs``)."""

    device: Device = "auto"
    common: Mapping = {}
    runs: dict[Name, Mapping] = Field(min_length=1)


class Evaluate(Section):
    """``evaluate``: the meta-test protocol."""

    device: Device = "auto"
    num_episodes: PosInt = 10_000
    batch_size: PosInt = 200
    seed: Count = 1
    # Refuse a test split whose smallest class leaves fewer queries per class than this (the
    # protocol takes every remaining example of each class, capped at the smallest class).
    min_queries_per_class: PosInt = 5


class Export(Section):
    """``export``: the few-shot classifier bundles of ``export@<run>``."""

    # Test episodes on which the bundle (from images) is checked against the evaluation
    # (from the stored embeddings), recorded in its provenance; 0: no check.
    check_episodes: Count = 2
    check_queries: PosInt = 5  # queries per class in each of those episodes


class Report(Section):
    """``report``: the pipeline's metrics and curves."""

    dpi: Annotated[int, Field(ge=30, le=600)] = 120


class Compare(Section):
    """``compare``: every method on the same test episodes, ensembles, Figure 2."""

    device: Device = "auto"
    methods: Annotated[list[str], Field(min_length=1)]
    train_steps: PosInt | None = None
    validate_every: PosInt | None = None
    maml: Mapping = {}
    maml_runs: dict[str, Mapping] = {}
    num_episodes: PosInt | None = None
    ensemble_episodes: Count = 1000
    noise_seed: Count = 0
    figure_episodes: Count = 1000
    figure_iterations: PosInt = 1000


# ----------------------------------------------------------------------------- tune
class SearchRange(Section):
    """``tune.space.<name>``: a range ``{low, high, log}`` or ``{choices: [...]}``; which
    names and values LEOConfig accepts is checked by :func:`leo.tune.space.make_space`."""

    low: float | None = None
    high: float | None = None
    log: bool = False
    choices: list[int | float] | None = None

    @model_validator(mode="after")
    def _one_form(self) -> SearchRange:
        if self.choices is not None:
            if self.low is not None or self.high is not None or self.log:
                raise ValueError("give low/high (and log) or choices, not both")
            if not self.choices:
                raise ValueError("choices: empty")
            return self
        if self.low is None or self.high is None:
            raise ValueError("needs low and high (or choices)")
        if not self.low < self.high:
            raise ValueError(f"empty or inverted range (low {self.low:g} >= high {self.high:g})")
        if self.log and self.low <= 0:
            raise ValueError(f"low: must be > 0 for a log range (got {self.low:g})")
        return self


class TuneRun(Section):
    """``tune.runs.<run>``: one population-based search over ``metatrain.runs.<run>``."""

    population: Annotated[int, Field(ge=2)] = 4  # trials
    steps: PosInt  # outer steps of each trial
    perturbation_interval: PosInt  # outer steps between rankings (and validations)
    space: dict[str, SearchRange] = {}  # entries added to (or replacing) tune.space

    @model_validator(mode="after")
    def _interval(self) -> TuneRun:
        if self.perturbation_interval > self.steps:
            raise ValueError(
                f"perturbation_interval: must be at most steps ({self.steps}), "
                f"got {self.perturbation_interval}"
            )
        return self


class Tune(Section):
    """``tune``: population-based training of LEO's hyperparameters on Ray Tune."""

    # A Ray cluster (host:port, ray://host:port, auto); null: $RAY_ADDRESS, else a local Ray.
    address: str | None = None
    storage: str = "tmp/tune"  # trial checkpoints (on a multi-node cluster: shared by every node)
    cpus_per_trial: Positive = 1.0
    gpus_per_trial: Annotated[float, Field(ge=0.0)] = 0.0
    device: Device = "auto"
    max_failures: Count = 2
    synch: bool = True
    quantile_fraction: Annotated[float, Field(gt=0.0, le=0.5)] = 0.25
    resample_probability: Annotated[float, Field(ge=0.0, le=1.0)] = 0.25
    space: dict[str, SearchRange] = {}
    runs: dict[Name, TuneRun] = {}  # the runs of metatrain.runs to search (none: no search)
