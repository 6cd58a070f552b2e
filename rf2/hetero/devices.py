"""Device profiles: what hardware and network each device tier has, as plain data.

A profile (``device_profiles/<name>.yaml``) lists tiers ordered from slowest to fastest.
Each tier gives its share of the population and *distributions* of per-device speeds,
so a population can draw one device per user (system heterogeneity within a tier as
well as between tiers). Profiles are data, never code: they are validated here into
frozen dataclasses, and every invalid value is reported as one :class:`ProfileError`
naming the field, so a typo in a sweep fails before any compute starts.
"""

from __future__ import annotations

import importlib.resources
import re
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal

import numpy as np
import yaml

from rf2.core.errors import ConfigError, ProfileError
from rf2.core.typed import check, from_dict

DistributionKind = Literal["constant", "lognormal", "normal"]

_PARAMS: dict[str, tuple[str, ...]] = {
    "constant": ("value",),
    "lognormal": ("median", "sigma"),
    "normal": ("mean", "std"),
}
_TIER_NAME = re.compile(r"^[A-Za-z0-9_.-]+$")
_PACKAGE = "rf2.device_profiles"


@dataclass(frozen=True)
class Distribution:
    """A positive random quantity (a speed, a time per example).

    ``constant``: always ``value``. ``lognormal``: ``median * exp(sigma * N(0, 1))`` —
    the natural model for speeds spread over orders of magnitude (AI-Benchmark scores
    span 212..76206). ``normal``: ``N(mean, std)`` truncated to > 0 by redrawing, as
    FLASH does for per-batch times and network speeds.
    """

    kind: DistributionKind = "constant"
    value: float | None = None
    median: float | None = None
    sigma: float | None = None
    mean: float | None = None
    std: float | None = None

    def validate(self, path: str = "") -> None:
        used = _PARAMS[self.kind]
        for name in ("value", "median", "sigma", "mean", "std"):
            val = getattr(self, name)
            if name in used:
                check(val is not None, f"{path}.{name}", val,
                      f"a number (required by kind {self.kind!r})")
            else:
                check(val is None, f"{path}.{name}", val,
                      f"unset for kind {self.kind!r}, which takes {', '.join(used)}")
        for name in ("value", "median", "mean"):
            val = getattr(self, name)
            check(val is None or val > 0, f"{path}.{name}", val, "a number > 0")
        for name in ("sigma", "std"):
            val = getattr(self, name)
            check(val is None or val >= 0, f"{path}.{name}", val, "a number >= 0")

    def sample(self, rng: np.random.Generator, size: int) -> np.ndarray:
        """(size,) float64 draws, all > 0."""
        if self.kind == "constant":
            return np.full(size, float(self.value or 0.0))
        if self.kind == "lognormal":
            return float(self.median or 0.0) * np.exp(float(self.sigma or 0.0)
                                                      * rng.standard_normal(size))
        mean, std = float(self.mean or 0.0), float(self.std or 0.0)
        out = rng.normal(mean, std, size)
        for _ in range(100):  # redraw non-positive values (rare unless std >> mean)
            bad = out <= 0
            if not bad.any():
                return out
            out[bad] = rng.normal(mean, std, int(bad.sum()))
        out[out <= 0] = mean  # pathological std: fall back to the mean, never <= 0
        return out

    def center(self) -> float:
        """The typical value (constant, median or mean), for summaries."""
        return float(self.value or self.median or self.mean or 0.0)


@dataclass(frozen=True)
class TierSpec:
    """One device class. Speeds are per-device distributions (drawn once per user).

    ``availability`` is the probability a device is online in a round: iid per round
    when ``availability_period`` is null, else an on/off pattern online for
    ``round(availability * period)`` consecutive rounds of every ``period`` with a
    per-device random phase (diurnal charging/idle windows, as in FedScale/FLASH traces).
    ``dropout`` is the probability a device that started a round fails mid-round.
    The jitters are per-round multiplicative lognormal noise on the device's own speed
    (FLASH redraws per-batch times and each transfer's bandwidth every round).
    """

    name: str
    share: float
    compute_ms_per_example: Distribution
    download_mbps: Distribution
    upload_mbps: Distribution
    availability: float = 1.0
    availability_period: int | None = None
    dropout: float = 0.0
    compute_jitter_sigma: float = 0.0
    network_jitter_sigma: float = 0.0

    def validate(self, path: str = "") -> None:
        check(bool(_TIER_NAME.match(self.name)), f"{path}.name", self.name,
              "a non-empty name of letters, digits, '_', '.', '-' (used in metric keys)")
        for name in ("share", "availability", "dropout"):
            val = getattr(self, name)
            check(0.0 <= val <= 1.0, f"{path}.{name}", val, "a probability in [0, 1]")
        check(self.availability_period is None or self.availability_period >= 1,
              f"{path}.availability_period", self.availability_period,
              "null (iid per round) or an integer >= 1")
        for name in ("compute_jitter_sigma", "network_jitter_sigma"):
            val = getattr(self, name)
            check(val >= 0, f"{path}.{name}", val, "a number >= 0")


@dataclass(frozen=True)
class DeviceProfile:
    """Tiers ordered slowest first (population modes map low activity to tier 0)."""

    tiers: tuple[TierSpec, ...]
    name: str = ""
    description: str = ""

    def validate(self, path: str = "") -> None:
        check(len(self.tiers) > 0, "tiers", [], "a non-empty list of tiers")
        names = [t.name for t in self.tiers]
        dup = sorted({n for n in names if names.count(n) > 1})
        check(not dup, "tiers[*].name", dup, "unique tier names")
        shares = [t.share for t in self.tiers]
        check(abs(sum(shares) - 1.0) <= 1e-6, "tiers[*].share", shares,
              f"shares summing to 1 (within 1e-6); they sum to {sum(shares):.9g}")

    @property
    def tier_names(self) -> tuple[str, ...]:
        return tuple(t.name for t in self.tiers)

    @property
    def shares(self) -> np.ndarray:  # (T,)
        return np.array([t.share for t in self.tiers], dtype=np.float64)


def _shorthand(data: Any) -> Any:
    """Let a bare number stand for ``{kind: constant, value: number}`` in tier speeds."""
    if not isinstance(data, dict) or not isinstance(data.get("tiers"), list):
        return data
    tiers = []
    for tier in data["tiers"]:
        if isinstance(tier, dict):
            tier = dict(tier)
            for key in ("compute_ms_per_example", "download_mbps", "upload_mbps"):
                val = tier.get(key)
                if isinstance(val, (int, float)) and not isinstance(val, bool):
                    tier[key] = {"kind": "constant", "value": val}
        tiers.append(tier)
    return {**data, "tiers": tiers}


def profile_from_dict(data: Any, name: str) -> DeviceProfile:
    """Validate a parsed profile mapping; ``name`` labels errors and fills a missing name."""
    try:
        profile = from_dict(DeviceProfile, _shorthand(data))
    except ConfigError as err:
        raise ProfileError(name, err.field, err.value, err.allowed) from None
    return profile if profile.name else replace(profile, name=name)


def _shipped_dir() -> Any:
    """The packaged profiles; falls back to the source tree when rf2 is not installed."""
    try:
        return importlib.resources.files(_PACKAGE)
    except ModuleNotFoundError:
        return Path(__file__).resolve().parent.parent / "device_profiles"


def list_profiles() -> list[str]:
    """Names of the shipped profiles (``device_profiles/*.yaml``), sorted."""
    return sorted(p.name[:-5] for p in _shipped_dir().iterdir() if p.name.endswith(".yaml"))


def load_profile(name_or_path: str) -> DeviceProfile:
    """Load a shipped profile by name, or any profile YAML by filesystem path."""
    looks_like_path = name_or_path.endswith((".yaml", ".yml")) or "/" in name_or_path
    if looks_like_path:
        path = Path(name_or_path)
        if not path.is_file():
            raise ProfileError(name_or_path, "path", name_or_path, "an existing YAML file")
        label = path.stem
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError as err:
            line = path.read_bytes()[: err.start].count(b"\n") + 1
            raise ProfileError(f"{name_or_path}:{line}", "encoding",
                               f"byte 0x{err.object[err.start]:02x}",
                               "UTF-8 text (save the file as UTF-8)") from None
        except OSError as err:
            raise ProfileError(name_or_path, "path", name_or_path,
                               f"a readable YAML file ({err.strerror or err})") from None
    else:
        res = _shipped_dir() / f"{name_or_path}.yaml"
        if not res.is_file():
            raise ProfileError(name_or_path, "profile", name_or_path,
                               f"one of the shipped profiles {list_profiles()} "
                               "or a path to a YAML file")
        text, label = res.read_text(encoding="utf-8"), name_or_path
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f"{name_or_path}:{mark.line + 1}" if mark is not None else name_or_path
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise ProfileError(where, "yaml", problem, "valid YAML") from None
    return profile_from_dict(data, label)
