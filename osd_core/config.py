"""Compression parameters: declared once, with the help users read, and validated at construction."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

from .budget import VALUE_BITS, Encoding
from .errors import ConfigError
from .settings import setting

METHODS = ("truncsvd", "magtruncsvd", "impart", "deltacome", "sparse", "dare", "bitdelta", "osd")
ENTRYWISE_METHODS = ("sparse", "dare", "bitdelta")  # entries of the delta itself, no factorisation
SIGMA_PLACEMENTS = ("sqrt", "u", "v")
FACTOR_SPLITS = ("equal", "joint")
GRADIENT_POINTS = ("finetuned", "reconstruction", "path")
IMPORTANCES = ("taylor", "damage")
METRICS = ("frobenius", "activation", "fisher", "kfac")
VALUE_DTYPES = {"float32": 32, "float16": 16, "bfloat16": 16, "int8": 8, "int4": 4}
SCALED_DTYPES = ("int8", "int4")  # integer values with a float32 scale per column
POSITIONS = ("index", "bitmap", "auto")
# tensors stored whole: 1-D deltas (biases, norms), heads too small to factor
DENSE_DTYPES = ("float16", "int8", "int4")
SVD_METHODS = ("auto", "exact", "randomized")
# Choices a command line offers without importing torch (``osd_core.allocate``, ``osd_core.adapters``).
# Across layers: the paper's split; or measured and spent globally over the factorised matrices, or
# over every delta tensor, the 1-D ones (biases, norms) included (``osd_core.allocate``).
ALLOCATIONS = ("uniform", "global", "global-all")
GLOBAL_ALLOCATIONS = ("global", "global-all")
ADAPTER_PROFILES = ("peft", "vllm")
ADAPTER_DTYPES = ("float16", "bfloat16", "float32")
# Calibration rows per forward pass. Only memory depends on it (rows weigh the same in any batch):
# SmolLM2-135M at 64 tokens takes about 160 MiB a row (peak 5,134 MiB at 16 rows, 2,841 at 2).
CALIBRATION_BATCH = 4
# Catalog VACUUM keeps files a compaction replaced this many hours, so a reader that opened the table
# just before can still finish. Delta's own default is a week, for time travel, which the catalog does not use.
VACUUM_RETAIN_HOURS = 1
SEED_LIMIT = 2**63  # torch.Generator.manual_seed takes any int64 >= 0


@dataclass(frozen=True)
class CompressionConfig:
    """How to compress every compressible matrix of one model.

    ``rank`` (r) fixes the per-layer budget ``32·r·(n+d)`` bits; the relaxed methods factor at
    ``k = ⌈rank⌉ + c`` and sparsify (``c``: ``extra_rank``, or by default the rank dense factors of
    the value width would fill). ``truncsvd`` needs a whole rank; the relaxed methods also take a
    fraction (``0.5``: half a rank-1 budget), since their factors need not be whole. The
    documented-but-inferred choices of the method (docs/method.md) are parameters so the quality
    benchmark can settle them by measurement:

    - ``sigma``: where singular values go (``"sqrt"`` on both sides, into ``"u"`` or ``"v"``).
      Taylor scores do not depend on it; magnitude scores do.
    - ``factor_split``: ``"equal"`` density in both factors, or ``"joint"`` ranking of both factors'
      scores under one budget (within a layer; across layers is the compression's ``allocation``).
    - ``gradient_at``: gradients taken at the fine-tuned weights, at the rank-k reconstruction, or
      averaged along the path from base to fine-tune (integrated gradients).
    - ``importance`` (osd): ``"taylor"``, the paper's first-order score ``|U ⊙ G·V|``; or
      ``"damage"``, the increase in calibration-weighted output error from zeroing each entry
      (an Optimal-Brain-Damage reading with the input second moment as curvature).
    - ``metric``: the output-error metric that damage scores, whitening and refits minimise:
      ``"frobenius"``, ``"activation"`` (input second moment), ``"fisher"`` (output-side Fisher
      diagonal, as Fisher-weighted SVD) or ``"kfac"`` (both).
    - ``whiten``: factor the delta in that metric instead of plain Frobenius.
    - ``refit``: rounds of alternating least squares on the kept values after masking.
    - ``value_dtype``: width of stored values. The paper counts 32-bit values; 16-bit floats, or
      8- or 4-bit integers with a 32-bit scale per singular vector (``"int8"``, ``"int4"``), buy
      more entries under the same budget (beyond the paper; measured, see README).
    - ``positions``: kept entries located by flat ``"index"`` (the paper), by a ``"bitmap"`` of
      the factor, or ``"auto"``: per layer, whichever keeps more entries within the budget.
    - ``dense_dtype``: width of the deltas stored whole (biases, norms, small heads), which the
      budget does not count but the bytes do: at small r they are a third of a MiniLM delta.
    """

    # The defaults are what measured best per byte on validation splits (README, "Results"):
    # magnitude masks of a rank-8r factorisation, int4 values, positions by bitmap or index, and
    # int4 deltas where stored whole (on three MiniLM fine-tunes' validation splits, at or above int8
    # values and int8 whole deltas at equal bytes from r = 0.25 to 4, within 0.3 points at 16).
    # "osd" with float32 values and indices is the paper's method as we read it, measured beside it.
    # Each field's help is the flag's help (osd_cli.settings); the fleet file's [sweep.compression]
    # table and the flows' parameters take the same names.
    method: str = setting("magtruncsvd", "truncsvd, magtruncsvd (magnitude masks), impart (random masks whose "
                          "density follows each singular value, rescaled), deltacome (whole singular vectors at 8, 4 or 2 "
                          "bits, more for larger ones), sparse (largest delta "
                          "entries), dare (random delta entries, rescaled), bitdelta (the sign of every entry and "
                          "one scale: 1 bit per entry, whatever the rank), or osd (the paper's Taylor-importance "
                          "masks, needs calibration)", METHODS)
    rank: int | float = setting(1, "budget rank r: 32·r·(n+d) bits per layer; the relaxed methods take "
                                "fractions (0.5)")
    extra_rank: int | None = setting(None, "c: factor at k = ⌈r⌉ + c (default: what dense factors of the "
                                     "value width fill, k = 8r for int4, 4r for int8, 2r for 16-bit)")
    sigma: str = setting("sqrt", "where singular values go: sqrt on both factors, into u, or into v",
                         SIGMA_PLACEMENTS)
    factor_split: str = setting("equal", "within a layer: equal density in both factors, or joint ranking of "
                                "both factors' scores (osd)", FACTOR_SPLITS)
    gradient_at: str = setting("finetuned", "where osd takes its gradients: at the fine-tune, at the rank-k "
                               "reconstruction, or along the path from base to fine-tune", GRADIENT_POINTS)
    importance: str = setting("taylor", "osd entry score: the paper's Taylor score, or the output-error "
                              "damage of zeroing the entry", IMPORTANCES)
    metric: str = setting("fisher", "output-error metric from calibration (damage, whitening, refit)", METRICS)
    whiten: bool = setting(False, "factor the delta in that metric instead of plain Frobenius")
    refit: int = setting(0, "rounds of least-squares refit of the kept values after masking")
    value_dtype: str = setting("int4", "stored value width (the paper counts float32; int8 and int4 add a 32-bit "
                               "scale per singular vector; truncsvd, which defines the budget, stays float32)",
                               tuple(VALUE_DTYPES))
    positions: str = setting("auto", "how kept entries are located: flat index (the paper), a bitmap of "
                             "the factor, or auto: per layer, whichever keeps more", POSITIONS)
    dense_dtype: str = setting("int4", "width of deltas stored whole (biases, norms, heads too small to "
                               "factor): int8 or int4 with one float32 scale per tensor, or float16",
                               DENSE_DTYPES)
    svd: str = setting("auto", "exact, randomized, or auto (randomized where it is faster)", SVD_METHODS)
    power_iters: int = setting(4, "power iterations of the randomized SVD")
    seed: int = setting(0, "seed of the randomized SVD (0 to 2**63 - 1)")
    compress_embeddings: bool = setting(True, "factor embedding deltas too (else stored dense)")

    def __post_init__(self) -> None:
        _choice("method", self.method, METHODS)
        _choice("sigma", self.sigma, SIGMA_PLACEMENTS)
        _choice("factor_split", self.factor_split, FACTOR_SPLITS)
        _choice("gradient_at", self.gradient_at, GRADIENT_POINTS)
        _choice("svd", self.svd, SVD_METHODS)
        _choice("importance", self.importance, IMPORTANCES)
        _choice("metric", self.metric, METRICS)
        _choice("value_dtype", self.value_dtype, tuple(VALUE_DTYPES))
        _choice("positions", self.positions, POSITIONS)
        _choice("dense_dtype", self.dense_dtype, DENSE_DTYPES)
        if not isinstance(self.refit, int) or self.refit < 0:
            raise ConfigError(f"refit must be an integer >= 0, got {self.refit!r}")
        if isinstance(self.rank, bool) or not isinstance(self.rank, (int, float)) or not self.rank > 0 \
                or not math.isfinite(self.rank):
            raise ConfigError(f"rank must be a number > 0, got {self.rank!r}")
        if isinstance(self.rank, float) and self.rank.is_integer():
            object.__setattr__(self, "rank", int(self.rank))  # 2.0 is rank 2: one spelling per budget
        if self.method == "truncsvd" and not isinstance(self.rank, int):
            raise ConfigError(f"method 'truncsvd' keeps whole singular vectors: rank must be an integer, "
                              f"got {self.rank!r} (fractional budgets need a relaxed method)")
        if self.extra_rank is not None and (not isinstance(self.extra_rank, int) or self.extra_rank < 0):
            raise ConfigError(f"extra_rank must be an integer >= 0 (or None: fill the budget), got {self.extra_rank!r}")
        if isinstance(self.power_iters, bool) or not isinstance(self.power_iters, int) or self.power_iters < 0:
            raise ConfigError(f"power_iters must be an integer >= 0, got {self.power_iters!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or not 0 <= self.seed < SEED_LIMIT:
            raise ConfigError(f"seed must be an integer from 0 to 2**63 - 1 (a torch generator seed), "
                              f"got {self.seed!r}")
        for flag in ("whiten", "compress_embeddings"):
            if not isinstance(getattr(self, flag), bool):
                raise ConfigError(f"{flag} must be true or false, got {getattr(self, flag)!r}")
        if self.method == "deltacome" and (self.extra_rank is not None or self.whiten or self.refit):
            raise ConfigError("method 'deltacome' chooses its own vectors and keeps them whole: extra_rank, whiten "
                              "and refit do not apply to it")
        if self.factor_split == "joint" and self.method != "osd":
            raise ConfigError("factor_split='joint' needs commensurate scores: only method 'osd' has them")

    @property
    def c(self) -> int | float:
        """The extra rank ``k - r`` (fractional when ``r`` is; rounded so names read 0.3, not 0.30000000000000004)."""
        c = round(self.k - self.rank, 9)
        return int(c) if float(c).is_integer() else c

    @property
    def k(self) -> int:
        """The factorisation rank: ``r`` for truncsvd; for the relaxed methods ``⌈r⌉ + extra_rank``,
        or by default the rank dense factors of the stored value width would fill: ``r·32/bits``
        (8r for int4, 4r for int8, 2r for 16-bit), and ``⌊r⌋ + 1`` for float32; at least 1. For
        deltacome, the most singular vectors it may keep (16r, all at 2 bits); each layer's
        record says how many it kept."""
        if self.method == "truncsvd":
            return int(self.rank)
        if self.method == "deltacome":  # the most vectors it may keep: all at 2 bits, 16r
            return max(1, math.floor(self.rank * VALUE_BITS / 2 + 0.5))
        if self.extra_rank is not None:
            return math.ceil(self.rank) + self.extra_rank
        if self.value_bits == VALUE_BITS:
            return math.floor(self.rank) + 1
        return max(1, math.floor(self.rank * VALUE_BITS / self.value_bits + 0.5))  # halves round up

    @property
    def stored_dtype(self) -> str:
        """The value type written: ``value_dtype``, except float32 for truncsvd, which defines the
        budget as dense float32 factors (narrower values would leave most of it unspent)."""
        return "float32" if self.method == "truncsvd" else self.value_dtype

    @property
    def value_bits(self) -> int:
        return VALUE_DTYPES[self.stored_dtype]

    @property
    def encodings(self) -> tuple[Encoding, ...]:
        """The bit encodings a layer may use: one, or both position encodings under ``"auto"``."""
        scale = 32 if self.stored_dtype in SCALED_DTYPES else 0
        positions = "index" if self.method == "truncsvd" else self.positions
        kinds = ("index", "bitmap") if positions == "auto" else (positions,)
        return tuple(Encoding(self.value_bits, kind, scale) for kind in kinds)

    @property
    def factorises(self) -> bool:
        """Whether deltas are factorised (rank k) rather than sparsified entry by entry."""
        return self.method not in ENTRYWISE_METHODS

    @property
    def needs_gradients(self) -> bool:
        """Whether a calibration pass is needed (gradients and output-error weights)."""
        return self.method == "osd"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _choice(field: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ConfigError(f"{field} must be one of {', '.join(allowed)}; got {value!r}")
